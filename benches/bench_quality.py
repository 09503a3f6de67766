"""Quality benchmark: exl2rs (``exact``) against uniform GPTQ, EXL2's annealer and RTN.

wiki-ho protocol (DESIGN.md): perplexity and KL(fp32 ‖ model) on the held-out windows, every
model scored in one pass (the fp32 log-probabilities of a batch are computed once). Per target
bpw (decoder linears), from ONE shared measurement:

* ``exact``   exl2rs's exact allocation, GPTQ (the default pipeline);
* ``anneal``  the same measurement solved by ``anneal`` (EXL2's optimizer), GPTQ;
* ``rtn``     the ``exact`` allocation quantized round-to-nearest (``rtn=True``);
* ``uniform`` every decoder linear at the cheapest single config at or above the target, GPTQ;
* ``uniform-rtn`` (``--uniform-rtn``) the same uniform config, round-to-nearest;
* ``exact+plain`` (``--plain-configs``) exact on a second measurement whose candidate sets add
  the plain single-width layouts (``1:3b_128g`` …) that EXL2's tables lack;
* ``exact-<objective>`` (``--objectives``) exact on another objective the allocator offers:
  ``relative`` (errors normalised by each linear's reference energy), ``norm`` (anneal's
  Σ e^norm objective).

Every model's head is quantized at the same 6 bits. Prints the table with ratios to ``exact``
and writes ``benches/out/bench_quality.json``.

    nice .venv/bin/python benches/bench_quality.py [--layers N] [--targets 2.5 3.0 3.5 4.0]

``--layers N`` runs on SmolLM2 truncated to its first N decoder layers (the fixture cache's
truncated copies): the comparison is between quantizations of the same network, so KL and the
perplexity ratios stay meaningful, while a 2-core machine finishes in minutes instead of hours.
Converted models and the measurement are kept under ``--work`` and reused by a rerun.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from exl2rs.demo import (
    HEAD_BITS,
    Settings,
    Variant,
    convert_all,
    convert_variant,
    decoder_bpw,
    decoder_shapes,
    eval_windows,
    exl2rs_variant,
    load_fp32,
    model_dir,
    quantized_loader,
    score_all,
    shared_measurement,
    uniform_variant,
)

TARGETS = (2.5, 3.0, 3.5, 4.0)
OBJECTIVES: dict[str, dict[str, Any]] = {
    "relative": {"scale": "relative"},
    "norm": {"objective": "norm"},
}
SKIPPABLE = ("anneal", "rtn", "uniform")


def objective_kw(name: str) -> dict[str, Any]:
    """Allocation keywords of an ``--objectives`` entry: a name of OBJECTIVES, or ``norm:P``
    (Σ err^P with exponent P)."""
    if name.startswith("norm:"):
        return {"objective": "norm", "norm": float(name.split(":", 1)[1])}
    return OBJECTIVES[name]


def objective_name(text: str) -> str:
    if text in OBJECTIVES:
        return text
    if text.startswith("norm:"):
        try:
            if float(text.split(":", 1)[1]) > 0:
                return text
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(
        f"unknown objective {text!r}: expected one of {sorted(OBJECTIVES)} or norm:P (P > 0)"
    )


def build_variants(
    measurement: Path,
    shapes: dict[str, tuple[int, int]],
    targets: list[float],
    *,
    uniform_rtn: bool,
    objectives: list[str],
    plain_measurement: Path | None = None,
    skip: tuple[str, ...] = (),
) -> list[Variant]:
    out: list[Variant] = []
    for t in targets:
        exact = exl2rs_variant(f"exact_{t:.2f}", "exact", measurement, t, shapes)
        out.append(exact)
        if "anneal" not in skip:
            out.append(
                exl2rs_variant(f"anneal_{t:.2f}", "anneal", measurement, t, shapes, solver="anneal")
            )
        if "rtn" not in skip:
            out.append(Variant(f"rtn_{t:.2f}", "rtn", t, dict(exact.strategy), rtn=True))
        if "uniform" not in skip:
            out.append(uniform_variant(f"uniform_{t:.2f}", "uniform", t, shapes))
        if uniform_rtn:
            out.append(uniform_variant(f"urtn_{t:.2f}", "uniform-rtn", t, shapes, rtn=True))
        if plain_measurement is not None:
            out.append(
                exl2rs_variant(f"exact-plain_{t:.2f}", "exact+plain", plain_measurement, t, shapes)
            )
        for name in objectives:
            out.append(
                exl2rs_variant(
                    f"exact-{name}_{t:.2f}",
                    f"exact-{name}",
                    measurement,
                    t,
                    shapes,
                    **objective_kw(name),
                )
            )
    return out


def measured_errors(measurement: Path) -> dict[str, dict[str, float]]:
    """Linear → {config descriptor: its error under the allocator's default scale} of a native
    measurement (Fisher-weighted tr(ΔW H ΔWᵀ) when it has sensitivities)."""
    from exl2rs._core import Measurement
    from exl2rs.allocation import DEFAULT_SCALE
    from exl2rs.qparams import QParams

    m = Measurement.load(measurement)
    descs = [QParams.from_dict(json.loads(t)).desc for t in m.configs_json()]
    problem = m.linear_problem(m.resolve_scale(DEFAULT_SCALE))
    return {
        name: {descs[c]: err for _, err, c in problem.options(i)}
        for i, name in enumerate(problem.names)
    }


def predicted_objective(
    errors: dict[str, dict[str, float]], strategy: dict[str, Any]
) -> float | None:
    """Σ measured error of ``strategy``'s configs (the allocator's objective), or None when a
    config was not measured for some linear."""
    total = 0.0
    for name, q in strategy.items():
        err = errors.get(name, {}).get(q.desc)
        if err is None:
            return None
        total += err
    return total


def kind_bpw(strategy: dict[str, Any], shapes: dict[str, tuple[int, int]]) -> dict[str, float]:
    """Mean bpw per linear kind (``q_proj`` …) of ``strategy``, weighted by the weights."""
    bits: dict[str, float] = {}
    count: dict[str, int] = {}
    for name, (k, m) in shapes.items():
        kind = name.rsplit(".", 1)[-1]
        bits[kind] = bits.get(kind, 0.0) + strategy[name].total_bits(k, m)
        count[kind] = count.get(kind, 0) + k * m
    return {kind: round(bits[kind] / count[kind], 4) for kind in bits}


def table(rows: list[dict[str, Any]], targets: list[float]) -> list[str]:
    head = (
        f"{'target':>6}  {'method':<15} {'config':<22} {'bpw':>7} {'ppl':>12} "
        f"{'ppl/exact':>9} {'KL':>9} {'KL/exact':>8}"
    )
    lines = [head, "-" * len(head)]
    for t in targets:
        group = [r for r in rows if r["target"] == t]
        ex = next(r for r in group if r["method"] == "exact")
        for r in group:
            lines.append(
                f"{t:6.2f}  {r['method']:<15} {r['config'] or '(allocated)':<22} "
                f"{r['bpw']:7.4f} {r['ppl']:12.4f} {r['ppl'] / ex['ppl']:9.4f} "
                f"{r['kl']:9.5f} {r['kl'] / ex['kl']:8.3f}"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--layers", type=int, default=None, help="truncate SmolLM2 to N layers")
    ap.add_argument("--targets", type=float, nargs="+", default=list(TARGETS))
    ap.add_argument("--measure-rows", type=int, default=8)
    ap.add_argument("--measure-length", type=int, default=512)
    ap.add_argument("--quant-rows", type=int, default=8)
    ap.add_argument("--quant-length", type=int, default=512)
    ap.add_argument("--windows", type=int, default=32, help="wiki-ho windows (protocol: 32)")
    ap.add_argument("--uniform-rtn", action="store_true", help="also uniform round-to-nearest")
    ap.add_argument(
        "--objectives",
        nargs="*",
        default=[],
        type=objective_name,
        help=f"also exact on other objectives: {', '.join(sorted(OBJECTIVES))} or norm:P",
    )
    ap.add_argument("--skip", nargs="*", default=[], choices=SKIPPABLE, help="methods not to run")
    ap.add_argument(
        "--plain-configs",
        action="store_true",
        help="also exact on a second measurement with plain single-width configs added",
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--jobs", type=int, default=None, help="converts at once (spawned; default: one per core)"
    )
    ap.add_argument("--work", type=Path, default=None, help="default benches/out/quality_L<N>")
    ap.add_argument("--json", type=Path, default=Path("benches/out/bench_quality.json"))
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args(argv)
    if not 1 <= args.windows <= 32:
        ap.error("--windows must be in [1, 32]")
    settings = Settings(
        args.layers,
        args.measure_rows,
        args.measure_length,
        args.quant_rows,
        args.quant_length,
        args.windows,
    )
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    work = args.work or Path("benches/out") / f"quality_L{args.layers or 'full'}"
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    model = model_dir(settings)
    shapes = decoder_shapes(model)
    measurement, measure_s, reused = shared_measurement(
        model, work, settings, threads=args.threads, progress=args.progress
    )
    print(f"measurement {measurement}: {'reused' if reused else 'measured'} ({measure_s:.0f} s)")
    plain: Path | None = None
    if args.plain_configs:
        plain_settings = Settings(**{**settings.__dict__, "plain_configs": True})
        plain, plain_s, plain_reused = shared_measurement(
            model, work / "plain", plain_settings, threads=args.threads, progress=args.progress
        )
        print(f"measurement {plain}: {'reused' if plain_reused else 'measured'} ({plain_s:.0f} s)")
    variants = build_variants(
        measurement,
        shapes,
        args.targets,
        uniform_rtn=args.uniform_rtn,
        objectives=args.objectives,
        plain_measurement=plain,
        skip=tuple(args.skip),
    )
    convert_all(model, work / "models", variants, settings, threads=args.threads, jobs=args.jobs)
    for v in variants:  # every job is finished now: this only reads its result
        convert_variant(model, work / "models", v, settings, threads=args.threads, progress=False)
    windows = eval_windows(model, settings.windows)
    ref, scores = score_all(
        load_fp32(model),
        {v.key: quantized_loader(v.result.output_dir) for v in variants},
        windows,
        progress=args.progress,
    )
    # The objective of every model under the richest measurement: does it rank them as KL does?
    errors = measured_errors(plain or measurement)
    rows = []
    for v in variants:
        s = scores[v.key]
        rows.append(
            {
                "target": v.target,
                "method": v.label,
                "key": v.key,
                "config": v.extra.get("config", ""),
                "bpw": decoder_bpw(v.strategy, shapes),
                "ppl": s.perplexity,
                "kl": s.kl_mean,
                "rtn": v.rtn,
                "objective": None if v.allocation is None else v.allocation.objective,
                "predicted_objective": predicted_objective(errors, v.strategy),
                "solver": None if v.allocation is None else v.allocation.solution.solver,
                "anneal_norm": None if v.allocation is None else v.allocation.solution.anneal_norm,
                "kind_bpw": kind_bpw(v.strategy, shapes),
                "quantize_s": v.result.stage_seconds.get("quantize"),
                "cal_ppl_quant": v.result.cal_ppl_quant,
            }
        )
    lines = table(rows, args.targets)
    print(f"\nfp32: ppl {ref.perplexity:.4f} ({windows.shape[0]} windows x {windows.shape[1]})")
    print("\n".join(lines))
    verdicts = []
    for t in args.targets:
        group = [r for r in rows if r["target"] == t]
        ex = next(r for r in group if r["method"] == "exact")
        rivals = [r for r in group if r["method"] in ("anneal", "rtn", "uniform", "uniform-rtn")]
        beaten_by = [r["method"] for r in rivals if r["ppl"] <= ex["ppl"] or r["kl"] <= ex["kl"]]
        verdicts.append({"target": t, "exact_best": not beaten_by, "beaten_by": beaten_by})
        print(
            f"target {t}: exact "
            + ("best on ppl and KL" if not beaten_by else f"NOT best (ties/loses to {beaten_by})")
        )
    doc = {
        "protocol": "wiki-ho",
        "model": str(model),
        "layers": args.layers,
        "windows": int(windows.shape[0]),
        "window_length": int(windows.shape[1]),
        "head_bits": HEAD_BITS,
        "calibration": {
            "measure": [settings.measure_rows, settings.measure_length],
            "quantize": [settings.quant_rows, settings.quant_length],
            "source": "default (exllamav2 built-in mix, wiki chars [0, 1M) only)",
        },
        "fp32_ppl": ref.perplexity,
        "rows": rows,
        "verdicts": verdicts,
        "total_s": time.perf_counter() - t_all,
        "threads": torch.get_num_threads(),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.json} ({doc['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
