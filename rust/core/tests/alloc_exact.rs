//! Property tests: every solver respects budget and constraints; `exact` (and `minimax` for the
//! minimax objective) equals brute force; greedy/lagrangian never beat exact and their bounds
//! are valid; feasibility errors agree with brute force.
#[path = "alloc_common.rs"]
mod common;

use common::{brute_force, close, random_problem, respects_constraints, Gen};
use exl2rs_core::alloc::{
    solve, AllocError, AnnealParams, Objective, SolveConfig, SolverKind, Target,
};
use proptest::prelude::*;

const OBJECTIVES: [Objective; 4] = [
    Objective::Sum,
    Objective::Weighted,
    Objective::Norm(2.5),
    Objective::Minimax,
];

fn tiny_anneal() -> AnnealParams {
    AnnealParams {
        iterations: 20,
        samples: 2,
        temp_min: 0.5,
        ..AnnealParams::default()
    }
}

fn check(seed: u64) {
    let p = random_problem(seed, 6, 4);
    let mut g = Gen(seed ^ 0xABCD);
    let max: u64 = p
        .items
        .iter()
        .map(|it| it.options.iter().map(|o| o.bits).max().unwrap())
        .sum();
    let budget = g.below(max + 2);
    let target = Target::Bits(budget);
    for obj in OBJECTIVES {
        let brute = brute_force(&p, budget, obj);
        let exact = solve(&p, target, &SolveConfig::new(obj, SolverKind::Exact));
        let sol = match (&exact, brute.any_valid, brute.best) {
            (Err(AllocError::InvalidProblem(_)), false, _) => return,
            (Err(AllocError::Infeasible { .. }), true, None) => {
                assert!(brute.min_cost.unwrap() > budget);
                continue;
            }
            (Ok(s), true, Some(best)) => {
                assert!(
                    close(s.objective, best),
                    "seed {seed} {obj:?}: exact {} vs brute {best}",
                    s.objective
                );
                assert!(s.optimal && s.gap == Some(0.0));
                s.clone()
            }
            other => panic!("seed {seed} {obj:?}: exact/brute disagree: {other:?} {p:?}"),
        };
        assert!(
            sol.cost_bits <= budget && respects_constraints(&p, &sol.choices),
            "seed {seed}"
        );
        let solvers: &[SolverKind] = if obj == Objective::Minimax {
            &[SolverKind::Minimax, SolverKind::Anneal]
        } else {
            &[
                SolverKind::Greedy,
                SolverKind::Lagrangian,
                SolverKind::Anneal,
                SolverKind::Minimax,
            ]
        };
        for &kind in solvers {
            let cfg = SolveConfig {
                anneal: tiny_anneal(),
                ..SolveConfig::new(obj, kind)
            };
            let s = solve(&p, target, &cfg).unwrap_or_else(|e| panic!("seed {seed} {kind:?}: {e}"));
            assert!(s.cost_bits <= budget, "seed {seed} {kind:?} over budget");
            assert!(
                respects_constraints(&p, &s.choices),
                "seed {seed} {kind:?} constraints"
            );
            assert!(close(s.objective, obj.evaluate(&p, &s.choices)));
            assert!(
                s.objective >= sol.objective - 1e-9 * (1.0 + sol.objective.abs()),
                "seed {seed} {kind:?} beat exact"
            );
            if let Some(lb) = s.lower_bound {
                assert!(
                    lb <= sol.objective + 1e-9 * (1.0 + sol.objective.abs()),
                    "seed {seed} {kind:?} bound {lb} > opt {}",
                    sol.objective
                );
            }
            if kind == SolverKind::Minimax && obj == Objective::Minimax {
                assert!(close(s.objective, sol.objective));
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn exact_matches_brute_force(seed in any::<u64>()) {
        check(seed);
    }
}

/// Larger instances (beyond brute force): exact is never beaten by the heuristics and its cost
/// stays in budget; the greedy bound never exceeds exact.
#[test]
fn exact_dominates_heuristics_on_medium_instances() {
    for seed in 0..300u64 {
        let p = random_problem(seed.wrapping_mul(7919), 40, 8);
        let Ok(prep) = exl2rs_core::alloc::Prepared::new(&p, Objective::Sum) else {
            continue;
        };
        let (lo, hi) = prep.cost_range();
        let budget = lo + (hi - lo) * (seed % 10) / 10;
        let flag = std::sync::atomic::AtomicBool::new(false);
        let ex = prep
            .solve(
                Target::Bits(budget),
                SolverKind::Exact,
                &tiny_anneal(),
                &flag,
            )
            .unwrap();
        assert!(ex.cost_bits <= budget);
        for kind in [SolverKind::Greedy, SolverKind::Lagrangian] {
            let s = prep
                .solve(Target::Bits(budget), kind, &tiny_anneal(), &flag)
                .unwrap();
            assert!(s.cost_bits <= budget);
            assert!(s.objective >= ex.objective - 1e-9 * (1.0 + ex.objective));
            assert!(s.lower_bound.unwrap() <= ex.objective + 1e-9 * (1.0 + ex.objective));
        }
    }
}

/// Independent check beyond brute-force sizes: a dense DP over every integer cost (possible only
/// because these costs are small) must agree with `exact` on 40-item instances.
#[test]
fn exact_matches_dense_cost_dp_on_larger_instances() {
    for seed in 0..200u64 {
        let mut p = random_problem(seed.wrapping_mul(104_729) + 11, 40, 8);
        p.groups.clear();
        let Ok(prep) = exl2rs_core::alloc::Prepared::new(&p, Objective::Weighted) else {
            continue;
        };
        let (lo, hi) = prep.cost_range();
        let budget = lo + (hi - lo) * (seed % 7 + 1) / 8;
        // dp[c] = least Σ w·e over the items so far at total cost exactly c.
        let mut dp = vec![f64::INFINITY; budget as usize + 1];
        dp[0] = 0.0;
        for it in &p.items {
            let mut next = vec![f64::INFINITY; dp.len()];
            for (c, &v) in dp.iter().enumerate() {
                if v.is_finite() {
                    for (k, o) in it.options.iter().enumerate() {
                        let nc = c + o.bits as usize;
                        if common::allowed(it, k) && nc < next.len() {
                            next[nc] = next[nc].min(v + it.weight * o.error);
                        }
                    }
                }
            }
            dp = next;
        }
        let best = dp.iter().cloned().fold(f64::INFINITY, f64::min);
        let flag = std::sync::atomic::AtomicBool::new(false);
        let s = prep
            .solve(
                Target::Bits(budget),
                SolverKind::Exact,
                &tiny_anneal(),
                &flag,
            )
            .unwrap();
        assert!(
            close(s.objective, best),
            "seed {seed}: exact {} vs dense DP {best}",
            s.objective
        );
    }
}
