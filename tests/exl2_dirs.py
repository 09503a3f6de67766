"""Builds small EXL2 directories for the loader / export / eval tests: a HF model folder whose
linears are RTN-quantized with :func:`exl2rs.gptq.rtn_quantize` and packed with
:func:`exl2rs.packing.pack_exl2`, written per the shared contract (shards with ``{"format":
"pt"}``, an index, ``quantization_config``, ``exl2rs_strategy.json``)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from exl2rs import packing
from exl2rs.gptq import prepare, rtn_quantize
from exl2rs.qparams import QParams, head_config

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def uniform(bits: int, group_size: int = 32) -> QParams:
    return QParams((bits,), (1.0,), (group_size,))


def mixed() -> QParams:
    """8/4/3/2-bit groups in one matrix (widths descending)."""
    return QParams((8, 4, 3, 2), (0.25, 0.25, 0.25, 0.25), (32, 32, 32, 32))


def quantize_linear(weight: torch.Tensor, qparams: QParams, seed: int) -> packing.Exl2Tensors:
    """RTN with an act-order permutation from a random Hessian (so perms are non-trivial)."""
    g = torch.Generator().manual_seed(seed)
    k = weight.shape[1]
    x = (
        torch.randn(4 * k, k, generator=g)
        * torch.linspace(0.2, 3.0, k)[torch.randperm(k, generator=g)]
    )
    prepared = prepare(x.T @ x / x.shape[0])
    res = rtn_quantize(weight.float(), prepared, qparams)
    groups = list(zip(res.group_bits, res.group_rows, strict=True))
    t = packing.pack_exl2(
        res.codes.numpy(),
        groups,
        res.scales.numpy().astype(np.int32) + 1,
        res.scale_max.float().numpy(),
        res.perm.numpy(),
    )
    # The packed form must reproduce the quantizer's weight.
    np.testing.assert_allclose(t.dequantize().T, res.weight.numpy(), rtol=1e-6, atol=1e-7)
    return t


def write_exl2_dir(
    src: Path,
    out: Path,
    *,
    config_for: Callable[[str], QParams | None] = lambda name: uniform(4),
    head_bits: int | None = 6,
    shards: int = 1,
    with_q_perm: bool = True,
    bits: float = 4.0,
) -> Path:
    """Quantizes every decoder linear of ``src`` for which ``config_for(name)`` is a config
    (None keeps it fp16, which the loader must refuse) and the head at ``head_bits`` (None:
    no quantized head)."""
    cfg = json.loads((src / "config.json").read_text())
    weights: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        weights.update(load_file(f))
    if "lm_head.weight" not in weights:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    strategy: dict[str, Any] = {}
    seed = 0
    for name, w in weights.items():
        prefix = name.removesuffix(".weight")
        leaf = prefix.rpartition(".")[2]
        qp: QParams | None = None
        if name.endswith(".weight") and leaf in LINEARS:
            qp = config_for(prefix)
        elif name == "lm_head.weight" and head_bits is not None:
            qp = head_config(head_bits)
        if name == "lm_head.weight" and qp is None:
            if cfg.get("tie_word_embeddings"):
                continue
            tensors[name] = w.to(torch.float16).contiguous()
            continue
        if qp is None:
            tensors[name] = w.to(torch.float16).contiguous()
            continue
        seed += 1
        t = quantize_linear(w, qp, seed)
        for k, v in t.state_dict(prefix).items():
            tensors[k] = torch.from_numpy(np.ascontiguousarray(v))
        if with_q_perm:
            tensors[f"{prefix}.q_perm"] = torch.from_numpy(np.argsort(t.q_invperm).astype(np.int32))
        k_in, n_out = w.shape[1], w.shape[0]
        strategy[prefix] = {
            "desc": qp.desc,
            "config": qp.to_dict(),
            "bits": qp.total_bits(k_in, n_out),
            "bpw": qp.bpw(k_in, n_out),
        }
    names = sorted(tensors)
    per = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    for i in range(shards):
        part = names[i * per : (i + 1) * per]
        fname = (
            "output.safetensors"
            if shards == 1
            else f"output-{i + 1:05d}-of-{shards:05d}.safetensors"
        )
        save_file({n: tensors[n] for n in part}, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    cfg["quantization_config"] = {
        "quant_method": "exl2",
        "version": "0.3.2",
        "bits": bits,
        "head_bits": head_bits or 0,
        "calibration": {"rows": 0, "length": 0, "dataset": "(test)"},
        "quantizer": "exl2rs",
        "exl2rs_version": "test",
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    for extra in src.iterdir():
        if (
            extra.suffix != ".safetensors"
            and extra.name not in ("config.json",)
            and extra.is_file()
        ):
            if not extra.name.endswith(".index.json"):
                shutil.copy2(extra, out / extra.name)
    (out / "exl2rs_strategy.json").write_text(
        json.dumps({"version": 1, "bits": bits, "linears": strategy}, indent=1)
    )
    return out


def tiny_llama_config(vocab: int) -> Any:
    """The 2-layer, hidden-64 Llama (GQA, biased attention, tied embeddings) of the load tests."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        attention_bias=True,
    )
    config.architectures = ["LlamaForCausalLM"]
    return config
