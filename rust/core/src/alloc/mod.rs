//! The allocation problem and its solvers. (Owned by the allocator work.)
mod problem;
pub use problem::*;
