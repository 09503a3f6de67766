"""The measurement pass: every decoder linear × every candidate config, plus EXL2's joint rows.

Layer by layer over :class:`exl2rs.streaming.StreamingModel`: only one decoder block and the
calibration states are resident. Reference (unquantized) states flow forward, as in exllamav2, so
errors never compound. For each linear and config the file records the exact cost, the
Hessian-weighted error ``tr(ΔW H ΔWᵀ)`` and the reference energy ``tr(W H Wᵀ)`` (``H`` is the mean
of ``x xᵀ`` per calibration token); for each attention / MLP module it records the relative output
error of EXL2's joint table rows, from which exllamav2's ``measurement.json`` is written.

The run checkpoints after every layer into a job directory (reference states as safetensors plus
the partial JSON, each written atomically), so a killed run resumes where it stopped and writes a
byte-identical file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import queue
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from exl2rs import gptq
from exl2rs._core import Measurement
from exl2rs.atomic import atomic_write_bytes
from exl2rs.errors import (
    CalibrationError,
    Exl2Error,
    MeasurementError,
    ModelError,
    UnsupportedArchitectureError,
)
from exl2rs.qparams import ATTN_KINDS, MLP_KINDS, QParams
from exl2rs.sensitivity import DEFAULT_FISHER, FISHER_KINDS, FisherKind

if TYPE_CHECKING:
    from exl2rs.streaming import StreamingModel

__all__ = ["FORMAT", "VERSION", "add_arguments", "measure", "run"]

FORMAT = "exl2rs.measurement"
VERSION = 1
JOB_FORMAT = "exl2rs.measure-job"
# exllamav2 aborts when the best row of a module is this inaccurate ("Measurement/inference error").
MIN_BEST_ACCURACY = 0.1
# Calibration tokens on which the 19 + 17 joint table rows are scored (see ``measure``).
DEFAULT_MODULE_TOKENS = 4096
# Tokens for the sensitivity pass: a per-linear scalar needs far fewer than the Hessians, and the
# pass costs ~3 forward passes over them.
DEFAULT_SENSITIVITY_TOKENS = 4096


# ---------------------------------------------------------------------------------------------
# Small helpers: hashing, atomic writes, config identity


def _sha256_file(path: Path, h: Any) -> None:
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)


def model_hash(model_dir: Path) -> str:
    """SHA-256 over config.json and every safetensors file (names and contents, sorted)."""
    h = hashlib.sha256()
    files = [model_dir / "config.json", *sorted(model_dir.glob("*.safetensors"))]
    for f in files:
        if not f.is_file():
            raise ModelError(f"{f}: missing (expected a Hugging Face model folder)")
        h.update(f.name.encode() + b"\0")
        _sha256_file(f, h)
    return h.hexdigest()


def _tokens_hash(tokens: torch.Tensor) -> str:
    t = tokens.to(torch.int64).contiguous().cpu()
    h = hashlib.sha256(str(tuple(t.shape)).encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _config_dict(q: QParams) -> dict[str, Any]:
    return {
        "bits": [int(b) for b in q.bits],
        "bits_prop": [float(p) for p in q.bits_prop],
        "group_size": [int(g) for g in q.group_size],
        "scale_bits": int(q.scale_bits),
    }


def _config_key(q: QParams) -> str:
    return _canonical(_config_dict(q)).decode()


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, allow_nan=False) + "\n").encode()


def _save_states(path: Path, states: torch.Tensor) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save({"states": states.contiguous().cpu()}))


def _load_states(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))["states"]
    except Exception as exc:  # noqa: BLE001 - report which checkpoint is unusable
        raise MeasurementError(
            f"{path}: cannot read the checkpointed states ({exc}); delete the job dir to restart"
        ) from exc


# ---------------------------------------------------------------------------------------------
# Candidate sets


@dataclass(frozen=True)
class CandidateSet:
    """Configs measured per linear kind, and the joint EXL2 rows per module."""

    per_kind: dict[str, list[QParams]]
    attn_rows: list[dict[str, QParams]]
    mlp_rows: list[dict[str, QParams]]

    def for_group(self, kinds: Sequence[str]) -> list[QParams]:
        """Union (first-seen order) of the members' candidates, so a fused group can be tied."""
        seen: dict[str, QParams] = {}
        for kind in kinds:
            if kind not in self.per_kind:
                raise MeasurementError(
                    f"no candidate configs for linear kind {kind!r} "
                    f"(known: {', '.join(sorted(self.per_kind))})"
                )
            for q in self.per_kind[kind]:
                seen.setdefault(_config_key(q), q)
        return list(seen.values())

    def digest(self) -> str:
        obj = {
            "per_kind": {k: [_config_dict(q) for q in v] for k, v in self.per_kind.items()},
            "attn": [{k: _config_dict(q) for k, q in row.items()} for row in self.attn_rows],
            "mlp": [{k: _config_dict(q) for k, q in row.items()} for row in self.mlp_rows],
        }
        return hashlib.sha256(_canonical(obj)).hexdigest()


def default_candidates(
    overrides: Mapping[str, Sequence[QParams]] | None = None,
) -> CandidateSet:
    """EXL2's per-matrix sets and joint tables; ``overrides`` replaces the set of given kinds."""
    from exl2rs import qparams

    per_kind = {k: list(qparams.candidates(k)) for k in (*ATTN_KINDS, *MLP_KINDS)}
    for kind, configs in (overrides or {}).items():
        if not configs:
            raise MeasurementError(f"candidate set for {kind!r} is empty")
        per_kind[kind] = list(configs)
    return CandidateSet(per_kind, list(qparams.attn_table()), list(qparams.mlp_table()))


# ---------------------------------------------------------------------------------------------
# One module (attention or MLP) of one layer


@dataclass(frozen=True)
class _Linear:
    full_name: str  # model.layers.0.self_attn.q_proj
    rel_name: str  # self_attn.q_proj (inside the block)
    kind: str  # EXL2's name: q_proj … down_proj
    module: str  # self_attn


@dataclass(frozen=True)
class _Group:
    """Linears reading one input: one Hessian, one factorisation."""

    shared_input: str  # model.layers.0.self_attn.qkv
    members: tuple[_Linear, ...]


@dataclass(frozen=True)
class _Module:
    kind: str  # "self_attn" | "mlp" (EXL2's module kinds)
    full_name: str  # model.layers.0.self_attn
    groups: tuple[_Group, ...]

    @property
    def linears(self) -> list[_Linear]:
        return [lin for g in self.groups for lin in g.members]


def _layer_plan(adapter: Any, layer: int) -> list[_Module]:
    """Attention then MLP of ``layer``, their linears under EXL2's kind names, grouped by input."""
    base = adapter.layer_name(layer)
    plan = []
    for kind, sub, names, exl2_names in (
        ("self_attn", adapter.attn_module, adapter.attn_linears, ATTN_KINDS),
        ("mlp", adapter.mlp_module, adapter.mlp_linears, MLP_KINDS),
    ):
        if len(names) != len(exl2_names):
            raise UnsupportedArchitectureError(
                f"{adapter.family}: {sub} has linears {list(names)}; measurement needs the "
                f"{len(exl2_names)} of EXL2's {kind} ({', '.join(exl2_names)})"
            )
        to_kind = dict(zip(names, exl2_names, strict=True))
        groups = []
        for g in adapter.groups:
            if g.module != sub:
                continue
            members = tuple(
                _Linear(f"{base}.{sub}.{n}", f"{sub}.{n}", to_kind[n], sub) for n in g.linears
            )
            groups.append(_Group(f"{base}.{sub}.{g.name}", members))
        plan.append(_Module(kind, f"{base}.{sub}", tuple(groups)))
    return plan


def _weight(block: torch.nn.Module, rel_name: str) -> torch.Tensor:
    w = block.get_submodule(rel_name).weight
    if not isinstance(w, torch.Tensor):
        raise ModelError(f"{rel_name}: no weight tensor in the decoder block")
    return w


class _HessianHook:
    """Forward pre-hook that accumulates the input of one linear into a Hessian."""

    def __init__(self, hessian: gptq.Hessian) -> None:
        self.hessian = hessian

    def __call__(self, _module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self.hessian.add(args[0].detach())


def _relative_error(y_q: torch.Tensor, y_ref: torch.Tensor) -> float:
    """mean over calibration rows of ‖y_q − y_ref‖_F / ‖y_ref‖_F (fp64 sums)."""
    num = (y_q.to(torch.float64) - y_ref.to(torch.float64)).flatten(1).norm(dim=1)
    den = y_ref.to(torch.float64).flatten(1).norm(dim=1).clamp_min(1e-30)
    return float((num / den).mean())


def module_subset(states: torch.Tensor, module_tokens: int | None, kind: str) -> torch.Tensor:
    """The fixed token subset of ``states [rows, length, hidden]`` the joint rows are scored on.

    Every row keeps ``ceil(module_tokens / rows)`` tokens: for attention a prefix (causal, so the
    prefix's outputs need no later token), for the MLP (per-token) positions spread evenly over
    the whole row. ``None`` or a budget covering everything keeps all tokens.
    """
    rows, length = int(states.shape[0]), int(states.shape[1])
    if module_tokens is None or module_tokens >= rows * length:
        return states
    per_row = min(length, max(1, -(-module_tokens // rows)))
    if kind == "self_attn":
        return states[:, :per_row].contiguous()
    pos = torch.linspace(0, length - 1, per_row, dtype=torch.float64).round().to(torch.int64)
    return states[:, pos].contiguous()


def _reference_pass(
    *,
    block: torch.nn.Module,
    layer: int,
    module: _Module,
    states: torch.Tensor,
    forward: Callable[[torch.nn.Module, int, torch.Tensor], torch.Tensor],
    device: torch.device,
) -> tuple[torch.Tensor, dict[str, gptq.Hessian]]:
    """The module's reference output on all tokens, accumulating one Hessian per input group."""
    hessians: dict[str, gptq.Hessian] = {}
    with ExitStack() as stack:
        for group in module.groups:
            head = group.members[0]
            in_features = int(_weight(block, head.rel_name).shape[1])
            hess = gptq.Hessian(in_features, name=group.shared_input, device=device)
            hessians[group.shared_input] = hess
            stack.enter_context(_hooked(block.get_submodule(head.rel_name), _HessianHook(hess)))
        with torch.no_grad():
            y_ref = forward(block, layer, states)
    gptq._check_finite(y_ref, f"{module.full_name}: reference output")
    return y_ref, hessians


def _quantize_module(
    *,
    block: torch.nn.Module,
    layer: int,
    module: _Module,
    table: list[dict[str, QParams]],
    cands: CandidateSet,
    sub_states: torch.Tensor,
    y_ref_sub: torch.Tensor | None,
    hessians: Mapping[str, gptq.Hessian],
    forward: Callable[[torch.nn.Module, int, torch.Tensor], torch.Tensor],
    config_index: Callable[[QParams], int],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """GPTQ of every linear × candidate and the joint rows; returns linear and module records.

    The joint rows are scored on ``sub_states`` (the :func:`module_subset` of the module input)
    against ``y_ref_sub``, its reference output (computed here when None). Touches only this
    module's weights, restored before returning.
    """
    module_full = module.full_name
    # Quantize every linear to every candidate of its input group (union over fused members).
    weights: dict[str, torch.Tensor] = {}
    # Compact candidates (uint8 codes, ~1 byte per weight), dequantized when a joint row needs
    # one: holding every fp32 candidate of a module costs 4 bytes per weight and config.
    fake: dict[tuple[str, str], gptq.CompactResult] = {}
    records: list[dict[str, Any]] = []
    for group in module.groups:
        hess = hessians[group.shared_input]
        prepared = gptq.prepare(hess)
        configs = cands.for_group([m.kind for m in group.members])
        for lin in group.members:
            w = _weight(block, lin.rel_name).detach().to(torch.float32)
            weights[lin.kind] = w.clone()
            results = gptq.quantize_many_compact(w, prepared, configs, name=lin.full_name)
            out_f, in_f = int(w.shape[0]), int(w.shape[1])
            options = []
            for q, res in zip(configs, results, strict=True):
                fake[(lin.kind, _config_key(q))] = res
                options.append(
                    {
                        "config": config_index(q),
                        "bits": int(q.total_bits(in_f, out_f)),
                        "err": res.err,
                    }
                )
            records.append(
                {
                    "name": lin.full_name,
                    "layer": layer,
                    "module": lin.module,
                    "kind": lin.kind,
                    "in_features": in_f,
                    "out_features": out_f,
                    "shared_input": group.shared_input,
                    "ref_energy": gptq.weighted_error(w, prepared.hessian),
                    "samples": hess.count,
                    "options": options,
                }
            )
        del prepared

    # EXL2's joint rows on a fixed token subset of the same reference inputs; the subset's
    # reference output comes from the same forward, so only quantization differs.
    if y_ref_sub is None:
        with torch.no_grad():
            y_ref_sub = forward(block, layer, sub_states)
    by_kind = {lin.kind: lin for lin in module.linears}
    rows_out: list[dict[str, Any]] = []
    loaded: dict[str, tuple[str, str]] = {}  # kind -> candidate now in the block's weight
    try:
        for row in table:
            missing = [k for k in row if k not in by_kind]
            if missing:
                raise MeasurementError(
                    f"{module_full}: table row names {missing}, module has {sorted(by_kind)}"
                )
            total = 0
            for kind, q in row.items():
                dst = _weight(block, by_kind[kind].rel_name)
                key = (kind, _config_key(q))
                if key not in fake:
                    raise MeasurementError(
                        f"{by_kind[kind].full_name}: table config {q.desc} is not among the "
                        "measured candidates (a custom candidate set must keep the table configs)"
                    )
                if loaded.get(kind) != key:  # consecutive rows often share a config
                    with torch.no_grad():
                        dst.copy_(gptq.dequantize(fake[key]).to(dst.dtype))
                    loaded[kind] = key
                out_f, in_f = dst.shape
                total += int(q.total_bits(int(in_f), int(out_f)))
            with torch.no_grad():
                y_q = forward(block, layer, sub_states)
            accuracy = max(1e-6, 1.0 - _relative_error(y_q, y_ref_sub))
            rows_out.append(
                {
                    "accuracy": accuracy,
                    "total_bits": total,
                    "configs": {kind: config_index(q) for kind, q in row.items()},
                }
            )
    finally:
        for kind, w in weights.items():
            dst = _weight(block, by_kind[kind].rel_name)
            with torch.no_grad():
                dst.copy_(w.to(dst.dtype))
    if rows_out and max(r["accuracy"] for r in rows_out) < MIN_BEST_ACCURACY:
        raise MeasurementError(
            f"{module_full}: best table row has accuracy "
            f"{max(r['accuracy'] for r in rows_out):.4g} < {MIN_BEST_ACCURACY}: the module output "
            "is unstable (overflow or a broken forward)"
        )
    return records, {"name": module_full, "kind": module.kind, "rows": rows_out}


class _hooked:
    def __init__(self, module: torch.nn.Module, hook: _HessianHook) -> None:
        self.module = module
        self.hook = hook

    def __enter__(self) -> None:
        self.handle = self.module.register_forward_pre_hook(self.hook)

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


# ---------------------------------------------------------------------------------------------
# Concurrency: the reference chain in the calling process, quantization tasks in workers


@dataclass(frozen=True)
class _Task:
    """What a worker needs to quantize one module: everything else it reloads itself.

    Only the joint rows' token subset of the module input travels (and the full reference
    output only when the subset is everything), plus the Hessian sums: a few MiB per task.
    """

    layer: int
    module_index: int  # in ``_layer_plan``: 0 attention, 1 MLP
    sub_states: torch.Tensor
    y_ref: torch.Tensor | None  # its reference output when ``sub_states`` is all tokens
    hessians: dict[str, tuple[torch.Tensor, int]]  # shared input -> (Σ x xᵀ, tokens)


@dataclass(frozen=True)
class _Setup:
    """Per-run constants, sent once to each worker."""

    cands: CandidateSet
    index: dict[str, int]
    threads: int


def _run_task(
    sm: Any, block: torch.nn.Module, setup: _Setup, task: _Task
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    module = _layer_plan(sm.adapter, task.layer)[task.module_index]
    attn = module.kind == "self_attn"
    hessians = {}
    for name, (total, count) in task.hessians.items():
        hess = gptq.Hessian(int(total.shape[0]), name=name, device=total.device)
        hess.sum, hess.count = total, count
        hessians[name] = hess

    def config_index(q: QParams) -> int:
        # Read-only: every measured or table config is a candidate, indexed before the run.
        key = _config_key(q)
        if key not in setup.index:
            raise MeasurementError(f"config {q.desc} is not in the candidate table")
        return setup.index[key]

    return _quantize_module(
        block=block,
        layer=task.layer,
        module=module,
        table=setup.cands.attn_rows if attn else setup.cands.mlp_rows,
        cands=setup.cands,
        sub_states=task.sub_states,
        y_ref_sub=task.y_ref,
        hessians=hessians,
        forward=sm.attn_forward if attn else sm.mlp_forward,
        config_index=config_index,
    )


def _send(stream: Any, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)))
    stream.write(data)
    stream.flush()


def _recv(stream: Any) -> Any:
    head = stream.read(8)
    if len(head) < 8:
        raise EOFError
    (size,) = struct.unpack("<Q", head)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError
    return pickle.loads(data)


def _worker_main() -> None:
    """A worker process: one setup frame on stdin, then tasks until EOF (its parent is gone)."""
    from exl2rs.streaming import StreamingModel

    # Frames go to the original stdout; anything printed by libraries goes to stderr.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    inp = sys.stdin.buffer
    try:
        model_dir, device, setup = _recv(inp)
    except EOFError:
        return
    torch.set_num_threads(setup.threads)
    sm = StreamingModel(model_dir, device=device)
    while True:
        try:
            task = _recv(inp)
        except EOFError:
            return
        try:
            reply: tuple[str, Any] = ("ok", _run_task(sm, sm.load_block(task.layer), setup, task))
        except Exception as exc:  # noqa: BLE001 - sent back and re-raised in the parent
            reply = ("err", exc)
        try:
            _send(out, reply)
        except BrokenPipeError:
            return


class _ProcessPool(Executor):
    """``workers`` Python processes running :func:`_run_task` on pickled :class:`_Task` s.

    Plain subprocesses talking over their stdin/stdout rather than ``multiprocessing``, which
    would re-import the caller's ``__main__`` (a script without a main guard breaks), and
    rather than threads, whose GIL hand-offs stall GPTQ's many small ops. A worker whose parent
    dies sees EOF on stdin and exits.
    """

    def __init__(self, workers: int, model_dir: Path, device: str, setup: _Setup) -> None:
        from concurrent.futures import ThreadPoolExecutor

        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        cmd = [sys.executable, "-c", "from exl2rs.measure import _worker_main; _worker_main()"]
        self.procs = [
            subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
            for _ in range(workers)
        ]
        self.free: queue.Queue[subprocess.Popen[bytes]] = queue.Queue()
        for proc in self.procs:
            _send(proc.stdin, (model_dir, device, setup))
            self.free.put(proc)
        self.threads = ThreadPoolExecutor(max_workers=workers)

    def _call(self, task: _Task) -> Any:
        proc = self.free.get()
        try:
            _send(proc.stdin, task)
            status, value = _recv(proc.stdout)
        except (EOFError, OSError) as exc:
            code = proc.poll()
            raise MeasurementError(
                f"measurement worker {proc.pid} exited unexpectedly (exit code {code}) during "
                f"layer {task.layer}; its stderr says why"
            ) from exc
        finally:
            # Back even when dead, so queued tasks fail fast instead of waiting forever.
            self.free.put(proc)
        if status == "err":
            raise value
        return value

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        if fn is not _run_task or kwargs:
            raise TypeError("_ProcessPool runs _run_task(sm, block, setup, task) only")
        return self.threads.submit(self._call, args[3])

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.threads.shutdown(wait=wait, cancel_futures=cancel_futures)
        for proc in self.procs:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass
class _PendingLayer:
    layer: int
    futures: list[Future[tuple[list[dict[str, Any]], dict[str, Any]]]]
    states_after: torch.Tensor


class _InlineExecutor(Executor):
    """Runs each task at submission (``workers=1``): the sequential schedule, same results."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - re-raised by result(), in layer order
            fut.set_exception(exc)
        return fut


# ---------------------------------------------------------------------------------------------
# The job directory


def _job_header(
    model_h: str,
    cal_h: str,
    cand_h: str,
    rows: int,
    length: int,
    num_layers: int,
    module_tokens: int | None,
) -> dict[str, Any]:
    return {
        "format": JOB_FORMAT,
        "version": VERSION,
        "model_hash": model_h,
        "calibration_hash": cal_h,
        "candidates_hash": cand_h,
        "rows": rows,
        "length": length,
        "num_layers": num_layers,
        "module_tokens": module_tokens,
    }


def _read_job(job_dir: Path, header: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint to resume from, or None for a fresh start; refuses a foreign job."""
    path = job_dir / "job.json"
    if not path.exists():
        return None
    try:
        job = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MeasurementError(
            f"{path}: unreadable job file ({exc}); delete the job dir to restart"
        ) from exc
    if not isinstance(job, dict) or job.get("format") != JOB_FORMAT:
        raise MeasurementError(f"{path}: not an exl2rs measurement job file")
    for key, value in header.items():
        if job.get(key) != value:
            what = key.replace("_hash", "").replace("_", " ")
            raise MeasurementError(
                f"{job_dir}: job dir belongs to another measurement ({what} differs: job has "
                f"{str(job.get(key))[:16]!r}, this run {str(value)[:16]!r}); use another "
                "--job-dir or delete it"
            )
    return job


def _write_job(job_dir: Path, job: dict[str, Any]) -> None:
    atomic_write_bytes(job_dir / "job.json", _json_bytes(job))


# ---------------------------------------------------------------------------------------------
# Public entry point


def _check_tokens(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    if tokens.ndim != 2 or tokens.numel() == 0 or tokens.dtype.is_floating_point:
        raise CalibrationError(
            f"calibration tensor: expected integer token ids [rows, length], got "
            f"{tokens.dtype} {tuple(tokens.shape)}"
        )
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab:
        raise CalibrationError(
            f"calibration tensor: token ids span [{lo}, {hi}], vocabulary has {vocab}"
        )
    return tokens.to(torch.int64)


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _sensitivities(
    sm: StreamingModel,
    tokens: torch.Tensor,
    sensitivity_tokens: int,
    progress: bool,
    fisher: FisherKind,
    seed: int,
) -> dict[str, float]:
    """Sensitivities from the first calibration rows holding ``sensitivity_tokens`` tokens."""
    from exl2rs.sensitivity import linear_sensitivities

    rows = tokens[: max(1, sensitivity_tokens // tokens.shape[1])]
    return linear_sensitivities(sm, rows, progress=progress, fisher=fisher, seed=seed)


def measure(
    model_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    calibration: str | os.PathLike[str] | torch.Tensor = "default",
    rows: int = 16,
    length: int = 2048,
    device: str | torch.device | None = None,
    job_dir: str | os.PathLike[str] | None = None,
    candidates: Mapping[str, Sequence[QParams]] | None = None,
    write_exllamav2: str | os.PathLike[str] | None = None,
    seed: int = 0,
    progress: bool = True,
    threads: int | None = None,
    on_layer_done: Callable[[int], None] | None = None,
    module_tokens: int | None = DEFAULT_MODULE_TOKENS,
    workers: int | None = None,
    sensitivity_tokens: int | None = DEFAULT_SENSITIVITY_TOKENS,
    fisher: FisherKind = DEFAULT_FISHER,
) -> Path:
    """Measure ``model_dir`` and write the native measurement file to ``out_path``.

    ``calibration`` is a source for :func:`exl2rs.calibration.load_rows` (``rows`` × ``length``
    tokens), or token ids ``LongTensor[rows, length]`` used as given.

    ``candidates`` replaces the config set of the named linear kinds (default: EXL2's per-matrix
    sets). ``write_exllamav2`` also writes exllamav2's ``measurement.json`` (converted in Python
    from the native object). The job dir (default ``<out_path>.job``) holds the per-layer
    checkpoint; a rerun with the same model, calibration and candidates resumes from it.
    ``threads`` sets torch's CPU threads for the run (restored after): on a shared machine one
    thread avoids the thread-pool stalls that make small ops orders of magnitude slower.
    ``workers`` is how many quantization tasks (GPTQ of a module's linears × candidates, then
    its joint rows) run on worker threads beside the reference forward chain, which stays on the
    calling thread and runs at most one layer ahead. Default: 1 on CUDA; on CPU 2 when there are
    at least 2 cores, and then ``threads`` defaults to ``cores // 3`` (at least 1) — GPTQ's many
    small ops gain nothing from torch's intra-op pool (slower with 2 threads even on an idle
    machine), while independent tasks on single-threaded torch scale with cores. The file is
    identical for every ``workers`` / ``threads`` choice on one machine.
    ``on_layer_done(i)`` runs after layer ``i`` is checkpointed.

    Sensitivities (:mod:`exl2rs.sensitivity`, the default allocation objective's per-linear
    weights) come from one streamed forward + backward pass over the first calibration rows
    holding about ``sensitivity_tokens`` tokens (at least one row), after the last layer;
    ``None`` skips them (the allocator then falls back to relative errors). ``fisher`` picks
    the estimator (:func:`exl2rs.sensitivity.linear_sensitivities`; labels drawn with ``seed``).

    Token budget: Hessians and the reference forward (which produces the next layer's states) use
    every calibration token. The joint table rows (19 attention + 17 MLP module forwards per
    layer, used only for exllamav2's ``accuracy`` = 1 − mean relative output error) are scored on
    a fixed subset of about ``module_tokens`` tokens (:func:`module_subset`: an attention prefix /
    evenly spread MLP positions in every row); ``None`` scores them on all tokens. At 16 × 2048
    those forwards are ~3 TFLOP per layer on all tokens — most of a CPU run. Checked on SmolLM2
    layers 0-1 (benches/RESULTS.md, "Full measurement"): the subset keeps every module's row
    order; MLP accuracies move by ≤ 0.006 (mean 0.0008, unbiased), attention accuracies read
    0.002-0.003 lower on average (≤ 0.006; early positions carry relatively more error).
    """
    if module_tokens is not None and module_tokens < 1:
        raise ValueError(f"module_tokens must be positive or None, got {module_tokens}")
    if sensitivity_tokens is not None and sensitivity_tokens < 1:
        raise ValueError(f"sensitivity_tokens must be positive or None, got {sensitivity_tokens}")
    dev = torch.device(device if device is not None else _default_device())
    cores = os.cpu_count() or 1
    if workers is None:
        workers = 2 if dev.type == "cpu" and cores >= 2 else 1
    if workers < 1:
        raise ValueError(f"workers must be positive, got {workers}")
    if threads is None and workers > 1 and dev.type == "cpu":
        threads = max(1, cores // (workers + 1))
    saved_threads = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be positive, got {threads}")
        torch.set_num_threads(threads)
    try:
        return _measure(
            Path(model_dir),
            Path(out_path),
            calibration=calibration,
            rows=rows,
            length=length,
            device=dev,
            job_dir=job_dir,
            candidates=candidates,
            write_exllamav2=write_exllamav2,
            seed=seed,
            progress=progress,
            on_layer_done=on_layer_done,
            module_tokens=module_tokens,
            workers=workers,
            sensitivity_tokens=sensitivity_tokens,
            fisher=fisher,
        )
    finally:
        torch.set_num_threads(saved_threads)


def _measure(
    model_dir: Path,
    out_path: Path,
    *,
    calibration: str | os.PathLike[str] | torch.Tensor,
    rows: int,
    length: int,
    device: torch.device,
    job_dir: str | os.PathLike[str] | None,
    candidates: Mapping[str, Sequence[QParams]] | None,
    write_exllamav2: str | os.PathLike[str] | None,
    seed: int,
    progress: bool,
    on_layer_done: Callable[[int], None] | None,
    module_tokens: int | None,
    workers: int,
    sensitivity_tokens: int | None,
    fisher: FisherKind,
) -> Path:
    from tqdm.auto import tqdm

    from exl2rs.streaming import StreamingModel

    if rows <= 0 or length <= 0:
        raise CalibrationError(f"rows and length must be positive, got {rows} x {length}")
    dev = device
    torch.manual_seed(seed)
    sm = StreamingModel(model_dir, device=str(dev))
    if isinstance(calibration, torch.Tensor):
        tokens = _check_tokens(calibration, int(sm.config.vocab_size))
        rows, length = int(tokens.shape[0]), int(tokens.shape[1])
        source = "tensor"
    else:
        from exl2rs.calibration import load_rows

        tokens = load_rows(
            calibration if isinstance(calibration, str) else Path(calibration),
            sm.tokenizer,
            rows,
            length,
            seed=seed,
        )
        source = str(calibration)
    cands = default_candidates(candidates)
    num_layers = int(sm.num_layers)
    header = _job_header(
        model_hash(model_dir),
        _tokens_hash(tokens),
        cands.digest(),
        rows,
        length,
        num_layers,
        module_tokens,
    )
    job_path = Path(job_dir) if job_dir is not None else out_path.with_name(out_path.name + ".job")
    job_path.mkdir(parents=True, exist_ok=True)
    job = _read_job(job_path, header)

    # Global config table in first-use order (deterministic: candidate-set order).
    configs: list[dict[str, Any]] = []
    index: dict[str, int] = {}
    for kind in (*ATTN_KINDS, *MLP_KINDS):
        for q in cands.per_kind.get(kind, []):
            key = _config_key(q)
            if key not in index:
                index[key] = len(configs)
                configs.append(_config_dict(q))

    if job is None:
        states = sm.embed(tokens).to(torch.float32)
        linears_out: list[dict[str, Any]] = []
        modules_out: list[dict[str, Any]] = []
        start_layer = 0
    else:
        start_layer = int(job["next_layer"])
        linears_out = job["linears"]
        modules_out = job["modules"]
        configs[:] = job["configs"]
        index.clear()
        index.update({_canonical(c).decode(): i for i, c in enumerate(configs)})
        states = _load_states(job_path / job["states"])

    sens: dict[str, float] | None = None
    bar = tqdm(
        total=num_layers, initial=start_layer, desc="measure", unit="layer", disable=not progress
    )
    setup = _Setup(cands, dict(index), torch.get_num_threads())
    pool: Executor
    if workers == 1:
        pool = _InlineExecutor()
    else:
        pool = _ProcessPool(workers, model_dir, str(dev), setup)
    # Layers whose quantization tasks are in flight, oldest first: the reference chain runs at
    # most one layer ahead of the oldest unfinished layer, so residency stays bounded by width.
    pending: deque[_PendingLayer] = deque()
    t_last = time.perf_counter()
    try:
        for layer in range(start_layer, num_layers):
            block = sm.load_block(layer)
            futures: list[Future[tuple[list[dict[str, Any]], dict[str, Any]]]] = []
            for mi, module in enumerate(_layer_plan(sm.adapter, layer)):
                attn = module.kind == "self_attn"
                y_ref, hessians = _reference_pass(
                    block=block,
                    layer=layer,
                    module=module,
                    states=states,
                    forward=sm.attn_forward if attn else sm.mlp_forward,
                    device=dev,
                )
                sub = module_subset(states, module_tokens, module.kind)
                task = _Task(
                    layer=layer,
                    module_index=mi,
                    sub_states=sub,
                    y_ref=y_ref if sub is states else None,
                    hessians={k: (h.sum, h.count) for k, h in hessians.items()},
                )
                futures.append(pool.submit(_run_task, sm, block, setup, task))
                states = y_ref
            del block
            pending.append(_PendingLayer(layer, futures, states))
            if layer == num_layers - 1 and sensitivity_tokens is not None:
                # The chain is done: the pass runs while the workers finish the last layers.
                sens = _sensitivities(sm, tokens, sensitivity_tokens, progress, fisher, seed)
            while pending and (len(pending) > 1 or layer == num_layers - 1):
                done = pending.popleft()
                for fut in done.futures:
                    recs, mod_rec = fut.result()
                    linears_out.extend(recs)
                    modules_out.append(mod_rec)
                states_name = f"states-{done.layer + 1:05d}.safetensors"
                _save_states(job_path / states_name, done.states_after)
                old = job["states"] if job is not None else None
                job = {
                    **header,
                    "next_layer": done.layer + 1,
                    "states": states_name,
                    "configs": configs,
                    "linears": linears_out,
                    "modules": modules_out,
                }
                _write_job(job_path, job)
                if old and old != states_name:
                    (job_path / old).unlink(missing_ok=True)
                now = time.perf_counter()
                bar.update(1)
                bar.set_postfix(layer=done.layer, s=f"{now - t_last:.1f}")
                t_last = now
                if on_layer_done is not None:
                    on_layer_done(done.layer)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()

    if sensitivity_tokens is not None and sens is None and (job or {}).get("sensitivity") != fisher:
        # Resumed after the chain (or checkpointed with the other estimator).
        sens = _sensitivities(sm, tokens, sensitivity_tokens, progress, fisher, seed)
    if sens is not None:
        for rec in linears_out:
            rec["sensitivity"] = sens[rec["name"]]
        if job is not None:  # checkpointed: a rerun after a kill goes straight to the file
            job = {**job, "linears": linears_out, "sensitivity": fisher}
            _write_job(job_path, job)

    cfg = sm.config
    arch = (getattr(cfg, "architectures", None) or [type(cfg).__name__])[0]
    native = {
        "format": FORMAT,
        "version": VERSION,
        "model": {
            "name": model_dir.name,
            "architecture": str(arch),
            "hash": header["model_hash"],
            "num_layers": num_layers,
        },
        "calibration": {
            "hash": header["calibration_hash"],
            "rows": rows,
            "length": length,
            "source": source,
        },
        "candidates_hash": header["candidates_hash"],
        "configs": configs,
        "linears": linears_out,
        "modules": modules_out,
    }
    # The Rust loader validates the file (config costs, indices, finiteness) before the atomic
    # write; exllamav2's measurement.json comes from the same validated object.
    measurement = Measurement.from_json(_json_bytes(native).decode())
    measurement.save(out_path)
    if write_exllamav2 is not None:
        measurement.write_exllamav2(Path(write_exllamav2))
    # The checkpoint is spent once the file is written.
    if job is not None:
        (job_path / job["states"]).unlink(missing_ok=True)
    (job_path / "job.json").unlink(missing_ok=True)
    try:
        job_path.rmdir()
    except OSError:
        pass
    return out_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-i", "--in-dir", dest="model", required=True, help="HF model folder")
    parser.add_argument("-o", "--out", dest="out", required=True, help="native measurement JSON")
    parser.add_argument(
        "-om",
        "--output-measurement",
        dest="exllamav2",
        default=None,
        help="also write exllamav2's measurement.json here",
    )
    parser.add_argument(
        "-c",
        "--cal-dataset",
        dest="calibration",
        default="default",
        help="calibration text/jsonl/parquet/npy/safetensors, or 'default' (built-in set)",
    )
    parser.add_argument("-mr", "--measurement-rows", dest="rows", type=int, default=16)
    parser.add_argument("-ml", "--measurement-length", dest="length", type=int, default=2048)
    parser.add_argument(
        "--device", default=None, help="torch device (default: cuda when present, else cpu)"
    )
    parser.add_argument(
        "--job-dir", default=None, help="checkpoint folder (default: <out>.job); reruns resume"
    )
    parser.add_argument(
        "--module-tokens",
        dest="module_tokens",
        type=int,
        default=DEFAULT_MODULE_TOKENS,
        help="calibration tokens the joint table rows (exllamav2's accuracy) are scored on: an "
        "attention prefix / spread MLP positions of every row; 0 = all tokens. Hessians and the "
        f"reference states always use all tokens (default {DEFAULT_MODULE_TOKENS})",
    )
    parser.add_argument(
        "--sensitivity-tokens",
        dest="sensitivity_tokens",
        type=int,
        default=DEFAULT_SENSITIVITY_TOKENS,
        help="calibration tokens (whole rows, at least one) of the sensitivity pass that weights "
        f"the default allocation objective; 0 = no sensitivities (default "
        f"{DEFAULT_SENSITIVITY_TOKENS})",
    )
    parser.add_argument(
        "--fisher",
        choices=FISHER_KINDS,
        default=DEFAULT_FISHER,
        help="sensitivity estimator: 'true' (labels drawn from the model: its Fisher, the "
        "second-order term of KL and of the loss) or 'empirical' (the text's next tokens) "
        f"(default {DEFAULT_FISHER})",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="quantization tasks run beside the reference chain (default: 2 on CPU, 1 on CUDA)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    try:
        path = measure(
            args.model,
            args.out,
            calibration=args.calibration,
            rows=args.rows,
            length=args.length,
            device=args.device,
            job_dir=args.job_dir,
            write_exllamav2=args.exllamav2,
            seed=args.seed,
            progress=not args.no_progress,
            threads=args.threads,
            module_tokens=args.module_tokens or None,
            workers=args.workers,
            sensitivity_tokens=args.sensitivity_tokens or None,
            fisher=args.fisher,
        )
    except Exl2Error as exc:
        print(f"exl2rs measure: error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0
