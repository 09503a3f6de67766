//! exl2rs-core: the pure-Rust engine of exl2rs (no PyO3).
//!
//! - [`qparams`]: EXL2 quantization configs, their exact bit cost, the default candidate tables.
//! - [`alloc`]: the allocation problem (multiple-choice knapsack), pruning and solvers.
//! - [`buffers`]: a bounded pool of recycled, already-faulted memory for large results.
//! - [`pack`]: EXL2 and GPTQ-v1 bit packing, unpacking and dequantization.
//! - [`measurement`]: exl2rs's native measurement format and exllamav2's `measurement.json`.

pub mod alloc;
pub mod buffers;
pub mod error;
pub mod measurement;
pub mod pack;
pub mod qparams;

pub use error::{Error, Result};
