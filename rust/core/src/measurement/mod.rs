//! Measurement files: exl2rs's native format and exllamav2's `measurement.json`.
//!
//! - [`native`]: the native file (per-linear raw errors for every candidate, module rows),
//!   validated on load and written atomically.
//! - [`problem`]: native measurement → allocation [`Problem`](crate::alloc::Problem).
//! - [`exl2`]: exllamav2's `measurement.json` (read, write, to problem).
//! - [`shapes`]: the matrix shapes an exllamav2 file lacks, verified against its bit counts.
//! - [`strategy`]: exllamav2's `job["strategy"]` from an allocation.
//! - [`job`]: hand a strategy to exllamav2's converter through `job_new.json`.
//! - [`hash`]: stable content hashes for the file keys.
mod error;
pub mod exl2;
pub mod hash;
mod io;
pub mod job;
pub mod native;
pub mod problem;
pub mod shapes;
pub mod strategy;

pub use error::{MeasurementError, Result};
pub use exl2::{Exl2Measurement, Exl2Module, Exl2Row};
pub use job::{inject_strategy, Exl2Job};
pub use native::{
    CalibrationInfo, LinearOption, LinearRecord, MeasurementKeys, ModelInfo, ModuleRecord,
    ModuleRow, NativeMeasurement, FORMAT_TAG, FORMAT_VERSION,
};
pub use problem::{ErrorScale, LinearProblemOptions};
pub use shapes::{Exl2Shapes, LinearShape, LlamaDims, ModuleShape};
pub use strategy::{Strategy, StrategyEntry};
