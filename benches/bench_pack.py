"""Pack / unpack throughput of exl2rs against a vectorised NumPy implementation, same run.

For an 8192 x 8192 matrix at each EXL2 width: exl2rs on 1 and 2 threads (each in a child
process with RAYON_NUM_THREADS set, since Rayon's pool is sized once per process) and NumPy's
whole-array shift-and-or packer and unpacker. Every time is the best of --reps runs (the
machine is shared; interference only adds time). GB/s counts packed int32 bytes for both
directions. Packing and unpacking are each timed on both sides returning a fresh array
("fresh": each call's result is dropped before the next, as in a loop over matrices; exl2rs
by default recycles a dropped large result's memory for the next one of the same size) and
writing into a preallocated, reused result ("out": `pack_columns(..., out=buf)` /
`unpack_columns(..., out=buf)` against `np_pack(..., out=buf)` / `np_unpack(..., out=buf)`;
NumPy's own temporaries are still allocated per call). exl2rs is also timed "cold", with
recycling off (`set_output_cache(0)`), so every result is new memory as on a first call.
"floor" is the time NumPy needs just to allocate and fill a fresh array of the output's size:
no function returning new memory can beat it, so "max x" = NumPy fresh time / floor bounds the
cold ratio. Prints a table of ratios and writes JSON to benches/out/bench_pack.json.

    python benches/bench_pack.py [--rows 8192] [--cols 8192] [--reps 5] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

WIDTHS = (2, 3, 4, 5, 6, 8)
RPB = {2: 16, 3: 32, 4: 8, 5: 32, 6: 16, 8: 4}  # rows per block: fills whole int32 words


def np_pack(
    codes: npt.NDArray[np.uint8], bits: int, out: npt.NDArray[np.int32] | None = None
) -> npt.NDArray[np.int32]:
    """Vectorised NumPy packer: one shift-and-or per row position of a block, written into
    ``out`` (``[rows*bits/32, cols]`` int32, zeroed first) when given."""
    rows, cols = codes.shape
    r = RPB[bits]
    w = r * bits // 32
    blocks = codes.reshape(rows // r, r, cols).astype(np.uint32)
    if out is None:
        out = np.zeros((rows // r * w, cols), dtype=np.int32)
    else:
        out.fill(0)
    words = out.view(np.uint32).reshape(rows // r, w, cols)
    for i in range(r):
        word, shift = divmod(i * bits, 32)
        words[:, word] |= blocks[:, i] << np.uint32(shift)
        if shift + bits > 32:
            words[:, word + 1] |= blocks[:, i] >> np.uint32(32 - shift)
    return out


def np_unpack(
    packed: npt.NDArray[np.int32], bits: int, out: npt.NDArray[np.uint8] | None = None
) -> npt.NDArray[np.uint8]:
    """Vectorised NumPy unpacker: one shift-and-mask per row position of a block, written into
    ``out`` (``[qrows*32/bits, cols]`` uint8) when given."""
    qrows, cols = packed.shape
    r = RPB[bits]
    w = r * bits // 32
    words = packed.view(np.uint32).reshape(qrows // w, w, cols)
    if out is None:
        out = np.empty((qrows // w * r, cols), dtype=np.uint8)
    blocks = out.reshape(qrows // w, r, cols)
    mask = np.uint32((1 << bits) - 1)
    for i in range(r):
        word, shift = divmod(i * bits, 32)
        v = words[:, word] >> np.uint32(shift)
        if shift + bits > 32:
            v |= words[:, word + 1] << np.uint32(32 - shift)
        blocks[:, i] = v & mask
    return out


def best_s(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def cold_s(pk: Any, fn: Callable[[], object], reps: int, cache_bytes: int) -> float:
    """best_s with result recycling off (every result in new memory)."""
    pk.set_output_cache(0)
    try:
        return best_s(fn, reps)
    finally:
        pk.set_output_cache(cache_bytes)


def make_codes(rows: int, cols: int, bits: int) -> npt.NDArray[np.uint8]:
    rng = np.random.default_rng(bits)
    return rng.integers(0, 2**bits, (rows, cols), dtype=np.uint8)


def child(rows: int, cols: int, reps: int) -> dict[str, Any]:
    """Runs in a process whose Rayon pool size is fixed by RAYON_NUM_THREADS."""
    from exl2rs import packing as pk

    res: dict[str, Any] = {}
    cache_bytes = pk.output_cache_info()["max_bytes"]
    for bits in WIDTHS:
        codes = make_codes(rows, cols, bits)
        packed = pk.pack_columns(codes, bits)
        if not np.array_equal(packed, np_pack(codes, bits)):
            raise SystemExit(f"{bits}-bit: exl2rs and NumPy disagree")
        buf = np.empty_like(codes)
        if pk.unpack_columns(packed, bits, out=buf) is not buf or not np.array_equal(buf, codes):
            raise SystemExit(f"{bits}-bit: unpack_columns(out=) does not round-trip")
        pbuf = np.empty_like(packed)
        if pk.pack_columns(codes, bits, out=pbuf) is not pbuf or not np.array_equal(pbuf, packed):
            raise SystemExit(f"{bits}-bit: pack_columns(out=) disagrees with pack_columns")
        # "cold": every fresh result in new memory (recycling off), as on a first call or a
        # loop whose sizes never repeat; the default recycles dropped results of equal size.
        res[str(bits)] = {
            "pack_cold_s": cold_s(
                pk, lambda c=codes, b=bits: pk.pack_columns(c, b), reps, cache_bytes
            ),
            "unpack_cold_s": cold_s(
                pk, lambda p=packed, b=bits: pk.unpack_columns(p, b), reps, cache_bytes
            ),
            "pack_s": best_s(lambda c=codes, b=bits: pk.pack_columns(c, b), reps),
            "pack_out_s": best_s(
                lambda c=codes, b=bits, o=pbuf: pk.pack_columns(c, b, out=o), reps
            ),
            "unpack_s": best_s(lambda p=packed, b=bits: pk.unpack_columns(p, b), reps),
            "unpack_out_s": best_s(
                lambda p=packed, b=bits, o=buf: pk.unpack_columns(p, b, out=o), reps
            ),
        }
    # A whole EXL2 matrix with a mixed layout (exllamav2's down_proj row 9).
    groups = pk.exl2_layout(rows, [8, 5, 4], [0.05, 0.1, 0.85], [32, 128, 128])
    rng = np.random.default_rng(0)
    codes = np.concatenate([rng.integers(0, 2**b, (r, cols), dtype=np.uint8) for b, r in groups])
    scales = rng.integers(1, 17, (len(groups), cols), dtype=np.uint8)
    sm = np.ones(len(groups), np.float32)
    perm = rng.permutation(rows)
    t = pk.pack_exl2(codes, groups, scales, sm, perm)
    res["exl2_mixed"] = {
        "pack_s": best_s(lambda: pk.pack_exl2(codes, groups, scales, sm, perm), reps),
        "dequant_s": best_s(t.dequantize, reps),
        "dequant_cold_s": cold_s(pk, t.dequantize, reps, cache_bytes),
        "packed_bytes": int(t.q_weight.nbytes),
    }
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--cols", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=5, help="runs per timing; the best is kept")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--out", type=Path, default=Path("benches/out/bench_pack.json"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rows % 32:
        ap.error(f"--rows must be a multiple of 32 (got {a.rows})")
    if a.child:
        print(json.dumps(child(a.rows, a.cols, a.reps)))
        return 0

    threads = [int(t) for t in a.threads.split(",")]
    runs: dict[int, dict[str, Any]] = {}
    for t in threads:
        env = dict(os.environ, RAYON_NUM_THREADS=str(t))
        cmd = [
            sys.executable,
            __file__,
            "--child",
            f"--rows={a.rows}",
            f"--cols={a.cols}",
            f"--reps={a.reps}",
        ]
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        runs[t] = json.loads(out.strip().splitlines()[-1])

    print(
        f"pack/unpack along K, {a.rows} x {a.cols} codes, best of {a.reps} reps; "
        "GB/s of packed int32 data; x = NumPy time / exl2rs time (unp: fresh result both "
        "sides, exl2rs recycling dropped results (the default); pcold / ucold: exl2rs with "
        "recycling off, every result in new memory; p out / u out: into a reused out= "
        "buffer both sides)"
    )
    head = f"{'bits':>4} {'np pack':>8} {'np p out':>8} {'np unp':>8} {'np u out':>8}"
    for t in threads:
        head += f" {f'pack {t}T':>8} {f'p out {t}T':>9} {f'unp {t}T':>8} {f'u out {t}T':>9}"
        head += f" {f'x pk {t}T':>8} {f'x pcold {t}T':>11} {f'x pout {t}T':>10}"
        head += f" {f'x unp {t}T':>9} {f'x ucold {t}T':>11} {f'x uout {t}T':>10}"
    head += f" {'max x pk':>8} {'max x unp':>9}"
    print(head)
    rows_out = []
    for bits in WIDTHS:
        codes = make_codes(a.rows, a.cols, bits)
        packed = np_pack(codes, bits)
        gb = packed.nbytes / 1e9
        buf = np.empty_like(codes)
        pbuf = np.empty_like(packed)
        npk = best_s(lambda c=codes, b=bits: np_pack(c, b), a.reps)
        npko = best_s(lambda c=codes, b=bits, o=pbuf: np_pack(c, b, out=o), a.reps)
        npu = best_s(lambda p=packed, b=bits: np_unpack(p, b), a.reps)
        npo = best_s(lambda p=packed, b=bits, o=buf: np_unpack(p, b, out=o), a.reps)
        if not np.array_equal(np_unpack(packed, bits), codes) or not np.array_equal(buf, codes):
            raise SystemExit(f"{bits}-bit: NumPy reference does not round-trip")
        if not np.array_equal(pbuf, packed):
            raise SystemExit(f"{bits}-bit: np_pack(out=) disagrees with np_pack")
        floor_pk = best_s(lambda p=packed: np.empty(p.shape, np.int32).fill(1), a.reps)
        floor_unp = best_s(lambda c=codes: np.empty(c.shape, np.uint8).fill(1), a.reps)
        line = f"{bits:>4} {gb / npk:>8.3f} {gb / npko:>8.3f} {gb / npu:>8.3f} {gb / npo:>8.3f}"
        entry: dict[str, Any] = {
            "bits": bits,
            "packed_bytes": packed.nbytes,
            "numpy_pack_s": npk,
            "numpy_pack_out_s": npko,
            "numpy_unpack_s": npu,
            "numpy_unpack_out_s": npo,
            "fresh_fill_pack_out_s": floor_pk,
            "fresh_fill_unpack_out_s": floor_unp,
            "exl2rs": {},
        }
        for t in threads:
            r = runs[t][str(bits)]
            line += f" {gb / r['pack_s']:>8.2f} {gb / r['pack_out_s']:>9.2f}"
            line += f" {gb / r['unpack_s']:>8.2f} {gb / r['unpack_out_s']:>9.2f}"
            line += f" {npk / r['pack_s']:>7.1f}x {npk / r['pack_cold_s']:>10.1f}x"
            line += f" {npko / r['pack_out_s']:>9.1f}x"
            line += f" {npu / r['unpack_s']:>8.1f}x {npu / r['unpack_cold_s']:>10.1f}x"
            line += f" {npo / r['unpack_out_s']:>9.1f}x"
            entry["exl2rs"][str(t)] = {
                **r,
                "pack_gbps": gb / r["pack_s"],
                "pack_out_gbps": gb / r["pack_out_s"],
                "unpack_gbps": gb / r["unpack_s"],
                "unpack_out_gbps": gb / r["unpack_out_s"],
                "pack_vs_numpy": npk / r["pack_s"],
                "pack_cold_vs_numpy": npk / r["pack_cold_s"],
                "unpack_cold_vs_numpy": npu / r["unpack_cold_s"],
                "pack_out_vs_numpy_out": npko / r["pack_out_s"],
                "unpack_vs_numpy": npu / r["unpack_s"],
                "unpack_out_vs_numpy_out": npo / r["unpack_out_s"],
            }
        line += f" {npk / floor_pk:>7.1f}x {npu / floor_unp:>8.1f}x"
        print(line)
        rows_out.append(entry)
    print("\nwhole EXL2 matrix, 0.05:8b/0.1:5b/0.85:4b (g32/g128/g128), random act-order:")
    for t in threads:
        m = runs[t]["exl2_mixed"]
        print(
            f"  {t}T: pack_exl2 {m['pack_s'] * 1e3:.1f} ms "
            f"({m['packed_bytes'] / 1e9 / m['pack_s']:.2f} GB/s), "
            f"dequantize {m['dequant_s'] * 1e3:.1f} ms (cold {m['dequant_cold_s'] * 1e3:.1f} ms)"
        )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "bench": "bench_pack",
        "rows": a.rows,
        "cols": a.cols,
        "reps": a.reps,
        "stat": "best",
        "load_average": os.getloadavg(),
        "widths": rows_out,
        "exl2_mixed": {str(t): runs[t]["exl2_mixed"] for t in threads},
    }
    a.out.write_text(json.dumps(doc, indent=2))
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
