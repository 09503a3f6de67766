"""StreamingModel: block-by-block fp32 forward must reproduce the full HF model."""

from __future__ import annotations

import json
import subprocess
import sys
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from exl2rs.errors import ModelError, NonFiniteError, UnsupportedArchitectureError
from exl2rs.streaming import StreamingModel


def hf_logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits: torch.Tensor = model(ids).logits
    return logits


def family_config(family: str) -> Any:
    import transformers as tf

    common: dict[str, Any] = {
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 256,
    }
    if family == "mistral":
        config = tf.MistralConfig(sliding_window=8, **common)
    elif family == "qwen2":
        config = tf.Qwen2Config(**common)
    elif family == "qwen3":
        config = tf.Qwen3Config(**common)
    elif family == "gemma2":
        config = tf.Gemma2Config(
            sliding_window=8, layer_types=["sliding_attention", "full_attention"], **common
        )
    elif family == "gemma3":
        config = tf.Gemma3TextConfig(
            sliding_window=8, layer_types=["sliding_attention", "full_attention"], **common
        )
    else:
        raise AssertionError(family)
    arch = {
        "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM",
        "gemma2": "Gemma2ForCausalLM",
        "gemma3": "Gemma3ForCausalLM",
    }[family]
    config.architectures = [arch]
    return config


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "gemma2", "gemma3"])
def test_families_match_hf(
    family: str, tmp_path: Path, ids: torch.Tensor, tiny_model: Callable[..., Path]
) -> None:
    model_dir = tiny_model(family_config(family), tmp_path)
    model = StreamingModel(model_dir)
    assert model.adapter.family == family
    got = model.logits(ids)
    want = hf_logits(model_dir, ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # The attention and MLP halves compose to the whole layer (norm placement per family).
    states = model.embed(ids)
    for i in range(model.num_layers):
        block = model.load_block(i)
        split = model.mlp_forward(block, i, model.attn_forward(block, i, states))
        states = model.block_forward(block, i, states)
        torch.testing.assert_close(split, states, atol=1e-5, rtol=1e-5)


def test_tiny_llama_matches_hf_and_chunking(tiny_llama_dir: Path) -> None:
    ids = torch.randint(0, 49152, (5, 16), generator=torch.Generator().manual_seed(2))
    want = hf_logits(tiny_llama_dir, ids)
    torch.testing.assert_close(StreamingModel(tiny_llama_dir).logits(ids), want, atol=1e-5, rtol=0)
    # 16 tokens per chunk: one row at a time, the same numbers.
    chunked = StreamingModel(tiny_llama_dir, chunk_tokens=16)
    torch.testing.assert_close(chunked.logits(ids), want, atol=1e-5, rtol=0)


def test_smollm2_streamed_logits_match_hf(
    smollm2_dir: Path, tokenizer: Any, wiki_text: str
) -> None:
    ids = torch.tensor(
        tokenizer(wiki_text[:4000], add_special_tokens=False)["input_ids"][:128]
    ).view(2, 64)
    model = StreamingModel(smollm2_dir)
    assert model.num_layers == 30 and model.adapter.family == "llama"
    got = model.logits(ids)
    want = hf_logits(smollm2_dir, ids)
    assert (got - want).abs().max().item() < 1e-4


def test_block_api(tiny_llama_dir: Path) -> None:
    model = StreamingModel(tiny_llama_dir)
    names = model.linear_names(1)
    assert names == [
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.k_proj",
        "model.layers.1.self_attn.v_proj",
        "model.layers.1.self_attn.o_proj",
        "model.layers.1.mlp.gate_proj",
        "model.layers.1.mlp.up_proj",
        "model.layers.1.mlp.down_proj",
    ]
    block = model.load_block(1)
    weights = load_file(str(tiny_llama_dir / "model.safetensors"))
    for name in names:
        linear = model.linear(block, name)
        assert linear.weight.dtype == torch.float32
        torch.testing.assert_close(linear.weight, weights[name + ".weight"], rtol=0, atol=0)
    assert all(not p.requires_grad for p in block.parameters())
    with pytest.raises(ModelError, match="not a decoder linear name"):
        model.linear(block, "lm_head")
    with pytest.raises(ModelError, match="no such submodule"):
        model.linear(block, "model.layers.1.self_attn.x_proj")
    with pytest.raises(ModelError, match="is LlamaRMSNorm, not nn.Linear"):
        model.linear(block, "model.layers.1.input_layernorm")
    with pytest.raises(ModelError, match=r"layer index 2 out of range \[0, 2\)"):
        model.load_block(2)
    with pytest.raises(ModelError, match="expected states"):
        model.attn_forward(block, 1, torch.zeros(2, 4, 63))


def test_blocks_are_not_retained(tiny_llama_dir: Path) -> None:
    model = StreamingModel(tiny_llama_dir)
    block = model.load_block(0)
    ref = weakref.ref(block)
    model.block_forward(block, 0, model.embed(torch.zeros(1, 4, dtype=torch.long)))
    del block
    assert ref() is None, "StreamingModel kept a decoder block alive"


def test_sharded_checkpoint(tmp_path: Path, tiny_llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model.save_pretrained(tmp_path, max_shard_size="2MB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, 49152, (2, 8), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(
        StreamingModel(tmp_path).logits(ids), StreamingModel(tiny_llama_dir).logits(ids)
    )


def copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for item in src.iterdir():
        (dst / item.name).write_bytes(item.read_bytes())
    return dst


def test_nonfinite_weight_is_named(tmp_path: Path, tiny_llama_dir: Path) -> None:
    model_dir = copy_model(tiny_llama_dir, tmp_path / "m")
    weights = load_file(str(model_dir / "model.safetensors"))
    weights["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    model = StreamingModel(model_dir)
    model.load_block(0)
    with pytest.raises(NonFiniteError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        model.load_block(1)


def test_nonfinite_states_are_named(tiny_llama_dir: Path) -> None:
    model = StreamingModel(tiny_llama_dir)
    block = model.load_block(0)
    states = model.embed(torch.zeros(2, 4, dtype=torch.long))
    states[1, 2, 3] = float("inf")
    with pytest.raises(NonFiniteError, match=r"input states of model\.layers\.0\.mlp"):
        model.mlp_forward(block, 0, states)


def test_missing_and_misshapen_tensors(tmp_path: Path, tiny_llama_dir: Path) -> None:
    model_dir = copy_model(tiny_llama_dir, tmp_path / "m")
    weights = load_file(str(model_dir / "model.safetensors"))
    del weights["model.layers.0.self_attn.k_proj.weight"]
    weights["model.layers.1.mlp.down_proj.weight"] = torch.zeros(64, 127)
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    model = StreamingModel(model_dir)
    with pytest.raises(ModelError, match=r"missing tensors model\.layers\.0\.self_attn\.k_proj"):
        model.load_block(0)
    with pytest.raises(ModelError, match=r"down_proj\.weight has shape \(64, 127\)"):
        model.load_block(1)


def test_missing_layers_and_head(tmp_path: Path, tiny_llama_dir: Path) -> None:
    model_dir = copy_model(tiny_llama_dir, tmp_path / "m")
    config = json.loads((model_dir / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"declares 3 layers .* model\.layers\.2\.\*"):
        StreamingModel(model_dir)
    config["num_hidden_layers"] = 2
    config["tie_word_embeddings"] = False
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="no lm_head.weight and tie_word_embeddings is false"):
        StreamingModel(model_dir)


def test_bad_model_dirs(tmp_path: Path, tiny_llama_dir: Path) -> None:
    with pytest.raises(ModelError, match="no config.json"):
        StreamingModel(tmp_path)
    model_dir = copy_model(tiny_llama_dir, tmp_path / "m")
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    config["model_type"] = "gpt2"
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        StreamingModel(model_dir)
    (model_dir / "model.safetensors").unlink()
    config["architectures"] = ["LlamaForCausalLM"]
    config["model_type"] = "llama"
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="no .*safetensors"):
        StreamingModel(model_dir)


def test_embed_rejects_out_of_vocab(tiny_llama_dir: Path) -> None:
    model = StreamingModel(tiny_llama_dir)
    with pytest.raises(ModelError, match=r"token ids must lie in \[0, 49152\)"):
        model.embed(torch.tensor([[0, 49152]]))
    with pytest.raises(ModelError, match="integer input_ids"):
        model.embed(torch.zeros(2, 3))


_PEAK_SCRIPT = """
import resource, sys, torch
from exl2rs.streaming import StreamingModel
torch.set_num_threads(1)
model = StreamingModel(sys.argv[1])
ids = torch.zeros(1, 32, dtype=torch.long)
model.final_states(ids)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def _peak_rss(model_dir: Path) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(model_dir)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


def test_peak_memory_depends_on_width_not_depth(smollm2_dir: Path) -> None:
    from exl2rs.fixtures import truncated_model_dir

    shallow, deep = truncated_model_dir(2), smollm2_dir
    layer_bytes = sum(p.stat().st_size for p in deep.glob("*.safetensors")) - sum(
        p.stat().st_size for p in shallow.glob("*.safetensors")
    )
    # 28 more layers are ~390 MB of fp32 weights; streaming must not hold them.
    growth = _peak_rss(deep) - _peak_rss(shallow)
    assert growth < layer_bytes / 4, (growth, layer_bytes)


@pytest.mark.cuda
def test_cuda_blocks_with_cpu_states(tiny_llama_dir: Path) -> None:
    ids = torch.randint(0, 49152, (3, 32), generator=torch.Generator().manual_seed(4))
    model = StreamingModel(tiny_llama_dir, device="cuda", chunk_tokens=32)
    states = model.embed(ids)
    block = model.load_block(0)
    assert next(block.parameters()).is_cuda
    out = model.block_forward(block, 0, states)
    assert out.device.type == "cpu"  # states stay where the caller keeps them
    torch.testing.assert_close(
        model.logits(ids), StreamingModel(tiny_llama_dir).logits(ids), atol=1e-4, rtol=1e-4
    )


def test_half_precision_checkpoint_runs_in_fp32(tmp_path: Path, tiny_llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16).save_pretrained(
        tmp_path
    )
    model = StreamingModel(tmp_path)
    block = model.load_block(0)
    assert {p.dtype for p in block.parameters()} == {torch.float32}
    ids = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(model.logits(ids), hf_logits(tmp_path, ids), atol=1e-5, rtol=1e-5)
