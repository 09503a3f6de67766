"""exl2rs: mixed-precision EXL2 quantization to an exact size budget, with a Rust core."""

from exl2rs._core import __version__

__all__ = ["__version__"]
