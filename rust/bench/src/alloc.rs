//! Allocator benchmarks: `alloc` (every solver at every target, gap to exact), `frontier`
//! (a target sweep vs one solve per target) and `anneal` (EXL2's driver, optimised parallel vs
//! the straightforward single-threaded loop, and exact on anneal's own objective).
#[path = "synth.rs"]
mod synth;

use std::sync::atomic::AtomicBool;
use std::time::Instant;

use exl2rs_core::alloc::{
    anneal_reference, anneal_slots, frontier_prepared, solve, AnnealParams, Objective, Prepared,
    Problem, SolveConfig, SolverKind, Target,
};
use serde_json::{json, Value};

const HELP: &str = "\
usage: exl2rs-bench alloc|frontier|anneal [options]
  --model 8b|70b        synthetic Llama-3 shape (default 70b; anneal: 8b)
  --fused               tie q/k/v and gate/up to one config
  --seed S              synthetic problem seed (default 0)
  --problem FILE        read a Problem (serde JSON) instead of generating one
  --targets A:B:STEP    bpw targets (alloc default 2.5:6.0:0.5, frontier 2.0:8.0:0.05,
                        anneal 4.0:4.0:1)
  --solvers LIST        comma list (alloc default exact,greedy,lagrangian,minimax,anneal)
  --objective sum|weighted|norm:P|minimax   (default sum)
  --repeat R            timing repeats, best kept (default 5; anneal 1)
  --samples N           anneal runs per stage (default 80, EXL2's)
  --no-reference        anneal: skip the single-threaded baseline
  --threads N           Rayon threads
  --json OUT            write the results as JSON
  --dump FILE           write the problem (serde JSON, readable by --problem) and exit";

struct Args {
    model: String,
    fused: bool,
    seed: u64,
    problem: Option<String>,
    targets: Option<(f64, f64, f64)>,
    solvers: Vec<SolverKind>,
    objective: Objective,
    repeat: Option<usize>,
    samples: u32,
    reference: bool,
    threads: Option<usize>,
    json: Option<String>,
    dump: Option<String>,
}

fn parse(cmd: &str, a: &[String]) -> Result<Args, String> {
    let mut o = Args {
        model: if cmd == "anneal" {
            "8b".into()
        } else {
            "70b".into()
        },
        fused: false,
        seed: 0,
        problem: None,
        targets: None,
        solvers: vec![
            SolverKind::Exact,
            SolverKind::Greedy,
            SolverKind::Lagrangian,
            SolverKind::Minimax,
            SolverKind::Anneal,
        ],
        objective: Objective::Sum,
        repeat: None,
        samples: 80,
        reference: true,
        threads: None,
        json: None,
        dump: None,
    };
    let mut i = 0;
    let val = |i: &mut usize| -> Result<String, String> {
        *i += 1;
        a.get(*i)
            .cloned()
            .ok_or_else(|| format!("{} needs a value", a[*i - 1]))
    };
    let num = |s: String, what: &str| -> Result<f64, String> {
        s.parse::<f64>()
            .map_err(|_| format!("{what}: expected a number, got {s:?}"))
    };
    while i < a.len() {
        match a[i].as_str() {
            "--help" | "-h" => return Err(HELP.into()),
            "--model" => o.model = val(&mut i)?,
            "--fused" => o.fused = true,
            "--no-reference" => o.reference = false,
            "--seed" => o.seed = num(val(&mut i)?, "--seed")? as u64,
            "--problem" => o.problem = Some(val(&mut i)?),
            "--json" => o.json = Some(val(&mut i)?),
            "--dump" => o.dump = Some(val(&mut i)?),
            "--threads" => o.threads = Some(num(val(&mut i)?, "--threads")? as usize),
            "--repeat" => o.repeat = Some(num(val(&mut i)?, "--repeat")?.max(1.0) as usize),
            "--samples" => o.samples = num(val(&mut i)?, "--samples")? as u32,
            "--targets" => {
                let s = val(&mut i)?;
                let p: Vec<&str> = s.split(':').collect();
                if p.len() != 3 {
                    return Err(format!("--targets: expected A:B:STEP, got {s:?}"));
                }
                o.targets = Some((
                    num(p[0].into(), "--targets")?,
                    num(p[1].into(), "--targets")?,
                    num(p[2].into(), "--targets")?,
                ));
            }
            "--solvers" => {
                o.solvers = val(&mut i)?
                    .split(',')
                    .map(|s| s.parse::<SolverKind>().map_err(|e| e.to_string()))
                    .collect::<Result<_, _>>()?
            }
            "--objective" => {
                let s = val(&mut i)?;
                o.objective = match s.as_str() {
                    "sum" => Objective::Sum,
                    "weighted" => Objective::Weighted,
                    "minimax" => Objective::Minimax,
                    _ => match s.strip_prefix("norm:") {
                        Some(p) => Objective::Norm(num(p.into(), "--objective norm:P")?),
                        None => return Err(format!("--objective: unknown {s:?}")),
                    },
                }
            }
            other => return Err(format!("unknown option {other:?}\n{HELP}")),
        }
        i += 1;
    }
    Ok(o)
}

fn load_problem(o: &Args) -> Result<(String, Problem), String> {
    if let Some(path) = &o.problem {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
        let p: Problem = serde_json::from_str(&text)
            .map_err(|e| format!("{path}: not a Problem in serde JSON form: {e}"))?;
        return Ok((path.clone(), p));
    }
    let shape = synth::shape_by_name(&o.model)
        .ok_or_else(|| format!("--model: expected 8b or 70b, got {:?}", o.model))?;
    let label = format!(
        "{}{} seed {}",
        shape.name,
        if o.fused { " fused" } else { "" },
        o.seed
    );
    Ok((label, synth::synthetic(&shape, o.fused, o.seed)))
}

fn targets(o: &Args, default: (f64, f64, f64)) -> Vec<f64> {
    let (a, b, step) = o.targets.unwrap_or(default);
    let n = ((b - a) / step + 1e-9).floor().max(0.0) as usize;
    (0..=n)
        .map(|i| ((a + i as f64 * step) * 1e6).round() / 1e6)
        .collect()
}

pub fn run(cmd: &str, args: &[String]) -> i32 {
    let o = match parse(cmd, args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return 2;
        }
    };
    if let Some(n) = o.threads {
        if let Err(e) = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
        {
            eprintln!("--threads: {e}");
            return 2;
        }
    }
    if let Some(path) = &o.dump {
        let written = load_problem(&o).and_then(|(_, p)| {
            let text = serde_json::to_string(&p).map_err(|e| e.to_string())?;
            std::fs::write(path, text).map_err(|e| format!("{path}: {e}"))
        });
        return match written {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("error: {e}");
                1
            }
        };
    }
    let result = match cmd {
        "alloc" => bench_alloc(&o),
        "frontier" => bench_frontier(&o),
        _ => bench_anneal(&o),
    };
    match result {
        Ok(v) => {
            if let Some(path) = &o.json {
                let text = serde_json::to_string_pretty(&v).expect("JSON values serialise");
                if let Err(e) = std::fs::write(path, text) {
                    eprintln!("{path}: {e}");
                    return 1;
                }
            }
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

fn header(label: &str, p: &Problem, threads: usize) {
    println!(
        "problem: {label}: {} items, {} groups, {} options, {} weights; {threads} threads",
        p.items.len(),
        p.groups.len(),
        p.items.iter().map(|i| i.options.len()).sum::<usize>(),
        p.total_numel()
    );
}

fn bench_alloc(o: &Args) -> Result<Value, String> {
    let (label, p) = load_problem(o)?;
    header(&label, &p, rayon::current_num_threads());
    let repeat = o.repeat.unwrap_or(5);
    let mut rows = Vec::new();
    println!(
        "{:>6} {:>10} {:>11} {:>16} {:>12} {:>10} {:>9} {:>8} {:>7}",
        "target",
        "solver",
        "time ms",
        "objective",
        "gap exact %",
        "LB gap %",
        "bpw",
        "free",
        "optimal"
    );
    for t in targets(o, (2.5, 6.0, 0.5)) {
        let mut exact_obj = None;
        for &kind in &o.solvers {
            let cfg = SolveConfig::new(o.objective, kind);
            let reps = if kind == SolverKind::Anneal {
                1
            } else {
                repeat
            };
            let mut best_ms = f64::INFINITY;
            let mut sol = None;
            for _ in 0..reps {
                let t0 = Instant::now();
                let s = solve(&p, Target::Bpw(t), &cfg);
                best_ms = best_ms.min(t0.elapsed().as_secs_f64() * 1e3);
                sol = Some(s);
            }
            let s = match sol.expect("at least one repeat") {
                Ok(s) => s,
                Err(e) => {
                    println!("{t:>6.2} {:>10} {e}", kind.name());
                    rows.push(json!({"target": t, "solver": kind.name(), "error": e.to_string()}));
                    continue;
                }
            };
            if kind == SolverKind::Exact {
                exact_obj = Some(s.objective);
            }
            let gap_exact = exact_obj.map(|e| 100.0 * (s.objective - e) / e);
            let fmt_opt = |v: Option<f64>| v.map_or("-".to_string(), |g| format!("{g:.5}"));
            println!(
                "{t:>6.2} {:>10} {best_ms:>11.3} {:>16.9e} {:>12} {:>10} {:>9.5} {:>8} {:>7}",
                kind.name(),
                s.objective,
                fmt_opt(gap_exact),
                fmt_opt(s.gap.map(|g| 100.0 * g)),
                s.bpw,
                s.stats.free_classes,
                s.optimal
            );
            assert!(s.cost_bits <= s.budget_bits, "budget exceeded");
            rows.push(json!({
                "target": t, "solver": kind.name(), "time_ms": best_ms, "objective": s.objective,
                "gap_to_exact_pct": gap_exact, "lb_gap": s.gap, "bpw": s.bpw,
                "cost_bits": s.cost_bits, "budget_bits": s.budget_bits, "optimal": s.optimal,
                "stats": serde_json::to_value(&s.stats).expect("stats serialise"),
            }));
        }
    }
    Ok(
        json!({"bench": "alloc", "problem": label, "threads": rayon::current_num_threads(), "rows": rows}),
    )
}

fn bench_frontier(o: &Args) -> Result<Value, String> {
    let (label, p) = load_problem(o)?;
    header(&label, &p, rayon::current_num_threads());
    let ts: Vec<Target> = targets(o, (2.0, 8.0, 0.05))
        .into_iter()
        .map(Target::Bpw)
        .collect();
    let cfg = SolveConfig::new(o.objective, SolverKind::Exact);
    let cancel = AtomicBool::new(false);
    let repeat = o.repeat.unwrap_or(3);
    // Baseline: one independent solve (validation, fusing, pruning included) per target, in turn.
    let mut base_s = f64::INFINITY;
    let mut base = Vec::new();
    for _ in 0..repeat {
        let t0 = Instant::now();
        base = ts.iter().map(|&t| solve(&p, t, &cfg)).collect::<Vec<_>>();
        base_s = base_s.min(t0.elapsed().as_secs_f64());
    }
    let mut fr_s = f64::INFINITY;
    let mut pts = Vec::new();
    for _ in 0..repeat {
        let t0 = Instant::now();
        let prep = Prepared::new(&p, o.objective).map_err(|e| e.to_string())?;
        pts = frontier_prepared(&prep, &ts, &cfg, &cancel);
        fr_s = fr_s.min(t0.elapsed().as_secs_f64());
    }
    let ok: Vec<_> = pts.iter().filter_map(|r| r.as_ref().ok()).collect();
    for (a, b) in pts.iter().zip(&base) {
        match (a, b) {
            (Ok(a), Ok(b)) => assert_eq!(a.choices, b.choices, "frontier and single solves differ"),
            (Err(_), Err(_)) => {}
            _ => return Err("frontier and single solves disagree on feasibility".into()),
        }
    }
    let monotone = ok.windows(2).all(|w| w[1].objective <= w[0].objective);
    println!("{:<44} {:>10} {:>8}", "method", "time ms", "ratio");
    println!(
        "{:<44} {:>10.2} {:>8.2}",
        "solve() per target, sequential (baseline)",
        base_s * 1e3,
        1.0
    );
    println!(
        "{:<44} {:>10.2} {:>8.2}",
        format!(
            "frontier, shared prep, {} threads",
            rayon::current_num_threads()
        ),
        fr_s * 1e3,
        base_s / fr_s
    );
    println!(
        "{} targets, {} feasible (all exact optimal: {}), error non-increasing in size: {monotone}",
        ts.len(),
        ok.len(),
        ok.iter().all(|s| s.optimal)
    );
    let curve: Vec<Value> = pts
        .iter()
        .zip(&ts)
        .map(|(r, t)| match r {
            Ok(s) => json!({"target": t, "bpw": s.bpw, "objective": s.objective, "cost_bits": s.cost_bits}),
            Err(e) => json!({"target": t, "error": e.to_string()}),
        })
        .collect();
    Ok(
        json!({"bench": "frontier", "problem": label, "threads": rayon::current_num_threads(),
              "baseline_ms": base_s * 1e3, "frontier_ms": fr_s * 1e3, "curve": curve}),
    )
}

/// CPU time of this process so far (Σ over its threads, from /proc/self/task/*/schedstat), in
/// seconds; None where /proc is unavailable. The machine is shared, so CPU time is the stable
/// measure; wall time is reported next to it.
fn cpu_s() -> Option<f64> {
    let mut ns = 0u64;
    for t in std::fs::read_dir("/proc/self/task").ok()? {
        let st = std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok()?;
        ns += st.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(ns as f64 * 1e-9)
}

fn bench_anneal(o: &Args) -> Result<Value, String> {
    let (label, p) = load_problem(o)?;
    header(&label, &p, rayon::current_num_threads());
    if !p.groups.is_empty() {
        return Err(
            "anneal compares objectives per item; use a problem without fused groups".into(),
        );
    }
    // EXL2's slots: one per item, every allowed option in cost order, no pruning.
    let prep = Prepared::new(&p, Objective::Sum).map_err(|e| e.to_string())?;
    let slots = prep.anneal_slots();
    let params = AnnealParams {
        samples: o.samples,
        seed: o.seed,
        ..AnnealParams::default()
    };
    let cancel = AtomicBool::new(false);
    let mut rows = Vec::new();
    println!(
        "{:>6} {:<38} {:>10} {:>8} {:>16} {:>12} {:>9}",
        "target", "method", "time s", "speedup", "Σ err^norm", "max err", "bpw"
    );
    for t in targets(o, (4.0, 4.0, 1.0)) {
        let budget = Target::Bpw(t)
            .budget_bits(p.total_numel())
            .map_err(|e| e.to_string())?;
        let (c0, t0) = (cpu_s(), Instant::now());
        let fast = anneal_slots(&slots, budget, &params, &cancel).map_err(|e| e.to_string())?;
        let fast_s = t0.elapsed().as_secs_f64();
        let fast_cpu = cpu_s().zip(c0).map(|(a, b)| a - b);
        let (reference, reference_cpu) = if o.reference {
            let (c0, t0) = (cpu_s(), Instant::now());
            let r = anneal_reference(&slots, budget, &params).map_err(|e| e.to_string())?;
            let s = t0.elapsed().as_secs_f64();
            let c = cpu_s().zip(c0).map(|(a, b)| a - b);
            if r != fast {
                return Err("optimised and reference anneal disagree".into());
            }
            (Some(s), c)
        } else {
            (None, None)
        };
        let ns = |c: Option<f64>| c.map(|c| c * 1e9 / fast.proposals as f64);
        let norm = fast.norm;
        let energy = |ch: &[usize]| -> (f64, f64) {
            let e: Vec<f64> = p
                .items
                .iter()
                .zip(ch)
                .map(|(it, &k)| it.options[k].error)
                .collect();
            (
                e.iter().map(|x| x.powf(norm)).sum(),
                e.iter().cloned().fold(0.0, f64::max),
            )
        };
        let sa_choice = prep.item_choices(&fast.choice);
        let (sa_e, sa_m) = energy(&sa_choice);
        let sa_bits: u64 = p
            .items
            .iter()
            .zip(&sa_choice)
            .map(|(it, &k)| it.options[k].bits)
            .sum();
        let bpw = |b: u64| b as f64 / p.total_numel() as f64;
        let t0 = Instant::now();
        let ex = solve(
            &p,
            Target::Bpw(t),
            &SolveConfig::new(Objective::Norm(norm), SolverKind::Exact),
        )
        .map_err(|e| e.to_string())?;
        let ex_s = t0.elapsed().as_secs_f64();
        let (ex_e, ex_m) = energy(&ex.choices);
        let mm = solve(
            &p,
            Target::Bpw(t),
            &SolveConfig::new(Objective::Minimax, SolverKind::Minimax),
        )
        .map_err(|e| e.to_string())?;
        let (mm_e, mm_m) = energy(&mm.choices);
        let line = |name: String, s: f64, sp: Option<f64>, e: f64, m: f64, b: f64| {
            println!(
                "{t:>6.2} {name:<38} {s:>10.4} {:>8} {e:>16.9e} {m:>12.6e} {b:>9.5}",
                sp.map_or("-".into(), |x| format!("{x:.1}x"))
            );
        };
        if let Some(rs) = reference {
            line(
                "anneal reference (1 thread, naive)".into(),
                rs,
                Some(1.0),
                sa_e,
                sa_m,
                bpw(sa_bits),
            );
        }
        let threads = rayon::current_num_threads();
        line(
            format!("anneal optimised ({threads} threads)"),
            fast_s,
            reference.map(|r| r / fast_s),
            sa_e,
            sa_m,
            bpw(sa_bits),
        );
        if let Some(fc) = fast_cpu {
            let r = reference_cpu.map_or(String::new(), |rc| {
                format!(
                    "reference {rc:.3} s ({:.2} ns/proposal), ratio {:.2}x; ",
                    ns(Some(rc)).unwrap_or(0.0),
                    rc / fc
                )
            });
            println!(
                "{t:>6.2} anneal CPU time: {r}optimised {fc:.3} s ({:.2} ns/proposal)",
                ns(Some(fc)).unwrap_or(0.0)
            );
        }
        line(
            format!("exact, Σ err^{norm:.4}"),
            ex_s,
            reference.map(|r| r / ex_s),
            ex_e,
            ex_m,
            ex.bpw,
        );
        line(
            "minimax (max err)".into(),
            mm.stats.time_s,
            None,
            mm_e,
            mm_m,
            mm.bpw,
        );
        println!(
            "{t:>6.2} exact vs anneal on Σ err^norm: {:+.3}%   max err: minimax {:+.2}% vs anneal",
            100.0 * (ex_e - sa_e) / sa_e,
            100.0 * (mm_m - sa_m) / sa_m
        );
        rows.push(json!({
            "target": t, "norm": norm, "anneal_s": fast_s, "reference_s": reference,
            "anneal_cpu_s": fast_cpu, "reference_cpu_s": reference_cpu,
            "anneal_cpu_ns_per_proposal": ns(fast_cpu),
            "reference_cpu_ns_per_proposal": ns(reference_cpu),
            "anneal_energy": sa_e, "anneal_max_err": sa_m, "exact_s": ex_s, "exact_energy": ex_e,
            "exact_max_err": ex_m, "minimax_max_err": mm_m, "proposals": fast.proposals,
        }));
    }
    Ok(
        json!({"bench": "anneal", "problem": label, "threads": rayon::current_num_threads(),
              "samples": o.samples, "rows": rows}),
    )
}
