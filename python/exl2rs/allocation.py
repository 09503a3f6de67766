"""Bit allocation: solve a measurement (or any problem) for a size target.

The solvers are in Rust (``exl2rs._core.Problem.solve``); this module turns measurement files
and name patterns into problems and solutions into readable per-item results.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from exl2rs._core import Exl2Measurement, Measurement, Problem, Solution
from exl2rs.errors import InvalidProblemError, MeasurementFileError
from exl2rs.qparams import QParams

SolverName = Literal["exact", "greedy", "lagrangian", "anneal", "minimax"]
ObjectiveName = Literal["sum", "weighted", "norm", "minimax"]
SOLVERS: tuple[SolverName, ...] = ("exact", "greedy", "lagrangian", "anneal", "minimax")


# Per-linear error the allocator minimises by default ("auto"): sensitivity · tr(ΔW H ΔWᵀ), the
# empirical-Fisher estimate of the calibration loss each error adds ("fisher"), for measurements
# that record sensitivities, else tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) ("relative"). On the full SmolLM2
# (benches/RESULTS.md, "Quality"): raw sums starved the early layers (errors grow with the
# residual stream's depth); relative sums over-weight v_proj/k_proj (small outputs) and lost to
# uniform GPTQ at 3.5 bpw; the Fisher-weighted sum beat both and uniform at every target.
ErrorScaleName = Literal["raw", "relative", "fisher", "auto"]
DEFAULT_SCALE: ErrorScaleName = "auto"


@dataclass(frozen=True)
class ItemChoice:
    """The option chosen for one item."""

    name: str
    option: int
    bits: int
    numel: int
    error: float
    config: int
    desc: str | None

    @property
    def bpw(self) -> float:
        return self.bits / self.numel


@dataclass(frozen=True)
class Allocation:
    """A solved allocation: the solver's solution plus what each item got."""

    solution: Solution
    items: list[ItemChoice]
    source: Measurement | Exl2Measurement | None = field(default=None, repr=False)
    problem_kind: Literal["linear", "module", "custom"] = "custom"

    @property
    def bpw(self) -> float:
        return self.solution.bpw

    @property
    def cost_bits(self) -> int:
        return self.solution.cost_bits

    @property
    def objective(self) -> float:
        return self.solution.objective

    @property
    def optimal(self) -> bool:
        return self.solution.optimal

    @property
    def choices(self) -> list[int]:
        return list(self.solution.choices)

    def configs(self) -> dict[str, QParams]:
        """Item name → chosen EXL2 config (measurement-backed problems only)."""
        out: dict[str, QParams] = {}
        for it in self.items:
            if it.desc is None:
                raise InvalidProblemError(f"item {it.name!r} has no config description")
            out[it.name] = _config_of(self.source, it.config)
        return out

    def strategy(self) -> dict[str, Any]:
        """exllamav2's ``job["strategy"]`` for this allocation."""
        if isinstance(self.source, Measurement):
            if self.problem_kind == "linear":
                text = self.source.linear_strategy_json(self.choices)
            else:
                text = self.source.module_strategy_json(self.choices)
        elif isinstance(self.source, Exl2Measurement):
            text = self.source.strategy_json(self.choices)
        else:
            raise InvalidProblemError("a strategy needs a measurement-backed allocation")
        out: dict[str, Any] = json.loads(text)
        return out

    def table(self, limit: int | None = None) -> str:
        """A per-item table: name, bpw, bits, error, config."""
        s = self.solution
        gap = "n/a" if s.gap is None else f"{s.gap:.2e}"
        lb = "n/a" if s.lower_bound is None else f"{s.lower_bound:.6g}"
        head = (
            f"solver={s.solver} bpw={s.bpw:.4f} bits={s.cost_bits} budget={s.budget_bits} "
            f"objective={s.objective:.6g} lower_bound={lb} gap={gap} optimal={s.optimal} "
            f"time={s.time_s * 1e3:.2f} ms"
        )
        width = max([len(i.name) for i in self.items] + [4])
        lines = [head, f"{'item':<{width}}  {'bpw':>7}  {'bits':>12}  {'error':>11}  config"]
        rows = self.items if limit is None else self.items[:limit]
        for it in rows:
            lines.append(
                f"{it.name:<{width}}  {it.bpw:7.3f}  {it.bits:12d}  {it.error:11.4e}  "
                f"{it.desc or it.config}"
            )
        if limit is not None and len(self.items) > limit:
            lines.append(f"… {len(self.items) - limit} more items")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        s = self.solution
        return {
            "solver": s.solver,
            "bpw": s.bpw,
            "cost_bits": s.cost_bits,
            "budget_bits": s.budget_bits,
            "objective": s.objective,
            "lower_bound": s.lower_bound,
            "gap": s.gap,
            "optimal": s.optimal,
            "time_s": s.time_s,
            "items": [
                {
                    "name": i.name,
                    "option": i.option,
                    "bits": i.bits,
                    "bpw": i.bpw,
                    "error": i.error,
                    "config": i.desc,
                }
                for i in self.items
            ],
        }


def problem_from_arrays(
    names: Sequence[str],
    numel: Sequence[int] | np.ndarray,
    bits: Sequence[np.ndarray | Sequence[int]],
    errors: Sequence[np.ndarray | Sequence[float]],
    configs: Sequence[np.ndarray | Sequence[int]] | None = None,
    groups: Sequence[Sequence[int]] | None = None,
    weights: Sequence[float] | None = None,
) -> Problem:
    """Builds a problem: item i has options ``(bits[i][j], errors[i][j])``. ``configs[i][j]``
    ties fused items (``groups``) to the same config."""
    b = [np.ascontiguousarray(x, dtype=np.uint64) for x in bits]
    e = [np.ascontiguousarray(x, dtype=np.float64) for x in errors]
    c = None if configs is None else [np.ascontiguousarray(x, dtype=np.uint32) for x in configs]
    g = None if groups is None else [list(map(int, grp)) for grp in groups]
    w = None if weights is None else [float(x) for x in weights]
    n = [int(x) for x in numel]
    return Problem.from_arrays(list(names), n, b, e, c, g, w)


def load_measurement(path: str | Path) -> Measurement | Exl2Measurement:
    """Loads a native exl2rs measurement or exllamav2's measurement.json (detected by content)."""
    p = Path(path)
    try:
        head = p.read_text(encoding="utf-8")[:4096]
    except OSError as e:
        raise MeasurementFileError(f"{p}: cannot read: {e}") from e
    except UnicodeDecodeError as e:
        raise MeasurementFileError(f"{p}: not a UTF-8 JSON file: {e}") from e
    if '"exl2rs.measurement"' in head or '"format"' in head:
        return Measurement.load(p)
    return Exl2Measurement.load(p)


def _config_of(source: Measurement | Exl2Measurement | None, config: int) -> QParams:
    if not isinstance(source, Measurement):
        raise InvalidProblemError("per-item configs need a native measurement")
    return QParams.from_dict(json.loads(source.configs_json()[config]))


def _matches(names: Sequence[str], pattern: str) -> list[int]:
    hits = [i for i, n in enumerate(names) if fnmatch.fnmatchcase(n, pattern)]
    if not hits:
        raise InvalidProblemError(f"pattern {pattern!r} matches no item (e.g. {names[0]!r})")
    return hits


def _pin_option(problem: Problem, i: int, how: int | str) -> int:
    opts = problem.options(i)
    if how == "max":
        return max(range(len(opts)), key=lambda j: (opts[j][0], -opts[j][1]))
    if how == "min":
        return min(range(len(opts)), key=lambda j: (opts[j][0], opts[j][1]))
    if isinstance(how, int) and 0 <= how < len(opts):
        return how
    raise InvalidProblemError(
        f"pin {how!r} for item {problem.names[i]!r}: expected 'max', 'min' or an option index "
        f"in 0..{len(opts) - 1}"
    )


def constrain(
    problem: Problem,
    *,
    pin: Mapping[str, int | str] | None = None,
    min_bpw: Mapping[str, float] | None = None,
    max_bpw: Mapping[str, float] | None = None,
    exclude_configs: Mapping[str, Sequence[int]] | None = None,
    weights: Mapping[str, float] | None = None,
) -> Problem:
    """A copy of ``problem`` with constraints given by item-name patterns (fnmatch)."""
    names = problem.names
    pins = [
        (i, _pin_option(problem, i, how))
        for pat, how in (pin or {}).items()
        for i in _matches(names, pat)
    ]
    lo = [(i, float(v)) for pat, v in (min_bpw or {}).items() for i in _matches(names, pat)]
    hi = [(i, float(v)) for pat, v in (max_bpw or {}).items() for i in _matches(names, pat)]
    ex = [
        (i, [int(c) for c in v])
        for pat, v in (exclude_configs or {}).items()
        for i in _matches(names, pat)
    ]
    w = [(i, float(v)) for pat, v in (weights or {}).items() for i in _matches(names, pat)]
    if not (pins or lo or hi or ex or w):
        return problem
    return problem.with_constraints(pins, lo, hi, ex, w)


def _choices(problem: Problem, sol: Solution, source: object) -> list[ItemChoice]:
    cfg_descs: list[str] | None = None
    if isinstance(source, Measurement):
        cfg_descs = [QParams.from_dict(json.loads(t)).desc for t in source.configs_json()]
    names = problem.names
    out = []
    for i, j in enumerate(sol.choices):
        bits, err, cfg = problem.options(i)[j]
        desc = cfg_descs[cfg] if cfg_descs is not None and cfg < len(cfg_descs) else None
        out.append(ItemChoice(names[i], j, bits, problem.item_numel(i), err, cfg, desc))
    return out


def as_problem(
    source: Problem | Measurement | Exl2Measurement | str | Path,
    *,
    scale: ErrorScaleName = DEFAULT_SCALE,
    fuse: bool = False,
    modules: bool = False,
    dims: Mapping[str, int] | None = None,
) -> tuple[Problem, Measurement | Exl2Measurement | None, Literal["linear", "module", "custom"]]:
    """The problem behind ``source``: a native measurement gives one item per linear (or per
    module with ``modules=True``); exllamav2's measurement.json needs the model ``dims``
    (hidden_size, intermediate_size, num_attention_heads, num_key_value_heads[, head_dim])."""
    if isinstance(source, (str, Path)):
        source = load_measurement(source)
    if isinstance(source, Problem):
        return source, None, "custom"
    if isinstance(source, Measurement):
        if modules:
            return source.module_problem(), source, "module"
        return source.linear_problem(scale, fuse), source, "linear"
    if dims is None:
        raise InvalidProblemError(
            "exllamav2's measurement.json holds no shapes: pass dims={hidden_size, "
            "intermediate_size, num_attention_heads, num_key_value_heads}"
        )
    need = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
    missing = [k for k in need if k not in dims]
    if missing:
        raise InvalidProblemError(f"dims lacks {missing}; expected {list(need)} (+ head_dim)")
    problem = source.to_problem(
        hidden_size=dims["hidden_size"],
        intermediate_size=dims["intermediate_size"],
        num_attention_heads=dims["num_attention_heads"],
        num_key_value_heads=dims["num_key_value_heads"],
        head_dim=dims.get("head_dim"),
    )
    return problem, source, "module"


def allocate(
    source: Problem | Measurement | Exl2Measurement | str | Path,
    bpw: float | None = None,
    *,
    bits: int | None = None,
    bytes: int | None = None,  # noqa: A002 - the natural name for a byte budget
    overhead: int = 0,
    solver: SolverName = "exact",
    objective: ObjectiveName = "sum",
    norm: float | None = None,
    seed: int = 0,
    scale: ErrorScaleName = DEFAULT_SCALE,
    fuse: bool = False,
    modules: bool = False,
    dims: Mapping[str, int] | None = None,
    pin: Mapping[str, int | str] | None = None,
    min_bpw: Mapping[str, float] | None = None,
    max_bpw: Mapping[str, float] | None = None,
    exclude_configs: Mapping[str, Sequence[int]] | None = None,
    weights: Mapping[str, float] | None = None,
) -> Allocation:
    """Solves ``source`` for one target: ``bpw`` (average over the items' weights), ``bits``,
    or ``bytes`` (with a fixed ``overhead`` in bytes). The budget is never exceeded; an
    infeasible target raises :class:`exl2rs.InfeasibleTargetError` naming the feasible range."""
    problem, src, kind = as_problem(source, scale=scale, fuse=fuse, modules=modules, dims=dims)
    problem = constrain(
        problem,
        pin=pin,
        min_bpw=min_bpw,
        max_bpw=max_bpw,
        exclude_configs=exclude_configs,
        weights=weights,
    )
    sol = problem.solve(
        target_bpw=bpw,
        target_bits=bits,
        target_bytes=bytes,
        overhead=overhead,
        solver=solver,
        objective=objective,
        norm=norm,
        seed=seed,
    )
    return Allocation(sol, _choices(problem, sol, src), src, kind)


@dataclass(frozen=True)
class Frontier:
    """Error-vs-size curve: one solution per feasible target (None where infeasible)."""

    targets: list[float]
    solutions: list[Solution | None]

    def points(self) -> list[tuple[float, float]]:
        return [(s.bpw, s.objective) for s in self.solutions if s is not None]

    def table(self) -> str:
        lines = [f"{'target':>7}  {'bpw':>8}  {'objective':>12}  {'gap':>9}  {'ms':>8}"]
        for t, s in zip(self.targets, self.solutions, strict=True):
            if s is None:
                lines.append(f"{t:7.3f}  {'infeasible':>8}")
                continue
            gap = "n/a" if s.gap is None else f"{s.gap:.1e}"
            lines.append(
                f"{t:7.3f}  {s.bpw:8.4f}  {s.objective:12.6g}  {gap:>9}  {s.time_s * 1e3:8.2f}"
            )
        return "\n".join(lines)


def frontier(
    source: Problem | Measurement | Exl2Measurement | str | Path,
    targets: Sequence[float] | None = None,
    *,
    solver: SolverName = "exact",
    objective: ObjectiveName = "sum",
    norm: float | None = None,
    seed: int = 0,
    scale: ErrorScaleName = DEFAULT_SCALE,
    fuse: bool = False,
    modules: bool = False,
    dims: Mapping[str, int] | None = None,
) -> Frontier:
    """Solves many bpw targets in parallel (default 2.0 … 8.0 in steps of 0.05)."""
    problem, _, _ = as_problem(source, scale=scale, fuse=fuse, modules=modules, dims=dims)
    ts = [round(2.0 + 0.05 * i, 4) for i in range(121)] if targets is None else list(targets)
    sols = problem.frontier(ts, solver=solver, objective=objective, norm=norm, seed=seed)
    return Frontier(ts, list(sols))


__all__ = [
    "SOLVERS",
    "Allocation",
    "Exl2Measurement",
    "Frontier",
    "ItemChoice",
    "Measurement",
    "Problem",
    "Solution",
    "allocate",
    "as_problem",
    "constrain",
    "frontier",
    "load_measurement",
    "problem_from_arrays",
]
