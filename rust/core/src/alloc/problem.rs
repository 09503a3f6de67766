//! Problem data: items × options with exact integer costs and f64 errors, the targets, the
//! objectives and the solution record every solver returns.
use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum AllocError {
    #[error("infeasible target {target}: feasible range is {min} to {max}")]
    Infeasible {
        target: String,
        min: String,
        max: String,
    },
    #[error("invalid problem: {0}")]
    InvalidProblem(String),
    #[error("invalid target: {0}")]
    InvalidTarget(String),
    #[error("allocation cancelled")]
    Cancelled,
}

/// One option of an item: a quantization config with its exact cost and measured error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Opt {
    /// Exact cost in bits of this option (weights, scales, group table, permutation).
    pub bits: u64,
    /// Error of this option (raw; objectives transform it).
    pub error: f64,
    /// Identifier of the config, used to tie fused items to the same config.
    pub config: u32,
}

fn default_weight() -> f64 {
    1.0
}

/// One item: a linear layer (or an exllamav2 module) that must take exactly one option.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    pub name: String,
    /// Number of weights (in_features × out_features) — the bpw denominator.
    pub numel: u64,
    pub options: Vec<Opt>,
    /// Objective weight wᵢ (1.0 by default).
    #[serde(default = "default_weight")]
    pub weight: f64,
    #[serde(default)]
    pub min_bpw: Option<f64>,
    #[serde(default)]
    pub max_bpw: Option<f64>,
    /// Index into `options` this item is pinned to.
    #[serde(default)]
    pub pinned: Option<usize>,
    /// Config ids that may not be chosen.
    #[serde(default)]
    pub excluded: Vec<u32>,
}

impl Item {
    /// An unconstrained item with weight 1.
    pub fn new(name: impl Into<String>, numel: u64, options: Vec<Opt>) -> Self {
        Item {
            name: name.into(),
            numel,
            options,
            weight: 1.0,
            min_bpw: None,
            max_bpw: None,
            pinned: None,
            excluded: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Problem {
    pub items: Vec<Item>,
    /// Fused groups: item indices that must all take the same `config`.
    #[serde(default)]
    pub groups: Vec<Vec<usize>>,
}

impl Problem {
    /// Σ numel over all items: the bpw denominator.
    pub fn total_numel(&self) -> u64 {
        self.items.iter().map(|it| it.numel).sum()
    }
}

/// The size budget.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Target {
    /// Average bits per weight over all items: Σbits ≤ floor(bpw·Σnumel).
    Bpw(f64),
    /// Total bits: Σbits ≤ bits.
    Bits(u64),
    /// File size / VRAM in bytes with a fixed overhead: Σbits ≤ 8·(budget − overhead).
    Bytes { budget: u64, overhead: u64 },
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Bpw(b) => write!(f, "{b} bpw"),
            Target::Bits(b) => write!(f, "{b} bits"),
            Target::Bytes { budget, overhead } => {
                write!(f, "{budget} bytes (overhead {overhead} bytes)")
            }
        }
    }
}

impl Target {
    /// The budget in bits for a problem of `numel` weights.
    pub fn budget_bits(&self, numel: u64) -> Result<u64, AllocError> {
        match *self {
            Target::Bpw(b) => {
                if !b.is_finite() || b <= 0.0 {
                    return Err(AllocError::InvalidTarget(format!(
                        "bpw must be a positive finite number, got {b}"
                    )));
                }
                let bits = (b * numel as f64).floor();
                Ok(if bits >= u64::MAX as f64 {
                    u64::MAX
                } else {
                    bits as u64
                })
            }
            Target::Bits(b) => Ok(b),
            Target::Bytes { budget, overhead } => {
                let net = budget.checked_sub(overhead).ok_or_else(|| {
                    AllocError::InvalidTarget(format!(
                        "overhead of {overhead} bytes exceeds the budget of {budget} bytes"
                    ))
                })?;
                Ok(net.saturating_mul(8))
            }
        }
    }

    /// Human-readable feasible range `(min, max)` of reachable costs in this target's unit.
    pub(crate) fn describe_range(
        &self,
        min_bits: u64,
        max_bits: u64,
        numel: u64,
    ) -> (String, String) {
        let bpw = |b: u64| b as f64 / numel as f64;
        let bytes = |b: u64| b.div_ceil(8);
        match *self {
            Target::Bytes { overhead, .. } => (
                format!(
                    "{} bytes ({:.4} bpw)",
                    bytes(min_bits) + overhead,
                    bpw(min_bits)
                ),
                format!(
                    "{} bytes ({:.4} bpw)",
                    bytes(max_bits) + overhead,
                    bpw(max_bits)
                ),
            ),
            Target::Bits(_) => (
                format!("{min_bits} bits ({:.4} bpw)", bpw(min_bits)),
                format!("{max_bits} bits ({:.4} bpw)", bpw(max_bits)),
            ),
            Target::Bpw(_) => (
                format!("{:.6} bpw ({} bytes)", bpw(min_bits), bytes(min_bits)),
                format!("{:.6} bpw ({} bytes)", bpw(max_bits), bytes(max_bits)),
            ),
        }
    }
}

/// What the allocation minimises.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Objective {
    /// Σ eᵢ.
    Sum,
    /// Σ wᵢ·eᵢ.
    Weighted,
    /// Σ eᵢ^p (EXL2's "norm").
    Norm(f64),
    /// max eᵢ; the leftover budget then lowers Σ eᵢ among the minimax-optimal solutions.
    Minimax,
}

impl Objective {
    /// The separable per-item contribution of one option (for minimax: the raw error).
    pub fn item_value(&self, error: f64, weight: f64) -> f64 {
        match *self {
            Objective::Sum | Objective::Minimax => error,
            Objective::Weighted => weight * error,
            Objective::Norm(p) => error.powf(p),
        }
    }

    /// Evaluate the objective of a full choice vector over the original items.
    pub fn evaluate(&self, problem: &Problem, choices: &[usize]) -> f64 {
        let vals = problem
            .items
            .iter()
            .zip(choices)
            .map(|(it, &c)| self.item_value(it.options[c].error, it.weight));
        match self {
            Objective::Minimax => vals.fold(0.0, f64::max),
            _ => vals.sum(),
        }
    }
}

/// Which algorithm solves the problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SolverKind {
    Exact,
    Greedy,
    Lagrangian,
    Anneal,
    Minimax,
}

impl SolverKind {
    pub const ALL: [SolverKind; 5] = [
        SolverKind::Exact,
        SolverKind::Greedy,
        SolverKind::Lagrangian,
        SolverKind::Anneal,
        SolverKind::Minimax,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            SolverKind::Exact => "exact",
            SolverKind::Greedy => "greedy",
            SolverKind::Lagrangian => "lagrangian",
            SolverKind::Anneal => "anneal",
            SolverKind::Minimax => "minimax",
        }
    }
}

impl std::str::FromStr for SolverKind {
    type Err = AllocError;
    fn from_str(s: &str) -> Result<Self, AllocError> {
        SolverKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                AllocError::InvalidProblem(format!(
                "unknown solver {s:?}: expected one of exact, greedy, lagrangian, anneal, minimax"
            ))
            })
    }
}

/// Work counters of one solve.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Wall time of the solve in seconds (preprocessing shared by a frontier excluded).
    pub time_s: f64,
    /// Items after fusing groups (the knapsack's classes).
    pub classes: usize,
    /// Classes still undecided after reduced-cost fixing (exact) .
    pub free_classes: usize,
    /// DP states generated (exact) / proposals made (anneal) / λ evaluations (lagrangian).
    pub nodes: u64,
    /// Largest DP layer (exact).
    pub peak_states: usize,
    /// The LP (Lagrangian dual) bound, whatever the solver.
    pub lp_bound: Option<f64>,
    /// EXL2's selected norm (anneal only).
    pub anneal_norm: Option<f64>,
}

/// The allocation: one option index per ORIGINAL item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Solution {
    pub choices: Vec<usize>,
    pub cost_bits: u64,
    pub budget_bits: u64,
    pub bpw: f64,
    /// The objective value of `choices` over the original items.
    pub objective: f64,
    /// A proven lower bound on the optimum (in objective units), where the solver has one.
    pub lower_bound: Option<f64>,
    /// Relative gap (objective − lower_bound) / objective, where a bound is known.
    pub gap: Option<f64>,
    /// True when the solver proved `choices` optimal.
    pub optimal: bool,
    pub solver: SolverKind,
    pub stats: Stats,
}

/// Checks everything a solver relies on; errors name the item, group or value at fault.
pub fn validate(problem: &Problem) -> Result<(), AllocError> {
    let bad = |m: String| Err(AllocError::InvalidProblem(m));
    if problem.items.is_empty() {
        return bad("the problem has no items".into());
    }
    let mut total: u64 = 0;
    for (i, it) in problem.items.iter().enumerate() {
        let who = format!("item {i} ({:?})", it.name);
        if it.options.is_empty() {
            return bad(format!("{who} has no options"));
        }
        if it.numel == 0 {
            return bad(format!(
                "{who} has numel 0; expected the number of weights (> 0)"
            ));
        }
        total = match total.checked_add(it.numel) {
            Some(t) => t,
            None => return bad("total numel overflows u64".into()),
        };
        if !it.weight.is_finite() || it.weight < 0.0 {
            return bad(format!(
                "{who} has weight {}; expected a finite number ≥ 0",
                it.weight
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (k, o) in it.options.iter().enumerate() {
            if !o.error.is_finite() || o.error < 0.0 {
                return bad(format!(
                    "{who} option {k} (config {}) has error {}; expected a finite number ≥ 0",
                    o.config, o.error
                ));
            }
            if !seen.insert(o.config) {
                return bad(format!(
                    "{who} lists config {} twice (option {k})",
                    o.config
                ));
            }
        }
        for (label, v) in [("min_bpw", it.min_bpw), ("max_bpw", it.max_bpw)] {
            if let Some(v) = v {
                if !v.is_finite() || v < 0.0 {
                    return bad(format!(
                        "{who} has {label} {v}; expected a finite number ≥ 0"
                    ));
                }
            }
        }
        if let (Some(lo), Some(hi)) = (it.min_bpw, it.max_bpw) {
            if lo > hi {
                return bad(format!("{who} has min_bpw {lo} > max_bpw {hi}"));
            }
        }
        if let Some(p) = it.pinned {
            if p >= it.options.len() {
                return bad(format!(
                    "{who} is pinned to option {p} but has only {} options",
                    it.options.len()
                ));
            }
            let o = &it.options[p];
            if it.excluded.contains(&o.config) {
                return bad(format!(
                    "{who} is pinned to option {p} whose config {} is excluded",
                    o.config
                ));
            }
            if !bpw_allowed(it, o) {
                return bad(format!(
                    "{who} is pinned to option {p} at {:.4} bpw, outside its min/max bpw [{:?}, {:?}]",
                    o.bits as f64 / it.numel as f64,
                    it.min_bpw,
                    it.max_bpw
                ));
            }
        }
        if !it.options.iter().any(|o| option_allowed(it, o)) {
            return bad(format!(
                "{who}: all {} options are excluded by its excluded configs {:?} and min/max bpw [{:?}, {:?}]",
                it.options.len(),
                it.excluded,
                it.min_bpw,
                it.max_bpw
            ));
        }
    }
    let mut group_of = vec![usize::MAX; problem.items.len()];
    for (g, members) in problem.groups.iter().enumerate() {
        if members.is_empty() {
            return bad(format!("group {g} is empty"));
        }
        for &m in members {
            if m >= problem.items.len() {
                return bad(format!(
                    "group {g} references item {m}, but the problem has {} items",
                    problem.items.len()
                ));
            }
            if group_of[m] != usize::MAX {
                return bad(format!(
                    "item {m} ({:?}) is in group {} and group {g}; an item may be in one group",
                    problem.items[m].name, group_of[m]
                ));
            }
            group_of[m] = g;
        }
    }
    Ok(())
}

pub(crate) fn bpw_allowed(it: &Item, o: &Opt) -> bool {
    let bpw = o.bits as f64 / it.numel as f64;
    it.min_bpw.is_none_or(|lo| bpw >= lo) && it.max_bpw.is_none_or(|hi| bpw <= hi)
}

/// Whether an option survives the item's exclusions, min/max bpw and pin.
pub(crate) fn option_allowed(it: &Item, o: &Opt) -> bool {
    if let Some(p) = it.pinned {
        return it.options[p].config == o.config;
    }
    !it.excluded.contains(&o.config) && bpw_allowed(it, o)
}
