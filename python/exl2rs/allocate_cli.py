"""``exl2rs allocate`` and ``exl2rs frontier``: re-solve a measurement without the model."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from exl2rs.allocation import SOLVERS, allocate, frontier
from exl2rs.atomic import atomic_write_json
from exl2rs.errors import InvalidProblemError


def _pattern_map(values: list[str] | None, what: str, cast: Callable[[str], Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for v in values or []:
        pat, sep, val = v.rpartition("=")
        if not sep or not pat:
            raise InvalidProblemError(f"{what} {v!r}: expected PATTERN=VALUE")
        try:
            out[pat] = cast(val)
        except ValueError as e:
            raise InvalidProblemError(f"{what} {v!r}: bad value {val!r}: {e}") from e
    return out


def _pin_value(v: str) -> int | str:
    return v if v in ("max", "min") else int(v)


def _dims(text: str | None) -> dict[str, int] | None:
    if text is None:
        return None
    parts = text.split(",")
    keys = ["hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"]
    if len(parts) not in (4, 5):
        raise InvalidProblemError(
            f"--dims {text!r}: expected HIDDEN,INTER,HEADS,KV_HEADS[,HEAD_DIM]"
        )
    d = dict(zip(keys + ["head_dim"], (int(p) for p in parts), strict=False))
    return d


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "measurement", type=Path, help="exl2rs measurement or exllamav2 measurement.json"
    )
    p.add_argument("--solver", choices=SOLVERS, default="exact")
    p.add_argument("--objective", choices=("sum", "weighted", "norm", "minimax"), default="sum")
    p.add_argument("--norm", type=float, default=None, help="exponent of the 'norm' objective")
    p.add_argument(
        "--scale",
        choices=("raw", "relative", "fisher", "auto"),
        default="auto",
        help="per-linear error: raw tr(dW H dW^T), relative to tr(W H W^T), fisher (x the "
        "linear's measured sensitivity), auto (fisher when measured, else relative)",
    )
    p.add_argument("--fuse", action="store_true", help="tie q/k/v and gate/up to one config")
    p.add_argument(
        "--modules",
        action="store_true",
        help="allocate per module over EXL2's joint rows (as exllamav2 does)",
    )
    p.add_argument(
        "--dims", default=None, help="for exllamav2 files: HIDDEN,INTER,HEADS,KV_HEADS[,HEAD_DIM]"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the result as JSON here")


def add_allocate_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("-b", "--bits", type=float, dest="bpw", help="target bits per weight")
    g.add_argument("--target-size", type=int, default=None, help="budget in bytes")
    p.add_argument("--overhead", type=int, default=0, help="fixed bytes outside the budget")
    p.add_argument("--pin", action="append", metavar="PATTERN=max|min|INDEX")
    p.add_argument("--min-bpw", action="append", metavar="PATTERN=BPW")
    p.add_argument("--max-bpw", action="append", metavar="PATTERN=BPW")
    p.add_argument(
        "--strategy",
        type=Path,
        default=None,
        help="write exllamav2's strategy dict (job['strategy']) here",
    )
    p.add_argument("--limit", type=int, default=None, help="rows of the per-item table to print")


def add_frontier_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--from", dest="lo", type=float, default=2.0)
    p.add_argument("--to", dest="hi", type=float, default=8.0)
    p.add_argument("--step", type=float, default=0.05)


def run_allocate(args: argparse.Namespace) -> int:
    a = allocate(
        args.measurement,
        args.bpw,
        bytes=args.target_size,
        overhead=args.overhead,
        solver=args.solver,
        objective=args.objective,
        norm=args.norm,
        seed=args.seed,
        scale=args.scale,
        fuse=args.fuse,
        modules=args.modules,
        dims=_dims(args.dims),
        pin=_pattern_map(args.pin, "--pin", _pin_value),
        min_bpw=_pattern_map(args.min_bpw, "--min-bpw", float),
        max_bpw=_pattern_map(args.max_bpw, "--max-bpw", float),
    )
    print(a.table(limit=args.limit))
    if args.json:
        atomic_write_json(args.json, a.to_dict())
    if args.strategy:
        atomic_write_json(args.strategy, a.strategy())
    return 0


def run_frontier(args: argparse.Namespace) -> int:
    n = int(round((args.hi - args.lo) / args.step)) + 1
    targets = [round(args.lo + i * args.step, 6) for i in range(n)]
    f = frontier(
        args.measurement,
        targets,
        solver=args.solver,
        objective=args.objective,
        norm=args.norm,
        seed=args.seed,
        scale=args.scale,
        fuse=args.fuse,
        modules=args.modules,
        dims=_dims(args.dims),
    )
    print(f.table())
    if args.json:
        atomic_write_json(
            args.json,
            [
                None
                if s is None
                else {
                    "target": t,
                    "bpw": s.bpw,
                    "objective": s.objective,
                    "cost_bits": s.cost_bits,
                    "gap": s.gap,
                }
                for t, s in zip(f.targets, f.solutions, strict=True)
            ],
        )
    return 0
