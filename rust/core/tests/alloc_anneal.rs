//! EXL2's annealer: the optimised parallel driver equals the straightforward one, is
//! deterministic across thread counts and seeds, respects the budget, and can be cancelled.
#[path = "alloc_common.rs"]
mod common;

use std::sync::atomic::AtomicBool;

use exl2rs_core::alloc::{
    anneal_reference, anneal_slots, frontier, solve, AllocError, AnnealParams, Objective,
    SolveConfig, SolverKind, Target,
};

fn params(seed: u64) -> AnnealParams {
    AnnealParams {
        iterations: 50,
        samples: 6,
        temp_min: 0.05,
        seed,
        ..AnnealParams::default()
    }
}

fn slots(seed: u64) -> Vec<Vec<(u64, f64)>> {
    let mut g = common::Gen(seed);
    (0..12)
        .map(|_| {
            let mut v: Vec<(u64, f64)> = (0..5)
                .map(|_| (10 + g.below(90), 0.001 + g.unit() * 0.05))
                .collect();
            v.sort_by_key(|o| o.0);
            v
        })
        .collect()
}

#[test]
fn optimised_equals_reference_and_respects_budget() {
    let flag = AtomicBool::new(false);
    for seed in 0..20 {
        let s = slots(seed);
        let min: u64 = s.iter().map(|o| o[0].0).sum();
        let budget = min + 150;
        let fast = anneal_slots(&s, budget, &params(seed), &flag).unwrap();
        let reference = anneal_reference(&s, budget, &params(seed)).unwrap();
        assert_eq!(fast, reference, "seed {seed}");
        let cost: u64 = s
            .iter()
            .zip(&fast.choice)
            .map(|(o, &k)| o[k as usize].0)
            .sum();
        assert_eq!(cost, fast.cost);
        assert!(cost <= budget);
        assert!(fast.norm >= 1.5 - 0.075 && fast.norm <= 3.5 + 0.08);
        // EXL2's default schedule: 1975 temperature steps of 1000 proposals.
        assert_eq!(AnnealParams::default().outer_steps(), 1975);
    }
}

#[test]
fn results_do_not_depend_on_thread_count() {
    let s = slots(99);
    let budget = s.iter().map(|o| o[0].0).sum::<u64>() + 200;
    let flag = AtomicBool::new(false);
    let run = |n| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap()
            .install(|| anneal_slots(&s, budget, &params(5), &flag).unwrap())
    };
    assert_eq!(run(1), run(3));
    let other_seed = anneal_slots(&s, budget, &params(6), &flag).unwrap();
    assert!(other_seed.choice.len() == s.len());
}

#[test]
fn cancellation_stops_anneal_and_exact() {
    let flag = AtomicBool::new(true);
    let s = slots(1);
    let budget = s.iter().map(|o| o[0].0).sum::<u64>() + 100;
    assert_eq!(
        anneal_slots(&s, budget, &params(0), &flag),
        Err(AllocError::Cancelled)
    );
    let p = common::random_problem(3, 6, 4);
    let cfg = SolveConfig::new(Objective::Sum, SolverKind::Exact);
    if let Ok(points) = frontier(&p, &[Target::Bpw(4.0)], &cfg, &flag) {
        assert!(points.iter().all(|r| matches!(
            r,
            Err(AllocError::Cancelled) | Err(AllocError::Infeasible { .. })
        )));
    }
}

#[test]
fn frontier_matches_single_solves_and_is_monotone() {
    let flag = AtomicBool::new(false);
    for seed in 0..30u64 {
        let p = common::random_problem(seed * 31 + 7, 12, 6);
        let cfg = SolveConfig::new(Objective::Weighted, SolverKind::Exact);
        let Ok(points) = frontier(
            &p,
            &(0..40)
                .map(|i| Target::Bpw(0.5 + 0.2 * i as f64))
                .collect::<Vec<_>>(),
            &cfg,
            &flag,
        ) else {
            continue;
        };
        let mut last = f64::INFINITY;
        for (i, r) in points.iter().enumerate() {
            let single = solve(&p, Target::Bpw(0.5 + 0.2 * i as f64), &cfg);
            match (r, single) {
                (Ok(a), Ok(b)) => {
                    assert_eq!(a.objective, b.objective);
                    assert!(a.objective <= last + 1e-12);
                    last = a.objective;
                }
                (Err(AllocError::Infeasible { .. }), Err(AllocError::Infeasible { .. })) => {}
                other => panic!("seed {seed} point {i}: {other:?}"),
            }
        }
    }
}
