"""The allocation report: heatmap, frontier with the chosen point, per-layer table, one
self-contained HTML page."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest

from exl2rs import Exl2Error, allocate
from exl2rs.cli import main
from exl2rs.report import read_strategy, write_report
from exl2rs.synthetic import synthetic_measurement


@pytest.fixture(scope="module")
def measurement() -> Any:
    return synthetic_measurement(3, 256, 512, 4, 2, seed=7)


def strategy_of(measurement: Any, bpw: float) -> tuple[dict[str, Any], Any]:
    # the report sums raw tr(ΔW H ΔWᵀ); compare against an allocation on that scale
    a = allocate(measurement, bpw, scale="raw")
    shapes = dict(zip(measurement.linear_names, measurement.linear_shapes, strict=True))
    linears = {}
    for name, qp in a.configs().items():
        k, n = shapes[name]
        linears[name] = {
            "desc": qp.desc,
            "config": qp.to_dict(),
            "bits": qp.total_bits(k, n),
            "bpw": qp.bpw(k, n),
        }
    return {"version": 1, "bits": bpw, "linears": linears}, a


def test_report_page_is_self_contained(measurement: Any, tmp_path: Path) -> None:
    strategy, a = strategy_of(measurement, 4.0)
    files = write_report(tmp_path, strategy, measurement, title="test")
    assert files.html == tmp_path / "report.html"
    assert [p.name for p in files.images] == ["allocation.png", "frontier.png"]
    page = files.html.read_text()
    # No external assets: every image is an inlined PNG, no links or scripts.
    assert not re.search(r"""(src|href)=["'](?!data:)""", page)
    assert "<script" not in page and "<link" not in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2
    for img, path in zip(images, files.images, strict=True):
        assert base64.b64decode(img) == path.read_bytes()
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Summary numbers are the allocation's.
    bpw = float(re.search(r"decoder bpw</th><td>([\d.]+)<", page).group(1))  # type: ignore[union-attr]
    assert bpw == pytest.approx(a.bpw, abs=1e-4)
    obj = float(re.search(r"ΔWᵀ\)</th><td>([\d.e+-]+)<", page).group(1))  # type: ignore[union-attr]
    assert obj == pytest.approx(a.objective, rel=1e-5)
    # One row per layer in the per-layer table, every linear in the detail table.
    layer_table = page.split("<h2>Per layer</h2>")[1].split("</table>")[0]
    assert len(re.findall(r"<tr><th>\d+</th>", layer_table)) == 3
    for name in strategy["linears"]:
        assert f"<td>{name}</td>" in page
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_report_without_measurement_has_no_frontier(measurement: Any, tmp_path: Path) -> None:
    strategy, _ = strategy_of(measurement, 3.0)
    path = tmp_path / "s.json"
    path.write_text(json.dumps(strategy))
    files = write_report(tmp_path / "out", path)
    assert [p.name for p in files.images] == ["allocation.png"]
    assert "Error vs size" not in files.html.read_text()


def test_bad_strategies(measurement: Any, tmp_path: Path) -> None:
    with pytest.raises(Exl2Error, match="expected"):
        read_strategy({"linears": {}})
    with pytest.raises(Exl2Error, match="model.layers.0.mlp.up_proj lacks bpw"):
        read_strategy(
            {"linears": {"model.layers.0.mlp.up_proj": {"desc": "", "config": {}, "bits": 1}}}
        )
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(Exl2Error, match="bad.json: unreadable"):
        read_strategy(tmp_path / "bad.json")
    strategy, _ = strategy_of(measurement, 4.0)
    strategy["linears"]["model.layers.9.mlp.up_proj"] = strategy["linears"][
        "model.layers.0.mlp.up_proj"
    ]
    with pytest.raises(
        Exl2Error, match=r"model\.layers\.9\.mlp\.up_proj is in the strategy but not"
    ):
        write_report(tmp_path / "x", strategy, measurement)


def test_cli(measurement: Any, tmp_path: Path) -> None:
    strategy, _ = strategy_of(measurement, 3.5)
    d = tmp_path / "model"
    d.mkdir()
    (d / "exl2rs_strategy.json").write_text(json.dumps(strategy))
    measurement.save(d / "measurement.exl2rs.json")
    assert main(["report", str(d)]) == 0
    page = (d / "report" / "report.html").read_text()
    assert "Error vs size" in page
    assert main(["report", str(tmp_path)]) == 2  # no strategy there
