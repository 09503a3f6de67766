//! Bindings of `exl2rs_core::measurement`: the native measurement file and exllamav2's
//! `measurement.json`, their problem conversions and exllamav2 strategy write-back.
use crate::alloc::PyProblem;
use crate::errors::to_py;
use exl2rs_core::measurement::{
    inject_strategy, ErrorScale, Exl2Measurement, Exl2Shapes, LinearProblemOptions, LlamaDims,
    NativeMeasurement,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use std::path::PathBuf;

#[pyclass(name = "Measurement", module = "exl2rs._core", frozen)]
pub struct PyMeasurement {
    inner: NativeMeasurement,
}

fn parse_scale(scale: &str) -> PyResult<ErrorScale> {
    match scale {
        "raw" => Ok(ErrorScale::Raw),
        "relative" => Ok(ErrorScale::Relative),
        "fisher" => Ok(ErrorScale::Fisher),
        "auto" => Ok(ErrorScale::Auto),
        other => Err(PyValueError::new_err(format!(
            "unknown error scale {other:?}: expected 'raw', 'relative', 'fisher' or 'auto'"
        ))),
    }
}

#[pymethods]
impl PyMeasurement {
    /// Loads and validates a native measurement file.
    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = py
            .detach(|| NativeMeasurement::load(&path))
            .map_err(to_py)?;
        Ok(PyMeasurement { inner })
    }

    #[staticmethod]
    fn from_json(py: Python<'_>, text: &str) -> PyResult<Self> {
        let inner = py
            .detach(|| NativeMeasurement::from_json_str(text))
            .map_err(to_py)?;
        Ok(PyMeasurement { inner })
    }

    /// Validates and writes the file atomically (temp file, fsync, rename).
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        py.detach(|| self.inner.save(&path)).map_err(to_py)
    }

    fn to_json(&self) -> PyResult<String> {
        self.inner.to_json_string().map_err(to_py)
    }

    #[getter]
    fn model_name(&self) -> String {
        self.inner.model.name.clone()
    }

    #[getter]
    fn model_hash(&self) -> String {
        self.inner.model.hash.clone()
    }

    #[getter]
    fn calibration_hash(&self) -> String {
        self.inner.calibration.hash.clone()
    }

    #[getter]
    fn candidates_hash(&self) -> String {
        self.inner.candidates_hash.clone()
    }

    #[getter]
    fn num_layers(&self) -> u64 {
        self.inner.model.num_layers as u64
    }

    /// Names of the linears, in file order (the item order of `linear_problem`).
    #[getter]
    fn linear_names(&self) -> Vec<String> {
        self.inner.linears.iter().map(|l| l.name.clone()).collect()
    }

    /// (in_features, out_features) per linear, in file order.
    #[getter]
    fn linear_shapes(&self) -> Vec<(u64, u64)> {
        self.inner
            .linears
            .iter()
            .map(|l| (l.in_features, l.out_features))
            .collect()
    }

    #[getter]
    fn module_names(&self) -> Vec<String> {
        self.inner.modules.iter().map(|m| m.name.clone()).collect()
    }

    /// The configs of the file, as exllamav2 QParams dicts (JSON strings).
    fn configs_json(&self) -> Vec<String> {
        self.inner
            .configs
            .iter()
            .map(|q| q.to_exllamav2_json().to_string())
            .collect()
    }

    /// Config index of option `j` of linear `i`.
    fn option_config(&self, i: usize, j: usize) -> PyResult<u32> {
        let l = self
            .inner
            .linears
            .get(i)
            .ok_or_else(|| PyValueError::new_err(format!("linear index {i} out of range")))?;
        let o = l.options.get(j).ok_or_else(|| {
            PyValueError::new_err(format!("linear {:?} has no option {j}", l.name))
        })?;
        Ok(o.config)
    }

    /// Whether every linear carries a sensitivity (the "fisher" scale is available).
    #[getter]
    fn has_sensitivities(&self) -> bool {
        self.inner.has_sensitivities()
    }

    /// The scale `scale` means for this file ("auto" → "fisher" or "relative").
    fn resolve_scale(&self, scale: &str) -> PyResult<&'static str> {
        Ok(match self.inner.resolve_scale(parse_scale(scale)?) {
            ErrorScale::Raw => "raw",
            ErrorScale::Relative => "relative",
            ErrorScale::Fisher | ErrorScale::Auto => "fisher",
        })
    }

    /// One item per linear; `scale` = "raw" (tr(ΔW H ΔWᵀ)), "relative" (÷ tr(W H Wᵀ)),
    /// "fisher" (× the linear's sensitivity) or "auto" (fisher when the file has
    /// sensitivities, else relative); `fuse` ties q/k/v and gate/up to one config.
    #[pyo3(signature = (scale="raw", fuse=false))]
    fn linear_problem(&self, scale: &str, fuse: bool) -> PyResult<PyProblem> {
        let opts = LinearProblemOptions {
            scale: parse_scale(scale)?,
            fuse_shared_inputs: fuse,
        };
        Ok(PyProblem::new(
            self.inner.linear_problem(opts).map_err(to_py)?,
        ))
    }

    /// One item per attention/MLP module with EXL2's joint rows as options (error = 1 − accuracy).
    fn module_problem(&self) -> PyResult<PyProblem> {
        Ok(PyProblem::new(self.inner.module_problem().map_err(to_py)?))
    }

    /// Writes exllamav2's measurement.json (from the module rows) atomically.
    fn write_exllamav2(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        py.detach(|| self.inner.to_exl2()?.save(&path))
            .map_err(to_py)
    }

    /// exllamav2's `strategy` dict (JSON) for a solution of `linear_problem` (choices per linear).
    fn linear_strategy_json(&self, choices: Vec<usize>) -> PyResult<String> {
        Ok(self
            .inner
            .linear_strategy(&choices)
            .map_err(to_py)?
            .to_value()
            .to_string())
    }

    /// exllamav2's `strategy` dict (JSON) for a solution of `module_problem`.
    fn module_strategy_json(&self, choices: Vec<usize>) -> PyResult<String> {
        Ok(self
            .inner
            .module_strategy(&choices)
            .map_err(to_py)?
            .to_value()
            .to_string())
    }

    fn __repr__(&self) -> String {
        format!(
            "Measurement(model={:?}, {} linears, {} modules, {} configs)",
            self.inner.model.name,
            self.inner.linears.len(),
            self.inner.modules.len(),
            self.inner.configs.len()
        )
    }
}

#[pyclass(name = "Exl2Measurement", module = "exl2rs._core", frozen)]
pub struct PyExl2Measurement {
    inner: Exl2Measurement,
}

#[pymethods]
impl PyExl2Measurement {
    /// Loads exllamav2's measurement.json.
    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = py.detach(|| Exl2Measurement::load(&path)).map_err(to_py)?;
        Ok(PyExl2Measurement { inner })
    }

    #[staticmethod]
    fn from_json(text: &str) -> PyResult<Self> {
        Ok(PyExl2Measurement {
            inner: Exl2Measurement::from_json_str(text).map_err(to_py)?,
        })
    }

    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        py.detach(|| self.inner.save(&path)).map_err(to_py)
    }

    fn to_json(&self) -> String {
        self.inner.to_value().to_string()
    }

    #[getter]
    fn module_names(&self) -> Vec<String> {
        self.inner.modules.iter().map(|m| m.name()).collect()
    }

    /// Module items for a Llama-like model of these dimensions (the file holds no shapes).
    /// `count_norms` puts each module's norm weight in the bpw denominator, as exllamav2 does.
    #[pyo3(signature = (*, hidden_size, intermediate_size, num_attention_heads,
        num_key_value_heads, head_dim=None, count_norms=true))]
    fn to_problem(
        &self,
        hidden_size: u64,
        intermediate_size: u64,
        num_attention_heads: u64,
        num_key_value_heads: u64,
        head_dim: Option<u64>,
        count_norms: bool,
    ) -> PyResult<PyProblem> {
        if num_attention_heads == 0 {
            return Err(PyValueError::new_err(
                "num_attention_heads must be positive",
            ));
        }
        let dims = LlamaDims {
            hidden_size,
            intermediate_size,
            num_attention_heads,
            num_key_value_heads,
            head_dim: head_dim.unwrap_or(hidden_size / num_attention_heads),
        };
        let shapes = Exl2Shapes::llama(dims, count_norms);
        Ok(PyProblem::new(
            self.inner.to_problem(&shapes).map_err(to_py)?,
        ))
    }

    /// exllamav2's `strategy` (JSON) for chosen rows, one per module.
    fn strategy_json(&self, choices: Vec<usize>) -> PyResult<String> {
        Ok(self
            .inner
            .strategy(&choices)
            .map_err(to_py)?
            .to_value()
            .to_string())
    }

    /// Writes the strategy for `choices` into an exllamav2 `job_new.json` that has not started
    /// quantizing, so exllamav2's converter quantizes this allocation.
    #[pyo3(signature = (job_path, choices, reuse_measurement=""))]
    fn inject_into_job(
        &self,
        job_path: PathBuf,
        choices: Vec<usize>,
        reuse_measurement: &str,
    ) -> PyResult<()> {
        let strategy = self.inner.strategy(&choices).map_err(to_py)?;
        inject_strategy(&job_path, &self.inner, &strategy, reuse_measurement).map_err(to_py)
    }

    fn __repr__(&self) -> String {
        format!("Exl2Measurement({} modules)", self.inner.modules.len())
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyMeasurement>()?;
    m.add_class::<PyExl2Measurement>()?;
    Ok(())
}
