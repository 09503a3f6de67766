//! Problem data: items × options with exact integer costs and f64 errors.
//! Initial shared definition; the allocator work may extend it.
use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum AllocError {
    #[error("infeasible target {target}: feasible range is {min} to {max}")]
    Infeasible {
        target: String,
        min: String,
        max: String,
    },
    #[error("invalid problem: {0}")]
    InvalidProblem(String),
}

/// One option of an item: a quantization config with its exact cost and measured error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Opt {
    /// Exact cost in bits of this option (weights, scales, group table, permutation).
    pub bits: u64,
    /// Error of this option (raw; objectives transform it).
    pub error: f64,
    /// Identifier of the config, used to tie fused items to the same config.
    pub config: u32,
}

/// One item: a linear layer (or an exllamav2 module) that must take exactly one option.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    pub name: String,
    /// Number of weights (in_features × out_features) — the bpw denominator.
    pub numel: u64,
    pub options: Vec<Opt>,
    /// Objective weight wᵢ (1.0 by default).
    pub weight: f64,
    pub min_bpw: Option<f64>,
    pub max_bpw: Option<f64>,
    /// Index into `options` this item is pinned to.
    pub pinned: Option<usize>,
    /// Config ids that may not be chosen.
    pub excluded: Vec<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Problem {
    pub items: Vec<Item>,
    /// Fused groups: item indices that must all take the same `config`.
    pub groups: Vec<Vec<usize>>,
}
