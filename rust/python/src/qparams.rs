//! Bindings of `exl2rs_core::qparams`. A config crosses the FFI as the tuple
//! `(bits, bits_prop, group_size, scale_bits)`; the typed Python class is `exl2rs.qparams.QParams`.
use crate::errors::to_py;
use exl2rs_core::qparams::{self, LinearKind, QParams};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

pub type QTuple = (Vec<u8>, Vec<f64>, Vec<u32>, u8);

pub fn from_tuple(t: QTuple) -> PyResult<QParams> {
    QParams::new(t.0, t.1, t.2, t.3).map_err(to_py)
}

pub fn to_tuple(q: &QParams) -> QTuple {
    (
        q.bits.clone(),
        q.bits_prop.clone(),
        q.group_size.clone(),
        q.scale_bits,
    )
}

#[pyfunction]
fn qparams_validate(cfg: QTuple) -> PyResult<()> {
    from_tuple(cfg).map(|_| ())
}

#[pyfunction]
fn qparams_desc(cfg: QTuple) -> PyResult<String> {
    Ok(from_tuple(cfg)?.desc())
}

#[pyfunction]
fn qparams_total_bits(cfg: QTuple, rows: usize, cols: usize) -> PyResult<u64> {
    from_tuple(cfg)?.total_bits(rows, cols).map_err(to_py)
}

/// Groups as `(bits, row_start, rows)` in act-order row order.
#[pyfunction]
fn qparams_groups(cfg: QTuple, rows: usize) -> PyResult<Vec<(u8, u32, u32)>> {
    let groups = from_tuple(cfg)?.groups(rows).map_err(to_py)?;
    Ok(groups
        .into_iter()
        .map(|g| (g.bits, g.row_start, g.rows))
        .collect())
}

#[pyfunction]
fn qparams_candidates(linear: &str) -> PyResult<Vec<QTuple>> {
    let kind = LinearKind::from_name(linear).ok_or_else(|| {
        let names: Vec<&str> = LinearKind::ALL.iter().map(|k| k.name()).collect();
        PyValueError::new_err(format!(
            "unknown linear kind {linear:?}; expected one of {names:?}"
        ))
    })?;
    Ok(qparams::candidates(kind).iter().map(to_tuple).collect())
}

#[pyfunction]
fn qparams_attn_table() -> Vec<Vec<QTuple>> {
    qparams::attn_table()
        .iter()
        .map(|r| r.iter().map(to_tuple).collect())
        .collect()
}

#[pyfunction]
fn qparams_mlp_table() -> Vec<Vec<QTuple>> {
    qparams::mlp_table()
        .iter()
        .map(|r| r.iter().map(to_tuple).collect())
        .collect()
}

#[pyfunction]
fn qparams_head_config(bits: u8) -> PyResult<QTuple> {
    Ok(to_tuple(&qparams::head_config(bits).map_err(to_py)?))
}

#[pyfunction]
fn qparams_to_exllamav2_json(cfg: QTuple) -> PyResult<String> {
    Ok(from_tuple(cfg)?.to_exllamav2_json().to_string())
}

#[pyfunction]
fn qparams_from_exllamav2_json(text: &str) -> PyResult<QTuple> {
    let v: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| PyValueError::new_err(format!("QParams JSON does not parse: {e}")))?;
    Ok(to_tuple(&QParams::from_exllamav2_json(&v).map_err(to_py)?))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(qparams_validate, m)?)?;
    m.add_function(wrap_pyfunction!(qparams_desc, m)?)?;
    m.add_function(wrap_pyfunction!(qparams_total_bits, m)?)?;
    m.add_function(wrap_pyfunction!(qparams_groups, m)?)?;
    m.add_function(wrap_pyfunction!(qparams_candidates, m)?)?;
    m.add_function(wrap_pyfunction!(qparams_attn_table, m)?)?;
    m.add_function(wrap_pyfunction!(qparams_mlp_table, m)?)?;
    m.add_function(wrap_pyfunction!(qparams_head_config, m)?)?;
    m.add_function(wrap_pyfunction!(qparams_to_exllamav2_json, m)?)?;
    m.add_function(wrap_pyfunction!(qparams_from_exllamav2_json, m)?)?;
    Ok(())
}
