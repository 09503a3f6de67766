"""``QuantLinear``: an ``nn.Module`` over one EXL2 linear's stored tensors.

The buffers carry the names and dtypes of the EXL2 directory (``q_weight``, ``q_scale``,
``q_scale_max``, ``q_groups``, ``q_perm``, ``q_invperm`` and an optional fp16 ``bias``), so the
directory's state dict loads into it as is. ``q_perm`` may be absent from a state dict
(exllamav2 does not store it): it is then rebuilt as ``argsort(q_invperm)``.

``forward`` calls :func:`exl2rs.ops.exl2_matmul` (CPU reference, or the CUDA kernel where
``exl2rs.cuda_ops`` registered one). With :meth:`QuantLinear.cache_weight` enabled, the module
instead keeps its dequantized fp32 weight and runs a dense matmul: much faster on CPU when the
same module runs many times (evaluation), at 4 bytes per weight. It is off by default.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from exl2rs import ops
from exl2rs.errors import ModelError

__all__ = ["QUANT_TENSOR_NAMES", "QuantLinear"]

# Tensor suffixes of one quantized linear in an EXL2 directory (``bias`` optional, ``q_perm``
# optional on read).
QUANT_TENSOR_NAMES = ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm", "q_perm")
COL_ALIGN = 32


def padded_columns(out_features: int) -> int:
    return -(-out_features // COL_ALIGN) * COL_ALIGN


class QuantLinear(nn.Module):
    """A linear layer whose weight is stored as EXL2 tensors.

    ``qrows`` (rows of ``q_weight``) and ``num_groups`` fix the buffer shapes; they come from
    the file (see :meth:`from_shapes`).
    """

    q_weight: torch.Tensor
    q_scale: torch.Tensor
    q_scale_max: torch.Tensor
    q_groups: torch.Tensor
    q_perm: torch.Tensor
    q_invperm: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        qrows: int,
        num_groups: int,
        bias: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if in_features <= 0 or out_features <= 0 or qrows <= 0 or num_groups <= 0:
            raise ModelError(
                f"QuantLinear: in_features={in_features}, out_features={out_features}, "
                f"qrows={qrows} and num_groups={num_groups} must all be positive"
            )
        self.in_features = in_features
        self.out_features = out_features
        n_pad = padded_columns(out_features)
        kw: dict[str, Any] = {"device": device}
        self.register_buffer("q_weight", torch.zeros(qrows, n_pad, dtype=torch.int32, **kw))
        self.register_buffer(
            "q_scale", torch.zeros(num_groups, n_pad // 8, dtype=torch.int32, **kw)
        )
        self.register_buffer("q_scale_max", torch.zeros(num_groups, dtype=torch.float16, **kw))
        self.register_buffer("q_groups", torch.zeros(2 * num_groups, dtype=torch.int16, **kw))
        self.register_buffer("q_perm", torch.zeros(in_features, dtype=torch.int32, **kw))
        self.register_buffer("q_invperm", torch.zeros(in_features, dtype=torch.int32, **kw))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16, **kw))
        else:
            self.bias = None
        self._weight_cache_enabled = False
        self._weight_cache: torch.Tensor | None = None

    @classmethod
    def from_shapes(
        cls,
        shapes: Mapping[str, tuple[int, ...]],
        out_features: int,
        *,
        name: str = "<linear>",
        device: torch.device | str | None = None,
    ) -> QuantLinear:
        """A module sized for stored tensors whose shapes are ``shapes`` (keyed by suffix:
        ``q_weight``, ``q_scale_max``, ``q_invperm``, optional ``bias``)."""
        for key in ("q_weight", "q_scale_max", "q_invperm"):
            if key not in shapes:
                raise ModelError(f"{name}: {name}.{key} is missing")
        qw, smax, inv = shapes["q_weight"], shapes["q_scale_max"], shapes["q_invperm"]
        if len(qw) != 2 or len(smax) != 1 or len(inv) != 1:
            raise ModelError(
                f"{name}: q_weight {list(qw)}, q_scale_max {list(smax)}, q_invperm {list(inv)}: "
                "expected 2-D, 1-D and 1-D tensors"
            )
        if qw[1] != padded_columns(out_features):
            raise ModelError(
                f"{name}: q_weight has {qw[1]} columns, but the config's out_features "
                f"{out_features} pads to {padded_columns(out_features)}"
            )
        return cls(
            int(inv[0]),
            out_features,
            qrows=int(qw[0]),
            num_groups=int(smax[0]),
            bias="bias" in shapes,
            device=device,
        )

    # -- weight cache ---------------------------------------------------------------------

    def cache_weight(self, enabled: bool = True) -> QuantLinear:
        """Keep (or drop) the dequantized fp32 weight so forward is a dense matmul."""
        self._weight_cache_enabled = enabled
        self._weight_cache = None
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> QuantLinear:
        self._weight_cache = None  # buffers moved or cast: rebuild lazily
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        return self

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        self._weight_cache = None
        inv_key, perm_key = prefix + "q_invperm", prefix + "q_perm"
        if perm_key not in state_dict and inv_key in state_dict:
            inv = state_dict[inv_key]
            state_dict[perm_key] = torch.argsort(inv.to(torch.int64)).to(torch.int32)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # -- compute --------------------------------------------------------------------------

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W [in_features, out_features]`` (input rows in the original order)."""
        w: torch.Tensor = ops.exl2_dequantize(
            self.q_weight,
            self.q_scale,
            self.q_scale_max,
            self.q_groups,
            self.q_perm,
            self.out_features,
            dtype,
        )
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._weight_cache_enabled:
            if self._weight_cache is None:
                # [N, K] contiguous: F.linear's fast layout.
                self._weight_cache = self.dequantize(torch.float32).T.contiguous()
            y = nn.functional.linear(x.to(torch.float32), self._weight_cache).to(x.dtype)
        else:
            y = ops.exl2_matmul(
                x,
                self.q_weight,
                self.q_scale,
                self.q_scale_max,
                self.q_groups,
                self.q_perm,
                self.out_features,
            )
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    # -- checks ---------------------------------------------------------------------------

    def validate(self, name: str = "<linear>") -> None:
        """Checks what shapes alone cannot: the group table against ``q_weight`` and
        ``in_features``, and ``q_perm``/``q_invperm`` being inverse permutations."""
        try:
            layout = ops.parse_q_groups(self.q_groups.cpu(), self.q_weight.shape[0])
        except Exception as e:
            raise ModelError(f"{name}: {e}") from e
        if layout.rows != self.in_features:
            raise ModelError(
                f"{name}: q_groups covers {layout.rows} input rows, the layer has "
                f"{self.in_features} in_features"
            )
        inv = self.q_invperm.to(torch.int64).cpu()
        if int(inv.min()) < 0 or int(inv.max()) >= self.in_features:
            raise ModelError(f"{name}: q_invperm has entries outside 0..{self.in_features - 1}")
        perm = torch.argsort(inv)
        if not torch.equal(inv[perm], torch.arange(self.in_features)):
            raise ModelError(f"{name}: q_invperm is not a permutation of 0..{self.in_features - 1}")
        if not torch.equal(self.q_perm.to(torch.int64).cpu(), perm):
            raise ModelError(f"{name}: q_perm is not argsort(q_invperm)")
        if not bool(torch.isfinite(self.q_scale_max).all()):
            raise ModelError(f"{name}: q_scale_max holds NaN or inf")

    def extra_repr(self) -> str:
        if self.q_groups.is_meta:
            bits: list[int] | str = "?"
        else:
            bits = sorted({int(b) for b in self.q_groups[0::2].tolist()}, reverse=True)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={bits}, groups={self.q_scale_max.shape[0]}, bias={self.bias is not None}"
        )
