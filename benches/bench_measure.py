"""Full measurement of SmolLM2-135M on CPU, and peak RSS against depth.

Each run is a fresh subprocess (so ``ru_maxrss`` is its own peak): the truncated models
(``fixtures.truncated_model_dir(n)``) and the full 30-layer model, all on the same calibration
rows. Prints wall time, seconds per layer and peak RSS per depth, and writes JSON.

    nice .venv/bin/python benches/bench_measure.py --depths 1 3 30 --rows 16 --length 2048
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
n, rows, length, threads, out = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                                 int(sys.argv[4]), Path(sys.argv[5]))
model = fixtures.smollm2_dir() if n == 30 else fixtures.truncated_model_dir(n)
t0 = time.perf_counter()
measure.measure(model, out, calibration="default", rows=rows, length=length, device="cpu",
                progress=False, threads=threads)
wall = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"layers": n, "wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "bytes": out.stat().st_size}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[1, 3, 30])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
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
                str(out),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(res)
            print(
                f"depth {n}: {res['wall_s']:.1f} s wall, {res['cpu_s']:.1f} s CPU, "
                f"peak RSS {res['peak_rss_mib']:.0f} MiB, load {os.getloadavg()[0]:.2f}",
                flush=True,
            )
    base = results[0]
    print(
        f"\nSmolLM2-135M measurement, calibration 'default' {args.rows} x {args.length} tokens, "
        f"default candidates, CPU, {args.threads} torch thread(s)"
    )
    print(
        f"{'layers':>6} {'wall s':>8} {'CPU s':>8} {'s/layer':>8} {'peak RSS MiB':>13} "
        f"{'RSS vs first':>13}"
    )
    for r in results:
        print(
            f"{r['layers']:>6} {r['wall_s']:>8.1f} {r['cpu_s']:>8.1f} "
            f"{r['wall_s'] / r['layers']:>8.1f} "
            f"{r['peak_rss_mib']:>13.0f} {r['peak_rss_mib'] / base['peak_rss_mib']:>12.2f}x"
        )
    args.json.write_text(
        json.dumps(
            {"rows": args.rows, "length": args.length, "threads": args.threads, "runs": results},
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
