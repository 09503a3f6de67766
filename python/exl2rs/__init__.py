"""exl2rs: mixed-precision EXL2 quantization to an exact size budget, with a Rust core."""

from typing import TYPE_CHECKING

from exl2rs import _hf_hook
from exl2rs._core import Exl2Measurement, Measurement, Problem, Solution, __version__
from exl2rs.allocation import Allocation, Frontier, allocate, frontier, problem_from_arrays
from exl2rs.convert import ConvertResult, convert
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

if TYPE_CHECKING:
    from exl2rs.load import load
    from exl2rs.quant_linear import QuantLinear

# `load` and `QuantLinear` import torch on first use, not here; the transformers quantizer
# registers when transformers' quantizer registry is imported.
__getattr__ = _hf_hook.lazy_attr
_hf_hook.install()

__all__ = [
    "Allocation",
    "ConvertResult",
    "convert",
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
    "QuantLinear",
    "load",
    "QParamsError",
    "UnsupportedArchitectureError",
    "__version__",
]
