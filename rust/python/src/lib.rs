//! exl2rs._core: thin PyO3 bindings over exl2rs-core. Each submodule binds one core module.
use pyo3::prelude::*;

mod alloc;
mod buffers;
mod cancel;
mod errors;
mod measurement;
mod pack;
mod qparams;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    errors::register(m)?;
    qparams::register(m)?;
    alloc::register(m)?;
    measurement::register(m)?;
    pack::register(m)?;
    buffers::register(m)?;
    // pyo3 keeps an `__all__` of every added name; the typed facade, not this private
    // module, defines the public surface, so drop it (and keep the stub check simple).
    m.delattr("__all__")?;
    Ok(())
}
