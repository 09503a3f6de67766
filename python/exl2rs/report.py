"""Where the bits went: an allocation heatmap (layers × linear kind, coloured by bpw), the
error-vs-size frontier with the chosen point, a per-layer table; PNG via matplotlib (Agg, no
display) and one self-contained HTML page (:func:`write_report`, ``exl2rs report DIR``)."""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exl2rs.allocation import Allocation, Frontier
from exl2rs.errors import Exl2Error
from exl2rs.qparams import LINEAR_KINDS, QParams

_LAYER = re.compile(r"\.layers\.(\d+)\.(?:[A-Za-z_]+)\.([A-Za-z_]+)$")


def allocation_grid(a: Allocation) -> tuple[list[str], list[list[float | None]]]:
    """(kinds, grid[layer][kind] = bpw) for names like ``model.layers.3.mlp.down_proj``."""
    return bpw_grid({it.name: it.bpw for it in a.items})


def bpw_grid(bpw: Mapping[str, float]) -> tuple[list[str], list[list[float | None]]]:
    """(kinds, grid[layer][kind] = bpw) from ``{linear name: bpw}``."""
    cells: dict[tuple[int, str], float] = {}
    for name, value in bpw.items():
        m = _LAYER.search(name)
        if m:
            cells[(int(m.group(1)), m.group(2))] = value
    kinds = [k for k in LINEAR_KINDS if any(k == c[1] for c in cells)]
    kinds += sorted({c[1] for c in cells} - set(kinds))
    layers = 1 + max((c[0] for c in cells), default=-1)
    grid = [[cells.get((layer, k)) for k in kinds] for layer in range(layers)]
    return kinds, grid


def _atomic_savefig(fig: object, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")  # type: ignore[attr-defined]
    tmp.replace(path)


def plot_allocation(a: Allocation, path: str | Path, title: str | None = None) -> Path:
    """Heatmap of bpw per layer (rows) and linear kind (columns)."""
    return plot_bpw_grid(
        {it.name: it.bpw for it in a.items}, path, title or f"{a.solution.solver}: {a.bpw:.3f} bpw"
    )


def plot_bpw_grid(bpw: Mapping[str, float], path: str | Path, title: str) -> Path:
    """Heatmap of ``{linear name: bpw}`` per layer (rows) and linear kind (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    kinds, grid = bpw_grid(bpw)
    if not grid:
        raise Exl2Error("report: no decoder linear names (model.layers.N.module.kind) to plot")
    data = np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 * len(kinds) + 2, 0.22 * len(grid) + 1.5))
    im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=2.0, vmax=8.0)
    ax.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right")
    step = max(1, len(grid) // 16)  # integer layer ticks, at most ~16 labels
    ax.set_yticks(range(0, len(grid), step))
    ax.set_ylabel("layer")
    ax.set_title(title)
    for y, row in enumerate(grid):
        for x, v in enumerate(row):
            if v is not None:
                ax.text(x, y, f"{v:.1f}", ha="center", va="center", fontsize=6, color="w")
    fig.colorbar(im, ax=ax, label="bits per weight")
    out = Path(path)
    _atomic_savefig(fig, out)
    plt.close(fig)
    return out


def plot_frontiers(
    frontiers: Mapping[str, Frontier],
    path: str | Path,
    chosen: Sequence[Allocation] = (),
    ylabel: str = "objective (Σ tr(ΔW H ΔWᵀ))",
    marks: Sequence[tuple[str, float, float]] = (),
) -> Path:
    """Error-vs-bpw curves, one per solver, with the chosen allocations (and ``marks``:
    ``(label, bpw, objective)`` points) marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, f in frontiers.items():
        pts = f.points()
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, lw=1.2)
    for a in chosen:
        ax.scatter([a.bpw], [a.objective], zorder=3)
        ax.annotate(f"{a.solution.solver} {a.bpw:.2f}", (a.bpw, a.objective), fontsize=7)
    for label, x, y in marks:
        ax.scatter([x], [y], zorder=4, marker="*", s=120, color="crimson")
        ax.annotate(label, (x, y), fontsize=8, xytext=(6, 6), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (decoder linears)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(path)
    _atomic_savefig(fig, out)
    plt.close(fig)
    return out


# -- the report page -------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearRow:
    """One linear of a strategy, with its measured error when a measurement is given."""

    name: str
    layer: int | None
    kind: str
    desc: str
    bits: int
    bpw: float
    error: float | None  # tr(ΔW H ΔWᵀ) of the chosen config
    rel_error: float | None  # the same over tr(W H Wᵀ)

    @property
    def numel(self) -> int:
        return round(self.bits / self.bpw) if self.bpw > 0 else 0


@dataclass(frozen=True)
class ReportFiles:
    html: Path
    images: tuple[Path, ...]


def read_strategy(strategy: Mapping[str, Any] | str | Path) -> dict[str, dict[str, Any]]:
    """``linears`` of an ``exl2rs_strategy.json`` (a path or the parsed dict), checked."""
    where = "strategy"
    if not isinstance(strategy, Mapping):
        where = str(strategy)
        try:
            strategy = json.loads(Path(strategy).read_text())
        except (OSError, ValueError) as e:
            raise Exl2Error(f"{where}: unreadable strategy file ({e})") from e
    linears = strategy.get("linears") if isinstance(strategy, Mapping) else None
    if not isinstance(linears, Mapping) or not linears:
        raise Exl2Error(f"{where}: expected {{'linears': {{name: {{desc, config, bits, bpw}}}}}}")
    out: dict[str, dict[str, Any]] = {}
    for name, entry in linears.items():
        missing = [k for k in ("desc", "config", "bits", "bpw") if k not in entry]
        if missing:
            raise Exl2Error(f"{where}: linear {name} lacks {', '.join(missing)}")
        out[str(name)] = dict(entry)
    return out


def _measured_errors(
    linears: Mapping[str, Mapping[str, Any]], measurement: Any
) -> dict[str, tuple[float, float]]:
    """``{name: (error, relative error)}`` of each strategy linear's config in the
    measurement; a linear or config the measurement does not hold is an error."""
    raw, rel = measurement.linear_problem(), measurement.linear_problem(scale="relative")
    configs = [QParams.from_dict(json.loads(c)) for c in measurement.configs_json()]
    index = {n: i for i, n in enumerate(raw.names)}
    out: dict[str, tuple[float, float]] = {}
    for name, entry in linears.items():
        if name == "lm_head" or name not in index:
            if name == "lm_head":
                continue
            raise Exl2Error(f"report: {name} is in the strategy but not in the measurement")
        i = index[name]
        want = QParams.from_dict(entry["config"])
        # An option's third field is its index into the measurement's config list.
        for (_, err, c), (_, rerr, _) in zip(raw.options(i), rel.options(i), strict=True):
            if configs[c] == want:
                out[name] = (err, rerr)
                break
        else:
            raise Exl2Error(f"report: {name}: config {entry['desc']} was not measured")
    return out


def linear_rows(
    linears: Mapping[str, Mapping[str, Any]], measurement: Any | None = None
) -> list[LinearRow]:
    errors = _measured_errors(linears, measurement) if measurement is not None else {}
    rows = []
    for name, entry in linears.items():
        m = _LAYER.search(name)
        err = errors.get(name)
        rows.append(
            LinearRow(
                name=name,
                layer=int(m.group(1)) if m else None,
                kind=m.group(2) if m else name.rpartition(".")[2],
                desc=str(entry["desc"]),
                bits=int(entry["bits"]),
                bpw=float(entry["bpw"]),
                error=None if err is None else err[0],
                rel_error=None if err is None else err[1],
            )
        )
    return rows


def _decoder_bpw(rows: Sequence[LinearRow]) -> float:
    dec = [r for r in rows if r.layer is not None]
    numel = sum(r.numel for r in dec)
    return sum(r.bits for r in dec) / numel if numel else float("nan")


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _layer_table(rows: Sequence[LinearRow]) -> str:
    kinds = [k for k in LINEAR_KINDS if any(r.kind == k for r in rows)]
    layers = sorted({r.layer for r in rows if r.layer is not None})
    cells = {(r.layer, r.kind): r for r in rows}
    has_err = any(r.error is not None for r in rows)
    head = "".join(f"<th>{html.escape(k)}</th>" for k in kinds)
    head += "<th>layer bpw</th>" + ("<th>layer error</th>" if has_err else "")
    body = []
    for layer in layers:
        mine = [r for r in rows if r.layer == layer]
        tds = []
        for k in kinds:
            r = cells.get((layer, k))
            if r is None:
                tds.append("<td>–</td>")
                continue
            tip = html.escape(
                f"{r.desc}; {r.bits} bits"
                + (f"; rel. error {r.rel_error:.3g}" if r.rel_error is not None else "")
            )
            tds.append(
                f'<td title="{tip}">{r.bpw:.3f}<br><small>{html.escape(r.desc)}</small></td>'
            )
        tds.append(f"<td>{_decoder_bpw(mine):.3f}</td>")
        if has_err:
            err = sum(r.error or 0.0 for r in mine)
            tds.append(f"<td>{err:.4g}</td>")
        body.append(f"<tr><th>{layer}</th>{''.join(tds)}</tr>")
    return (
        f"<table><thead><tr><th>layer</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    )


def _linear_table(rows: Sequence[LinearRow]) -> str:
    body = "".join(
        f"<tr><td>{html.escape(r.name)}</td><td>{html.escape(r.desc)}</td><td>{r.bits}</td>"
        f"<td>{r.bpw:.4f}</td><td>{_fmt(r.error, '.4g')}</td><td>{_fmt(r.rel_error, '.3g')}</td>"
        "</tr>"
        for r in rows
    )
    return (
        "<table><thead><tr><th>linear</th><th>config</th><th>bits</th><th>bpw</th>"
        f"<th>error tr(ΔW H ΔWᵀ)</th><th>relative</th></tr></thead><tbody>{body}</tbody></table>"
    )


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;font-size:12px;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}
td:first-child,th:first-child{text-align:left}small{color:#666}
img{max-width:100%;border:1px solid #eee}.kv td{text-align:left}"""


def write_report(
    out_dir: str | Path,
    strategy: Mapping[str, Any] | str | Path,
    measurement: Any | str | Path | None = None,
    frontier_data: Mapping[str, Frontier] | None = None,
    *,
    title: str = "exl2rs allocation report",
    targets: Sequence[float] | None = None,
) -> ReportFiles:
    """Writes ``allocation.png``, ``frontier.png`` (with a measurement) and ``report.html``
    (the images inlined, no external assets) into ``out_dir``, each atomically.

    ``measurement``: an exl2rs :class:`~exl2rs.Measurement` (or its file); it gives each
    linear's error and, unless ``frontier_data`` is passed, the exact solver's frontier over
    ``targets`` (default: every 0.05 bpw the measurement can reach)."""
    from exl2rs import _core
    from exl2rs.allocation import frontier
    from exl2rs.atomic import atomic_write_bytes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    linears = read_strategy(strategy)
    if measurement is not None and not isinstance(measurement, _core.Measurement):
        measurement = _core.Measurement.load(Path(measurement))
    rows = linear_rows(linears, measurement)
    bpw = _decoder_bpw(rows)
    images = [
        plot_bpw_grid(
            {r.name: r.bpw for r in rows}, out / "allocation.png", f"{title}: {bpw:.3f} bpw"
        )
    ]
    objective = None
    if measurement is not None:
        dec = [r for r in rows if r.layer is not None]
        objective = sum(r.error or 0.0 for r in dec)
        if frontier_data is None:
            if targets is None:
                lo, hi = measurement.linear_problem().cost_range()
                total = measurement.linear_problem().total_numel
                a, b = math.ceil(lo / total * 20) / 20, math.floor(hi / total * 20) / 20
                targets = [round(a + 0.05 * i, 4) for i in range(int(round((b - a) / 0.05)) + 1)]
            frontier_data = {"exact": frontier(measurement, targets)}
    if frontier_data:
        marks = [] if objective is None else [(f"chosen {bpw:.3f} bpw", bpw, objective)]
        images.append(plot_frontiers(frontier_data, out / "frontier.png", marks=marks))
    summary = [
        ("decoder linears", str(sum(1 for r in rows if r.layer is not None))),
        ("decoder bpw", f"{bpw:.4f}"),
        ("decoder bits", f"{sum(r.bits for r in rows if r.layer is not None):,}"),
    ]
    head_rows = [r for r in rows if r.layer is None]
    for r in head_rows:
        summary.append((r.name, f"{r.desc} ({r.bpw:.3f} bpw)"))
    if objective is not None:
        summary.append(("objective Σ tr(ΔW H ΔWᵀ)", f"{objective:.6g}"))
    kv = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary)
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f'<table class="kv">{kv}</table>',
        "<h2>Allocation</h2>",
        _img(images[0], "allocation heatmap"),
    ]
    if len(images) > 1:
        body += ["<h2>Error vs size</h2>", _img(images[1], "frontier")]
    body += ["<h2>Per layer</h2>", _layer_table(rows)]
    body += ["<details><summary>Every linear</summary>", _linear_table(rows), "</details>"]
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )
    path = out / "report.html"
    atomic_write_bytes(path, page.encode())
    return ReportFiles(path, tuple(images))


def _find_measurement(directory: Path) -> Path | None:
    found = sorted(directory.glob("*.exl2rs.json"))
    return found[0] if found else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=Path, help="an EXL2 directory with exl2rs_strategy.json")
    parser.add_argument(
        "--measurement",
        type=Path,
        help="native exl2rs measurement (default: DIR/*.exl2rs.json if present)",
    )
    parser.add_argument("--out", type=Path, help="output folder (default DIR/report)")


def run(args: argparse.Namespace) -> int:
    directory: Path = args.dir
    strategy = directory / "exl2rs_strategy.json"
    if not strategy.is_file():
        raise Exl2Error(f"{directory}: no exl2rs_strategy.json (not an exl2rs output?)")
    measurement = args.measurement or _find_measurement(directory)
    files = write_report(
        args.out or directory / "report",
        strategy,
        measurement,
        title=f"{directory.name}: exl2rs allocation",
    )
    print(f"wrote {files.html} ({', '.join(p.name for p in files.images)})")
    return 0
