"""The measurement pass: file content, resume after a kill, refusals, bad input, real layers."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from exl2rs import gptq, measure, qparams
from exl2rs.errors import (
    CalibrationError,
    MeasurementError,
    NonFiniteError,
    UnsupportedArchitectureError,
)

ROWS, LENGTH = 3, 48


def _tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 49152, (ROWS, LENGTH), generator=torch.Generator().manual_seed(seed))


def _run(model: Path, out: Path, **kw: Any) -> Path:
    kw.setdefault("calibration", _tokens())
    kw.setdefault("workers", 1)  # worker processes cost an import each; one test uses them
    return measure.measure(model, out, device="cpu", progress=False, threads=1, **kw)


@pytest.fixture(scope="module")
def measured(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("meas") / "m.json"
    ex = out.with_name("measurement.json")
    _run(tiny_llama_dir, out, write_exllamav2=ex)
    return {
        "path": out,
        "native": json.loads(out.read_text()),
        "exl2_path": ex,
        "exl2": json.loads(ex.read_text()),
    }


def test_native_file_content(measured: dict[str, Any], tiny_llama_dir: Path) -> None:
    nat = measured["native"]
    assert nat["format"] == "exl2rs.measurement" and nat["version"] == 1
    assert nat["model"]["num_layers"] == 2
    assert nat["model"]["architecture"] == "LlamaForCausalLM"
    assert nat["model"]["hash"] == measure.model_hash(tiny_llama_dir)
    assert nat["calibration"]["rows"] == ROWS and nat["calibration"]["length"] == LENGTH
    configs = [
        qparams.QParams(tuple(c["bits"]), tuple(c["bits_prop"]), tuple(c["group_size"]))
        for c in nat["configs"]
    ]
    linears = nat["linears"]
    assert [lin["name"] for lin in linears[:7]] == [
        f"model.layers.0.{m}.{k}"
        for m, ks in (("self_attn", measure.ATTN_KINDS), ("mlp", measure.MLP_KINDS))
        for k in ks
    ]
    union_qkv = {q.desc for k in ("q_proj", "k_proj", "v_proj") for q in qparams.candidates(k)}
    for lin in linears:
        descs = [configs[o["config"]].desc for o in lin["options"]]
        assert len(descs) == len(set(descs))
        if lin["kind"] in ("q_proj", "k_proj", "v_proj"):
            assert set(descs) == union_qkv  # fused members share one option list
            assert lin["shared_input"].endswith("self_attn.qkv")
        elif lin["kind"] in ("gate_proj", "up_proj"):
            assert lin["shared_input"].endswith("mlp.gate_up")
        else:
            assert set(descs) == {q.desc for q in qparams.candidates(lin["kind"])}
        assert lin["samples"] == ROWS * LENGTH
        assert lin["ref_energy"] > 0
        for o in lin["options"]:
            q = configs[o["config"]]
            assert o["bits"] == q.total_bits(lin["in_features"], lin["out_features"])
            assert 0 <= o["err"] < lin["ref_energy"]
        by_bits = sorted(lin["options"], key=lambda o: o["bits"])
        assert by_bits[0]["err"] > by_bits[-1]["err"]
    mods = nat["modules"]
    assert [m["name"] for m in mods] == [
        "model.layers.0.self_attn",
        "model.layers.0.mlp",
        "model.layers.1.self_attn",
        "model.layers.1.mlp",
    ]
    shapes = {lin["name"]: (lin["in_features"], lin["out_features"]) for lin in linears}
    for m in mods:
        table = qparams.attn_table() if m["kind"] == "self_attn" else qparams.mlp_table()
        assert len(m["rows"]) == len(table)
        for row, trow in zip(m["rows"], table, strict=True):
            assert 1e-6 <= row["accuracy"] <= 1.0
            assert {k: configs[i].desc for k, i in row["configs"].items()} == {
                k: q.desc for k, q in trow.items()
            }
            assert row["total_bits"] == sum(
                q.total_bits(*shapes[f"{m['name']}.{k}"]) for k, q in trow.items()
            )
        # The widest row is far more accurate than the narrowest.
        assert 1 - m["rows"][-1]["accuracy"] < 0.25 * (1 - m["rows"][0]["accuracy"])


def test_files_load_in_rust(measured: dict[str, Any]) -> None:
    from exl2rs._core import Exl2Measurement, Measurement

    m = Measurement.load(measured["path"])
    assert m.num_layers == 2 and len(m.linear_names) == 14
    e = Exl2Measurement.load(measured["exl2_path"])
    assert len(e.module_names) == 4
    ex = measured["exl2"]["measurement"]
    row = ex["model.layers.1.mlp"][7]
    assert set(row) == {"accuracy", "total_bits", "gate_proj", "up_proj", "down_proj"}
    assert qparams.QParams.from_dict(row["down_proj"]) == qparams.mlp_table()[7]["down_proj"]


def test_job_dir_is_cleaned_up(measured: dict[str, Any]) -> None:
    assert not measured["path"].with_name("m.json.job").exists()


_KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, torch
    from exl2rs import measure
    def kill(layer):
        if layer == 0:
            os.kill(os.getpid(), signal.SIGKILL)
    toks = torch.load(sys.argv[3])
    measure.measure(sys.argv[1], sys.argv[2], calibration=toks, device="cpu", progress=False,
                    threads=1, workers=2, on_layer_done=kill)
    """
)


def test_resume_after_sigkill_is_byte_identical(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Killed while its 2 worker processes run (they must exit with it: ``subprocess.run``
    returns only once they close the captured pipes), resumed with 2 workers: the file equals
    the uninterrupted sequential (``workers=1``) one byte for byte."""
    clean = _run(tiny_llama_dir, tmp_path / "clean.json")
    toks = tmp_path / "toks.pt"
    torch.save(_tokens(), toks)
    out = tmp_path / "resumed.json"
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_SCRIPT, str(tiny_llama_dir), str(out), str(toks)],
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    job = json.loads((tmp_path / "resumed.json.job" / "job.json").read_text())
    assert job["next_layer"] == 1 and not out.exists()
    resumed: list[int] = []
    _run(tiny_llama_dir, out, on_layer_done=resumed.append, workers=2)
    assert resumed == [1]  # layer 0 came from the checkpoint
    assert out.read_bytes() == clean.read_bytes()


class _Stop(Exception):
    pass


def _stop_after(k: int) -> Callable[[int], None]:
    def cb(layer: int) -> None:
        if layer == k:
            raise _Stop

    return cb


def test_foreign_job_dir_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    job = tmp_path / "job"
    with pytest.raises(_Stop):
        _run(tiny_llama_dir, tmp_path / "a.json", job_dir=job, on_layer_done=_stop_after(0))
    with pytest.raises(MeasurementError, match=r"another measurement \(calibration differs"):
        _run(tiny_llama_dir, tmp_path / "b.json", job_dir=job, calibration=_tokens(seed=1))
    small = {"q_proj": qparams.candidates("q_proj")[:3]}
    with pytest.raises(MeasurementError, match="candidates differs"):
        _run(tiny_llama_dir, tmp_path / "c.json", job_dir=job, candidates=small)
    (job / "job.json").write_text("{not json")
    with pytest.raises(MeasurementError, match="unreadable job file"):
        _run(tiny_llama_dir, tmp_path / "d.json", job_dir=job)


def test_nonfinite_weight_names_the_tensor(
    tiny_llama_dir: Path, tmp_path: Path, tiny_model: Any
) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in tiny_llama_dir.iterdir():
        if f.suffix != ".safetensors":
            (bad / f.name).write_bytes(f.read_bytes())
    for f in tiny_llama_dir.glob("*.safetensors"):
        tensors = load_file(str(f))
        name = "model.layers.1.mlp.down_proj.weight"
        if name in tensors:
            tensors[name][3, 5] = float("nan")
        save_file(tensors, str(bad / f.name), metadata={"format": "pt"})
    with pytest.raises(NonFiniteError, match=r"layers\.1\.mlp\.down_proj"):
        _run(bad, tmp_path / "m.json")


def test_bad_calibration_and_architecture(tiny_llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match=r"token ids span \[0, 60000\]"):
        _run(tiny_llama_dir, tmp_path / "m.json", calibration=torch.tensor([[0, 60000]]))
    with pytest.raises(CalibrationError, match="integer token ids"):
        _run(tiny_llama_dir, tmp_path / "m.json", calibration=torch.zeros(2, 4))
    odd = tmp_path / "odd"
    odd.mkdir()
    for f in tiny_llama_dir.iterdir():
        (odd / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((odd / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["MambaForCausalLM"], "mamba"
    (odd / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="MambaForCausalLM.*LlamaForCausalLM"):
        _run(odd, tmp_path / "m.json")


def test_cli_round_trip(tiny_llama_dir: Path, tmp_path: Path, capsys: Any) -> None:
    import argparse

    tok_file = tmp_path / "cal.txt"
    tok_file.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    parser = argparse.ArgumentParser()
    measure.add_arguments(parser)
    out = tmp_path / "cli.json"
    args = parser.parse_args(
        ["-i", str(tiny_llama_dir), "-o", str(out), "-c", str(tok_file), "-mr", "2", "-ml", "32"]
        + ["--device", "cpu", "--no-progress", "--threads", "1", "--workers", "1"]
        + ["-om", str(tmp_path / "ex.json")]
    )
    threads = torch.get_num_threads()
    assert measure.run(args) == 0
    assert torch.get_num_threads() == threads  # --threads is scoped to the run
    assert json.loads(out.read_text())["calibration"]["source"] == str(tok_file)
    assert (tmp_path / "ex.json").is_file()
    args = parser.parse_args(["-i", str(tmp_path / "nope"), "-o", str(out), "--no-progress"])
    assert measure.run(args) == 1
    assert "nope" in capsys.readouterr().err


# --- real SmolLM2 layers with real calibration text -------------------------------------------


@pytest.fixture
def one_thread() -> Any:
    # Small torch ops stall badly in a 2-thread pool on a shared 2-core machine.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def smollm2_hessians(smollm2_dir: Path, wiki_text: str) -> dict[str, Any]:
    """Inputs of layer 0 and layer 12 (q/k/v and down_proj) on 4 x 256 wiki tokens."""
    from exl2rs.streaming import StreamingModel

    sm = StreamingModel(smollm2_dir)
    ids = sm.tokenizer(wiki_text[:40_000], add_special_tokens=False)["input_ids"][: 4 * 256]
    states = sm.embed(torch.tensor(ids).view(4, 256))
    out: dict[str, Any] = {}
    for layer in range(13):
        block = sm.load_block(layer)
        if layer in (0, 12):
            hq = gptq.Hessian(576, name=f"model.layers.{layer}.self_attn.qkv")
            hd = gptq.Hessian(1536, name=f"model.layers.{layer}.mlp.down")
            h1 = block.self_attn.q_proj.register_forward_pre_hook(lambda _m, a, h=hq: h.add(a[0]))
            h2 = block.mlp.down_proj.register_forward_pre_hook(lambda _m, a, h=hd: h.add(a[0]))
        states = sm.block_forward(block, layer, states)
        if layer in (0, 12):
            h1.remove()
            h2.remove()
            for kind, hess in (("q_proj", hq), ("k_proj", hq), ("down_proj", hd)):
                mod = "self_attn" if kind != "down_proj" else "mlp"
                w = block.get_submodule(f"{mod}.{kind}").weight.detach().clone()
                out[f"{layer}.{kind}"] = (w, hess)
    return out


@pytest.mark.parametrize("key", ["0.q_proj", "12.k_proj", "12.down_proj"])
def test_gptq_beats_rtn_and_exl2_rule_on_smollm2(
    smollm2_hessians: dict[str, Any], key: str, one_thread: Any
) -> None:
    w, hess = smollm2_hessians[key]
    prepared = gptq.prepare(hess)
    # Every other candidate keeps the 2-to-8-bit span at half the time.
    configs = qparams.candidates(key.split(".")[1])[::2]
    ours = gptq.quantize_many(w, prepared, configs, scale_search="hessian")
    exl2 = gptq.quantize_many(w, prepared, configs, scale_search="exl2")
    rtn = gptq.quantize_many(w, prepared, configs, scale_search="exl2", error_feedback=False)
    for q, a, b, r in zip(configs, ours, exl2, rtn, strict=True):
        assert a.err <= r.err and b.err <= r.err, q.desc
    ratios = [a.err / b.err for a, b in zip(ours, exl2, strict=True)]
    # Hessian-weighted scale search: lower tr(ΔW H ΔWᵀ) on average and on most configs.
    assert sum(ratios) / len(ratios) < 0.99, ratios
    assert sum(r < 1.0 for r in ratios) >= 0.7 * len(ratios), ratios


def test_small_batch_budget_and_compact_candidates_keep_the_records(
    measured: dict[str, Any], tiny_llama_dir: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    """GPTQ in batches of 2 configs (the MLP linears are 64 x 128), candidates held as uint8
    codes and dequantized per joint row: the same file as one batch per linear."""
    monkeypatch.setattr(gptq, "DEFAULT_MAX_BATCH_BYTES", 2 * 64 * 128 * gptq.BATCH_BYTES_PER_WEIGHT)
    sizes: list[int] = []
    per_weight: list[float] = []
    batch, compact, deq = gptq._quantize_batch, gptq.quantize_many_compact, gptq.dequantize

    def spy_batch(w: torch.Tensor, prepared: Any, layouts: Any, *a: Any) -> Any:
        sizes.append(len(layouts))
        return batch(w, prepared, layouts, *a)

    def spy_compact(w: torch.Tensor, *a: Any, **kw: Any) -> Any:
        out = compact(w, *a, **kw)
        per_weight.extend(r.nbytes / w.numel() for r in out)
        return out

    def spy_deq(res: Any) -> torch.Tensor:
        assert isinstance(res, gptq.CompactResult) and res.codes.dtype == torch.uint8
        return deq(res)

    monkeypatch.setattr(gptq, "_quantize_batch", spy_batch)
    monkeypatch.setattr(gptq, "quantize_many_compact", spy_compact)
    monkeypatch.setattr(gptq, "dequantize", spy_deq)
    got = json.loads(_run(tiny_llama_dir, tmp_path / "small.json").read_text())
    assert min(sizes) == 1 and max(sizes) <= 8  # 13 MLP configs: 2 per batch, one left over
    assert per_weight and max(per_weight) < 1.05  # not the 4-byte fp32 weights
    want = measured["native"]
    assert got["linears"] == want["linears"]
    assert got["modules"] == want["modules"]


def test_module_subset_is_causal_prefix_or_spread_positions() -> None:
    states = torch.arange(2 * 10 * 3, dtype=torch.float32).reshape(2, 10, 3)
    assert measure.module_subset(states, None, "mlp") is states
    assert measure.module_subset(states, 20, "self_attn") is states
    attn = measure.module_subset(states, 7, "self_attn")  # ceil(7 / 2) = 4 tokens per row
    assert torch.equal(attn, states[:, :4])
    mlp = measure.module_subset(states, 7, "mlp")
    assert torch.equal(mlp, states[:, [0, 3, 6, 9]])


def test_module_tokens_subset_changes_only_module_accuracy(
    measured: dict[str, Any], tiny_llama_dir: Path, tmp_path: Path
) -> None:
    sub = json.loads(_run(tiny_llama_dir, tmp_path / "sub.json", module_tokens=48).read_text())
    full = measured["native"]
    # Hessians and reference states use every token: per-linear records are unchanged.
    assert sub["linears"] == full["linears"]
    acc_sub = [r["accuracy"] for m in sub["modules"] for r in m["rows"]]
    acc_full = [r["accuracy"] for m in full["modules"] for r in m["rows"]]
    assert acc_sub != acc_full
    # 16 of 48 tokens per row still rank and size the rows like the full set.
    assert max(abs(a - b) for a, b in zip(acc_sub, acc_full, strict=True)) < 0.05
    with pytest.raises(ValueError, match="module_tokens must be positive"):
        _run(tiny_llama_dir, tmp_path / "bad.json", module_tokens=0)


@pytest.mark.parametrize("workers", [1, 2])
def test_error_inside_a_quantization_task_names_the_linear(
    tiny_llama_dir: Path, tmp_path: Path, workers: int
) -> None:
    """Raised in a worker process, the error crosses back with its type and message."""
    small = {"o_proj": qparams.candidates("o_proj")[:2]}
    with pytest.raises(MeasurementError, match=r"layers\.0\.self_attn\.o_proj: table config"):
        _run(tiny_llama_dir, tmp_path / "m.json", candidates=small, workers=workers)
    assert not (tmp_path / "m.json").exists()


def test_workers_must_be_positive(tiny_llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="workers must be positive, got 0"):
        _run(tiny_llama_dir, tmp_path / "m.json", workers=0)


@pytest.mark.parametrize("key", ["0.q_proj", "12.down_proj"])
def test_bracketed_scale_search_matches_exhaustive_on_smollm2(
    smollm2_hessians: dict[str, Any], key: str, one_thread: Any
) -> None:
    """The default search (17 of the 97 grid points) against all 97 on the same loss."""
    w, hess = smollm2_hessians[key]
    prepared = gptq.prepare(hess)
    configs = qparams.candidates(key.split(".")[1])[::3]
    fast = gptq.quantize_many(w, prepared, configs, scale_search="hessian")
    full = gptq.quantize_many(w, prepared, configs, scale_search="hessian_full")
    rtn = gptq.quantize_many(w, prepared, configs, scale_search="hessian", error_feedback=False)
    ratios = [a.err / b.err for a, b in zip(fast, full, strict=True)]
    for q, a, r, ratio in zip(configs, fast, rtn, ratios, strict=True):
        assert a.err < r.err, q.desc
        assert ratio <= 1.01, (q.desc, ratio)
    assert sum(ratios) / len(ratios) <= 1.003, ratios
