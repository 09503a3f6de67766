"""exl2rs export-gptq: EXL2 → GPTQ-v1 with dynamic overrides, on small EXL2 dirs built here."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from exl2_dirs import mixed, tiny_llama_config, uniform, write_exl2_dir
from exl2rs import packing
from exl2rs.export_gptq import GptqExportError, export_gptq, resolve_dynamic
from exl2rs.qparams import QParams

VOCAB = 256


@pytest.fixture(scope="module")
def src_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model: Callable[..., Path]) -> Path:
    config = tiny_llama_config(VOCAB)
    path: Path = tiny_model(config, tmp_path_factory.mktemp("src"), seed=5)
    return path


def mix_of_widths(name: str) -> QParams:
    if ".layers.1.self_attn." in name and name.rpartition(".")[2] in ("q_proj", "k_proj", "v_proj"):
        return uniform(8)
    if name.endswith("down_proj"):
        return uniform(3, 64)
    if name.endswith("layers.0.mlp.gate_proj") or name.endswith("layers.0.mlp.up_proj"):
        return uniform(2)
    return uniform(4)


@pytest.fixture(scope="module")
def exl2_dir(tmp_path_factory: pytest.TempPathFactory, src_dir: Path) -> Path:
    return write_exl2_dir(src_dir, tmp_path_factory.mktemp("exl2"), config_for=mix_of_widths)


def exl2_of(directory: Path, prefix: str, cols: int) -> packing.Exl2Tensors:
    t = {}
    for f in directory.glob("*.safetensors"):
        t.update(load_file(f))
    return packing.Exl2Tensors(
        *(
            t[f"{prefix}.{n}"]
            for n in ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm")
        ),
        cols=cols,
    )


def test_dequantized_gptq_equals_dequantized_exl2(exl2_dir: Path, tmp_path: Path) -> None:
    res = export_gptq(exl2_dir, tmp_path / "gptq")
    stored = load_file(tmp_path / "gptq" / "model.safetensors")
    assert len(res.linears) == 14
    for spec in res.linears:
        p = spec.name
        g = packing.GptqTensors(
            stored[f"{p}.qweight"],
            stored[f"{p}.qzeros"],
            stored[f"{p}.scales"],
            stored[f"{p}.g_idx"],
            spec.bits,
        )
        assert g.qweight.shape == (spec.in_features * spec.bits // 32, spec.out_features)
        assert g.scales.dtype == np.float16
        assert g.scales.shape == (-(-spec.in_features // spec.group_size), spec.out_features)
        u = g.unpack()
        # Symmetric v1: the true zero is 2^(b-1) everywhere (stored as zero - 1).
        assert np.all(u.zeros == 1 << (spec.bits - 1))
        e = exl2_of(exl2_dir, p, spec.out_features)
        w_exl2 = packing.dequantize_exl2(e)
        eu = e.unpack()
        scale = eu.scales.astype(np.float64) ** 2 * eu.scale_max[:, None] / 256
        # Only the scales are rounded, to fp16: |W_gptq - W_exl2| <= |q - z| * |Δscale|.
        tol = np.abs(scale - scale.astype(np.float16)).max() * (1 << (spec.bits - 1))
        np.testing.assert_allclose(packing.dequantize_gptq(g), w_exl2, rtol=0, atol=tol + 1e-9)
        # act-order: input row perm[i] is in the group of storage row i.
        groups = np.concatenate([np.full(r, j) for j, (_, r) in enumerate(eu.groups)])
        np.testing.assert_array_equal(g.g_idx[eu.perm], groups)
        assert f"{p}.q_weight" not in stored
    # Biases, norms, embeddings are copied; the 6-bit head becomes fp16 and untied.
    assert "model.layers.0.self_attn.q_proj.bias" in stored
    assert stored["lm_head.weight"].dtype == np.float16
    assert res.head_dequantized
    cfg = json.loads((tmp_path / "gptq" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False


def test_base_config_and_dynamic_rules(exl2_dir: Path, tmp_path: Path) -> None:
    res = export_gptq(exl2_dir, tmp_path / "gptq")
    assert (res.base_bits, res.base_group_size) == (4, 32)
    qc = json.loads((tmp_path / "gptq" / "quantize_config.json").read_text())
    cfg = json.loads((tmp_path / "gptq" / "config.json").read_text())
    assert cfg["quantization_config"] == qc
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq"
    assert qc["desc_act"] is True and qc["sym"] is True and qc["bits"] == 4
    dynamic = qc["dynamic"]
    # One rule per differing module; fused q/k/v and gate/up share one rule.
    assert len(dynamic) == 4, dynamic
    base = (qc["bits"], qc["group_size"])
    for spec in res.linears:
        assert resolve_dynamic(dynamic, spec.name, base) == (spec.bits, spec.group_size)
    # vLLM looks the rules up by the fused layer names.
    assert resolve_dynamic(dynamic, "model.layers.1.self_attn.qkv_proj", base) == (8, 32)
    assert resolve_dynamic(dynamic, "model.layers.0.mlp.gate_up_proj", base) == (2, 32)
    assert resolve_dynamic(dynamic, "model.layers.0.self_attn.qkv_proj", base) == (4, 32)
    assert resolve_dynamic(dynamic, "model.layers.10.mlp.down_proj", base) == (4, 32)
    assert all(k.startswith("+:") for k in dynamic)


def test_refusals(src_dir: Path, tmp_path: Path, exl2_dir: Path) -> None:
    mixed_dir = write_exl2_dir(
        src_dir, tmp_path / "mixed", config_for=lambda n: mixed() if "down" in n else uniform(4)
    )
    with pytest.raises(
        GptqExportError,
        match=r"model\.layers\.0\.mlp\.down_proj: mixes \[8, 4, 3, 2\].*single-width",
    ):
        export_gptq(mixed_dir, tmp_path / "o1")

    def split_qkv(n: str) -> QParams:
        return uniform(8) if n.endswith("layers.0.self_attn.k_proj") else uniform(4)

    split = write_exl2_dir(src_dir, tmp_path / "split", config_for=split_qkv, head_bits=None)
    with pytest.raises(
        GptqExportError,
        match=r"model\.layers\.0\.self_attn\.qkv_proj: vLLM fuses q_proj, k_proj, v_proj",
    ):
        export_gptq(split, tmp_path / "o2")

    with pytest.raises(GptqExportError, match=r"down_proj: 3-bit groups cannot be exported: vLLM"):
        export_gptq(exl2_dir, tmp_path / "o3", vllm=True)

    six = write_exl2_dir(src_dir, tmp_path / "six", config_for=lambda n: uniform(6), head_bits=None)
    with pytest.raises(GptqExportError, match="6-bit groups cannot be exported: GPTQ has 2/3/4/8"):
        export_gptq(six, tmp_path / "o4")

    (tmp_path / "exists").mkdir()
    with pytest.raises(GptqExportError, match="already exists"):
        export_gptq(exl2_dir, tmp_path / "exists")
    # Nothing half-written is left behind by the refusals.
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".o", "o"))]


def test_vllm_widths_and_cli(src_dir: Path, tmp_path: Path) -> None:
    from exl2rs.cli import main

    d = write_exl2_dir(
        src_dir,
        tmp_path / "w48",
        config_for=lambda n: uniform(8) if "down" in n else uniform(4),
        head_bits=None,
    )
    out = tmp_path / "gptq"
    assert main(["export-gptq", str(d), str(out), "--vllm"]) == 0
    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc["bits"] == 4 and len(qc["dynamic"]) == 2
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True  # no quantized head: the tie stays
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    assert main(["export-gptq", str(d), str(out)]) == 2  # exists
    assert main(["export-gptq", str(d), str(out), "--force"]) == 0
