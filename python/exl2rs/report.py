"""Plots of where the bits went: an allocation heatmap (layers × linear kind, coloured by bpw)
and error-vs-size frontiers with the chosen points. PNG via matplotlib (Agg, no display)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from exl2rs.allocation import Allocation, Frontier
from exl2rs.qparams import LINEAR_KINDS

_LAYER = re.compile(r"\.layers\.(\d+)\.(?:[A-Za-z_]+)\.([A-Za-z_]+)$")


def allocation_grid(a: Allocation) -> tuple[list[str], list[list[float | None]]]:
    """(kinds, grid[layer][kind] = bpw) for names like ``model.layers.3.mlp.down_proj``."""
    cells: dict[tuple[int, str], float] = {}
    for it in a.items:
        m = _LAYER.search(it.name)
        if m:
            cells[(int(m.group(1)), m.group(2))] = it.bpw
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    kinds, grid = allocation_grid(a)
    data = np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 * len(kinds) + 2, 0.22 * len(grid) + 1.5))
    im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=2.0, vmax=8.0)
    ax.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right")
    ax.set_ylabel("layer")
    ax.set_title(title or f"{a.solution.solver}: {a.bpw:.3f} bpw")
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
) -> Path:
    """Error-vs-bpw curves, one per solver, with the chosen allocations marked."""
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
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (decoder linears)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(path)
    _atomic_savefig(fig, out)
    plt.close(fig)
    return out
