//! The reduced multiple-choice knapsack the solvers work on: classes of (cost, value) options,
//! each with its Pareto front and lower hull precomputed, plus the Lagrangian dual bound.
use super::prune::{hull_of_front, pareto_front};

#[derive(Debug, Clone)]
pub(crate) struct Class {
    /// (cost, value), sorted by cost then value.
    pub opts: Vec<(u64, f64)>,
    /// Pareto indices into `opts`, increasing cost, strictly decreasing value.
    pub front: Vec<u32>,
    /// Lower-hull indices into `opts` (a subsequence of `front`).
    pub hull: Vec<u32>,
}

impl Class {
    pub fn new(opts: Vec<(u64, f64)>) -> Self {
        let front = pareto_front(&opts);
        let hull = hull_of_front(&opts, &front);
        Class {
            front: front.into_iter().map(|i| i as u32).collect(),
            hull: hull.into_iter().map(|i| i as u32).collect(),
            opts,
        }
    }
    pub fn cheapest(&self) -> u32 {
        self.front[0]
    }
    pub fn best(&self) -> u32 {
        *self.front.last().expect("class has options")
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Mckp {
    pub classes: Vec<Class>,
    /// Σ cheapest cost.
    pub min_cost: u64,
    /// Σ cost of each class's lowest-value option (cheapest among ties).
    pub best_cost: u64,
    /// Every hull segment (efficiency −Δv/Δw, class, position of its upper end in the hull),
    /// by decreasing efficiency (ties by class, then position): the LP walk's order, which does
    /// not depend on the budget.
    pub segs: Vec<(f64, u32, u32)>,
}

/// A solution of the reduced knapsack: option index per class (into `Class::opts`).
#[derive(Debug, Clone)]
pub(crate) struct McSol {
    pub choice: Vec<u32>,
    pub cost: u64,
    pub value: f64,
    pub lower_bound: Option<f64>,
    /// The LP (Lagrangian dual) bound where one was computed.
    pub lp_bound: Option<f64>,
    pub optimal: bool,
    pub nodes: u64,
    pub peak_states: usize,
    pub free_classes: usize,
}

impl Mckp {
    pub fn new(classes: Vec<Class>) -> Self {
        let min_cost = classes
            .iter()
            .map(|c| c.opts[c.cheapest() as usize].0)
            .sum();
        let best_cost = classes.iter().map(|c| c.opts[c.best() as usize].0).sum();
        let mut segs: Vec<(f64, u32, u32)> = Vec::new();
        for (ci, c) in classes.iter().enumerate() {
            for h in 1..c.hull.len() {
                let (w0, v0) = c.opts[c.hull[h - 1] as usize];
                let (w1, v1) = c.opts[c.hull[h] as usize];
                segs.push(((v0 - v1) / (w1 - w0) as f64, ci as u32, h as u32));
            }
        }
        segs.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        Mckp {
            classes,
            min_cost,
            best_cost,
            segs,
        }
    }

    pub fn max_cost(&self) -> u64 {
        self.classes
            .iter()
            .map(|c| c.opts.iter().map(|o| o.0).max().unwrap_or(0))
            .sum()
    }

    pub fn evaluate(&self, choice: &[u32]) -> (u64, f64) {
        let mut cost = 0u64;
        let mut value = 0.0;
        for (c, &k) in self.classes.iter().zip(choice) {
            let (w, v) = c.opts[k as usize];
            cost += w;
            value += v;
        }
        (cost, value)
    }

    /// Lagrangian dual value L(λ) = Σ min_k (v + λ·w) − λ·C: a lower bound on the optimum for
    /// every λ ≥ 0 (equal to the LP optimum at the critical slope).
    pub fn dual(&self, lambda: f64, budget: u64) -> f64 {
        let mut s = 0.0;
        for c in &self.classes {
            s += c
                .hull
                .iter()
                .map(|&k| {
                    let (w, v) = c.opts[k as usize];
                    v + lambda * w as f64
                })
                .fold(f64::INFINITY, f64::min);
        }
        s - lambda * budget as f64
    }

    /// The all-lowest-value solution; optimal whenever it fits.
    pub fn unconstrained(&self) -> McSol {
        let choice: Vec<u32> = self.classes.iter().map(|c| c.best()).collect();
        let (cost, value) = self.evaluate(&choice);
        McSol {
            choice,
            cost,
            value,
            lower_bound: Some(value),
            lp_bound: Some(value),
            optimal: true,
            nodes: 0,
            peak_states: 0,
            free_classes: 0,
        }
    }
}
