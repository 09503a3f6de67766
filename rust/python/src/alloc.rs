//! Bindings of `exl2rs_core::alloc`: `Problem` (built from NumPy arrays or JSON) and its
//! `solve` / `frontier`, returning `Solution` objects. A problem keeps its prepared (pruned,
//! fused) form per objective, so re-solving many targets costs only the solve.
use crate::cancel;
use crate::errors::to_py;
use exl2rs_core::alloc::{
    self, AllocError, AnnealParams, Item, Objective, Opt, Prepared, Problem, Solution, SolveConfig,
    SolverKind, Target,
};
use numpy::PyReadonlyArray1;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::sync::{Arc, Mutex};

#[pyclass(name = "Problem", module = "exl2rs._core", frozen)]
pub struct PyProblem {
    pub inner: Arc<Problem>,
    prepared: Mutex<Option<(Objective, Arc<Prepared>)>>,
}

impl PyProblem {
    pub fn new(p: Problem) -> Self {
        PyProblem {
            inner: Arc::new(p),
            prepared: Mutex::new(None),
        }
    }

    fn prepared(&self, objective: Objective) -> PyResult<Arc<Prepared>> {
        let mut slot = self.prepared.lock().expect("prepared cache poisoned");
        if let Some((o, p)) = slot.as_ref() {
            if *o == objective {
                return Ok(p.clone());
            }
        }
        let p = Arc::new(Prepared::new(&self.inner, objective).map_err(to_py)?);
        *slot = Some((objective, p.clone()));
        Ok(p)
    }
}

fn parse_objective(objective: &str, norm: Option<f64>) -> PyResult<Objective> {
    match objective {
        "sum" => Ok(Objective::Sum),
        "weighted" => Ok(Objective::Weighted),
        "minimax" => Ok(Objective::Minimax),
        "norm" | "power" => {
            let p = norm.unwrap_or(2.0);
            if !(p.is_finite() && p > 0.0) {
                return Err(PyValueError::new_err(format!(
                    "norm must be positive, got {p}"
                )));
            }
            Ok(Objective::Norm(p))
        }
        other => Err(PyValueError::new_err(format!(
            "unknown objective {other:?}: expected sum, weighted, norm or minimax"
        ))),
    }
}

fn parse_target(
    bpw: Option<f64>,
    bits: Option<u64>,
    bytes: Option<u64>,
    overhead: u64,
) -> PyResult<Target> {
    match (bpw, bits, bytes) {
        (Some(b), None, None) => Ok(Target::Bpw(b)),
        (None, Some(b), None) => Ok(Target::Bits(b)),
        (None, None, Some(b)) => Ok(Target::Bytes {
            budget: b,
            overhead,
        }),
        _ => Err(PyValueError::new_err(
            "give exactly one target: target_bpw, target_bits or target_bytes",
        )),
    }
}

#[allow(clippy::too_many_arguments)]
fn solve_config(
    solver: &str,
    objective: &str,
    norm: Option<f64>,
    seed: u64,
    anneal_samples: Option<u32>,
    anneal_iterations: Option<u32>,
) -> PyResult<SolveConfig> {
    let solver: SolverKind = solver.parse().map_err(to_py)?;
    let mut anneal = AnnealParams {
        seed,
        ..AnnealParams::default()
    };
    if let Some(s) = anneal_samples {
        anneal.samples = s;
    }
    if let Some(i) = anneal_iterations {
        anneal.iterations = i;
    }
    Ok(SolveConfig {
        objective: parse_objective(objective, norm)?,
        solver,
        anneal,
    })
}

#[pymethods]
impl PyProblem {
    /// Builds a problem from per-item arrays: `bits[i]` / `errors[i]` / `configs[i]` are the
    /// options of item i. `groups` lists item indices tied to one config.
    #[staticmethod]
    #[pyo3(signature = (names, numel, bits, errors, configs=None, groups=None, weights=None))]
    #[allow(clippy::too_many_arguments)]
    fn from_arrays(
        names: Vec<String>,
        numel: Vec<u64>,
        bits: Vec<PyReadonlyArray1<'_, u64>>,
        errors: Vec<PyReadonlyArray1<'_, f64>>,
        configs: Option<Vec<PyReadonlyArray1<'_, u32>>>,
        groups: Option<Vec<Vec<usize>>>,
        weights: Option<Vec<f64>>,
    ) -> PyResult<Self> {
        let n = names.len();
        if numel.len() != n || bits.len() != n || errors.len() != n {
            return Err(PyValueError::new_err(format!(
                "names, numel, bits and errors must have one entry per item: got {}, {}, {}, {}",
                n,
                numel.len(),
                bits.len(),
                errors.len()
            )));
        }
        if let Some(c) = &configs {
            if c.len() != n {
                return Err(PyValueError::new_err(format!(
                    "configs has {} entries for {n} items",
                    c.len()
                )));
            }
        }
        if let Some(w) = &weights {
            if w.len() != n {
                return Err(PyValueError::new_err(format!(
                    "weights has {} entries for {n} items",
                    w.len()
                )));
            }
        }
        let mut items = Vec::with_capacity(n);
        for i in 0..n {
            let b = bits[i].as_slice()?;
            let e = errors[i].as_slice()?;
            if b.len() != e.len() {
                return Err(PyValueError::new_err(format!(
                    "item {:?}: {} costs but {} errors",
                    names[i],
                    b.len(),
                    e.len()
                )));
            }
            let cfg: Vec<u32> = match &configs {
                Some(c) => {
                    let c = c[i].as_slice()?;
                    if c.len() != b.len() {
                        return Err(PyValueError::new_err(format!(
                            "item {:?}: {} costs but {} config ids",
                            names[i],
                            b.len(),
                            c.len()
                        )));
                    }
                    c.to_vec()
                }
                None => (0..b.len() as u32).collect(),
            };
            let options = (0..b.len())
                .map(|j| Opt {
                    bits: b[j],
                    error: e[j],
                    config: cfg[j],
                })
                .collect();
            let mut item = Item::new(names[i].clone(), numel[i], options);
            if let Some(w) = &weights {
                item.weight = w[i];
            }
            items.push(item);
        }
        let problem = Problem {
            items,
            groups: groups.unwrap_or_default(),
        };
        alloc::validate(&problem).map_err(to_py)?;
        Ok(PyProblem::new(problem))
    }

    #[staticmethod]
    fn from_json(text: &str) -> PyResult<Self> {
        let p: Problem = serde_json::from_str(text)
            .map_err(|e| to_py(AllocError::InvalidProblem(format!("problem JSON: {e}"))))?;
        alloc::validate(&p).map_err(to_py)?;
        Ok(PyProblem::new(p))
    }

    fn to_json(&self) -> PyResult<String> {
        serde_json::to_string(&*self.inner).map_err(|e| PyValueError::new_err(e.to_string()))
    }

    /// A copy with item constraints changed: `pins` (item → option index), `min_bpw` /
    /// `max_bpw` (item → bound), `exclude` (item → config ids), `weights` (item → weight).
    #[pyo3(signature = (pins=None, min_bpw=None, max_bpw=None, exclude=None, weights=None))]
    fn with_constraints(
        &self,
        pins: Option<Vec<(usize, usize)>>,
        min_bpw: Option<Vec<(usize, f64)>>,
        max_bpw: Option<Vec<(usize, f64)>>,
        exclude: Option<Vec<(usize, Vec<u32>)>>,
        weights: Option<Vec<(usize, f64)>>,
    ) -> PyResult<Self> {
        let mut p = (*self.inner).clone();
        let n = p.items.len();
        let check = |i: usize| {
            if i < n {
                Ok(i)
            } else {
                Err(PyValueError::new_err(format!(
                    "item index {i} out of range ({n} items)"
                )))
            }
        };
        for (i, o) in pins.unwrap_or_default() {
            p.items[check(i)?].pinned = Some(o);
        }
        for (i, b) in min_bpw.unwrap_or_default() {
            p.items[check(i)?].min_bpw = Some(b);
        }
        for (i, b) in max_bpw.unwrap_or_default() {
            p.items[check(i)?].max_bpw = Some(b);
        }
        for (i, c) in exclude.unwrap_or_default() {
            p.items[check(i)?].excluded.extend(c);
        }
        for (i, w) in weights.unwrap_or_default() {
            p.items[check(i)?].weight = w;
        }
        alloc::validate(&p).map_err(to_py)?;
        Ok(PyProblem::new(p))
    }

    #[getter]
    fn num_items(&self) -> usize {
        self.inner.items.len()
    }

    #[getter]
    fn total_numel(&self) -> u64 {
        self.inner.total_numel()
    }

    #[getter]
    fn names(&self) -> Vec<String> {
        self.inner.items.iter().map(|i| i.name.clone()).collect()
    }

    #[getter]
    fn groups(&self) -> Vec<Vec<usize>> {
        self.inner.groups.clone()
    }

    /// Options of item `i` as (bits, error, config) triples.
    fn options(&self, i: usize) -> PyResult<Vec<(u64, f64, u32)>> {
        let it = self.inner.items.get(i).ok_or_else(|| {
            PyValueError::new_err(format!(
                "item index {i} out of range ({} items)",
                self.inner.items.len()
            ))
        })?;
        Ok(it
            .options
            .iter()
            .map(|o| (o.bits, o.error, o.config))
            .collect())
    }

    /// Number of weights of item `i` (its bpw denominator).
    fn item_numel(&self, i: usize) -> PyResult<u64> {
        self.inner.items.get(i).map(|it| it.numel).ok_or_else(|| {
            PyValueError::new_err(format!(
                "item index {i} out of range ({} items)",
                self.inner.items.len()
            ))
        })
    }

    /// (min_bits, max_bits) reachable under the constraints.
    #[pyo3(signature = (objective="sum", norm=None))]
    fn cost_range(&self, objective: &str, norm: Option<f64>) -> PyResult<(u64, u64)> {
        Ok(self
            .prepared(parse_objective(objective, norm)?)?
            .cost_range())
    }

    #[pyo3(signature = (*, target_bpw=None, target_bits=None, target_bytes=None, overhead=0,
        solver="exact", objective="sum", norm=None, seed=0, anneal_samples=None,
        anneal_iterations=None))]
    #[allow(clippy::too_many_arguments)]
    fn solve(
        &self,
        py: Python<'_>,
        target_bpw: Option<f64>,
        target_bits: Option<u64>,
        target_bytes: Option<u64>,
        overhead: u64,
        solver: &str,
        objective: &str,
        norm: Option<f64>,
        seed: u64,
        anneal_samples: Option<u32>,
        anneal_iterations: Option<u32>,
    ) -> PyResult<PySolution> {
        let target = parse_target(target_bpw, target_bits, target_bytes, overhead)?;
        let cfg = solve_config(
            solver,
            objective,
            norm,
            seed,
            anneal_samples,
            anneal_iterations,
        )?;
        let prep = self.prepared(cfg.objective)?;
        let sol = cancel::run(py, |c| prep.solve(target, cfg.solver, &cfg.anneal, c))?;
        sol.map(PySolution::from).map_err(to_py)
    }

    /// Solves every bpw target in parallel; an infeasible target yields None in its place.
    #[pyo3(signature = (targets_bpw, *, solver="exact", objective="sum", norm=None, seed=0,
        anneal_samples=None, anneal_iterations=None))]
    #[allow(clippy::too_many_arguments)]
    fn frontier(
        &self,
        py: Python<'_>,
        targets_bpw: Vec<f64>,
        solver: &str,
        objective: &str,
        norm: Option<f64>,
        seed: u64,
        anneal_samples: Option<u32>,
        anneal_iterations: Option<u32>,
    ) -> PyResult<Vec<Option<PySolution>>> {
        let cfg = solve_config(
            solver,
            objective,
            norm,
            seed,
            anneal_samples,
            anneal_iterations,
        )?;
        let prep = self.prepared(cfg.objective)?;
        let targets: Vec<Target> = targets_bpw.iter().map(|&b| Target::Bpw(b)).collect();
        let sols = cancel::run(py, |c| alloc::frontier_prepared(&prep, &targets, &cfg, c))?;
        sols.into_iter()
            .map(|r| match r {
                Ok(s) => Ok(Some(PySolution::from(s))),
                Err(AllocError::Infeasible { .. }) => Ok(None),
                Err(e) => Err(to_py(e)),
            })
            .collect()
    }

    fn __len__(&self) -> usize {
        self.inner.items.len()
    }

    fn __repr__(&self) -> String {
        format!(
            "Problem({} items, {} fused groups, {} weights)",
            self.inner.items.len(),
            self.inner.groups.len(),
            self.inner.total_numel()
        )
    }
}

#[pyclass(name = "Solution", module = "exl2rs._core", frozen)]
pub struct PySolution {
    #[pyo3(get)]
    pub choices: Vec<usize>,
    #[pyo3(get)]
    pub cost_bits: u64,
    #[pyo3(get)]
    pub budget_bits: u64,
    #[pyo3(get)]
    pub bpw: f64,
    #[pyo3(get)]
    pub objective: f64,
    #[pyo3(get)]
    pub lower_bound: Option<f64>,
    #[pyo3(get)]
    pub gap: Option<f64>,
    #[pyo3(get)]
    pub optimal: bool,
    #[pyo3(get)]
    pub solver: String,
    #[pyo3(get)]
    pub time_s: f64,
    #[pyo3(get)]
    pub anneal_norm: Option<f64>,
    stats_json: String,
}

impl From<Solution> for PySolution {
    fn from(s: Solution) -> Self {
        PySolution {
            stats_json: serde_json::to_string(&s.stats).unwrap_or_default(),
            choices: s.choices,
            cost_bits: s.cost_bits,
            budget_bits: s.budget_bits,
            bpw: s.bpw,
            objective: s.objective,
            lower_bound: s.lower_bound,
            gap: s.gap,
            optimal: s.optimal,
            solver: s.solver.name().to_string(),
            time_s: s.stats.time_s,
            anneal_norm: s.stats.anneal_norm,
        }
    }
}

#[pymethods]
impl PySolution {
    /// Solver statistics (time, classes, DP states, LP bound, …) as a dict.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let json = py.import("json")?;
        json.call_method1("loads", (&self.stats_json,))?
            .cast_into::<PyDict>()
            .map_err(Into::into)
    }

    fn __repr__(&self) -> String {
        format!(
            "Solution(solver={}, bpw={:.4}, cost_bits={}, objective={:.6e}, optimal={}, gap={})",
            self.solver,
            self.bpw,
            self.cost_bits,
            self.objective,
            self.optimal,
            self.gap.map_or("None".into(), |g| format!("{g:.2e}"))
        )
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyProblem>()?;
    m.add_class::<PySolution>()?;
    Ok(())
}
