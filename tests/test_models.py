"""Architecture adapters: lookup, refusal of unknown families, names and shared-input groups."""

from __future__ import annotations

import pytest
import torch

from exl2rs.errors import ModelError, UnsupportedArchitectureError
from exl2rs.models import ADAPTERS, adapter_for, supported_architectures

FAMILIES = {
    "LlamaForCausalLM": ("llama", "LlamaConfig"),
    "MistralForCausalLM": ("mistral", "MistralConfig"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2Config"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3Config"),
    "Gemma2ForCausalLM": ("gemma2", "Gemma2Config"),
    "Gemma3ForCausalLM": ("gemma3", "Gemma3TextConfig"),
}


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_lookup_by_architecture_and_model_type(arch: str) -> None:
    import transformers

    family, config_cls = FAMILIES[arch]
    config = getattr(transformers, config_cls)()
    config.architectures = [arch]
    assert adapter_for(config).family == family
    assert adapter_for({"architectures": [arch]}).family == family
    # A config without architectures falls back to model_type.
    assert adapter_for({"model_type": config.model_type}).family == family


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_adapter_names_exist_on_the_hf_layer(arch: str) -> None:
    """Every submodule an adapter names is present on transformers' decoder layer."""
    import transformers

    _, config_cls = FAMILIES[arch]
    config = getattr(transformers, config_cls)(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=128,
    )
    adapter = adapter_for({"architectures": [arch]})
    with torch.device("meta"):
        model = getattr(transformers, arch)(config)
    layer = model.get_submodule(adapter.layer_prefix)[0]
    for name in adapter.linear_names(0):
        assert isinstance(model.get_submodule(name), torch.nn.Linear), name
    norms = [adapter.attn_pre_norm, adapter.mlp_pre_norm, adapter.attn_post_norm]
    for norm in [*norms, adapter.mlp_post_norm]:
        if norm is not None:
            layer.get_submodule(norm)
    model.get_submodule(adapter.final_norm)
    assert adapter.embed_weight in dict(model.named_parameters())
    # Every linear of the layer is covered by exactly one shared-input group.
    linears = {n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    grouped = [f"{g.module}.{lin}" for g in adapter.groups for lin in g.linears]
    assert sorted(grouped) == sorted(linears)


def test_unsupported_architecture_is_named_with_the_supported_list() -> None:
    with pytest.raises(UnsupportedArchitectureError) as info:
        adapter_for({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    message = str(info.value)
    assert "GPT2LMHeadModel" in message
    for arch in supported_architectures():
        assert arch in message
    assert issubclass(UnsupportedArchitectureError, ModelError)
    with pytest.raises(UnsupportedArchitectureError, match="model_type 'falcon'"):
        adapter_for({"model_type": "falcon"})
    # A known model_type under an unknown head class is still refused.
    with pytest.raises(UnsupportedArchitectureError, match="LlamaForSequenceClassification"):
        adapter_for({"architectures": ["LlamaForSequenceClassification"], "model_type": "llama"})


def test_names_and_groups() -> None:
    adapter = adapter_for({"architectures": ["LlamaForCausalLM"]})
    assert adapter.linear_names(7)[0] == "model.layers.7.self_attn.q_proj"
    assert adapter.linear_names(7)[-1] == "model.layers.7.mlp.down_proj"
    assert [(g.name, g.linears) for g in adapter.groups] == [
        ("qkv", ("q_proj", "k_proj", "v_proj")),
        ("o", ("o_proj",)),
        ("gate_up", ("gate_proj", "up_proj")),
        ("down", ("down_proj",)),
    ]
    group = adapter.group_of("model.layers.7.self_attn.v_proj")
    assert adapter.shared_input_name(7, group) == "model.layers.7.self_attn.qkv"
    assert adapter.group_of("up_proj").name == "gate_up"
    with pytest.raises(KeyError, match="lm_head"):
        adapter.group_of("lm_head")


def test_layer_types() -> None:
    mistral = adapter_for({"architectures": ["MistralForCausalLM"]})
    llama = adapter_for({"architectures": ["LlamaForCausalLM"]})

    class Config:
        sliding_window = 4096
        layer_types = None

    assert mistral.layer_type(Config(), 0) == "sliding_attention"
    assert llama.layer_type(Config(), 0) == "full_attention"
    Config.layer_types = ["sliding_attention", "full_attention"]
    assert llama.layer_type(Config(), 1) == "full_attention"
    assert llama.layer_type(Config(), 0) == "sliding_attention"


def test_architectures_are_unique() -> None:
    archs = supported_architectures()
    assert len(archs) == len(set(archs)) == len(ADAPTERS)
