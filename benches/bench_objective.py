"""Which per-linear error should the allocator minimise? Full SmolLM2, one shared measurement.

For each target, allocates with ``exact`` on the raw sum Σ tr(ΔW H ΔWᵀ), the raw ``norm``
(Σ e², optional), the relative sum Σ tr(ΔW H ΔWᵀ)/tr(W H Wᵀ), EXL2's annealer, plus the
uniform-GPTQ baseline; converts each (one process per core) and scores all of them in one pass
over wiki-ho windows (perplexity, KL to fp32). Prints the mean bpw per linear kind and per layer
of each allocation, the scores, and writes JSON.

    python benches/bench_objective.py --measurement demo_out/measurement.exl2rs.json \
        --targets 3.0 4.0 --windows 8 [--norm]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from exl2rs import demo
from exl2rs.demo import FULL


def per_kind_and_layer(v: demo.Variant, shapes: dict[str, tuple[int, int]]) -> dict[str, Any]:
    kind: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    layer: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for n, q in v.strategy.items():
        r, c = shapes[n]
        for acc in (kind[n.rsplit(".", 1)[-1]], layer[int(n.split(".")[2])]):
            acc[0] += q.total_bits(r, c)
            acc[1] += r * c
    return {
        "kind": {k: round(b / w, 3) for k, (b, w) in kind.items()},
        "layer": [round(layer[i][0] / layer[i][1], 3) for i in sorted(layer)],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--measurement", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("benches/out/objective"))
    ap.add_argument("--targets", type=float, nargs="+", default=[3.0, 4.0])
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--norm", action="store_true", help="also the raw Σ e² objective")
    args = ap.parse_args()

    model = demo.model_dir(FULL)
    shapes = demo.decoder_shapes(model)
    specs: dict[str, dict[str, Any]] = {
        "exact_raw": {"scale": "raw"},
        "exact_relative": {"scale": "relative"},
        "anneal": {"solver": "anneal", "scale": "relative"},
    }
    if args.norm:
        specs["exact_raw_norm2"] = {"scale": "raw", "objective": "norm", "norm": 2.0}
    doc: dict[str, Any] = {"measurement": str(args.measurement), "windows": args.windows}
    for target in args.targets:
        variants = []
        for key, kw in specs.items():
            kw = dict(kw)
            solver = kw.pop("solver", "exact")
            v = demo.exl2rs_variant(
                f"{key}_{target}", key, args.measurement, target, shapes, solver=solver, **kw
            )
            variants.append(v)
        variants.append(demo.uniform_variant(f"uniform_{target}", "uniform", target, shapes))
        demo.convert_all(model, args.out / "models", variants, FULL)
        for v in variants:
            demo.convert_variant(model, args.out / "models", v, FULL, progress=False)
        ref, scores = demo.score_all(
            demo.load_fp32(model),
            {v.key: demo.quantized_loader(v.result.output_dir) for v in variants},
            demo.eval_windows(model, args.windows),
            batch=4,
            progress=False,
        )
        print(f"\n== {target} bpw, {args.windows} wiki-ho windows, fp32 ppl {ref.perplexity:.3f}")
        print(f"{'allocation':<16} {'bpw':>7} {'ppl':>8} {'KL':>8}  mean bpw per kind")
        rows = []
        for v in variants:
            s = scores[v.key]
            shape = per_kind_and_layer(v, shapes)
            bpw = demo.decoder_bpw(v.strategy, shapes)
            print(f"{v.label:<16} {bpw:7.4f} {s.perplexity:8.3f} {s.kl_mean:8.4f}  {shape['kind']}")
            rows.append(
                {"allocation": v.label, "bpw": bpw, "ppl": s.perplexity, "kl": s.kl_mean, **shape}
            )
        for r in rows:
            print(f"  {r['allocation']:<16} per layer: {' '.join(f'{b:.2f}' for b in r['layer'])}")
        doc[str(target)] = {"fp32_ppl": ref.perplexity, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_objective.json").write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
