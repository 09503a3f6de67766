"""exl2rs: mixed-precision EXL2 quantization to an exact size budget, with a Rust core."""

from exl2rs._core import __version__
from exl2rs.errors import (
    CalibrationError,
    CancelledError,
    Exl2Error,
    HessianError,
    InfeasibleTargetError,
    InvalidProblemError,
    JobError,
    MeasurementError,
    MeasurementFileError,
    ModelError,
    NonFiniteError,
    PackError,
    QParamsError,
    UnsupportedArchitectureError,
)
from exl2rs.qparams import QParams

__all__ = [
    "CalibrationError",
    "CancelledError",
    "Exl2Error",
    "HessianError",
    "InfeasibleTargetError",
    "InvalidProblemError",
    "JobError",
    "MeasurementError",
    "MeasurementFileError",
    "ModelError",
    "NonFiniteError",
    "PackError",
    "QParams",
    "QParamsError",
    "UnsupportedArchitectureError",
    "__version__",
]
