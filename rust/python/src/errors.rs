//! Python exception hierarchy rooted at `exl2rs.Exl2Error`, and the mapping from core errors.
use exl2rs_core::alloc::AllocError;
use exl2rs_core::Error;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

pyo3::create_exception!(
    _core,
    Exl2Error,
    PyException,
    "Base class of every exl2rs error."
);
pyo3::create_exception!(
    _core,
    InfeasibleTargetError,
    Exl2Error,
    "The size target cannot be met under the constraints; the message gives the feasible range."
);
pyo3::create_exception!(
    _core,
    InvalidProblemError,
    Exl2Error,
    "The allocation problem is malformed (an item, option or constraint is wrong)."
);
pyo3::create_exception!(
    _core,
    MeasurementFileError,
    Exl2Error,
    "A measurement file is malformed, truncated or does not match the model."
);
pyo3::create_exception!(
    _core,
    PackError,
    Exl2Error,
    "Tensors to pack or unpack have the wrong shape, dtype, width or code range."
);
pyo3::create_exception!(
    _core,
    QParamsError,
    Exl2Error,
    "An EXL2 quantization config is invalid or does not fit the matrix."
);
pyo3::create_exception!(
    _core,
    CancelledError,
    Exl2Error,
    "A long-running call was interrupted (Ctrl-C)."
);

/// Converts any core error into the matching Python exception.
pub fn to_py(err: impl Into<Error>) -> PyErr {
    let err = err.into();
    let msg = err.to_string();
    match err {
        Error::Alloc(AllocError::Infeasible { .. }) => InfeasibleTargetError::new_err(msg),
        Error::Alloc(AllocError::Cancelled) => CancelledError::new_err(msg),
        Error::Alloc(_) => InvalidProblemError::new_err(msg),
        Error::Measurement(_) => MeasurementFileError::new_err(msg),
        Error::Pack(_) => PackError::new_err(msg),
        Error::QParams(_) => QParamsError::new_err(msg),
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("Exl2Error", py.get_type::<Exl2Error>())?;
    m.add(
        "InfeasibleTargetError",
        py.get_type::<InfeasibleTargetError>(),
    )?;
    m.add("InvalidProblemError", py.get_type::<InvalidProblemError>())?;
    m.add(
        "MeasurementFileError",
        py.get_type::<MeasurementFileError>(),
    )?;
    m.add("PackError", py.get_type::<PackError>())?;
    m.add("QParamsError", py.get_type::<QParamsError>())?;
    m.add("CancelledError", py.get_type::<CancelledError>())?;
    Ok(())
}
