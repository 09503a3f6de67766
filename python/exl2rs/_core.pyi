"""Type stubs of the Rust extension module exl2rs._core."""

__version__: str
