"""``make demo``: the main job on the built-in default.

Measures SmolLM2-135M-Instruct on exllamav2's calibration text (fetched from PyPI into the
fixture cache), then allocates 4.0 and 3.0 bpw with every solver and prints, per target,
what each reached: bpw, bits, objective, lower bound, gap, time, and the objective relative to
``exact``; plus the *flat* baseline: every linear at its own largest config within the target.
Writes to ``demo_out/``: the native measurement, exllamav2's ``measurement.json``, exllamav2
strategies, and PNG plots of the allocations and frontiers.

    python -m exl2rs.demo [--rows 4] [--length 512] [--out demo_out]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from exl2rs import fixtures
from exl2rs._core import Measurement, Problem
from exl2rs.allocation import SOLVERS, allocate, frontier
from exl2rs.atomic import atomic_write_json
from exl2rs.measure import measure
from exl2rs.report import plot_allocation, plot_frontiers

TARGETS = (4.0, 3.0)


def flat_allocation(problem: Problem, target_bpw: float) -> tuple[float, float]:
    """(bpw, objective) of the no-allocation baseline: every linear on its own takes its
    largest option at or below the target bpw (the best error among equal sizes)."""
    bits = obj = 0.0
    for i in range(problem.num_items):
        numel = problem.item_numel(i)
        opts = problem.options(i)
        fits = [o for o in opts if o[0] <= target_bpw * numel] or [min(opts)]
        b, e, _ = max(fits, key=lambda o: (o[0], -o[1]))
        bits += b
        obj += e
    return bits / problem.total_numel, obj


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=4, help="calibration rows (-mr)")
    ap.add_argument("--length", type=int, default=512, help="tokens per row (-ml)")
    ap.add_argument("--out", type=Path, default=Path("demo_out"))
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads for measuring")
    args = ap.parse_args(argv)

    model = fixtures.smollm2_dir()
    args.out.mkdir(parents=True, exist_ok=True)
    native = args.out / "measurement.exl2rs.json"
    t0 = time.perf_counter()
    measure(
        model,
        native,
        rows=args.rows,
        length=args.length,
        device=args.device,
        write_exllamav2=args.out / "measurement.json",
        threads=args.threads,
    )
    measure_s = time.perf_counter() - t0
    m = Measurement.load(native)
    problem = m.linear_problem()
    print(
        f"\nmeasured {len(m.linear_names)} linears of {m.model_name} × {len(m.configs_json())} "
        f"configs on {args.rows}×{args.length} calibration tokens in {measure_s:.1f} s"
    )

    chosen = []
    for target in TARGETS:
        print(f"\n== target {target} bpw (decoder linears; objective Σ tr(ΔW H ΔWᵀ))")
        print(
            f"{'solver':<11} {'bpw':>7} {'bits':>11} {'objective':>11} {'bound':>11} "
            f"{'gap':>8} {'ms':>8} {'vs exact':>8}"
        )
        results = {s: allocate(problem, target, solver=s) for s in SOLVERS}
        exact = results["exact"]
        for name, a in results.items():
            s = a.solution
            lb = "-" if s.lower_bound is None else f"{s.lower_bound:.5g}"
            gap = "-" if s.gap is None else f"{s.gap:.1e}"
            print(
                f"{name:<11} {s.bpw:7.4f} {s.cost_bits:11d} {s.objective:11.5g} {lb:>11} "
                f"{gap:>8} {s.time_s * 1e3:8.2f} {s.objective / exact.objective:8.3f}"
            )
        flat_bpw, flat_obj = flat_allocation(problem, target)
        print(
            f"{'flat':<11} {flat_bpw:7.4f} {'':>11} {flat_obj:11.5g} {'':>11} {'':>8} "
            f"{'':>8} {flat_obj / exact.objective:8.3f}"
        )
        exact_m = allocate(m, target)
        strategy = args.out / f"strategy_{target:.1f}.json"
        atomic_write_json(strategy, exact_m.strategy())
        plot_allocation(
            exact_m,
            args.out / f"allocation_{target:.1f}.png",
            title=f"SmolLM2-135M, exact, {exact_m.bpw:.3f} bpw",
        )
        chosen.append(exact_m)

    fr = {s: frontier(problem, solver=s) for s in ("exact", "greedy", "lagrangian")}
    plot_frontiers(fr, args.out / "frontier.png", chosen)
    print(
        f"\nwrote {args.out}/: measurement.exl2rs.json, measurement.json (exllamav2), "
        "strategy_*.json, allocation_*.png, frontier.png"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
