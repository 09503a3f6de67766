//! Malformed problems and infeasible targets give the right error, naming item and value.
use exl2rs_core::alloc::{
    solve, AllocError, Item, Objective, Opt, Problem, SolveConfig, SolverKind, Target,
};

fn opt(bits: u64, error: f64, config: u32) -> Opt {
    Opt {
        bits,
        error,
        config,
    }
}

fn ok_problem() -> Problem {
    let opts = || vec![opt(20, 4.0, 0), opt(40, 2.0, 1), opt(80, 1.0, 2)];
    Problem {
        items: vec![
            Item::new("a", 10, opts()),
            Item::new("b", 10, opts()),
            Item::new("c", 10, opts()),
        ],
        groups: vec![],
    }
}

fn invalid(p: &Problem, needles: &[&str]) {
    match solve(p, Target::Bpw(4.0), &SolveConfig::default()) {
        Err(AllocError::InvalidProblem(msg)) => {
            for n in needles {
                assert!(msg.contains(n), "message {msg:?} lacks {n:?}");
            }
        }
        other => panic!("expected InvalidProblem containing {needles:?}, got {other:?}"),
    }
}

#[test]
fn malformed_problems_are_rejected_with_names_and_values() {
    invalid(&Problem::default(), &["no items"]);
    let mut p = ok_problem();
    p.items[1].options.clear();
    invalid(&p, &["item 1", "\"b\"", "no options"]);
    let mut p = ok_problem();
    p.items[2].options[1].error = f64::NAN;
    invalid(&p, &["item 2", "\"c\"", "option 1", "NaN"]);
    let mut p = ok_problem();
    p.items[0].options[0].error = -0.5;
    invalid(&p, &["item 0", "-0.5"]);
    let mut p = ok_problem();
    p.items[1].numel = 0;
    invalid(&p, &["item 1", "numel 0"]);
    let mut p = ok_problem();
    p.groups = vec![vec![0, 7]];
    invalid(&p, &["group 0", "item 7", "3 items"]);
    let mut p = ok_problem();
    p.items[0].pinned = Some(5);
    invalid(&p, &["item 0", "option 5", "3 options"]);
    let mut p = ok_problem();
    p.items[2].excluded = vec![0, 1, 2];
    invalid(&p, &["item 2", "all 3 options are excluded"]);
    let mut p = ok_problem();
    p.items[1].min_bpw = Some(5.0);
    p.items[1].max_bpw = Some(3.0);
    invalid(&p, &["item 1", "min_bpw 5", "max_bpw 3"]);
    let mut p = ok_problem();
    p.items[0].min_bpw = Some(9.0);
    invalid(&p, &["item 0", "excluded"]);
    let mut p = ok_problem();
    p.items[1].options[2].config = 0;
    invalid(&p, &["item 1", "config 0 twice"]);
    let mut p = ok_problem();
    p.items[0].weight = f64::INFINITY;
    invalid(&p, &["item 0", "weight inf"]);
    let mut p = ok_problem();
    p.groups = vec![vec![0, 1], vec![1, 2]];
    invalid(&p, &["item 1", "group 0 and group 1"]);
    let mut p = ok_problem();
    p.items[1].options = vec![opt(30, 1.0, 7)];
    p.groups = vec![vec![0, 1]];
    invalid(
        &p,
        &[
            "fused group",
            "\"a\"",
            "\"b\"",
            "no config allowed for every member",
        ],
    );
    let mut p = ok_problem();
    p.items[0].pinned = Some(2);
    p.items[0].max_bpw = Some(4.0);
    invalid(&p, &["item 0", "pinned to option 2", "8.0000 bpw"]);
}

#[test]
fn infeasible_targets_fail_up_front_with_the_feasible_range() {
    let p = ok_problem(); // 30 weights, 60..=240 bits: 2 to 8 bpw
    for solver in SolverKind::ALL {
        let cfg = SolveConfig::new(Objective::Sum, solver);
        match solve(&p, Target::Bpw(1.5), &cfg) {
            Err(AllocError::Infeasible { min, max, .. }) => {
                assert!(min.starts_with("2.000000 bpw"), "{min}");
                assert!(max.starts_with("8.000000 bpw"), "{max}");
            }
            other => panic!("{solver:?}: expected Infeasible, got {other:?}"),
        }
    }
    let e = solve(
        &p,
        Target::Bytes {
            budget: 10,
            overhead: 3,
        },
        &SolveConfig::default(),
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("feasible range is 11 bytes") && msg.contains("33 bytes"),
        "{msg}"
    );
    assert!(matches!(
        solve(
            &p,
            Target::Bytes {
                budget: 3,
                overhead: 10
            },
            &SolveConfig::default()
        ),
        Err(AllocError::InvalidTarget(_))
    ));
    for bad in [f64::NAN, -1.0, 0.0, f64::INFINITY] {
        assert!(matches!(
            solve(&p, Target::Bpw(bad), &SolveConfig::default()),
            Err(AllocError::InvalidTarget(_))
        ));
    }
    // Pins are charged to the budget: pinning c to 80 bits raises the floor to 120 bits.
    let mut p = ok_problem();
    p.items[2].pinned = Some(2);
    let e = solve(&p, Target::Bits(119), &SolveConfig::default()).unwrap_err();
    assert!(e.to_string().contains("120 bits"), "{e}");
    assert_eq!(
        solve(&p, Target::Bits(120), &SolveConfig::default())
            .unwrap()
            .choices,
        vec![0, 0, 2]
    );
}

#[test]
fn targets_are_exact_and_never_exceeded() {
    let p = ok_problem();
    // Bpw: floor(bpw · 30) bits. 4.0 bpw → 120 bits → best is {40,40,40}=6.0 or {20,20,80}=9.
    let s = solve(&p, Target::Bpw(4.0), &SolveConfig::default()).unwrap();
    assert_eq!((s.cost_bits, s.budget_bits, s.objective), (120, 120, 6.0));
    let s = solve(&p, Target::Bpw(3.99), &SolveConfig::default()).unwrap();
    assert_eq!(s.budget_bits, 119);
    assert!(s.cost_bits <= 119);
    // Bytes: 8·(budget − overhead).
    let s = solve(
        &p,
        Target::Bytes {
            budget: 20,
            overhead: 5,
        },
        &SolveConfig::default(),
    )
    .unwrap();
    assert_eq!(s.budget_bits, 120);
    assert!(s.optimal && s.gap == Some(0.0) && s.lower_bound == Some(s.objective));
}

#[test]
fn minimax_is_refused_by_solvers_that_cannot_optimise_it() {
    for solver in [SolverKind::Greedy, SolverKind::Lagrangian] {
        let e = solve(
            &ok_problem(),
            Target::Bpw(4.0),
            &SolveConfig::new(Objective::Minimax, solver),
        )
        .unwrap_err();
        assert!(e.to_string().contains("minimax"), "{e}");
    }
    let e = solve(
        &ok_problem(),
        Target::Bpw(4.0),
        &SolveConfig::new(Objective::Norm(f64::NAN), SolverKind::Exact),
    )
    .unwrap_err();
    assert!(e.to_string().contains("norm exponent"), "{e}");
}

#[test]
fn problems_round_trip_through_serde_json() {
    let mut p = ok_problem();
    p.groups = vec![vec![0, 1]];
    p.items[2].excluded = vec![1];
    let text = serde_json::to_string(&p).unwrap();
    let back: Problem = serde_json::from_str(&text).unwrap();
    assert_eq!(back, p);
    // Optional fields default when absent (weight 1, no constraints).
    let minimal =
        r#"{"items":[{"name":"x","numel":4,"options":[{"bits":8,"error":1.0,"config":0}]}]}"#;
    let q: Problem = serde_json::from_str(minimal).unwrap();
    assert_eq!(q.items[0].weight, 1.0);
    assert!(q.groups.is_empty());
}
