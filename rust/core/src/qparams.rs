//! EXL2 QParams. (Being written.)
use thiserror::Error;

#[derive(Debug, Error)]
pub enum QParamsError {
    #[error("{0}")]
    Invalid(String),
}
