"""Peak memory and time of GPTQ over all candidates of one linear, by batch budget.

One SmolLM2-135M-sized MLP linear (gate_proj: 1536 x 576, K = 576 input rows) with a random
weight and Hessian, all of EXL2's MLP candidates in one ``quantize_many`` call. Each setting runs
in a fresh process (peak RSS is a per-process high-water mark): the peak is ``ru_maxrss`` after
the call minus the resident set before it (glibc's mmap threshold fixed at 64 KiB so freed
tensors leave the resident set); ``held`` is what the returned candidates still occupy (fp32
weights and int16 codes for ``quantize_many``, uint8 codes for ``quantize_many_compact``); the
time is the best of ``--repeats`` calls.

    nice .venv/bin/python benches/bench_gptq_memory.py --max-batch-bytes 0 20000000 9000000

``0`` is the default budget (one batch here). Run with an older ``exl2rs`` on ``PYTHONPATH``
to get the unbatched numbers: settings it lacks are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from exl2rs import gptq, qparams


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(kind: str, out_f: int, in_f: int, budget: int, compact: bool, repeats: int) -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, in_f, generator=g) @ (
        torch.randn(in_f, in_f, generator=g) * 0.05 + torch.eye(in_f)
    )
    prepared = gptq.prepare(gptq.accumulate_hessian(x, name="bench"))
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    del x
    configs = qparams.candidates(kind)
    kw: dict[str, Any] = {"max_batch_bytes": budget} if budget else {}
    fn = gptq.quantize_many_compact if compact else gptq.quantize_many
    before = _rss()
    res = fn(w, prepared, configs, **kw)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    held = _rss() - before
    del res
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(w, prepared, configs, **kw)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"peak": peak, "held": held, "seconds": min(times), "configs": len(configs)}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", default="gate_proj")
    ap.add_argument("--shape", type=int, nargs=2, default=[1536, 576], metavar=("OUT", "IN"))
    ap.add_argument("--max-batch-bytes", type=int, nargs="+", default=[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    out_f, in_f = args.shape
    if args.child:
        child(args.kind, out_f, in_f, int(args.child[0]), args.child[1] == "1", args.repeats)
        return 0
    has_budget = hasattr(gptq, "quantize_many_compact")
    rows = []
    print(
        f"{args.kind} {out_f} x {in_f}, all candidates, 1 thread; fp32 weight = "
        f"{out_f * in_f * 4 / 2**20:.2f} MiB"
    )
    print(f"{'call':<22} {'budget':>10} {'peak MiB':>9} {'held MiB':>9} {'seconds':>8}")
    for budget in args.max_batch_bytes:
        for compact in (False, True):
            if (budget or compact) and not has_budget:
                continue
            cmd = [
                sys.executable,
                __file__,
                "--kind",
                args.kind,
                "--shape",
                str(out_f),
                str(in_f),
                "--repeats",
                str(args.repeats),
                "--child",
                str(budget),
                "1" if compact else "0",
            ]
            # Fixed mmap threshold: freed tensors go back to the OS at once, so the resident set
            # follows what is allocated (glibc's sliding threshold would keep them in its heap).
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 16)}
            proc = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
            r = json.loads(proc.stdout)
            r.update(budget=budget, compact=compact)
            rows.append(r)
            name = "quantize_many_compact" if compact else "quantize_many"
            print(
                f"{name:<22} {budget or 'default':>10} {r['peak'] / 2**20:>9.1f} "
                f"{r['held'] / 2**20:>9.1f} {r['seconds']:>8.2f}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
