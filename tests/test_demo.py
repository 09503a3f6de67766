"""``python -m exl2rs.demo --quick`` end to end on SmolLM2 cut to one layer, and its pieces."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from exl2rs import demo
from exl2rs.errors import Exl2Error
from exl2rs.qparams import QParams

# SmolLM2-135M's per-layer linear shapes (in_features, out_features).
SHAPES = {
    "l.q_proj": (576, 576),
    "l.k_proj": (576, 192),
    "l.v_proj": (576, 192),
    "l.o_proj": (576, 576),
    "l.gate_proj": (576, 1536),
    "l.up_proj": (576, 1536),
    "l.down_proj": (1536, 576),
}


@pytest.mark.parametrize(
    ("target", "desc"), [(4.0, "1:4b_128g s4"), (3.0, "1:3b_128g s4"), (2.0, "1:2b_128g s4")]
)
def test_uniform_config_is_the_cheapest_at_or_above_the_target(target: float, desc: str) -> None:
    q, bpw = demo.uniform_config(SHAPES, target)
    assert q.desc == desc
    assert bpw >= target
    assert bpw == demo.decoder_bpw(dict.fromkeys(SHAPES, q), SHAPES)
    cheaper = [
        c
        for c in demo.uniform_candidates()
        if target <= demo.decoder_bpw(dict.fromkeys(SHAPES, c), SHAPES) < bpw
    ]
    assert cheaper == []


def test_uniform_config_beyond_every_candidate_is_refused() -> None:
    with pytest.raises(Exl2Error, match="no config reaches 9.0 bpw"):
        demo.uniform_config(SHAPES, 9.0)


def test_decoder_bpw_counts_every_tensor_bit() -> None:
    q = QParams((4,), (1.0,), (128,))
    bits = sum(q.total_bits(k, n) for k, n in SHAPES.values())
    numel = sum(k * n for k, n in SHAPES.values())
    assert demo.decoder_bpw(dict.fromkeys(SHAPES, q), SHAPES) == bits / numel
    assert bits > 4 * numel  # scales, group table and permutation are counted too


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    out = tmp_path_factory.mktemp("demo")
    lines: list[str] = []
    # One torch thread: on a loaded 2-core machine a thread pool stalls far more than it helps.
    doc = demo.run_demo(out, demo.QUICK, threads=1, progress=False, log=lines.append)
    return out, doc, "\n".join(lines)


def test_quick_demo_table(quick_run: tuple[Path, dict[str, Any], str]) -> None:
    out, doc, printed = quick_run
    rows = {r["key"]: r for r in doc["rows"]}
    assert list(rows) == ["fp32", "exl2rs_4.0", "uniform_4.0"]
    fp32, ours, uni = rows["fp32"], rows["exl2rs_4.0"], rows["uniform_4.0"]
    assert fp32["kl"] == 0.0
    assert 3.9 < ours["bpw"] <= 4.0  # the budget is never exceeded
    assert uni["config"] == "1:4b_128g s4" and uni["bpw"] >= 4.0
    for r in (ours, uni):
        assert 0.0 < r["kl"] < 1.0 and math.isfinite(r["ppl"])
        assert r["file_bytes"] == demo.dir_bytes(Path(r["output_dir"]))
        assert r["file_bytes"] < fp32["file_bytes"]
        assert r["quantize_s"] > 0 and r["compile_s"] > 0 and r["eval_s"] > 0
    assert ours["measure_s"] > 0 and ours["allocate_s"] >= 0 and uni["measure_s"] is None
    # one printed table with every model, the same numbers as the JSON
    for r in rows.values():
        assert any(
            line.startswith(r["model"]) and f"{r['ppl']:.3f}" in line
            for line in printed.splitlines()
        )
    saved = json.loads((out / "demo.json").read_text())
    assert [r["key"] for r in saved["rows"]] == list(rows)
    md = (out / "demo.md").read_text()
    assert "| model |" in md and "exl2rs@4.0" in md
    for name in ("allocation.png", "frontier.png", "report.html"):
        assert (out / "report_exl2rs_4.0" / name).stat().st_size > 1000
    assert doc["report"] == [str(out / "report_exl2rs_4.0" / "report.html")]
    assert (out / "measurement.json").is_file()  # exllamav2's format beside the native one


def test_one_pass_scores_match_the_evaluator(quick_run: tuple[Path, dict[str, Any], str]) -> None:
    """The shared-reference pass gives what exl2rs.evaluate computes model by model."""
    from exl2rs.evaluate import kl_divergence, perplexity

    _, doc, _ = quick_run
    model = Path(doc["model"])
    windows = demo.eval_windows(model, doc["windows"])
    ref = demo.load_fp32(model)
    ours = next(r for r in doc["rows"] if r["key"] == "exl2rs_4.0")
    quant = demo.load_quantized(Path(ours["output_dir"]))
    with torch.inference_mode():
        ref_fn = lambda ids: ref(ids).logits  # noqa: E731
        q_fn = lambda ids: quant(ids).logits  # noqa: E731
        fp32_row = doc["rows"][0]
        assert perplexity(ref_fn, windows, batch_size=1) == pytest.approx(fp32_row["ppl"], rel=1e-5)
        assert perplexity(q_fn, windows, batch_size=1) == pytest.approx(ours["ppl"], rel=1e-5)
        kl = kl_divergence(ref_fn, q_fn, windows, batch_size=1)
        assert kl == pytest.approx(ours["kl"], rel=1e-4)


def test_measurement_is_reused_when_inputs_match(
    quick_run: tuple[Path, dict[str, Any], str],
) -> None:
    out, doc, _ = quick_run
    model = Path(doc["model"])
    path, seconds, reused = demo.shared_measurement(model, out, demo.QUICK, progress=False)
    assert reused and path == out / "measurement.exl2rs.json"
    assert seconds == doc["rows"][1]["measure_s"]


def test_fresh_refuses_to_delete_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "thesis.tex").write_text("precious")
    with pytest.raises(Exl2Error, match="does not look like a demo output"):
        demo.run_demo(tmp_path, demo.QUICK, fresh=True, progress=False, log=lambda _s: None)
    assert (tmp_path / "thesis.tex").read_text() == "precious"


def test_convert_all_reports_every_failed_job(tmp_path: Path) -> None:
    """Spawned converts: a failing job does not hide the others; the error names every failed
    variant and carries the first worker's own exception."""
    from exl2rs.errors import JobError
    from exl2rs.fixtures import truncated_model_dir

    model = truncated_model_dir(1)
    bad = [demo.Variant(f"bad{i}", "bad", 4.0, {}) for i in range(2)]
    lines: list[str] = []
    with pytest.raises(RuntimeError, match=r"2 of 2 converts failed: bad[01], bad[01]") as info:
        demo.convert_all(model, tmp_path, bad, demo.QUICK, jobs=2, log=lines.append)
    assert isinstance(info.value.__cause__, JobError)
    assert sum("FAILED" in line for line in lines) == 2
