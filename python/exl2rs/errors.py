"""The exl2rs exception hierarchy. Every error exl2rs raises derives from :class:`Exl2Error`.

The Rust-side classes are defined in the extension; Python-side failures (calibration data,
models, GPTQ numerics) subclass the same base so one ``except Exl2Error`` catches all of them.
"""

from exl2rs._core import (
    CancelledError,
    Exl2Error,
    InfeasibleTargetError,
    InvalidProblemError,
    MeasurementFileError,
    PackError,
    QParamsError,
)


class CalibrationError(Exl2Error):
    """Calibration data is missing, empty, too short for the rows asked, or malformed."""


class ModelError(Exl2Error):
    """A model directory is unreadable or does not match its config."""


class UnsupportedArchitectureError(ModelError):
    """The model's architecture has no adapter; the message lists the supported ones."""


class NonFiniteError(Exl2Error):
    """NaN or inf found in weights, activations or a Hessian; the message names the layer."""


class HessianError(Exl2Error):
    """A Hessian would not factor even after the bounded damping retries."""


class MeasurementError(Exl2Error):
    """The measurement pass failed or its job directory does not match the run."""


class JobError(Exl2Error):
    """A conversion job directory is corrupt or belongs to another run."""


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
    "QParamsError",
    "UnsupportedArchitectureError",
]

# Present the Rust-defined classes under the public package name in tracebacks.
for _cls in (
    CancelledError,
    Exl2Error,
    InfeasibleTargetError,
    InvalidProblemError,
    MeasurementFileError,
    PackError,
    QParamsError,
):
    _cls.__module__ = "exl2rs"
