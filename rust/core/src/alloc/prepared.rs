//! A validated problem reduced to knapsack classes: fused groups merged into one class over the
//! configs all members share, filters (pins, exclusions, min/max bpw) applied, options sorted and
//! pruned. Built once and reused for every target (frontier sweeps share it).
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::anneal::{anneal, AnnealParams};
use super::exact::exact;
use super::greedy::hull_greedy;
use super::lagrangian::lagrangian;
use super::mckp::{Class, McSol, Mckp};
use super::minimax::minimax;
use super::problem::{option_allowed, validate};
use super::{AllocError, Objective, Problem, Solution, SolverKind, Stats, Target};

/// One merged option of a class.
#[derive(Debug, Clone)]
pub(crate) struct ClassOpt {
    pub cost: u64,
    /// The objective's contribution (Σ over members; for minimax Σ raw errors).
    pub value: f64,
    /// Σ raw member errors (EXL2's module error; anneal and the minimax tie-break use it).
    pub err_sum: f64,
    /// max raw member error (minimax).
    pub err_max: f64,
    /// Original option index of each member.
    pub member_opts: Vec<u32>,
}

#[derive(Debug, Clone)]
pub(crate) struct ClassInfo {
    pub members: Vec<usize>,
    /// Sorted by (cost, value); aligned with `Mckp::classes[i].opts`.
    pub opts: Vec<ClassOpt>,
}

/// A problem prepared for solving under one objective.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub(crate) problem: Problem,
    pub(crate) objective: Objective,
    pub(crate) numel: u64,
    pub(crate) classes: Vec<ClassInfo>,
    pub(crate) mckp: Mckp,
}

impl Prepared {
    pub fn new(problem: &Problem, objective: Objective) -> Result<Self, AllocError> {
        validate(problem)?;
        if let Objective::Norm(p) = objective {
            if !p.is_finite() || p <= 0.0 {
                return Err(AllocError::InvalidProblem(format!(
                    "objective norm exponent must be finite and > 0, got {p}"
                )));
            }
        }
        let n = problem.items.len();
        let mut in_group = vec![false; n];
        let mut member_lists: Vec<Vec<usize>> = Vec::new();
        for g in &problem.groups {
            for &m in g {
                in_group[m] = true;
            }
            member_lists.push(g.clone());
        }
        for (i, &g) in in_group.iter().enumerate() {
            if !g {
                member_lists.push(vec![i]);
            }
        }
        // Classes in model order of their first member, so results do not depend on group order.
        member_lists.sort_by_key(|m| *m.iter().min().expect("non-empty"));

        let mut classes = Vec::with_capacity(member_lists.len());
        for members in member_lists {
            classes.push(build_class(problem, objective, members)?);
        }
        let mut max_total: u64 = 0;
        for c in &classes {
            let mx = c.opts.iter().map(|o| o.cost).max().unwrap_or(0);
            max_total = max_total.checked_add(mx).ok_or_else(|| {
                AllocError::InvalidProblem("total cost in bits overflows u64".into())
            })?;
        }
        let mckp = Mckp::new(
            classes
                .iter()
                .map(|c| Class::new(c.opts.iter().map(|o| (o.cost, o.value)).collect()))
                .collect(),
        );
        Ok(Prepared {
            problem: problem.clone(),
            objective,
            numel: problem.total_numel(),
            classes,
            mckp,
        })
    }

    /// Smallest and largest total cost in bits reachable under the constraints.
    pub fn cost_range(&self) -> (u64, u64) {
        (self.mckp.min_cost, self.mckp.max_cost())
    }

    /// Number of knapsack classes (items after fusing groups).
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    /// The budget in bits for `target`, or `Infeasible` naming the feasible range.
    pub fn budget_bits(&self, target: Target) -> Result<u64, AllocError> {
        let budget = target.budget_bits(self.numel)?;
        let (lo, hi) = self.cost_range();
        if budget < lo {
            let (min, max) = target.describe_range(lo, hi, self.numel);
            return Err(AllocError::Infeasible {
                target: target.to_string(),
                min,
                max,
            });
        }
        Ok(budget)
    }

    pub fn solve(
        &self,
        target: Target,
        solver: SolverKind,
        anneal_params: &AnnealParams,
        cancel: &AtomicBool,
    ) -> Result<Solution, AllocError> {
        let t0 = Instant::now();
        let budget = self.budget_bits(target)?;
        if cancel.load(Ordering::Relaxed) {
            return Err(AllocError::Cancelled);
        }
        let mut stats = Stats {
            classes: self.classes.len(),
            ..Stats::default()
        };
        let minimax_objective = self.objective == Objective::Minimax;
        let (class_choice, lower_bound, optimal) = match solver {
            SolverKind::Minimax => {
                let (ch, t) = minimax(self, budget, cancel)?;
                stats.lp_bound = None;
                if minimax_objective {
                    (ch, Some(t), true)
                } else {
                    (ch, None, false)
                }
            }
            SolverKind::Exact if minimax_objective => {
                let (ch, t) = minimax(self, budget, cancel)?;
                (ch, Some(t), true)
            }
            SolverKind::Anneal => {
                let r = anneal(self, budget, anneal_params, cancel)?;
                stats.nodes = r.proposals;
                stats.anneal_norm = Some(r.norm);
                (r.choice, None, false)
            }
            SolverKind::Greedy | SolverKind::Lagrangian if minimax_objective => {
                return Err(AllocError::InvalidProblem(format!(
                    "solver {} cannot minimise the minimax objective; use exact or minimax",
                    solver.name()
                )));
            }
            SolverKind::Exact | SolverKind::Greedy | SolverKind::Lagrangian => {
                let sol: McSol = match solver {
                    SolverKind::Exact => exact(&self.mckp, budget, cancel)?,
                    SolverKind::Greedy => hull_greedy(&self.mckp, budget).0,
                    _ => lagrangian(&self.mckp, budget),
                };
                debug_assert!(sol.cost <= budget, "solver exceeded the budget");
                stats.nodes = sol.nodes;
                stats.peak_states = sol.peak_states;
                stats.free_classes = sol.free_classes;
                stats.lp_bound = sol.lp_bound;
                (sol.choice, sol.lower_bound, sol.optimal)
            }
        };
        let mut sol = self.expand(&class_choice, budget, solver, lower_bound, optimal);
        stats.time_s = t0.elapsed().as_secs_f64();
        sol.stats = stats;
        Ok(sol)
    }

    /// EXL2's annealing slots: one per class, every allowed option in cost order (no pruning,
    /// as in EXL2), with the class's Σ raw member error.
    pub fn anneal_slots(&self) -> Vec<Vec<(u64, f64)>> {
        super::anneal::slots_of(self)
    }

    /// Original-item option indices of a class-level choice (as returned for the slots).
    pub fn item_choices(&self, class_choice: &[u32]) -> Vec<usize> {
        let mut choices = vec![0usize; self.problem.items.len()];
        for (c, &k) in self.classes.iter().zip(class_choice) {
            for (&m, &o) in c.members.iter().zip(&c.opts[k as usize].member_opts) {
                choices[m] = o as usize;
            }
        }
        choices
    }

    /// Map a class-level choice back to original items and score it.
    pub(crate) fn expand(
        &self,
        class_choice: &[u32],
        budget: u64,
        solver: SolverKind,
        lower_bound: Option<f64>,
        optimal: bool,
    ) -> Solution {
        let choices = self.item_choices(class_choice);
        let cost_bits: u64 = self
            .problem
            .items
            .iter()
            .zip(&choices)
            .map(|(it, &c)| it.options[c].bits)
            .sum();
        assert!(
            cost_bits <= budget,
            "internal error: solver exceeded the budget"
        );
        let objective = self.objective.evaluate(&self.problem, &choices);
        let (lower_bound, gap) = if optimal {
            (Some(objective), Some(0.0))
        } else {
            match lower_bound {
                Some(lb) => {
                    let lb = lb.min(objective);
                    let gap = if objective > 0.0 {
                        (objective - lb) / objective
                    } else {
                        0.0
                    };
                    (Some(lb), Some(gap.max(0.0)))
                }
                None => (None, None),
            }
        };
        Solution {
            choices,
            cost_bits,
            budget_bits: budget,
            bpw: cost_bits as f64 / self.numel as f64,
            objective,
            lower_bound,
            gap,
            optimal,
            solver,
            stats: Stats::default(),
        }
    }
}

fn build_class(
    problem: &Problem,
    objective: Objective,
    members: Vec<usize>,
) -> Result<ClassInfo, AllocError> {
    let first = &problem.items[members[0]];
    let mut opts = Vec::new();
    for (k0, o0) in first.options.iter().enumerate() {
        if !option_allowed(first, o0) {
            continue;
        }
        let mut member_opts = vec![k0 as u32];
        let mut ok = true;
        for &m in &members[1..] {
            let it = &problem.items[m];
            match it.options.iter().position(|o| o.config == o0.config) {
                Some(k) if option_allowed(it, &it.options[k]) => member_opts.push(k as u32),
                _ => {
                    ok = false;
                    break;
                }
            }
        }
        if !ok {
            continue;
        }
        let mut cost = 0u64;
        let (mut value, mut err_sum, mut err_max) = (0.0, 0.0, 0.0f64);
        for (&m, &k) in members.iter().zip(&member_opts) {
            let it = &problem.items[m];
            let o = &it.options[k as usize];
            cost = cost.checked_add(o.bits).ok_or_else(|| {
                AllocError::InvalidProblem(format!("cost of group {members:?} overflows u64"))
            })?;
            err_sum += o.error;
            err_max = err_max.max(o.error);
            value += objective.item_value(o.error, it.weight);
        }
        opts.push(ClassOpt {
            cost,
            value,
            err_sum,
            err_max,
            member_opts,
        });
    }
    if opts.is_empty() {
        let names: Vec<&str> = members
            .iter()
            .map(|&m| problem.items[m].name.as_str())
            .collect();
        return Err(AllocError::InvalidProblem(format!(
            "fused group of items {members:?} {names:?} has no config allowed for every member"
        )));
    }
    opts.sort_by(|a, b| {
        a.cost
            .cmp(&b.cost)
            .then(a.value.total_cmp(&b.value))
            .then(a.member_opts.cmp(&b.member_opts))
    });
    Ok(ClassInfo { members, opts })
}
