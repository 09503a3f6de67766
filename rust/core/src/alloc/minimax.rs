//! Minimax: the smallest threshold t on the per-item error such that taking, in every class, the
//! cheapest option with max member error ≤ t fits the budget (bisection over the sorted distinct
//! error levels). The leftover budget then minimises Σ e exactly among options with error ≤ t.
use std::sync::atomic::AtomicBool;

use super::exact::exact;
use super::mckp::{Class, Mckp};
use super::prepared::Prepared;
use super::AllocError;

/// Class-level choice and the optimal threshold t* (the optimum of max e).
pub(crate) fn minimax(
    p: &Prepared,
    budget: u64,
    cancel: &AtomicBool,
) -> Result<(Vec<u32>, f64), AllocError> {
    let mut levels: Vec<f64> = p
        .classes
        .iter()
        .flat_map(|c| c.opts.iter().map(|o| o.err_max))
        .collect();
    levels.sort_by(f64::total_cmp);
    levels.dedup();
    let fits = |t: f64| -> bool {
        let mut cost = 0u64;
        for c in &p.classes {
            match c
                .opts
                .iter()
                .filter(|o| o.err_max <= t)
                .map(|o| o.cost)
                .min()
            {
                Some(w) => cost += w,
                None => return false,
            }
        }
        cost <= budget
    };
    // The largest level admits every option, so it fits whenever the target is feasible.
    let (mut lo, mut hi) = (0usize, levels.len() - 1);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if fits(levels[mid]) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    let t = levels[lo];
    // Tie-break: minimise Σ e over the options allowed by t.
    let mut index: Vec<Vec<u32>> = Vec::with_capacity(p.classes.len());
    let mut classes = Vec::with_capacity(p.classes.len());
    for c in &p.classes {
        let keep: Vec<u32> = (0..c.opts.len() as u32)
            .filter(|&k| c.opts[k as usize].err_max <= t)
            .collect();
        classes.push(Class::new(
            keep.iter()
                .map(|&k| (c.opts[k as usize].cost, c.opts[k as usize].err_sum))
                .collect(),
        ));
        index.push(keep);
    }
    let restricted = Mckp::new(classes);
    let sol = exact(&restricted, budget, cancel)?;
    let choice = sol
        .choice
        .iter()
        .zip(&index)
        .map(|(&k, keep)| keep[k as usize])
        .collect();
    Ok((choice, t))
}
