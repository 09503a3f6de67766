"""exl2rs: mixed-precision EXL2 quantization to an exact size budget, with a Rust core."""

from exl2rs._core import Exl2Measurement, Measurement, Problem, Solution, __version__
from exl2rs.allocation import Allocation, Frontier, allocate, frontier, problem_from_arrays
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
    "Allocation",
    "Exl2Measurement",
    "Frontier",
    "Measurement",
    "Problem",
    "Solution",
    "allocate",
    "frontier",
    "problem_from_arrays",
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
