//! Frontier: many targets solved in parallel over one prepared (validated, fused, pruned) problem.
use std::sync::atomic::AtomicBool;

use rayon::prelude::*;

use super::{AllocError, Prepared, Solution, SolveConfig, Target};

/// Solve every target in parallel (Rayon). The outer error is a problem error; each point is the
/// target's own result (e.g. `Infeasible` for a target below the smallest reachable size).
pub fn frontier(
    problem: &super::Problem,
    targets: &[Target],
    cfg: &SolveConfig,
    cancel: &AtomicBool,
) -> Result<Vec<Result<Solution, AllocError>>, AllocError> {
    let prep = Prepared::new(problem, cfg.objective)?;
    Ok(frontier_prepared(&prep, targets, cfg, cancel))
}

/// As [`frontier`], over an already prepared problem.
pub fn frontier_prepared(
    prep: &Prepared,
    targets: &[Target],
    cfg: &SolveConfig,
    cancel: &AtomicBool,
) -> Vec<Result<Solution, AllocError>> {
    targets
        .par_iter()
        .map(|&t| prep.solve(t, cfg.solver, &cfg.anneal, cancel))
        .collect()
}
