"""GPTQ speed on a 4096 x 4096 linear against a straightforward reference, and the quality of the
Hessian-weighted scale search against EXL2's rule on real SmolLM2 layers.

Part 1 (speed): the reference is textbook GPTQ — act-order, one row at a time with a full update
of every later row, EXL2's damping and scale rule — timed in the same run as
``gptq.quantize`` on the same weight and Hessian (4 bits, group 128).
Part 2 (quality): layers 0, 14 and 29 of SmolLM2-135M-Instruct on wiki calibration text; for every
linear and every default candidate config, ``tr(ΔW H ΔWᵀ)`` with our scale search vs EXL2's rule
(same GPTQ otherwise) and vs round-to-nearest.

    nice .venv/bin/python benches/bench_gptq.py
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from exl2rs import gptq, qparams


def reference_gptq(w: torch.Tensor, h: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Textbook GPTQ (no lazy batching) with EXL2's damping and scale rule; returns W_q [N, K]."""
    k = h.shape[0]
    perm = torch.argsort(torch.diag(h), descending=True, stable=True)
    hp = h[perm][:, perm] + 0.12 * float(torch.diag(h).mean()) * torch.eye(k)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hp)), upper=True)
    wt = w.T[perm].clone()
    out = torch.empty_like(wt)
    maxq, zero = 2**bits - 1, 2 ** (bits - 1)
    scale = torch.ones(wt.shape[1])
    for r in range(k):
        if r % group == 0:
            x = wt[r : r + group]
            base = (x.abs().amax(0) + 1e-12) / (maxq / 2)
            top = float(base.max())
            q16 = torch.clamp(torch.round(torch.sqrt(base / top) * 16), 1, 16)
            best = (math.inf, 0.0)
            for i in range(97):
                sm = float(torch.tensor((0.70 + 0.5 * i / 96) * top).half())
                s = q16 * q16 * sm / 256
                q = (torch.clamp(torch.round(x / s) + zero, 0, maxq) - zero) * s
                cost = float((q - x).abs().pow(3.5).sum())
                if cost < best[0]:
                    best = (cost, sm)
            scale = q16 * q16 * best[1] / 256
        q = (torch.clamp(torch.round(wt[r] / scale) + zero, 0, maxq) - zero) * scale
        out[r] = q
        wt[r + 1 :] -= torch.outer(u[r, r + 1 :], (wt[r] - q) / u[r, r])
    return out[torch.argsort(perm)].T


def speed(size: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4 * size, size, generator=g) @ (
        torch.randn(size, size, generator=g) * 0.05 + torch.eye(size)
    )
    w = torch.randn(size, size, generator=g) * 0.02
    hess = gptq.accumulate_hessian(x, name="bench")
    qp = qparams.QParams(bits=(4,), bits_prop=(1.0,), group_size=(128,))
    t0 = time.perf_counter()
    prepared = gptq.prepare(hess)
    ours = gptq.quantize(w, prepared, qp)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = reference_gptq(w, prepared.hessian, 4, 128)
    t_ref = time.perf_counter() - t0
    return {
        "size": size,
        "ours_s": t_ours,
        "reference_s": t_ref,
        "speedup": t_ref / t_ours,
        "ours_err": ours.err,
        "reference_err": gptq.weighted_error(w - ref, prepared.hessian),
    }


def quality(layers: list[int], rows: int, length: int) -> list[dict[str, Any]]:
    from exl2rs import fixtures
    from exl2rs.calibration import load_rows
    from exl2rs.streaming import StreamingModel

    sm = StreamingModel(fixtures.smollm2_dir())
    states = sm.embed(load_rows("default", sm.tokenizer, rows, length))
    a = sm.adapter
    out = []
    for layer in range(max(layers) + 1):
        block = sm.load_block(layer)
        hooks, hess = [], {}
        if layer in layers:
            for grp in a.groups:
                head = f"{grp.module}.{grp.linears[0]}"
                h = gptq.Hessian(int(block.get_submodule(head).weight.shape[1]), name=grp.name)
                hess[grp.name] = h
                hooks.append(
                    block.get_submodule(head).register_forward_pre_hook(
                        lambda _m, args, h=h: h.add(args[0])
                    )
                )
        states = sm.block_forward(block, layer, states)
        for hk in hooks:
            hk.remove()
        for grp in a.groups if layer in layers else ():
            prepared = gptq.prepare(hess[grp.name])
            for lin in grp.linears:
                w = block.get_submodule(f"{grp.module}.{lin}").weight.detach().clone()
                configs = qparams.candidates(lin)
                ours = gptq.quantize_many(w, prepared, configs, scale_search="hessian")
                exl2 = gptq.quantize_many(w, prepared, configs, scale_search="exl2")
                rtn = gptq.quantize_many(w, prepared, configs, error_feedback=False)
                ratios = [o.err / e.err for o, e in zip(ours, exl2, strict=True)]
                out.append(
                    {
                        "layer": layer,
                        "linear": lin,
                        "configs": len(configs),
                        "mean_ratio_vs_exl2_rule": statistics.fmean(ratios),
                        "worst_ratio_vs_exl2_rule": max(ratios),
                        "better_than_exl2_rule": sum(r < 1 for r in ratios),
                        "mean_ratio_vs_rtn": statistics.fmean(
                            o.err / r.err for o, r in zip(ours, rtn, strict=True)
                        ),
                    }
                )
                r = out[-1]
                print(
                    f"layer {layer:>2} {lin:<9} ours/exl2-rule mean "
                    f"{r['mean_ratio_vs_exl2_rule']:.3f} worst {r['worst_ratio_vs_exl2_rule']:.3f} "
                    f"better {r['better_than_exl2_rule']}/{len(configs)} "
                    f"ours/RTN {r['mean_ratio_vs_rtn']:.3f}",
                    flush=True,
                )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 14, 29])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--json", type=Path, default=Path("benches/bench_gptq.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"threads": args.threads}
    if not args.skip_speed:
        s = speed(args.size)
        result["speed"] = s
        print(f"\nGPTQ {s['size']}x{s['size']}, 4b g128, {args.threads} thread(s)")
        print(f"{'impl':<22} {'seconds':>9} {'tr(dW H dW^T)':>15}")
        print(f"{'reference (textbook)':<22} {s['reference_s']:>9.1f} {s['reference_err']:>15.5g}")
        print(f"{'exl2rs gptq.quantize':<22} {s['ours_s']:>9.1f} {s['ours_err']:>15.5g}")
        print(f"speedup {s['speedup']:.2f}x\n", flush=True)
    result["quality"] = quality(args.layers, args.rows, args.length)
    q = result["quality"]
    vs_rtn = statistics.fmean(r["mean_ratio_vs_rtn"] for r in q)
    print(
        f"\nall {len(q)} linears: mean ours/exl2-rule "
        f"{statistics.fmean(r['mean_ratio_vs_exl2_rule'] for r in q):.3f}, "
        f"better on {sum(r['better_than_exl2_rule'] for r in q)}/{sum(r['configs'] for r in q)} "
        f"(linear, config) pairs; mean ours/RTN {vs_rtn:.3f}"
    )
    args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
