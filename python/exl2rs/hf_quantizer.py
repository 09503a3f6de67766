"""transformers integration: ``quant_method: "exl2"`` → :class:`Exl2HfQuantizer`.

Importing this module registers the config and the quantizer with transformers (``import
exl2rs`` arranges that lazily, see :mod:`exl2rs._hf_hook`). ``from_pretrained(DIR)`` then swaps
every linear with stored ``q_weight`` for a ``QuantLinear`` before the weights load, and after
loading runs the same strict check as :func:`exl2rs.load`: a tensor missing from the directory,
one the model has no place for, or a shape the config disagrees with raises
:class:`exl2rs.ModelError` instead of leaving random weights in the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from exl2rs.errors import ModelError
from exl2rs.load import (
    CheckpointIndex,
    quantized_prefixes,
    replace_quantized_linears,
    scan_checkpoint,
    verify_loaded,
)
from exl2rs.quant_linear import QuantLinear

__all__ = ["QUANT_METHOD", "Exl2Config", "Exl2HfQuantizer"]

QUANT_METHOD = "exl2"


class Exl2Config(QuantizationConfigMixin):
    """The ``quantization_config`` block of an EXL2 ``config.json`` (informational: the
    tensors themselves say how each linear is stored). Unknown keys are kept."""

    def __init__(
        self,
        bits: float | None = None,
        head_bits: int | None = None,
        version: str | None = None,
        calibration: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD  # type: ignore[assignment]  # not a built-in method
        self.bits = bits
        self.head_bits = head_bits
        self.version = version
        self.calibration = calibration
        for key, value in kwargs.items():
            if key != "quant_method":
                setattr(self, key, value)


class Exl2HfQuantizer(HfQuantizer):
    """Loads pre-quantized EXL2 directories (no quantization inside transformers)."""

    requires_calibration = True

    def __init__(self, quantization_config: Exl2Config, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self._index: CheckpointIndex | None = None

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if not self.pre_quantized:
            raise ModelError(
                "exl2: transformers cannot quantize to EXL2; convert with `exl2rs convert` and "
                "load the output directory"
            )

    def update_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        return torch.float16 if dtype is None else dtype

    def _process_model_before_weight_loading(
        self, model: Any, checkpoint_files: list[str] | None = None, **kwargs: Any
    ) -> Any:
        if not checkpoint_files:
            raise ModelError("exl2: from_pretrained found no checkpoint files to read")
        files = [Path(f) for f in checkpoint_files]
        directory = files[0].parent
        index = scan_checkpoint(directory)
        if not quantized_prefixes(index):
            raise ModelError(f"{directory}: quant_method is exl2, but no tensor is a .q_weight")
        self._index = index
        head = model.get_output_embeddings()
        head_name = next((n for n, m in model.named_modules() if m is head), None)
        replaced = replace_quantized_linears(model, index)
        if any(f"{p}.q_perm" not in index.tensors for p in replaced):
            # exllamav2 does not store q_perm: it is rebuilt after loading, not missing.
            ignore = set(getattr(model, "_keys_to_ignore_on_load_missing", None) or ())
            model._keys_to_ignore_on_load_missing = ignore | {r"\.q_perm$"}
        if head_name is not None and f"{head_name}.q_weight" in index.tensors:
            # A quantized head is untied (EXL2 writes it even for tied embeddings): drop the
            # tie so transformers does not attach the embedding to it.
            model.config.tie_word_embeddings = False
            text = model.config.get_text_config()
            text.tie_word_embeddings = False
            tied = dict(getattr(model, "all_tied_weights_keys", {}) or {})
            model.all_tied_weights_keys = {
                k: v for k, v in tied.items() if not k.startswith(f"{head_name}.")
            }
        return model

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        if self._index is None:
            raise ModelError("exl2: the quantizer did not see the checkpoint before loading")
        for name, m in model.named_modules():
            if isinstance(m, QuantLinear) and f"{name}.q_perm" not in self._index.tensors:
                m.q_perm = torch.argsort(m.q_invperm.to(torch.int64)).to(torch.int32)
        verify_loaded(model, self._index)
        return model

    def is_serializable(self, safe_serialization: Any = None) -> bool:
        return False

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Registers the config and quantizer under ``exl2`` (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(Exl2Config)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(Exl2HfQuantizer)


register()
