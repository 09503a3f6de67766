//! llama.cpp-style Lagrangian relaxation: bisect the multiplier λ, keep the choice closest to the
//! budget from under, then close the gap with a priority-queue auction of next-hull upgrades.
//!
//! llama.cpp starts μ at 1 and doubles it; with costs in bits that scale is arbitrary, so the
//! bracket here is [0, largest hull slope], at and above which every class takes its cheapest
//! option, and 64 bisection steps resolve it to machine precision.
use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;

use super::mckp::{McSol, Mckp};

const BISECTION_STEPS: usize = 64;

/// Per class, the hull position minimising v + λ·w (ties to the cheaper point).
fn choose(m: &Mckp, lambda: f64, pos: &mut [u32]) -> (u64, f64) {
    let mut cost = 0u64;
    let mut dual = 0.0;
    for (c, p) in m.classes.iter().zip(pos.iter_mut()) {
        let mut best = (f64::INFINITY, 0u32);
        for (h, &k) in c.hull.iter().enumerate() {
            let (w, v) = c.opts[k as usize];
            let s = v + lambda * w as f64;
            if s < best.0 {
                best = (s, h as u32);
            }
        }
        *p = best.1;
        cost += c.opts[c.hull[best.1 as usize] as usize].0;
        dual += best.0;
    }
    (cost, dual)
}

struct Upgrade {
    score: f64,
    class: u32,
}
impl PartialEq for Upgrade {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == CmpOrdering::Equal
    }
}
impl Eq for Upgrade {}
impl PartialOrd for Upgrade {
    fn partial_cmp(&self, o: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(o))
    }
}
impl Ord for Upgrade {
    fn cmp(&self, o: &Self) -> CmpOrdering {
        // Highest score first; lower class index wins ties (deterministic).
        self.score
            .total_cmp(&o.score)
            .then(o.class.cmp(&self.class))
    }
}

pub(crate) fn lagrangian(m: &Mckp, budget: u64) -> McSol {
    if m.best_cost <= budget {
        return m.unconstrained();
    }
    let n = m.classes.len();
    let mut hi = 0.0f64;
    for c in &m.classes {
        for h in 1..c.hull.len() {
            let (w0, v0) = c.opts[c.hull[h - 1] as usize];
            let (w1, v1) = c.opts[c.hull[h] as usize];
            hi = hi.max((v0 - v1) / (w1 - w0) as f64);
        }
    }
    hi *= 1.0 + 1e-9;
    let mut lo = 0.0f64;
    let mut pos = vec![0u32; n];
    let mut best_pos = vec![0u32; n];
    let mut best_cost = m.min_cost;
    let mut bound = f64::NEG_INFINITY;
    let mut evals = 0u64;
    for _ in 0..BISECTION_STEPS {
        let mid = 0.5 * (lo + hi);
        let (cost, dual) = choose(m, mid, &mut pos);
        evals += 1;
        bound = bound.max(dual - mid * budget as f64);
        if cost <= budget {
            if cost >= best_cost {
                best_cost = cost;
                best_pos.copy_from_slice(&pos);
            }
            hi = mid;
        } else {
            lo = mid;
        }
    }
    // Auction: next-hull upgrades in order of error drop per bit, applied while they fit.
    let mut cost = best_cost;
    let mut heap = BinaryHeap::new();
    let push = |heap: &mut BinaryHeap<Upgrade>, ci: usize, p: u32| {
        let c = &m.classes[ci];
        if (p as usize) + 1 < c.hull.len() {
            let (w0, v0) = c.opts[c.hull[p as usize] as usize];
            let (w1, v1) = c.opts[c.hull[p as usize + 1] as usize];
            heap.push(Upgrade {
                score: (v0 - v1) / (w1 - w0) as f64,
                class: ci as u32,
            });
        }
    };
    for (ci, &p) in best_pos.iter().enumerate() {
        push(&mut heap, ci, p);
    }
    while let Some(up) = heap.pop() {
        let ci = up.class as usize;
        let c = &m.classes[ci];
        let p = best_pos[ci] as usize;
        let dw = c.opts[c.hull[p + 1] as usize].0 - c.opts[c.hull[p] as usize].0;
        if cost + dw <= budget {
            cost += dw;
            best_pos[ci] += 1;
            push(&mut heap, ci, best_pos[ci]);
        }
    }
    let choice: Vec<u32> = m
        .classes
        .iter()
        .zip(&best_pos)
        .map(|(c, &p)| c.hull[p as usize])
        .collect();
    let (cost, value) = m.evaluate(&choice);
    let lb = bound.min(value);
    McSol {
        choice,
        cost,
        value,
        lower_bound: Some(lb),
        lp_bound: Some(lb),
        optimal: false,
        nodes: evals,
        peak_states: 0,
        free_classes: 0,
    }
}
