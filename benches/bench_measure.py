"""Full measurement of SmolLM2-135M on CPU, and peak RSS against depth.

Each run is a fresh subprocess (so ``ru_maxrss`` is its own peak): the truncated models
(``fixtures.truncated_model_dir(n)``) and the full 30-layer model, all on the same calibration
rows. Prints wall time, seconds per layer and peak RSS per depth, and writes JSON.

    nice .venv/bin/python benches/bench_measure.py --depths 1 3 30 --rows 16 --length 2048

CPU is reported for the main process (reference chain) and its worker processes (GPTQ and joint
rows) separately; on an idle machine with ``workers`` cores, wall ≈ the larger share.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from exl2rs import fixtures, measure
n, rows, length, threads, workers, out = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                                          int(sys.argv[4]), int(sys.argv[5]), Path(sys.argv[6]))
model = fixtures.smollm2_dir() if n == 30 else fixtures.truncated_model_dir(n)
t0 = time.perf_counter()
measure.measure(model, out, calibration="default", rows=rows, length=length, device="cpu",
                progress=False, threads=threads, workers=workers)
wall = time.perf_counter() - t0
me = resource.getrusage(resource.RUSAGE_SELF)
kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # the worker processes, reaped at the end
print(json.dumps({"layers": n, "wall_s": wall, "cpu_s": me.ru_utime + me.ru_stime,
                  "worker_cpu_s": kids.ru_utime + kids.ru_stime,
                  "peak_rss_mib": me.ru_maxrss / 1024,
                  "worker_peak_rss_mib": kids.ru_maxrss / 1024,
                  "bytes": out.stat().st_size}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[1, 3, 30])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2, help="measure(workers=...)")
    ap.add_argument("--json", type=Path, default=Path("benches/bench_measure.json"))
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.depths:
            out = Path(tmp) / f"m{n}.json"
            cmd = [
                sys.executable,
                "-c",
                CHILD,
                str(n),
                str(args.rows),
                str(args.length),
                str(args.threads),
                str(args.workers),
                str(out),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(res)
            res["load_end"] = os.getloadavg()[0]
            print(
                f"depth {n}: {res['wall_s']:.1f} s wall, CPU {res['cpu_s']:.1f} s main + "
                f"{res['worker_cpu_s']:.1f} s workers, peak RSS {res['peak_rss_mib']:.0f} MiB "
                f"main / {res['worker_peak_rss_mib']:.0f} MiB worker, load {res['load_end']:.2f}",
                flush=True,
            )
    base = results[0]
    print(
        f"\nSmolLM2-135M measurement, calibration 'default' {args.rows} x {args.length} tokens, "
        f"default candidates, CPU, {args.workers} worker(s), {args.threads} torch thread(s) each"
    )
    print(
        f"{'layers':>6} {'wall s':>8} {'CPU main':>9} {'CPU wkrs':>9} {'CPU/layer':>10} "
        f"{'RSS main':>9} {'RSS wkr':>8} {'main RSS vs first':>18}"
    )
    for r in results:
        cpu = r["cpu_s"] + r["worker_cpu_s"]
        print(
            f"{r['layers']:>6} {r['wall_s']:>8.1f} {r['cpu_s']:>9.1f} {r['worker_cpu_s']:>9.1f} "
            f"{cpu / r['layers']:>10.1f} {r['peak_rss_mib']:>9.0f} "
            f"{r['worker_peak_rss_mib']:>8.0f} {r['peak_rss_mib'] / base['peak_rss_mib']:>17.2f}x"
        )
    args.json.write_text(
        json.dumps(
            {
                "rows": args.rows,
                "length": args.length,
                "threads": args.threads,
                "workers": args.workers,
                "runs": results,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
