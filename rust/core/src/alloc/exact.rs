//! The exact solver: LP bound + greedy incumbent, reduced-cost fixing, then a Pareto-frontier
//! DP with Lagrangian suffix bounds over the classes still undecided.
//!
//! With λ* the LP's critical slope, LB = Σⱼ mⱼ − λ*·C where mⱼ = minₖ (vⱼₖ + λ*·wⱼₖ), and for any
//! feasible x:  value(x) = LB + λ*·(C − W(x)) + Σⱼ rⱼ(x),  rⱼₖ = vⱼₖ + λ*·wⱼₖ − mⱼ ≥ 0.
//! A solution at least as good as the incumbent U therefore uses only options with rⱼₖ ≤ U − LB.
//! The greedy gap U − LB is tiny, so almost every class keeps a single option; the DP then runs
//! over the few that keep two or more, pruning states whose bound e + Σ_suffix mⱼ − λ*·(C − c)
//! cannot beat U. The result is optimal over exact integer costs.
use std::sync::atomic::{AtomicBool, Ordering};

use super::greedy::hull_greedy;
use super::mckp::{McSol, Mckp};
use super::AllocError;

#[derive(Clone, Copy)]
struct State {
    cost: u64,
    value: f64,
    parent: u32,
    opt: u32,
}

pub(crate) fn exact(m: &Mckp, budget: u64, cancel: &AtomicBool) -> Result<McSol, AllocError> {
    if m.best_cost <= budget {
        return Ok(m.unconstrained());
    }
    let (inc, lambda) = hull_greedy(m, budget);
    if inc.optimal {
        return Ok(inc);
    }
    let lam = lambda;
    let mins: Vec<f64> = m
        .classes
        .iter()
        .map(|c| {
            c.hull.iter().map(|&k| c.opts[k as usize].1 + lam * c.opts[k as usize].0 as f64).fold(
                f64::INFINITY,
                f64::min,
            )
        })
        .collect();
    let lb = mins.iter().sum::<f64>() - lam * budget as f64;
    let scale = inc.value.abs() + lb.abs() + lam * budget as f64 + mins.iter().map(|x| x.abs()).sum::<f64>();
    // Tolerance for rounding in the reduced costs: keeping slightly too many options or states
    // is always safe, pruning one too many is not.
    let eps = 1e-10 * scale + f64::MIN_POSITIVE;
    let tau = (inc.value - lb).max(0.0) + eps;

    // Reduced-cost fixing over each class's Pareto front.
    let mut fixed_cost = 0u64;
    let mut fixed_value = 0.0;
    let mut choice = inc.choice.clone();
    let mut free: Vec<(usize, Vec<u32>)> = Vec::new();
    for (ci, c) in m.classes.iter().enumerate() {
        let kept: Vec<u32> = c
            .front
            .iter()
            .copied()
            .filter(|&k| {
                let (w, v) = c.opts[k as usize];
                v + lam * w as f64 - mins[ci] <= tau
            })
            .collect();
        if kept.len() == 1 {
            let (w, v) = c.opts[kept[0] as usize];
            fixed_cost += w;
            fixed_value += v;
            choice[ci] = kept[0];
        } else {
            free.push((ci, kept));
        }
    }
    let free_classes = free.len();
    if fixed_cost > budget {
        // Only possible through rounding; the incumbent is then optimal within eps.
        return Ok(McSol { free_classes, ..proven(inc, lb) });
    }
    let cap = budget - fixed_cost;
    // Big cost ranges first: their choices decide feasibility, the bound prunes the rest.
    free.sort_by(|a, b| {
        let range = |(ci, kept): &(usize, Vec<u32>)| {
            let c = &m.classes[*ci];
            c.opts[*kept.last().unwrap() as usize].0 - c.opts[kept[0] as usize].0
        };
        range(b).cmp(&range(a)).then(a.0.cmp(&b.0))
    });
    let n = free.len();
    let mut suf_min = vec![0u64; n + 1];
    let mut suf_m = vec![0.0f64; n + 1];
    for s in (0..n).rev() {
        let (ci, kept) = &free[s];
        suf_min[s] = suf_min[s + 1] + m.classes[*ci].opts[kept[0] as usize].0;
        suf_m[s] = suf_m[s + 1] + mins[*ci];
    }
    let target = inc.value - fixed_value;
    let mut layers: Vec<Vec<State>> = Vec::with_capacity(n + 1);
    layers.push(vec![State { cost: 0, value: 0.0, parent: u32::MAX, opt: u32::MAX }]);
    let mut nodes = 0u64;
    let mut peak = 1usize;
    let mut cand: Vec<State> = Vec::new();
    for s in 0..n {
        if cancel.load(Ordering::Relaxed) {
            return Err(AllocError::Cancelled);
        }
        let (ci, kept) = &free[s];
        let c = &m.classes[*ci];
        let prev = &layers[s];
        cand.clear();
        for (pi, st) in prev.iter().enumerate() {
            for &k in kept {
                let (w, v) = c.opts[k as usize];
                let cost = st.cost + w;
                if cost + suf_min[s + 1] > cap {
                    break; // kept is sorted by cost
                }
                let value = st.value + v;
                let bound = value + suf_m[s + 1] - lam * (cap - cost) as f64;
                if bound > target + eps {
                    continue;
                }
                cand.push(State { cost, value, parent: pi as u32, opt: k });
            }
        }
        nodes += cand.len() as u64;
        cand.sort_unstable_by(|a, b| a.cost.cmp(&b.cost).then(a.value.total_cmp(&b.value)));
        let mut next: Vec<State> = Vec::with_capacity(cand.len());
        for st in &cand {
            if next.last().is_none_or(|l: &State| st.value < l.value) {
                next.push(*st);
            }
        }
        peak = peak.max(next.len());
        if next.is_empty() {
            break;
        }
        layers.push(next);
    }
    let mut out = inc;
    if layers.len() == n + 1 {
        let last = &layers[n];
        let (bi, best) = last
            .iter()
            .enumerate()
            .min_by(|a, b| a.1.value.total_cmp(&b.1.value).then(a.1.cost.cmp(&b.1.cost)))
            .expect("non-empty layer");
        if best.value < target {
            let mut idx = bi;
            for s in (0..n).rev() {
                let st = layers[s + 1][idx];
                choice[free[s].0] = st.opt;
                idx = st.parent as usize;
            }
            let (cost, value) = m.evaluate(&choice);
            debug_assert!(cost <= budget);
            out = McSol { choice, cost, value, ..out };
        }
    }
    Ok(McSol { nodes, peak_states: peak, free_classes, ..proven(out, lb) })
}

fn proven(sol: McSol, lp: f64) -> McSol {
    McSol { lower_bound: Some(sol.value), lp_bound: Some(lp.min(sol.value)), optimal: true, ..sol }
}
