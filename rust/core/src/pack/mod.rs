//! EXL2 and GPTQ-v1 bit packing. (Owned by the packing work.)
use thiserror::Error;

#[derive(Debug, Error)]
pub enum PackError {
    #[error("{0}")]
    Invalid(String),
}
