//! Fresh NumPy results backed by `exl2rs_core::buffers`: large outputs (pack, unpack,
//! dequantize) live in recycled, already-faulted mappings, returned to the pool when the last
//! NumPy array or view of them dies. Small ones are plain NumPy arrays.
use std::sync::OnceLock;

use exl2rs_core::buffers::{Buffer, BufferPool};
use numpy::ndarray::ArrayViewMut2;
use numpy::{Element, PyArray2};
use pyo3::exceptions::PyMemoryError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// Below this NumPy's own allocation is cheap (heap memory, no fresh mapping per call); it is
/// also where NumPy starts advising huge pages.
const MIN_POOLED_BYTES: usize = 4 << 20;

/// The default limit on idle recycled memory; `EXL2RS_OUTPUT_CACHE_MB` overrides it at import.
const DEFAULT_MAX_MB: usize = 512;

static OUTPUTS: OnceLock<BufferPool> = OnceLock::new();

fn pool() -> &'static BufferPool {
    OUTPUTS.get_or_init(|| {
        let mb = std::env::var("EXL2RS_OUTPUT_CACHE_MB")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(DEFAULT_MAX_MB);
        BufferPool::new(mb.saturating_mul(1 << 20))
    })
}

/// Owns the memory of one NumPy result (its `base`); gives it back to the pool when dropped.
#[pyclass(frozen, module = "exl2rs._core", name = "OutputBuffer")]
pub struct OutputBuffer {
    buf: Option<Buffer>,
}

impl Drop for OutputBuffer {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            pool().give(b);
        }
    }
}

/// A fresh C-ordered `[rows, cols]` array of `T` that the caller overwrites completely, and
/// whether its memory is resident already (a recycled buffer, whose stale contents must not
/// be read).
pub fn fresh_array2<'py, T: Element>(
    py: Python<'py>,
    shape: [usize; 2],
) -> PyResult<(Bound<'py, PyArray2<T>>, bool)> {
    let bytes = shape[0]
        .checked_mul(shape[1])
        .and_then(|n| n.checked_mul(std::mem::size_of::<T>()))
        .ok_or_else(|| PyMemoryError::new_err(format!("an output of shape {shape:?} overflows")))?;
    let pool = pool();
    if bytes < MIN_POOLED_BYTES || bytes > pool.max_bytes() {
        return Ok((PyArray2::<T>::zeros(py, shape, false), false));
    }
    let mut buf = pool.take(bytes).map_err(|e| {
        PyMemoryError::new_err(format!("cannot map {bytes} bytes for an output: {e}"))
    })?;
    let recycled = buf.recycled();
    let ptr = buf.as_mut_ptr().cast::<T>();
    // SAFETY: the mapping is page-aligned (so aligned for T) and holds exactly
    // rows·cols·size_of::<T>() initialised bytes (zero-filled or a previous result's, and
    // every bit pattern is a valid T for the integer and float dtypes used here). It is moved
    // into `owner`, which becomes the array's base, so it outlives the array and every view;
    // nothing else refers to it.
    let view = unsafe { ArrayViewMut2::from_shape_ptr(shape, ptr) };
    let owner = Bound::new(py, OutputBuffer { buf: Some(buf) })?;
    let arr = unsafe { PyArray2::borrow_from_array(&view, owner.into_any()) };
    Ok((arr, recycled))
}

/// Limits the idle memory kept for reuse (bytes; 0 disables recycling and frees it all).
#[pyfunction]
fn set_output_cache(max_bytes: usize) {
    pool().set_max_bytes(max_bytes);
}

/// Frees every idle recycled buffer now (the limit is kept).
#[pyfunction]
fn clear_output_cache() {
    pool().clear();
}

/// The recycling pool's counters: cached_bytes, cached_buffers, max_bytes, hits, misses,
/// min_pooled_bytes.
#[pyfunction]
fn output_cache_info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let s = pool().stats();
    let d = PyDict::new(py);
    d.set_item("cached_bytes", s.cached_bytes)?;
    d.set_item("cached_buffers", s.cached_buffers)?;
    d.set_item("max_bytes", s.max_bytes)?;
    d.set_item("hits", s.hits)?;
    d.set_item("misses", s.misses)?;
    d.set_item("min_pooled_bytes", MIN_POOLED_BYTES)?;
    Ok(d)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<OutputBuffer>()?;
    m.add_function(wrap_pyfunction!(set_output_cache, m)?)?;
    m.add_function(wrap_pyfunction!(clear_output_cache, m)?)?;
    m.add_function(wrap_pyfunction!(output_cache_info, m)?)?;
    Ok(())
}
