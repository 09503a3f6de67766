//! exl2rs._core: thin PyO3 bindings over exl2rs-core. Each submodule binds one core module.
use pyo3::prelude::*;

mod errors;
mod pack;
mod qparams;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    errors::register(m)?;
    qparams::register(m)?;
    pack::register(m)?;
    Ok(())
}
