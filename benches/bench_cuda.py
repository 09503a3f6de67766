"""EXL2 CUDA kernels against the device's copy bandwidth and cuBLAS fp16, in one run.

Sections: (1) device-to-device copy bandwidth of a 1 GiB buffer; (2) M=1 GEMV for
4096x4096, 4096x14336, 14336x4096, 8192x28672 (K x N) at 2.5/3/4/5/6/8 bpw: time, achieved
GB/s (bytes the kernel must move: weights, scales, tables, x, y) as a share of (1), speedup
over torch fp16 ``x @ W``; (3) M = 1..32 sweep; (4) large M: the op (dequantize + cuBLAS)
against cuBLAS fp16 alone; (5) the measurement pass of a truncated SmolLM2 on GPU and CPU.

Kernel times are CUDA-graph replays of many calls cycling through enough weight copies that
nothing stays in L2, so they are DRAM-bound numbers, not cache hits. The matrices hold random
codes and scales (every bit pattern is a valid EXL2 code), with an act-order permutation.

    python benches/bench_cuda.py                # everything, JSON to $OUT or benches/out
    python benches/bench_cuda.py --quick        # fewer shapes / repetitions
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]
# bpw -> EXL2 groups as (bits, share of rows); 2.5 bpw mixes 3- and 2-bit halves.
BPW_LAYOUTS: dict[float, list[tuple[int, float]]] = {
    2.5: [(3, 0.5), (2, 0.5)],
    3.0: [(3, 1.0)],
    4.0: [(4, 1.0)],
    5.0: [(5, 1.0)],
    6.0: [(6, 1.0)],
    8.0: [(8, 1.0)],
}
GROUP_SIZE = 128
L2_FLUSH_BYTES = 256 << 20  # weight copies cycled per graph: well beyond any L2


def random_exl2(k: int, n: int, layout: list[tuple[int, float]], device: str) -> dict[str, Any]:
    """Random EXL2 tensors of a valid layout (groups of GROUP_SIZE rows, widths descending)."""
    groups: list[tuple[int, int]] = []
    left = k
    for i, (bits, share) in enumerate(layout):
        rows = left if i == len(layout) - 1 else int(round(k * share / GROUP_SIZE)) * GROUP_SIZE
        for r in range(0, rows, GROUP_SIZE):
            groups.append((bits, min(GROUP_SIZE, rows - r)))
        left -= rows
    table, qrow = [], 0
    for bits, rows in groups:
        table += [bits, qrow]
        qrow += rows * bits // 32
    n_pad = -(-n // 32) * 32
    g = len(groups)
    info = torch.iinfo(torch.int32)
    return {
        "q_weight": torch.randint(
            info.min, info.max, (qrow, n_pad), dtype=torch.int32, device=device
        ),
        "q_scale": torch.randint(
            info.min, info.max, (g, n_pad // 8), dtype=torch.int32, device=device
        ),
        "q_scale_max": (torch.rand(g, device=device) * 0.01 + 1e-3).half(),
        "q_groups": torch.tensor(table, dtype=torch.int16, device=device),
        "q_perm": torch.randperm(k, device=device).to(torch.int32),
        "out_features": n,
    }


def tensor_bytes(t: dict[str, Any]) -> int:
    return sum(v.numel() * v.element_size() for v in t.values() if isinstance(v, torch.Tensor))


def bpw_of(t: dict[str, Any], k: int, n: int) -> float:
    return tensor_bytes(t) * 8 / (k * n)


def graph_time(calls: list[Callable[[], Any]], reps: int = 5) -> float:
    """Seconds per call: one CUDA graph of every call in ``calls`` (cycling weight copies),
    replayed ``reps`` times, median replay."""
    for fn in calls[:2]:
        fn()  # JIT build, plan caches, cuBLAS handles: outside the capture
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in calls:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(calls))
    return statistics.median(times)


def copy_bandwidth(gib: float = 1.0) -> float:
    """GB/s of a device-to-device copy (bytes read + bytes written, as for the kernels)."""
    n = int(gib * (1 << 30))
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n / statistics.median(times) / 1e9


def copies_for(nbytes: int) -> int:
    return max(2, math.ceil(L2_FLUSH_BYTES / max(nbytes, 1)))


class Case:
    """One matrix shape at one bpw, with enough copies to defeat L2."""

    def __init__(self, k: int, n: int, bpw: float, max_copies: int = 64) -> None:
        from exl2rs import cuda_ops

        self.k, self.n, self.bpw_target = k, n, bpw
        first = random_exl2(k, n, BPW_LAYOUTS[bpw], "cuda")
        self.copies = [first] + [
            random_exl2(k, n, BPW_LAYOUTS[bpw], "cuda")
            for _ in range(min(max_copies, copies_for(tensor_bytes(first))) - 1)
        ]
        self.bpw = bpw_of(first, k, n)
        self.ext = cuda_ops.load_extension()
        self.plans = [
            cuda_ops.plan_for(t["q_groups"], t["q_perm"], t["q_weight"].shape[0])
            for t in self.copies
        ]

    def gemv_calls(self, x: torch.Tensor) -> list[Callable[[], Any]]:
        from exl2rs import cuda_ops

        m = x.shape[0]
        calls = []
        for t, plan in zip(self.copies, self.plans, strict=True):
            splits = cuda_ops._splits(
                m, t["q_weight"].shape[1], plan.num_chunks, self.ext, x.device
            )
            args = (
                x,
                t["q_weight"],
                t["q_scale"],
                t["q_scale_max"],
                t["q_perm"],
                plan.chunks,
                plan.group_rows,
                self.n,
                splits,
            )
            calls.append(lambda args=args: self.ext.gemv(*args))
        return calls

    def op_calls(self, x: torch.Tensor) -> list[Callable[[], Any]]:
        from exl2rs import ops

        names = ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_perm")
        return [lambda t=t: ops.exl2_matmul(x, *(t[k] for k in names), self.n) for t in self.copies]

    def moved_bytes(self, m: int) -> int:
        """What a GEMV has to move at least: the stored tensors, x and y (fp16)."""
        return tensor_bytes(self.copies[0]) + 2 * m * (self.k + self.n)


def fp16_calls(k: int, n: int, x: torch.Tensor, copies: int) -> list[Callable[[], Any]]:
    ws = [torch.randn(k, n, device="cuda", dtype=torch.float16) for _ in range(copies)]
    return [lambda w=w: torch.matmul(x, w) for w in ws]


def section_m1(shapes: list[tuple[int, int]], bpws: list[float], bw: float) -> list[dict[str, Any]]:
    rows = []
    for k, n in shapes:
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        fp16 = graph_time(fp16_calls(k, n, x, copies_for(2 * k * n)))
        torch.cuda.empty_cache()
        for bpw in bpws:
            case = Case(k, n, bpw)
            t = graph_time(case.gemv_calls(x))
            gbs = case.moved_bytes(1) / t / 1e9
            rows.append(
                {
                    "k": k,
                    "n": n,
                    "bpw": round(case.bpw, 3),
                    "us": t * 1e6,
                    "gb_s": gbs,
                    "pct_bw": 100 * gbs / bw,
                    "fp16_us": fp16 * 1e6,
                    "speedup_fp16": fp16 / t,
                }
            )
            print(
                f"  {k:>5}x{n:<5} {case.bpw:5.2f} bpw  {t * 1e6:8.1f} us  {gbs:7.0f} GB/s "
                f"({100 * gbs / bw:5.1f}% of copy)  fp16 {fp16 * 1e6:8.1f} us  "
                f"x{fp16 / t:4.2f}",
                flush=True,
            )
            del case
            torch.cuda.empty_cache()
    return rows


def section_sweep(k: int, n: int, bpw: float, ms: list[int]) -> list[dict[str, Any]]:
    case = Case(k, n, bpw)
    rows = []
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        t = graph_time(case.gemv_calls(x))
        fp16 = graph_time(fp16_calls(k, n, x, copies_for(2 * k * n)))
        rows.append(
            {
                "m": m,
                "k": k,
                "n": n,
                "bpw": round(case.bpw, 3),
                "us": t * 1e6,
                "fp16_us": fp16 * 1e6,
                "speedup_fp16": fp16 / t,
            }
        )
        print(
            f"  M={m:<3} {t * 1e6:8.1f} us  fp16 {fp16 * 1e6:8.1f} us  x{fp16 / t:4.2f}", flush=True
        )
        torch.cuda.empty_cache()
    return rows


def section_large(shapes: list[tuple[int, int]], ms: list[int]) -> list[dict[str, Any]]:
    rows = []
    for k, n in shapes:
        case = Case(k, n, 4.0, max_copies=2)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            ops_t = graph_time(case.op_calls(x), reps=3)
            cublas = graph_time(fp16_calls(k, n, x, 2), reps=3)
            rows.append(
                {
                    "m": m,
                    "k": k,
                    "n": n,
                    "us": ops_t * 1e6,
                    "cublas_us": cublas * 1e6,
                    "ratio": ops_t / cublas,
                }
            )
            print(
                f"  {k}x{n} M={m:<5} exl2 {ops_t * 1e6:9.1f} us  cuBLAS fp16 "
                f"{cublas * 1e6:9.1f} us  ratio {ops_t / cublas:4.2f}",
                flush=True,
            )
            torch.cuda.empty_cache()
    return rows


def section_measure(layers: int, rows: int, length: int) -> dict[str, Any]:
    try:
        from exl2rs import fixtures, measure

        model = fixtures.truncated_model_dir(layers)
    except Exception as exc:  # no network and no fixture cache on this machine
        print(f"  skipped: SmolLM2 fixture unavailable ({type(exc).__name__}: {exc})")
        return {"skipped": str(exc)}
    out: dict[str, Any] = {"layers": layers, "rows": rows, "length": length}
    with tempfile.TemporaryDirectory() as tmp:
        for device in ("cuda", "cpu"):
            t0 = time.perf_counter()
            measure.measure(
                model,
                Path(tmp) / f"{device}.json",
                calibration="default",
                rows=rows,
                length=length,
                device=device,
                progress=False,
            )
            out[f"{device}_s"] = time.perf_counter() - t0
            print(
                f"  {layers}-layer SmolLM2, {rows} x {length}: {device} {out[f'{device}_s']:.1f} s",
                flush=True,
            )
    out["speedup"] = out["cpu_s"] / out["cuda_s"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes and widths")
    ap.add_argument("--no-measure", action="store_true", help="skip the measurement section")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_cuda: no CUDA device", file=sys.stderr)
        return 1
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path("benches/out")
    out_path = args.json or out_dir / "bench_cuda.json"
    props = torch.cuda.get_device_properties(0)
    result: dict[str, Any] = {
        "device": props.name,
        "sm_count": props.multi_processor_count,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    print(f"device: {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}")
    bw = copy_bandwidth()
    result["copy_gb_s"] = bw
    print(f"(1) device copy bandwidth (1 GiB D2D, read+write): {bw:.0f} GB/s")
    shapes = SHAPES[:2] + SHAPES[3:] if args.quick else SHAPES
    bpws = [2.5, 4.0, 8.0] if args.quick else list(BPW_LAYOUTS)
    print("(2) M=1 GEMV")
    result["m1"] = section_m1(shapes, bpws, bw)
    print("(3) M sweep, 8192x28672 at 4 bpw")
    ms = [1, 2, 4, 8, 16, 32] if args.quick else list(range(1, 33))
    result["sweep"] = section_sweep(8192, 28672, 4.0, ms)
    print("(4) large M: dequantize + cuBLAS vs cuBLAS fp16 (4 bpw)")
    result["large_m"] = section_large([(4096, 14336), (8192, 28672)], [64, 256, 1024, 4096])
    if not args.no_measure:
        print("(5) measurement pass, GPU vs CPU")
        result["measure"] = section_measure(layers=2, rows=16, length=256)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
