"""Registers exl2rs's transformers quantizer as soon as transformers' quantizer registry is
imported, without importing transformers (or torch) when exl2rs itself is imported.

Without the registration, transformers meets ``quant_method: "exl2"``, logs a warning and
returns a model with random weights; with it, ``from_pretrained`` goes through
:mod:`exl2rs.hf_quantizer`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from types import ModuleType

REGISTRY = "transformers.quantizers.auto"


def _register() -> None:
    import exl2rs.hf_quantizer  # noqa: F401  (registers on import)


class _RegistryFinder(importlib.abc.MetaPathFinder):
    """One-shot finder: wraps the registry module's loader to register right after it runs."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != REGISTRY:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        run = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            _register()

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Register now if transformers' registry is loaded, else when it gets imported."""
    if REGISTRY in sys.modules:
        _register()
    elif not any(isinstance(f, _RegistryFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegistryFinder())


# exl2rs's torch-backed public names, imported on first access (PEP 562).
LAZY_ATTRS = {"load": "exl2rs.load", "QuantLinear": "exl2rs.quant_linear"}


def lazy_attr(name: str) -> object:
    module = LAZY_ATTRS.get(name)
    if module is None:
        raise AttributeError(f"module 'exl2rs' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
