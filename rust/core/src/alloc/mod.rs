//! The allocation problem and its solvers: a multiple-choice knapsack of items × options (exact
//! integer bit costs, f64 errors) with fused groups, pins, exclusions and per-item bpw limits.
//!
//! - [`solve`] / [`Prepared::solve`]: one target with one solver ([`SolverKind`]).
//! - [`frontier`]: many targets in parallel, sharing one prepared problem.
//! - [`pareto_front`], [`lower_hull`]: the pruning primitives.
mod anneal;
mod exact;
mod frontier;
mod greedy;
mod lagrangian;
mod mckp;
mod minimax;
mod prepared;
mod problem;
mod prune;

use std::sync::atomic::AtomicBool;

pub use anneal::{anneal_reference, anneal_slots, AnnealParams, AnnealResult};
pub use frontier::{frontier, frontier_prepared};
pub use prepared::Prepared;
pub use problem::*;
pub use prune::{hull_of_front, lower_hull, pareto_front};

/// Objective, solver and annealing parameters of a solve.
#[derive(Debug, Clone, PartialEq)]
pub struct SolveConfig {
    pub objective: Objective,
    pub solver: SolverKind,
    pub anneal: AnnealParams,
}

impl Default for SolveConfig {
    fn default() -> Self {
        SolveConfig {
            objective: Objective::Sum,
            solver: SolverKind::Exact,
            anneal: AnnealParams::default(),
        }
    }
}

impl SolveConfig {
    pub fn new(objective: Objective, solver: SolverKind) -> Self {
        SolveConfig {
            objective,
            solver,
            ..SolveConfig::default()
        }
    }
}

/// Solve one target. Never exceeds the budget; fails with `Infeasible` (naming the feasible
/// range) before any work when the target is below the smallest reachable size.
pub fn solve(problem: &Problem, target: Target, cfg: &SolveConfig) -> Result<Solution, AllocError> {
    solve_cancellable(problem, target, cfg, &AtomicBool::new(false))
}

/// As [`solve`]; returns `Cancelled` soon after `cancel` is set (checked in long loops).
pub fn solve_cancellable(
    problem: &Problem,
    target: Target,
    cfg: &SolveConfig,
    cancel: &AtomicBool,
) -> Result<Solution, AllocError> {
    Prepared::new(problem, cfg.objective)?.solve(target, cfg.solver, &cfg.anneal, cancel)
}
