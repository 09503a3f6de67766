//! The crate-wide error type. Each module owns a specific error enum; this one wraps them so
//! the bindings map one type to the Python exception hierarchy.
use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Alloc(#[from] crate::alloc::AllocError),
    #[error(transparent)]
    Pack(#[from] crate::pack::PackError),
    #[error(transparent)]
    Measurement(#[from] crate::measurement::MeasurementError),
    #[error(transparent)]
    QParams(#[from] crate::qparams::QParamsError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
