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
            c.hull
                .iter()
                .map(|&k| c.opts[k as usize].1 + lam * c.opts[k as usize].0 as f64)
                .fold(f64::INFINITY, f64::min)
        })
        .collect();
    let lb = mins.iter().sum::<f64>() - lam * budget as f64;
    let scale = inc.value.abs()
        + lb.abs()
        + lam * budget as f64
        + mins.iter().map(|x| x.abs()).sum::<f64>();
    // Tolerance for rounding in the reduced costs: keeping slightly too many options or states
    // is always safe, pruning one too many is not.
    let eps = 1e-10 * scale + f64::MIN_POSITIVE;

    let red = Reduced::new(m, lam, &mins);
    // Widening cores: with threshold τ keep only options of reduced cost ≤ τ and prune every
    // state that cannot reach a value < min(U, LB + τ). Any solution of value < LB + τ uses
    // only kept options, so a solution found below LB + τ is optimal; if none exists, the
    // optimum lies above LB + τ and τ grows by √2. Once τ reaches the gap U − LB the core is the
    // full proof. The cost of a core grows quickly with τ, so stopping at the first τ above the
    // optimum's gap (rather than at the greedy gap) is what keeps hard targets cheap.
    let mut best = inc;
    let mut nodes = 0u64;
    let mut peak = 0usize;
    let mut tau = ((best.value - lb).max(0.0) / 16.0).max(eps);
    let free_classes = loop {
        let gap = (best.value - lb).max(0.0);
        let full = tau >= gap;
        let (keep, incumbent) = if full {
            (gap + eps, best.value)
        } else {
            (tau + eps, lb + tau)
        };
        let core = Core {
            m,
            budget,
            red: &red,
            tau: keep,
            eps,
            incumbent,
        };
        let r = core.solve(cancel)?;
        nodes += r.nodes;
        peak = peak.max(r.peak);
        let found = r.improved.is_some();
        if let Some((choice, value)) = r.improved {
            let (cost, v) = m.evaluate(&choice);
            debug_assert!(cost <= budget && (v - value).abs() <= 1e-9 * (1.0 + v.abs()));
            best = McSol {
                choice,
                cost,
                value: v,
                ..best
            };
        }
        if found || full {
            break r.free_classes;
        }
        tau *= std::f64::consts::SQRT_2;
    };
    Ok(McSol {
        nodes,
        peak_states: peak,
        free_classes,
        ..proven(best, lb)
    })
}

struct Core<'a> {
    m: &'a Mckp,
    budget: u64,
    red: &'a Reduced,
    tau: f64,
    eps: f64,
    incumbent: f64,
}

/// Reduced costs rⱼₖ = vⱼₖ + λ*·wⱼₖ − mⱼ of every class's Pareto front, and the classes ordered
/// by their second-smallest reduced cost, so a core's fixing is a binary search.
struct Reduced {
    /// Per class, aligned with `Class::front`.
    rc: Vec<Vec<f64>>,
    /// Per class, the front option of least reduced cost (the cheapest among ties).
    argmin: Vec<u32>,
    /// Classes by increasing second-smallest reduced cost (∞ for single-option classes).
    order: Vec<usize>,
    /// `second[i]`: the second-smallest reduced cost of `order[i]`.
    second: Vec<f64>,
    /// Σ cost and value of the argmin options of `order[i..]`.
    fix_cost: Vec<u64>,
    fix_value: Vec<f64>,
}

impl Reduced {
    fn new(m: &Mckp, lam: f64, mins: &[f64]) -> Self {
        let n = m.classes.len();
        let mut rc = Vec::with_capacity(n);
        let mut argmin = Vec::with_capacity(n);
        let mut sec = Vec::with_capacity(n);
        for (ci, c) in m.classes.iter().enumerate() {
            let r: Vec<f64> = c
                .front
                .iter()
                .map(|&k| {
                    let (w, v) = c.opts[k as usize];
                    v + lam * w as f64 - mins[ci]
                })
                .collect();
            let mut best = 0;
            for (i, &x) in r.iter().enumerate() {
                if x < r[best] {
                    best = i;
                }
            }
            let second = r
                .iter()
                .enumerate()
                .filter(|&(i, _)| i != best)
                .map(|(_, &x)| x)
                .fold(f64::INFINITY, f64::min);
            argmin.push(c.front[best]);
            sec.push(second);
            rc.push(r);
        }
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| sec[a].total_cmp(&sec[b]).then(a.cmp(&b)));
        let second: Vec<f64> = order.iter().map(|&ci| sec[ci]).collect();
        let mut fix_cost = vec![0u64; n + 1];
        let mut fix_value = vec![0.0f64; n + 1];
        for i in (0..n).rev() {
            let c = &m.classes[order[i]];
            let (w, v) = c.opts[argmin[order[i]] as usize];
            fix_cost[i] = fix_cost[i + 1] + w;
            fix_value[i] = fix_value[i + 1] + v;
        }
        Reduced {
            rc,
            argmin,
            order,
            second,
            fix_cost,
            fix_value,
        }
    }
}

struct CoreResult {
    improved: Option<(Vec<u32>, f64)>,
    nodes: u64,
    peak: usize,
    free_classes: usize,
}

impl Core<'_> {
    /// Fix every class whose options but one have reduced cost > tau, then run the bounded
    /// Pareto DP over the rest; returns a solution strictly better than the incumbent, if any
    /// exists among the kept options.
    fn solve(&self, cancel: &AtomicBool) -> Result<CoreResult, AllocError> {
        let Core {
            m,
            budget,
            red,
            tau,
            eps,
            incumbent,
        } = *self;
        // Reduced-cost fixing: the classes whose second-best reduced cost exceeds tau keep only
        // their best option; they form a suffix of `red.order`.
        let nfree = red.second.partition_point(|&r2| r2 <= tau);
        let fixed_cost = red.fix_cost[nfree];
        let fixed_value = red.fix_value[nfree];
        let mut free: Vec<(usize, Vec<u32>)> = red.order[..nfree]
            .iter()
            .map(|&ci| {
                let c = &m.classes[ci];
                let kept = c
                    .front
                    .iter()
                    .zip(&red.rc[ci])
                    .filter(|&(_, &r)| r <= tau)
                    .map(|(&k, _)| k)
                    .collect();
                (ci, kept)
            })
            .collect();
        let free_classes = free.len();
        let none = |nodes, peak| CoreResult {
            improved: None,
            nodes,
            peak,
            free_classes,
        };
        if fixed_cost > budget {
            return Ok(none(0, 0));
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
        let suffix = SuffixLp::new(m, &free);
        let target = incumbent - fixed_value;
        let mut layers: Vec<Vec<State>> = Vec::with_capacity(n + 1);
        layers.push(vec![State {
            cost: 0,
            value: 0.0,
            parent: u32::MAX,
            opt: u32::MAX,
        }]);
        let mut nodes = 0u64;
        let mut peak = 1usize;
        // Each layer is a Pareto list: cost strictly increasing, value strictly decreasing. So
        // is each option's shifted copy of the previous layer, and the next layer is their
        // dominance-filtered merge (no sort). Along one copy the remaining budget only shrinks,
        // so the suffix bound's segment pointer only moves down.
        let mut acc: Vec<State> = Vec::new();
        let mut list: Vec<State> = Vec::new();
        let mut merged: Vec<State> = Vec::new();
        for s in 0..n {
            if cancel.load(Ordering::Relaxed) {
                return Err(AllocError::Cancelled);
            }
            let (ci, kept) = &free[s];
            let c = &m.classes[*ci];
            let prev = &layers[s];
            acc.clear();
            for &k in kept {
                let (w, v) = c.opts[k as usize];
                list.clear();
                let mut cursor = suffix.cursor(s + 1);
                for (pi, st) in prev.iter().enumerate() {
                    let cost = st.cost + w;
                    if cost > cap {
                        break;
                    }
                    // Costs only grow along the layer: once the suffix cannot fit, stop.
                    let Some(rest) = cursor.bound(cap - cost) else {
                        break;
                    };
                    let value = st.value + v;
                    if value + rest > target + eps {
                        continue;
                    }
                    list.push(State {
                        cost,
                        value,
                        parent: pi as u32,
                        opt: k,
                    });
                }
                nodes += list.len() as u64;
                if acc.is_empty() {
                    std::mem::swap(&mut acc, &mut list);
                    continue;
                }
                merged.clear();
                pareto_merge(&acc, &list, &mut merged);
                std::mem::swap(&mut acc, &mut merged);
            }
            peak = peak.max(acc.len());
            if acc.is_empty() {
                break;
            }
            layers.push(acc.clone());
        }
        if layers.len() < n + 1 {
            return Ok(none(nodes, peak));
        }
        let (bi, best) = layers[n]
            .iter()
            .enumerate()
            .min_by(|a, b| {
                a.1.value
                    .total_cmp(&b.1.value)
                    .then(a.1.cost.cmp(&b.1.cost))
            })
            .expect("non-empty layer");
        if best.value >= target {
            return Ok(none(nodes, peak));
        }
        let mut choice = red.argmin.clone();
        let mut idx = bi;
        for s in (0..n).rev() {
            let st = layers[s + 1][idx];
            choice[free[s].0] = st.opt;
            idx = st.parent as usize;
        }
        let value = fixed_value + best.value;
        Ok(CoreResult {
            improved: Some((choice, value)),
            nodes,
            peak,
            free_classes,
        })
    }
}

/// LP lower bounds of every suffix of the DP order as a function of the remaining budget, over
/// the kept options: LB_s(b) = base_s − (greedy hull drops that fit in b − min cost of suffix).
struct SuffixLp {
    base_cost: Vec<u64>,
    base_value: Vec<f64>,
    /// Per suffix: cumulative (Δcost, value drop) of its hull segments in efficiency order.
    cum: Vec<Vec<(u64, f64)>>,
}

impl SuffixLp {
    fn new(m: &Mckp, free: &[(usize, Vec<u32>)]) -> Self {
        let n = free.len();
        let mut base_cost = vec![0u64; n + 1];
        let mut base_value = vec![0.0f64; n + 1];
        let mut segs: Vec<Vec<(f64, u64, f64)>> = vec![Vec::new(); n + 1];
        for s in (0..n).rev() {
            let (ci, kept) = &free[s];
            let c = &m.classes[*ci];
            let pts: Vec<(u64, f64)> = kept.iter().map(|&k| c.opts[k as usize]).collect();
            let front: Vec<usize> = (0..pts.len()).collect();
            let hull = super::prune::hull_of_front(&pts, &front);
            base_cost[s] = base_cost[s + 1] + pts[0].0;
            base_value[s] = base_value[s + 1] + pts[0].1;
            let mut own: Vec<(f64, u64, f64)> = hull
                .windows(2)
                .map(|w| {
                    let (dw, dv) = (pts[w[1]].0 - pts[w[0]].0, pts[w[0]].1 - pts[w[1]].1);
                    (dv / dw as f64, dw, dv)
                })
                .collect();
            // Merge two lists sorted by decreasing efficiency.
            let tail = &segs[s + 1];
            let mut merged = Vec::with_capacity(own.len() + tail.len());
            let (mut i, mut j) = (0, 0);
            own.sort_by(|a, b| b.0.total_cmp(&a.0));
            while i < own.len() || j < tail.len() {
                if j == tail.len() || (i < own.len() && own[i].0 >= tail[j].0) {
                    merged.push(own[i]);
                    i += 1;
                } else {
                    merged.push(tail[j]);
                    j += 1;
                }
            }
            segs[s] = merged;
        }
        let cum = segs
            .iter()
            .map(|l| {
                let (mut w, mut v) = (0u64, 0.0f64);
                l.iter()
                    .map(|&(_, dw, dv)| {
                        w += dw;
                        v += dv;
                        (w, v)
                    })
                    .collect()
            })
            .collect();
        SuffixLp {
            base_cost,
            base_value,
            cum,
        }
    }

    /// A bound evaluator for suffix `s`, queried with non-increasing budgets.
    fn cursor(&self, s: usize) -> Cursor<'_> {
        Cursor {
            base_cost: self.base_cost[s],
            base_value: self.base_value[s],
            cum: &self.cum[s],
            p: None,
        }
    }
}

struct Cursor<'a> {
    base_cost: u64,
    base_value: f64,
    cum: &'a [(u64, f64)],
    /// First segment whose cumulative cost exceeds the last query's extra budget.
    p: Option<usize>,
}

impl Cursor<'_> {
    /// LP lower bound on the value of the suffix with `budget` bits, or None if even its
    /// cheapest options do not fit. Budgets must not increase between calls.
    #[inline]
    fn bound(&mut self, budget: u64) -> Option<f64> {
        let extra = budget.checked_sub(self.base_cost)?;
        let cum = self.cum;
        let p = match self.p {
            None => cum.partition_point(|&(w, _)| w <= extra),
            Some(mut p) => {
                while p > 0 && cum[p - 1].0 > extra {
                    p -= 1;
                }
                p
            }
        };
        self.p = Some(p);
        let (w0, v0) = if p == 0 { (0, 0.0) } else { cum[p - 1] };
        let drop = match cum.get(p) {
            Some(&(w1, v1)) => v0 + (v1 - v0) * (extra - w0) as f64 / (w1 - w0) as f64,
            None => v0,
        };
        Some(self.base_value - drop)
    }
}

/// Merge two Pareto lists (cost strictly increasing, value strictly decreasing) into `out`,
/// keeping only states no other dominates (the cheaper one on equal cost and value).
fn pareto_merge(a: &[State], b: &[State], out: &mut Vec<State>) {
    let (mut i, mut j) = (0, 0);
    let mut last = f64::INFINITY;
    while i < a.len() || j < b.len() {
        let take_a = j == b.len()
            || (i < a.len()
                && (a[i].cost < b[j].cost || (a[i].cost == b[j].cost && a[i].value <= b[j].value)));
        let st = if take_a {
            i += 1;
            a[i - 1]
        } else {
            j += 1;
            b[j - 1]
        };
        if st.value < last {
            last = st.value;
            out.push(st);
        }
    }
}

fn proven(sol: McSol, lp: f64) -> McSol {
    McSol {
        lower_bound: Some(sol.value),
        lp_bound: Some(lp.min(sol.value)),
        optimal: true,
        ..sol
    }
}
