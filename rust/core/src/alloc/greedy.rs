//! Convex-hull LP walk plus skip-and-continue fill, and the Pareto fill of leftover budget.
use super::mckp::{McSol, Mckp};

/// The greedy solution and the critical slope λ* of the LP (0 when the LP is integral).
pub(crate) fn hull_greedy(m: &Mckp, budget: u64) -> (McSol, f64) {
    let segs = &m.segs;
    let mut pos = vec![0u32; m.classes.len()];
    let mut blocked = vec![false; m.classes.len()];
    let mut cost = m.min_cost;
    let mut lambda = None;
    for &(eff, ci, h) in segs {
        let ci = ci as usize;
        if blocked[ci] || pos[ci] + 1 != h {
            continue;
        }
        let c = &m.classes[ci];
        let dw = c.opts[c.hull[h as usize] as usize].0 - c.opts[c.hull[h as usize - 1] as usize].0;
        if cost + dw <= budget {
            cost += dw;
            pos[ci] = h;
        } else {
            if lambda.is_none() {
                lambda = Some(eff);
            }
            blocked[ci] = true;
        }
    }
    let mut choice: Vec<u32> = m
        .classes
        .iter()
        .zip(&pos)
        .map(|(c, &p)| c.hull[p as usize])
        .collect();
    let lambda = lambda.unwrap_or(0.0);
    pareto_fill(m, budget, &mut choice);
    let (cost, value) = m.evaluate(&choice);
    let lb = if lambda == 0.0 {
        value
    } else {
        m.dual(lambda, budget)
    };
    let sol = McSol {
        choice,
        cost,
        value,
        lower_bound: Some(lb.min(value)),
        lp_bound: Some(lb.min(value)),
        optimal: lambda == 0.0,
        nodes: segs.len() as u64,
        peak_states: 0,
        free_classes: 0,
    };
    (sol, lambda)
}

/// Spend leftover budget: repeatedly apply the single Pareto move (any class, any option) with
/// the largest value drop that still fits, until none does.
pub(crate) fn pareto_fill(m: &Mckp, budget: u64, choice: &mut [u32]) {
    let (mut cost, _) = m.evaluate(choice);
    loop {
        let slack = budget - cost;
        let mut best: Option<(f64, usize, u32)> = None;
        for (ci, c) in m.classes.iter().enumerate() {
            let (wc, vc) = c.opts[choice[ci] as usize];
            for &k in c.front.iter().rev() {
                let (w, v) = c.opts[k as usize];
                if v >= vc {
                    break;
                }
                if w <= wc + slack {
                    // The lowest-value option that fits is the best move for this class.
                    if best.is_none_or(|b| vc - v > b.0) {
                        best = Some((vc - v, ci, k));
                    }
                    break;
                }
            }
        }
        match best {
            Some((_, ci, k)) => {
                let c = &m.classes[ci];
                cost = cost - c.opts[choice[ci] as usize].0 + c.opts[k as usize].0;
                choice[ci] = k;
            }
            None => return,
        }
    }
}
