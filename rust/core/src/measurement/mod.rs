//! Measurement files. (Owned by the measurement-format work.)
use thiserror::Error;

#[derive(Debug, Error)]
pub enum MeasurementError {
    #[error("{0}")]
    Invalid(String),
}
