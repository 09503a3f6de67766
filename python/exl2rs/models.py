"""Architecture adapters: where a family keeps its decoder layers, linears and norms.

An :class:`Adapter` is plain data. The forward passes themselves are transformers' own decoder
layer classes (see :mod:`exl2rs.streaming`); the adapter only says which submodules form the
attention and MLP halves, which linears read the same input, and how the embedding and head
are scaled. Adding a family is one entry in :data:`ADAPTERS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from exl2rs.errors import UnsupportedArchitectureError

ATTN_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LinearGroup:
    """Linears of one module that read the same input and so share one Hessian."""

    module: str  # "self_attn" or "mlp" (the adapter's submodule name)
    name: str  # suffix of the shared-input name, e.g. "qkv" -> "model.layers.3.self_attn.qkv"
    linears: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Adapter:
    """How one architecture family lays out its decoder (HF names, submodules, norms)."""

    family: str
    architectures: tuple[str, ...]  # HF ``config.architectures`` class names
    model_types: tuple[str, ...]  # HF ``config.model_type`` values
    layer_prefix: str = "model.layers"
    embed_weight: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm"
    head_weight: str = "lm_head.weight"
    attn_module: str = "self_attn"
    mlp_module: str = "mlp"
    attn_linears: tuple[str, ...] = ATTN_LINEARS
    mlp_linears: tuple[str, ...] = MLP_LINEARS
    # Norms around each half, as attribute names on the decoder layer. Gemma's "sandwich"
    # layout adds a norm after attention and after the MLP, inside the residual branch.
    attn_pre_norm: str = "input_layernorm"
    attn_post_norm: str | None = None
    mlp_pre_norm: str = "post_attention_layernorm"
    mlp_post_norm: str | None = None
    # Gemma multiplies the embeddings by sqrt(hidden_size).
    scale_embeddings: bool = False
    # Gemma3 keeps separate rotary tables for sliding and full attention layers.
    rope_per_layer_type: bool = False
    # Mistral without ``layer_types``: every layer uses the sliding window when one is set.
    sliding_window_all_layers: bool = False
    # sdpa cannot apply Gemma2's attention-logit softcapping.
    attn_implementation: str = "sdpa"

    @property
    def groups(self) -> tuple[LinearGroup, ...]:
        """The shared-input groups: (q,k,v), (o), (gate,up), (down)."""
        q, k, v, o = self.attn_linears
        gate, up, down = self.mlp_linears
        return (
            LinearGroup(self.attn_module, "qkv", (q, k, v)),
            LinearGroup(self.attn_module, "o", (o,)),
            LinearGroup(self.mlp_module, "gate_up", (gate, up)),
            LinearGroup(self.mlp_module, "down", (down,)),
        )

    def layer_name(self, layer: int) -> str:
        return f"{self.layer_prefix}.{layer}"

    def linear_names(self, layer: int) -> list[str]:
        """Full names of the decoder linears of ``layer``, attention first, in table order."""
        base = self.layer_name(layer)
        return [f"{base}.{self.attn_module}.{n}" for n in self.attn_linears] + [
            f"{base}.{self.mlp_module}.{n}" for n in self.mlp_linears
        ]

    def shared_input_name(self, layer: int, group: LinearGroup) -> str:
        return f"{self.layer_name(layer)}.{group.module}.{group.name}"

    def group_of(self, linear: str) -> LinearGroup:
        """The shared-input group of a linear given by kind ("k_proj") or full name."""
        kind = linear.rsplit(".", 1)[-1]
        for group in self.groups:
            if kind in group.linears:
                return group
        raise KeyError(f"{linear!r} is not a decoder linear of the {self.family} family")

    def layer_type(self, config: Any, layer: int) -> str:
        """``"full_attention"`` or ``"sliding_attention"`` for decoder layer ``layer``."""
        layer_types = getattr(config, "layer_types", None)
        if layer_types:
            return str(layer_types[layer])
        if self.sliding_window_all_layers and getattr(config, "sliding_window", None) is not None:
            return "sliding_attention"
        return "full_attention"


def _gemma(family: str, architecture: str, model_type: str, **extra: Any) -> Adapter:
    return Adapter(
        family,
        (architecture,),
        (model_type,),
        attn_post_norm="post_attention_layernorm",
        mlp_pre_norm="pre_feedforward_layernorm",
        mlp_post_norm="post_feedforward_layernorm",
        scale_embeddings=True,
        **extra,
    )


ADAPTERS: tuple[Adapter, ...] = (
    Adapter("llama", ("LlamaForCausalLM",), ("llama",)),
    Adapter("mistral", ("MistralForCausalLM",), ("mistral",), sliding_window_all_layers=True),
    Adapter("qwen2", ("Qwen2ForCausalLM",), ("qwen2",)),
    Adapter("qwen3", ("Qwen3ForCausalLM",), ("qwen3",)),
    _gemma("gemma2", "Gemma2ForCausalLM", "gemma2", attn_implementation="eager"),
    _gemma("gemma3", "Gemma3ForCausalLM", "gemma3_text", rope_per_layer_type=True),
)


def supported_architectures() -> list[str]:
    return [arch for adapter in ADAPTERS for arch in adapter.architectures]


def _config_field(config: Any, key: str) -> Any:
    if isinstance(config, Mapping):
        return config.get(key)
    return getattr(config, key, None)


def adapter_for(config: Any) -> Adapter:
    """The adapter for a transformers config (object or ``config.json`` dict).

    Matches ``architectures`` first, then ``model_type``; anything else raises
    :class:`UnsupportedArchitectureError` naming the architecture and the supported list.
    """
    architectures = list(_config_field(config, "architectures") or [])
    model_type = _config_field(config, "model_type")
    for arch in architectures:
        for adapter in ADAPTERS:
            if arch in adapter.architectures:
                return adapter
    if not architectures:
        for adapter in ADAPTERS:
            if model_type in adapter.model_types:
                return adapter
    named = ", ".join(architectures) if architectures else f"model_type {model_type!r}"
    raise UnsupportedArchitectureError(
        f"unsupported architecture {named}: exl2rs supports {', '.join(supported_architectures())}"
    )
