"""Python re-solve latency on a loaded 70B-shaped measurement (goal: one target < 5 ms).

Builds a seeded synthetic Llama-3-70B measurement with EXL2's real candidate costs, saves and
re-loads it through the Rust loader, then times `Problem.solve` per target for each solver.
Baseline in the same run: exllamav2's optimizer (`anneal`, its default parameters).
Writes benches/out/bench_allocate.json.

    python benches/bench_allocate.py [--repeat 20] [--anneal-repeat 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import exl2rs
from exl2rs.synthetic import LLAMA3_70B, synthetic_measurement

TARGETS = [2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--anneal-repeat", type=int, default=1)
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "out" / "bench_allocate.json"
    )
    args = ap.parse_args()

    d = LLAMA3_70B
    m = synthetic_measurement(d["layers"], d["hidden"], d["inter"], d["heads"], d["kv_heads"])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "measurement.json"
        m.save(path)
        t0 = time.perf_counter()
        loaded = exl2rs.Measurement.load(path)
        load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    problem = loaded.linear_problem()
    build_s = time.perf_counter() - t0
    problem.solve(target_bpw=4.0)  # prepares (prunes) once; re-solves reuse it
    print(
        f"70B-shaped measurement: {problem.num_items} linears; load {load_s * 1e3:.0f} ms, "
        f"problem {build_s * 1e3:.0f} ms"
    )

    rows = []
    for t in TARGETS:
        times: dict[str, float] = {}
        cpu: dict[str, float] = {}
        objs: dict[str, float] = {}
        for solver in ("exact", "greedy", "lagrangian", "anneal"):
            reps = args.anneal_repeat if solver == "anneal" else args.repeat
            ts, cs = [], []
            for _ in range(reps):
                c0, t0 = time.process_time(), time.perf_counter()
                s = problem.solve(target_bpw=t, solver=solver)
                ts.append(time.perf_counter() - t0)
                cs.append(time.process_time() - c0)
                assert s.cost_bits <= s.budget_bits
            times[solver] = statistics.median(ts)
            cpu[solver] = statistics.median(cs)
            objs[solver] = s.objective
        rows.append({"target": t, "median_s": times, "median_cpu_s": cpu, "objective": objs})

    print(
        f"{'bpw':>5} {'exact ms':>9} {'exact cpu':>9} {'greedy ms':>10} {'lagr ms':>8} "
        f"{'anneal ms':>10} "
        f"{'anneal/exact time':>18} {'anneal obj/exact':>17}"
    )
    for r in rows:
        ms = {k: v * 1e3 for k, v in r["median_s"].items()}
        cpu_ms = r["median_cpu_s"]["exact"] * 1e3
        print(
            f"{r['target']:5.2f} {ms['exact']:9.2f} {cpu_ms:9.2f} {ms['greedy']:10.2f} "
            f"{ms['lagrangian']:8.2f} {ms['anneal']:10.1f} "
            f"{ms['anneal'] / ms['exact']:17.1f}x "
            f"{r['objective']['anneal'] / r['objective']['exact']:17.4f}"
        )
    worst = max(r["median_s"]["exact"] for r in rows) * 1e3
    worst_cpu = max(r["median_cpu_s"]["exact"] for r in rows) * 1e3
    print(f"slowest exact re-solve: {worst:.2f} ms wall, {worst_cpu:.2f} ms CPU (goal < 5 ms)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"load_s": load_s, "build_s": build_s, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
