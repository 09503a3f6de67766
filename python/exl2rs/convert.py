"""``exl2rs convert``: measure → allocate → quantize → compile, as one resumable job.

Flags and defaults follow exllamav2 0.3.2's ``convert.py`` (``-i -o -cf -b -hb -c -m -om -r -mr
-l -ml -ss -nr``), plus ``--target-size`` (bytes of the weight files), ``--solver``,
``--pin PATTERN=CONFIG`` per-layer pins, ``--strategy FILE`` (skip measuring and allocating),
``--rtn``, ``--device`` and ``--status-json`` (one JSON object per line on stdout).

The work directory holds ``job.json`` (exl2rs's own, versioned, written atomically after every
stage), the calibration tokens, the measurement and the quantize checkpoint. A rerun resumes
automatically; a finished job is reported, not redone; a corrupt job, or one started with other
inputs (without ``-nr``), is refused naming the file and the field.

Differences from exllamav2: without ``-cf`` the loadable model goes to ``WORKDIR/exl2`` (exllamav2
writes bare shards into the work dir); ``-om`` writes exllamav2's ``measurement.json`` there and the
native measurement next to it as ``<name>.exl2rs.json``; ``-m`` takes the native file (it carries
the model hash that is checked; its candidate configs may be any set — the allocation chooses
among what was measured).
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exl2rs.atomic import atomic_write_bytes
from exl2rs.errors import (
    CalibrationError,
    InfeasibleTargetError,
    InvalidProblemError,
    JobError,
    MeasurementFileError,
    ModelError,
)
from exl2rs.qparams import HEAD_BITS, QParams, head_config

if TYPE_CHECKING:
    import torch

    from exl2rs._core import Measurement

__all__ = ["ConvertResult", "add_arguments", "convert", "run"]

JOB_FORMAT = "exl2rs.convert-job"
JOB_VERSION = 1
JOB_FILE = "job.json"
CAL_FILE = "cal_data.safetensors"
NATIVE_MEASUREMENT = "measurement.exl2rs.json"
EXL2_MEASUREMENT = "measurement.json"
DEFAULT_OUT = "exl2"
STAGES = ("begin", "measure", "optimize", "quantize", "compile", "finished")
SOLVERS = ("exact", "greedy", "lagrangian", "anneal", "minimax")
# exllamav2's row counts: built-in dataset / custom dataset.
DEFAULT_ROWS = (115, 100)
DEFAULT_MEASUREMENT_ROWS = (19, 16)

Status = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class ConvertResult:
    """What a convert produced."""

    output_dir: Path
    work_dir: Path
    bpw: float  # decoder linears
    head_bits: int
    file_bytes: int
    tensor_bytes: int
    stage_seconds: dict[str, float]
    cal_ppl_fp32: float | None = None
    cal_ppl_quant: float | None = None
    measurement: Path | None = None
    strategy_file: Path | None = None
    already_finished: bool = False
    linears: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("output_dir", "work_dir", "measurement", "strategy_file"):
            d[k] = None if d[k] is None else str(d[k])
        d.pop("linears")
        return d


# -- inputs, hashing, the job file -----------------------------------------------------------


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, allow_nan=False) + "\n").encode()


def _write_job(work: Path, job: dict[str, Any]) -> None:
    atomic_write_bytes(work / JOB_FILE, _json_bytes(job))


def _read_job(work: Path) -> dict[str, Any] | None:
    path = work / JOB_FILE
    if not path.exists():
        return None
    try:
        job = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise JobError(f"{path}: corrupt job file ({exc}); rerun with -nr to start over") from exc
    if not isinstance(job, dict):
        raise JobError(f"{path}: corrupt job file (not a JSON object); rerun with -nr")
    if job.get("format") != JOB_FORMAT:
        raise JobError(f"{path}: field 'format' is {job.get('format')!r}, expected {JOB_FORMAT!r}")
    if job.get("version") != JOB_VERSION:
        raise JobError(
            f"{path}: field 'version' is {job.get('version')!r}, this exl2rs reads {JOB_VERSION}"
        )
    if job.get("stage") not in STAGES:
        raise JobError(f"{path}: field 'stage' is {job.get('stage')!r}, expected one of {STAGES}")
    if not isinstance(job.get("inputs"), dict):
        raise JobError(f"{path}: field 'inputs' is missing or not an object")
    return job


def _check_resume(work: Path, job: dict[str, Any], inputs: dict[str, Any]) -> None:
    saved = job["inputs"]
    for key in sorted(set(saved) | set(inputs)):
        if saved.get(key) != inputs.get(key):
            raise JobError(
                f"{work / JOB_FILE}: field 'inputs.{key}' is {saved.get(key)!r}, this run asks "
                f"{inputs.get(key)!r}; rerun with the same options, or with -nr to start over"
            )


def _prepare_work_dir(work: Path, no_resume: bool) -> None:
    if work.exists() and not work.is_dir():
        raise JobError(f"{work}: work dir path exists and is not a directory")
    work.mkdir(parents=True, exist_ok=True)
    if (work / JOB_FILE).exists():
        if no_resume:
            for item in work.iterdir():
                if item.is_dir() and not item.is_symlink():
                    shutil.rmtree(item)
                else:
                    item.unlink()
        return
    leftovers = [p.name for p in work.iterdir()]
    if leftovers:
        raise JobError(
            f"{work}: work dir is not empty and holds no {JOB_FILE} (found {leftovers[0]!r}); "
            "use an empty or new directory"
        )


# -- strategies, pins, size accounting -------------------------------------------------------


def _load_strategy(path: Path, names: list[str]) -> dict[str, QParams]:
    """A strategy file: ``exl2rs_strategy.json`` or a plain ``{linear: config dict}``."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise JobError(f"{path}: unreadable strategy file ({exc})") from exc
    table = doc.get("linears", doc) if isinstance(doc, dict) else None
    if not isinstance(table, dict):
        raise JobError(f"{path}: expected an object of linear name -> config")
    out: dict[str, QParams] = {}
    for name, entry in table.items():
        cfg = entry.get("config", entry) if isinstance(entry, dict) else entry
        try:
            out[name] = QParams.from_dict(cfg)
        except Exception as exc:  # noqa: BLE001 - name the entry
            raise JobError(f"{path}: config of {name!r} is invalid ({exc})") from exc
    missing = [n for n in names if n not in out]
    if missing:
        raise JobError(f"{path}: no config for {missing[0]!r} ({len(missing)} linears missing)")
    return {n: out[n] for n in names}


def _parse_pins(values: list[str] | None) -> dict[str, str]:
    pins: dict[str, str] = {}
    for v in values or []:
        pat, sep, cfg = v.partition("=")
        if not sep or not pat or not cfg:
            raise InvalidProblemError(
                f"--pin {v!r}: expected PATTERN=CONFIG (CONFIG: max, min, an option index or an "
                "EXL2 descriptor such as '1:4b_128g s4')"
            )
        pins[pat] = cfg.strip()
    return pins


def _pinned_problem(measurement: Any, pins: Mapping[str, str]) -> Any:
    """The linear problem of ``measurement`` with pins resolved per matched item."""
    from exl2rs.allocation import DEFAULT_SCALE

    problem = measurement.linear_problem(DEFAULT_SCALE)
    if not pins:
        return problem
    descs = [QParams.from_dict(json.loads(t)).desc for t in measurement.configs_json()]
    names = problem.names
    pairs: dict[int, int] = {}
    for pattern, spec in pins.items():
        hits = [i for i, n in enumerate(names) if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise InvalidProblemError(f"--pin {pattern!r} matches no linear (e.g. {names[0]!r})")
        for i in hits:
            opts = problem.options(i)
            if spec in ("max", "min"):
                pick = max if spec == "max" else min
                j = pick(range(len(opts)), key=lambda k: (opts[k][0], -opts[k][1]))
            elif spec.isdigit():
                j = int(spec)
                if j >= len(opts):
                    raise InvalidProblemError(
                        f"--pin {pattern}={spec}: {names[i]} has options 0..{len(opts) - 1}"
                    )
            else:
                matches = [k for k, o in enumerate(opts) if descs[o[2]] == spec]
                if not matches:
                    known = sorted({descs[o[2]] for o in opts})
                    raise InvalidProblemError(
                        f"--pin {pattern}={spec!r}: {names[i]} has no such config; its "
                        f"candidates are {known}"
                    )
                j = matches[0]
            pairs[i] = j
    return problem.with_constraints(sorted(pairs.items()), None, None, None, None)


def _linear_shapes(sm: Any) -> dict[str, tuple[int, int]]:
    """Decoder linear name → (in_features, out_features), from the meta skeleton."""
    shapes: dict[str, tuple[int, int]] = {}
    for i in range(sm.num_layers):
        meta = sm._meta_layers[i]  # noqa: SLF001 - shapes only, nothing materialised
        for name in sm.linear_names(i):
            lin = sm.linear(meta, name)
            shapes[name] = (int(lin.in_features), int(lin.out_features))
    return shapes


def _fixed_bytes(
    model_dir: Path,
    shapes: Mapping[str, tuple[int, int]],
    head_bits: int,
    hidden: int,
    vocab: int,
) -> int:
    """Bytes of everything outside the decoder linears: fp16 non-linear tensors + the head."""
    from safetensors import safe_open

    from exl2rs.export import _source_tensor_files

    total = 0
    files = _source_tensor_files(model_dir)
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for name in names:
                prefix = name.rpartition(".")[0]
                if prefix in shapes and name.endswith(".weight"):
                    continue
                if name == "lm_head.weight":
                    continue
                shape = f.get_slice(name).get_shape()
                n = 1
                for s in shape:
                    n *= int(s)
                total += 2 * n
    head = (head_config(head_bits).total_bits(hidden, vocab) + 7) // 8
    # q_perm (int32 per input row) is stored beside q_invperm but not in the cost model.
    perms = 4 * (sum(k for k, _ in shapes.values()) + hidden)
    return total + head + perms


def _bpw_range(shapes: Mapping[str, tuple[int, int]]) -> tuple[float, float]:
    """Smallest / largest decoder bpw reachable with EXL2's per-matrix candidates."""
    from exl2rs.qparams import candidates

    lo = hi = numel = 0
    cache: dict[tuple[str, int, int], tuple[int, int]] = {}
    for name, (k, n) in shapes.items():
        kind = name.rsplit(".", 1)[-1]
        key = (kind, k, n)
        if key not in cache:
            bits = [q.total_bits(k, n) for q in candidates(kind)]
            cache[key] = (min(bits), max(bits))
        lo += cache[key][0]
        hi += cache[key][1]
        numel += k * n
    return lo / numel, hi / numel


def _measurement_bpw_range(path: Path) -> tuple[float, float]:
    """Smallest / largest decoder bpw among the configs a measurement holds (any candidate
    set: the allocator chooses among what was measured)."""
    problem = _load_measurement(path).linear_problem()
    lo, hi = problem.cost_range()
    return lo / problem.total_numel, hi / problem.total_numel


# -- the job ---------------------------------------------------------------------------------


def _emit(status: Status | None, t0: float, stage: str, **extra: Any) -> None:
    if status is not None:
        status({"stage": stage, "elapsed": round(time.perf_counter() - t0, 3), **extra})


def convert(
    model_dir: str | os.PathLike[str],
    work_dir: str | os.PathLike[str],
    *,
    bits: float | None = 4.125,
    head_bits: int = 6,
    compile_full: str | os.PathLike[str] | None = None,
    calibration: str | os.PathLike[str] = "default",
    measurement: str | os.PathLike[str] | None = None,
    output_measurement: str | os.PathLike[str] | None = None,
    rows: int | None = None,
    length: int = 2048,
    measurement_rows: int | None = None,
    measurement_length: int = 2048,
    shard_size: int = 8192,
    no_resume: bool = False,
    target_size: int | None = None,
    solver: str = "exact",
    pins: Mapping[str, str] | None = None,
    strategy: str | os.PathLike[str] | Mapping[str, QParams] | None = None,
    rtn: bool = False,
    device: str | None = None,
    seed: int = 0,
    max_ppl_ratio: float | None = 3.0,
    threads: int | None = None,
    progress: bool = True,
    status: Status | None = None,
) -> ConvertResult:
    """Convert ``model_dir`` to EXL2 at ``bits`` bpw (decoder linears) or ``target_size`` bytes.

    ``strategy``: a strategy file or mapping (linear → QParams) used as given (no measurement,
    no allocation). ``pins``: pattern → ``max`` / ``min`` / option index / EXL2 descriptor.
    Everything lands in ``work_dir``; the compiled model in ``compile_full`` (default
    ``work_dir/exl2``). Returns the paths, the decoder bpw, the file bytes and the seconds per
    stage. Rerunning with the same arguments resumes (or reports a finished job).
    """
    import torch  # deferred: `import exl2rs` stays torch-free

    saved_threads = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise JobError(f"threads must be positive, got {threads}")
        torch.set_num_threads(threads)
    try:
        return _convert(
            model_dir=model_dir,
            work_dir=work_dir,
            bits=bits,
            head_bits=head_bits,
            compile_full=compile_full,
            calibration=calibration,
            measurement=measurement,
            output_measurement=output_measurement,
            rows=rows,
            length=length,
            measurement_rows=measurement_rows,
            measurement_length=measurement_length,
            shard_size=shard_size,
            no_resume=no_resume,
            target_size=target_size,
            solver=solver,
            pins=pins,
            strategy=strategy,
            rtn=rtn,
            device=device,
            seed=seed,
            max_ppl_ratio=max_ppl_ratio,
            progress=progress,
            status=status,
        )
    finally:
        torch.set_num_threads(saved_threads)


def _convert(
    *,
    model_dir: str | os.PathLike[str],
    work_dir: str | os.PathLike[str],
    bits: float | None,
    head_bits: int,
    compile_full: str | os.PathLike[str] | None,
    calibration: str | os.PathLike[str],
    measurement: str | os.PathLike[str] | None,
    output_measurement: str | os.PathLike[str] | None,
    rows: int | None,
    length: int,
    measurement_rows: int | None,
    measurement_length: int,
    shard_size: int,
    no_resume: bool,
    target_size: int | None,
    solver: str,
    pins: Mapping[str, str] | None,
    strategy: str | os.PathLike[str] | Mapping[str, QParams] | None,
    rtn: bool,
    device: str | None,
    seed: int,
    max_ppl_ratio: float | None,
    progress: bool,
    status: Status | None,
) -> ConvertResult:
    from exl2rs.measure import model_hash as hash_model
    from exl2rs.streaming import StreamingModel

    t_start = time.perf_counter()
    src = Path(model_dir)
    work = Path(work_dir)
    # -- argument checks (before touching anything) --
    if not src.is_dir():
        raise ModelError(f"{src}: model directory does not exist")
    if not (src / "config.json").is_file():
        raise ModelError(f"{src}: no config.json (not a Hugging Face model folder)")
    if head_bits not in HEAD_BITS:
        raise JobError(f"-hb {head_bits!r}: head bits must be one of {list(HEAD_BITS)}")
    if solver not in SOLVERS:
        raise JobError(f"--solver {solver!r}: expected one of {list(SOLVERS)}")
    if (bits is None) == (target_size is None) and strategy is None:
        raise JobError("give exactly one of -b BPW and --target-size BYTES")
    if target_size is not None and target_size <= 0:
        raise JobError(f"--target-size must be a positive byte count, got {target_size}")
    if shard_size < 0:
        raise JobError(f"-ss {shard_size}: shard size must be >= 0 MB (0 = unlimited)")
    if output_measurement is not None and (measurement is not None or strategy is not None):
        raise JobError("-om measures only; it cannot be combined with -m or --strategy")
    if output_measurement is not None and compile_full is not None:
        raise JobError("-om measures only; it conflicts with -cf (as in exllamav2)")
    builtin = str(calibration) == "default"
    rows = rows if rows is not None else DEFAULT_ROWS[0 if builtin else 1]
    m_rows = (
        measurement_rows
        if measurement_rows is not None
        else DEFAULT_MEASUREMENT_ROWS[0 if builtin else 1]
    )
    for flag, v in (("-r", rows), ("-l", length), ("-mr", m_rows), ("-ml", measurement_length)):
        if not isinstance(v, int) or v < 1:
            raise CalibrationError(f"{flag} must be a positive integer, got {v!r}")
    if not builtin and not Path(calibration).exists():
        raise CalibrationError(f"-c {calibration}: calibration dataset does not exist")
    out_dir = Path(compile_full) if compile_full is not None else work / DEFAULT_OUT

    sm = StreamingModel(src, device="cpu")
    shapes = _linear_shapes(sm)
    names = list(shapes)
    given_strategy: dict[str, QParams] | None = None
    strategy_src: str | None = None
    if isinstance(strategy, Mapping):
        from exl2rs.quantize import _check_strategy

        _check_strategy(strategy, names)
        given_strategy = {n: strategy[n] for n in names}
        strategy_src = "mapping"
    elif strategy is not None:
        given_strategy = _load_strategy(Path(strategy), names)
        strategy_src = str(Path(strategy).resolve())
    if given_strategy is None and bits is not None:
        if measurement is None:
            lo, hi = _bpw_range(shapes)
            where = "EXL2's candidate configs"
        else:
            lo, hi = _measurement_bpw_range(Path(measurement))
            where = f"the configs measured in {measurement}"
        if not lo <= bits <= hi:
            raise InfeasibleTargetError(
                f"-b {bits}: not reachable for {src.name}; the feasible decoder bpw range with "
                f"{where} is [{lo:.4f}, {hi:.4f}]"
            )
    pin_map = dict(pins or {})
    if given_strategy is not None and pin_map:
        raise JobError("--pin applies to the allocation; it cannot be combined with --strategy")

    inputs: dict[str, Any] = {
        "model_dir": str(src.resolve()),
        "calibration": "default" if builtin else str(Path(calibration).resolve()),
        "bits": bits,
        "target_size": target_size,
        "head_bits": head_bits,
        "rows": rows,
        "length": length,
        "measurement_rows": m_rows,
        "measurement_length": measurement_length,
        "shard_size": shard_size,
        "compile_full": str(out_dir.resolve()),
        "measurement": None if measurement is None else str(Path(measurement).resolve()),
        "output_measurement": None
        if output_measurement is None
        else str(Path(output_measurement).resolve()),
        "solver": solver,
        "pins": pin_map,
        "strategy": strategy_src,
        "strategy_hash": None,
        "rtn": rtn,
        "seed": seed,
        "max_ppl_ratio": max_ppl_ratio,
    }
    if given_strategy is not None:
        from exl2rs.quantize import strategy_digest

        inputs["strategy_hash"] = strategy_digest(given_strategy)

    _prepare_work_dir(work, no_resume)
    job = _read_job(work)
    model_h = hash_model(src)
    if job is not None:
        _check_resume(work, job, inputs)
        if job.get("model_hash") != model_h:
            raise JobError(
                f"{work / JOB_FILE}: field 'model_hash' is {str(job.get('model_hash'))[:16]}…, "
                f"the model in {src} hashes to {model_h[:16]}… (the model changed); rerun with -nr"
            )
        if job["stage"] == "finished":
            return _finished_result(work, job, already=True)
    else:
        job = {
            "format": JOB_FORMAT,
            "version": JOB_VERSION,
            "inputs": inputs,
            "model_hash": model_h,
            "stage": "begin",
            "stage_seconds": {},
        }
        _write_job(work, job)
    seconds: dict[str, float] = dict(job.get("stage_seconds", {}))

    def done(stage: str, t0: float, **fields: Any) -> None:
        seconds[stage] = round(seconds.get(stage, 0.0) + time.perf_counter() - t0, 3)
        nxt = STAGES[STAGES.index(stage) + 1]
        job.update(fields, stage=nxt, stage_seconds=seconds)
        _write_job(work, job)
        _emit(status, t_start, stage, completion=1.0)

    # -- begin: calibration tokens (kept in the job dir so a resume uses the same ones) --
    if job["stage"] == "begin":
        t0 = time.perf_counter()
        _emit(status, t_start, "begin", completion=0.0)
        from safetensors.torch import save

        from exl2rs.calibration import TOKEN_SUFFIXES, load_rows

        cal_src: str | Path = "default" if builtin else Path(calibration)
        # Token-id files need no tokenizer (models without tokenizer files can use them).
        tok = (
            None
            if cal_src != "default" and Path(cal_src).suffix in TOKEN_SUFFIXES
            else sm.tokenizer
        )
        ids = load_rows(cal_src, tok, rows, length, seed=seed)
        tensors = {"input_ids": ids.contiguous()}
        if given_strategy is None and measurement is None:
            tensors["measurement_ids"] = load_rows(
                cal_src,
                tok,
                m_rows,
                measurement_length,
                seed=seed,
            ).contiguous()
        atomic_write_bytes(work / CAL_FILE, save(tensors))
        done("begin", t0, calibration_hash=_file_hash(work / CAL_FILE))
    cal = _load_cal(work, job)

    # -- measure --
    if job["stage"] == "measure":
        t0 = time.perf_counter()
        m_path: str | None = None
        if given_strategy is None:
            if measurement is not None:
                m_path = str(_check_measurement(Path(measurement), model_h))
            else:
                m_path = str(
                    _run_measure(
                        src,
                        work,
                        cal,
                        device,
                        progress,
                        status,
                        t_start,
                        output_measurement,
                        seed,
                    )
                )
        done("measure", t0, measurement_file=m_path)
        if output_measurement is not None:
            job.update(stage="finished")
            _write_job(work, job)
            return _finished_result(work, job, already=False)

    # -- optimize --
    if job["stage"] == "optimize":
        t0 = time.perf_counter()
        if given_strategy is not None:
            chosen = given_strategy
            alloc_info: dict[str, Any] = {"solver": None, "source": strategy_src}
        else:
            chosen, alloc_info = _allocate(
                Path(job["measurement_file"]),
                src,
                shapes,
                bits,
                target_size,
                head_bits,
                solver,
                pin_map,
                sm,
            )
        done(
            "optimize",
            t0,
            strategy={n: q.to_dict() for n, q in chosen.items()},
            allocation=alloc_info,
        )
        _emit(status, t_start, "optimize", completion=1.0, bpw=alloc_info.get("bpw"))

    strat = {n: QParams.from_dict(d) for n, d in job["strategy"].items()}

    # -- quantize --
    if job["stage"] == "quantize":
        from exl2rs.quantize import quantize_model

        t0 = time.perf_counter()

        def on_event(ev: dict[str, Any]) -> None:
            _emit(status, t_start, "quantize", **{k: v for k, v in ev.items() if k != "stage"})

        qres = quantize_model(
            src,
            work,
            strat,
            cal["input_ids"],
            head_bits=head_bits,
            device=device,
            rtn=rtn,
            max_ppl_ratio=max_ppl_ratio,
            progress=progress,
            on_event=on_event,
            model_hash=model_h,
        )
        done(
            "quantize",
            t0,
            quantize={
                "linears": qres.linears,
                "modules": qres.modules,
                "head": qres.head,
                "cal_ppl_fp32": qres.cal_ppl_fp32,
                "cal_ppl_quant": qres.cal_ppl_quant,
            },
        )

    # -- compile --
    if job["stage"] == "compile":
        from exl2rs.export import compile_exl2, strategy_document
        from exl2rs.quantize import HEAD_NAME, TENSOR_DIR

        t0 = time.perf_counter()
        _emit(status, t_start, "compile", completion=0.0)
        q = job["quantize"]
        total_bits = sum(int(r["bits"]) for r in q["linears"])
        numel = sum(k * n for k, n in shapes.values())
        bpw = total_bits / numel
        doc = strategy_document(bits if bits is not None else bpw, q["linears"], q["head"])
        doc["allocation"] = job.get("allocation")
        extra: dict[str, Path] = {}
        mfile = job.get("measurement_file")
        if mfile:
            extra[NATIVE_MEASUREMENT] = Path(mfile)
            exl2_m = Path(mfile).with_name(EXL2_MEASUREMENT)
            if exl2_m.is_file() and exl2_m.parent == work:
                extra[EXL2_MEASUREMENT] = exl2_m
        res = compile_exl2(
            src,
            work / TENSOR_DIR,
            out_dir,
            bits=bits if bits is not None else round(bpw, 4),
            head_bits=head_bits,
            calibration={
                "rows": rows,
                "length": length,
                "dataset": "(default)" if builtin else Path(calibration).name,
            },
            strategy=doc,
            quantized=[*names, HEAD_NAME],
            shard_mb=shard_size,
            extra_files=extra,
        )
        for spent in work.glob("states-*.safetensors"):
            spent.unlink()  # the quantize checkpoint is spent once the model is compiled
        done(
            "compile",
            t0,
            result={
                "output_dir": str(res.path),
                "bpw": bpw,
                "file_bytes": res.file_bytes,
                "tensor_bytes": res.tensor_bytes,
                "shards": res.shards,
            },
        )
    return _finished_result(work, job, already=False)


def _load_cal(work: Path, job: dict[str, Any]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = work / CAL_FILE
    if not path.is_file():
        raise JobError(f"{path}: calibration tokens missing from the job dir; rerun with -nr")
    if _file_hash(path) != job.get("calibration_hash"):
        raise JobError(
            f"{work / JOB_FILE}: field 'calibration_hash' does not match {path}; rerun with -nr"
        )
    return load_file(str(path))


def _load_measurement(path: Path) -> Measurement:
    """The native measurement at ``path`` (``-m``), or an error saying what the file is not."""
    from exl2rs._core import Measurement

    if not path.is_file():
        raise MeasurementFileError(f"-m {path}: measurement file does not exist")
    try:
        return Measurement.load(path)
    except MeasurementFileError as exc:
        raise MeasurementFileError(
            f"-m {path}: not a native exl2rs measurement ({exc}); exllamav2's measurement.json "
            f"carries no model hash to check, pass the {NATIVE_MEASUREMENT} written beside it"
        ) from exc


def _check_measurement(path: Path, model_h: str) -> Path:
    m = _load_measurement(path)
    if m.model_hash != model_h:
        raise MeasurementFileError(
            f"-m {path}: measured another model (measurement model hash {m.model_hash[:16]}…, "
            f"this model {model_h[:16]}…)"
        )
    # Any candidate set is fine (EXL2's, a superset with plain layouts, a narrower one): the
    # allocator chooses among the configs the file measured, the quantizer takes any config.
    return path.resolve()


def _run_measure(
    src: Path,
    work: Path,
    cal: dict[str, torch.Tensor],
    device: str | None,
    progress: bool,
    status: Status | None,
    t_start: float,
    output_measurement: str | os.PathLike[str] | None,
    seed: int,
) -> Path:
    from exl2rs.measure import measure

    ids = cal["measurement_ids"]
    num_layers = None

    def on_layer(i: int) -> None:
        nonlocal num_layers
        if num_layers is None:
            num_layers = int(json.loads((src / "config.json").read_text())["num_hidden_layers"])
        _emit(status, t_start, "measure", layer=i, completion=(i + 1) / num_layers)

    native = work / NATIVE_MEASUREMENT
    measure(
        src,
        native,
        calibration=ids,
        device=device,
        job_dir=work / "measure.job",
        write_exllamav2=work / EXL2_MEASUREMENT,
        seed=seed,
        progress=progress,
        on_layer_done=on_layer,
    )
    if output_measurement is not None:
        om = Path(output_measurement)
        om.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(om, (work / EXL2_MEASUREMENT).read_bytes())
        atomic_write_bytes(om.with_name(om.stem + ".exl2rs.json"), native.read_bytes())
    return native


def _allocate(
    m_path: Path,
    src: Path,
    shapes: Mapping[str, tuple[int, int]],
    bits: float | None,
    target_size: int | None,
    head_bits: int,
    solver: str,
    pins: Mapping[str, str],
    sm: Any,
) -> tuple[dict[str, QParams], dict[str, Any]]:
    from exl2rs._core import Measurement
    from exl2rs.allocation import Allocation, _choices

    m = Measurement.load(m_path)
    problem = _pinned_problem(m, pins)
    if sorted(problem.names) != sorted(shapes):
        missing = sorted(set(shapes) - set(problem.names))
        raise MeasurementFileError(
            f"{m_path}: measurement linears do not match the model"
            + (f" (no entry for {missing[0]})" if missing else "")
        )
    overhead = 0
    if target_size is not None:
        overhead = _fixed_bytes(
            src,
            shapes,
            head_bits,
            int(sm.config.hidden_size),
            int(sm.config.vocab_size),
        )
        if overhead >= target_size:
            raise InfeasibleTargetError(
                f"--target-size {target_size}: embeddings, norms and the {head_bits}-bit head "
                f"alone take {overhead} bytes"
            )
    sol = problem.solve(
        target_bpw=bits if target_size is None else None,
        target_bytes=target_size,
        overhead=overhead,
        solver=solver,
    )
    alloc = Allocation(sol, _choices(problem, sol, m), m, "linear")
    configs = alloc.configs()
    info = {
        "solver": sol.solver,
        "bpw": sol.bpw,
        "cost_bits": sol.cost_bits,
        "budget_bits": sol.budget_bits,
        "objective": sol.objective,
        "lower_bound": sol.lower_bound,
        "gap": sol.gap,
        "optimal": sol.optimal,
        "overhead_bytes": overhead,
        "time_s": sol.time_s,
    }
    return {n: configs[n] for n in shapes}, info


def _finished_result(work: Path, job: dict[str, Any], *, already: bool) -> ConvertResult:
    res = job.get("result") or {}
    q = job.get("quantize") or {}
    m = job.get("measurement_file")
    out = Path(res["output_dir"]) if res else work
    return ConvertResult(
        output_dir=out,
        work_dir=work,
        bpw=float(res.get("bpw", 0.0)),
        head_bits=int(job["inputs"]["head_bits"]),
        file_bytes=int(res.get("file_bytes", 0)),
        tensor_bytes=int(res.get("tensor_bytes", 0)),
        stage_seconds=dict(job.get("stage_seconds", {})),
        cal_ppl_fp32=q.get("cal_ppl_fp32"),
        cal_ppl_quant=q.get("cal_ppl_quant"),
        measurement=Path(m) if m else None,
        strategy_file=(out / "exl2rs_strategy.json") if res else None,
        already_finished=already,
        linears=list(q.get("linears", [])),
    )


# -- CLI -------------------------------------------------------------------------------------


def _ppl_ratio(text: str) -> float | None:
    if text.strip().lower() == "off":
        return None
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not v > 1.0:
        raise argparse.ArgumentTypeError(f"expected a number > 1 or 'off', got {text!r}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-i", "--in_dir", "--in-dir", dest="in_dir", required=True, help="HF model dir")
    p.add_argument("-o", "--out_dir", "--out-dir", dest="out_dir", required=True, help="work dir")
    p.add_argument(
        "-cf",
        "--compile_full",
        dest="compile_full",
        default=None,
        help=f"output model dir (default WORKDIR/{DEFAULT_OUT})",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "-b",
        "--bits",
        type=float,
        default=None,
        help="target bpw of the decoder linears (default 4.125)",
    )
    size.add_argument(
        "--target-size",
        dest="target_size",
        type=int,
        default=None,
        help="budget in bytes for all weights (decoder, head, embeddings, norms)",
    )
    p.add_argument(
        "-hb",
        "--head_bits",
        dest="head_bits",
        type=int,
        default=6,
        help=f"head bits, one of {list(HEAD_BITS)} (default 6)",
    )
    p.add_argument(
        "-c",
        "--cal_dataset",
        dest="cal_dataset",
        default="default",
        help="calibration text/jsonl/parquet/npy/safetensors (default: built-in mix)",
    )
    p.add_argument("-m", "--measurement", default=None, help="reuse a native measurement")
    p.add_argument(
        "-om",
        "--output_measurement",
        dest="output_measurement",
        default=None,
        help="measure only: write exllamav2's measurement.json here (+ .exl2rs.json)",
    )
    p.add_argument(
        "-r",
        "--dataset_rows",
        dest="rows",
        type=int,
        default=None,
        help="quantization rows (default 115 built-in / 100 custom)",
    )
    p.add_argument(
        "-mr",
        "--measurement_rows",
        dest="measurement_rows",
        type=int,
        default=None,
        help="measurement rows (default 19 built-in / 16 custom)",
    )
    p.add_argument("-l", "--length", type=int, default=2048, help="tokens per quantization row")
    p.add_argument(
        "-ml",
        "--measurement_length",
        dest="measurement_length",
        type=int,
        default=2048,
        help="tokens per measurement row",
    )
    p.add_argument(
        "-ss",
        "--shard_size",
        dest="shard_size",
        type=int,
        default=8192,
        help="max shard size in MB (0 = one shard)",
    )
    p.add_argument(
        "-nr",
        "--no_resume",
        dest="no_resume",
        action="store_true",
        help="delete the job in the work dir and start over",
    )
    p.add_argument("--solver", choices=SOLVERS, default="exact")
    p.add_argument(
        "--pin",
        "--override",
        dest="pin",
        action="append",
        metavar="PATTERN=CONFIG",
        help="pin linears matching PATTERN to max/min/an option index/a descriptor",
    )
    p.add_argument(
        "--strategy",
        default=None,
        help="strategy JSON (exl2rs_strategy.json or {linear: config}); skips "
        "measuring and allocating",
    )
    p.add_argument("--rtn", action="store_true", help="round-to-nearest instead of GPTQ")
    p.add_argument("--device", default=None, help="torch device (default cuda when present)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--max-ppl-ratio",
        dest="max_ppl_ratio",
        type=_ppl_ratio,
        default=3.0,
        help="fail when calibration ppl exceeds this multiple of fp32 (default 3; 'off': only "
        "fail on a non-finite perplexity, for baselines such as --rtn at low bits)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--status-json",
        dest="status_json",
        action="store_true",
        help="one JSON object per line on stdout: stage, layer, completion, elapsed",
    )
    p.add_argument("--no-progress", dest="no_progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    def status(ev: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(ev) + "\n")
        sys.stdout.flush()

    bits = args.bits
    if bits is None and args.target_size is None and args.strategy is None:
        bits = 4.125
    res = convert(
        args.in_dir,
        args.out_dir,
        bits=bits,
        head_bits=args.head_bits,
        compile_full=args.compile_full,
        calibration=args.cal_dataset,
        measurement=args.measurement,
        output_measurement=args.output_measurement,
        rows=args.rows,
        length=args.length,
        measurement_rows=args.measurement_rows,
        measurement_length=args.measurement_length,
        shard_size=args.shard_size,
        no_resume=args.no_resume,
        target_size=args.target_size,
        solver=args.solver,
        pins=_parse_pins(args.pin),
        strategy=args.strategy,
        rtn=args.rtn,
        device=args.device,
        seed=args.seed,
        max_ppl_ratio=args.max_ppl_ratio,
        threads=args.threads,
        progress=not (args.no_progress or args.status_json),
        status=status if args.status_json else None,
    )
    summary = {"event": "finished", **res.to_dict()}
    if args.status_json:
        status(summary)
    else:
        what = "already finished" if res.already_finished else "finished"
        if args.output_measurement is not None:
            print(f"measurement written to {args.output_measurement}")
        else:
            print(
                f"{what}: {res.output_dir} ({res.bpw:.4f} bpw decoder, head {res.head_bits} bits, "
                f"{res.file_bytes} bytes); seconds per stage: {res.stage_seconds}"
            )
    return 0
