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
import importlib
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from exl2rs import gptq
from exl2rs.errors import (
    CalibrationError,
    Exl2Error,
    MeasurementError,
    ModelError,
    UnsupportedArchitectureError,
)

if TYPE_CHECKING:
    from exl2rs.qparams import QParams

__all__ = ["FORMAT", "VERSION", "add_arguments", "measure", "run", "to_exllamav2"]

FORMAT = "exl2rs.measurement"
VERSION = 1
JOB_FORMAT = "exl2rs.measure-job"
# Linears that read one input and therefore share a Hessian and its factorisation.
FUSED_KINDS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
)
ATTN_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_KINDS = ("gate_proj", "up_proj", "down_proj")
# exllamav2 aborts when the best row of a module is this inaccurate ("Measurement/inference error").
MIN_BEST_ACCURACY = 0.1


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


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via tmp file + fsync + os.replace."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


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
    kind: str  # q_proj
    module: str  # self_attn


def _shared_input_name(module_full: str, kinds: Sequence[str]) -> str:
    if len(kinds) == 1:
        return f"{module_full}.{kinds[0]}"
    short = [k.removesuffix("_proj") for k in kinds]
    joined = "".join(short) if all(len(s) == 1 for s in short) else "_".join(short)
    return f"{module_full}.{joined}"


def _input_groups(linears: Sequence[_Linear]) -> list[list[_Linear]]:
    """Linears of one module grouped by shared input: (q,k,v), (o), (gate,up), (down)."""
    by_kind = {lin.kind: lin for lin in linears}
    groups: list[list[_Linear]] = []
    used: set[str] = set()
    for fused in FUSED_KINDS:
        if all(k in by_kind for k in fused):
            groups.append([by_kind[k] for k in fused])
            used.update(fused)
    groups.extend([lin] for lin in linears if lin.kind not in used)
    order = {lin.kind: i for i, lin in enumerate(linears)}
    groups.sort(key=lambda g: order[g[0].kind])
    return groups


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


def _measure_module(
    *,
    sm: Any,
    block: torch.nn.Module,
    layer: int,
    module_full: str,
    module_kind: str,
    linears: list[_Linear],
    table: list[dict[str, QParams]],
    cands: CandidateSet,
    states: torch.Tensor,
    forward: Callable[[torch.nn.Module, int, torch.Tensor], torch.Tensor],
    config_index: Callable[[QParams], int],
    device: torch.device,
    tick: Callable[[str], None],
) -> tuple[torch.Tensor, list[dict[str, Any]], dict[str, Any]]:
    """Measure one module; returns its reference output, linear records and module record."""
    groups = _input_groups(linears)
    hessians: dict[str, gptq.Hessian] = {}
    with ExitStack() as stack:
        for group in groups:
            head = group[0]
            lin_mod = block.get_submodule(head.rel_name)
            in_features = int(_weight(block, head.rel_name).shape[1])
            hess = gptq.Hessian(
                in_features,
                name=_shared_input_name(module_full, [g.kind for g in group]),
                device=device,
            )
            hessians[head.kind] = hess
            stack.enter_context(_hooked(lin_mod, _HessianHook(hess)))
        with torch.no_grad():
            y_ref = forward(block, layer, states)
    gptq._check_finite(y_ref, f"{module_full}: reference output")
    tick(f"{module_kind} reference")

    # Quantize every linear to every candidate of its input group (union over fused members).
    weights: dict[str, torch.Tensor] = {}
    fake: dict[tuple[str, str], torch.Tensor] = {}
    records: list[dict[str, Any]] = []
    for group in groups:
        kinds = [g.kind for g in group]
        hess = hessians[group[0].kind]
        prepared = gptq.prepare(hess)
        configs = cands.for_group(kinds)
        for lin in group:
            w = _weight(block, lin.rel_name).detach().to(torch.float32)
            weights[lin.kind] = w.clone()
            results = gptq.quantize_many(w, prepared, configs, name=lin.full_name)
            out_f, in_f = int(w.shape[0]), int(w.shape[1])
            options = []
            for q, res in zip(configs, results, strict=True):
                fake[(lin.kind, _config_key(q))] = res.weight
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
                    "shared_input": hess.name,
                    "ref_energy": gptq.weighted_error(w, prepared.hessian),
                    "samples": hess.count,
                    "options": options,
                }
            )
            tick(f"{lin.kind} x{len(configs)}")
        del prepared

    # EXL2's joint rows on the same reference inputs.
    by_kind = {lin.kind: lin for lin in linears}
    rows_out: list[dict[str, Any]] = []
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
                with torch.no_grad():
                    dst.copy_(fake[key].to(dst.dtype))
                out_f, in_f = dst.shape
                total += int(q.total_bits(int(in_f), int(out_f)))
            with torch.no_grad():
                y_q = forward(block, layer, states)
            accuracy = max(1e-6, 1.0 - _relative_error(y_q, y_ref))
            rows_out.append(
                {
                    "accuracy": accuracy,
                    "total_bits": total,
                    "configs": {kind: config_index(q) for kind, q in row.items()},
                }
            )
            tick(f"{module_kind} row")
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
    return y_ref, records, {"name": module_full, "kind": module_kind, "rows": rows_out}


class _hooked:
    def __init__(self, module: torch.nn.Module, hook: _HessianHook) -> None:
        self.module = module
        self.hook = hook

    def __enter__(self) -> None:
        self.handle = self.module.register_forward_pre_hook(self.hook)

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def _layer_linears(sm: Any, layer: int) -> dict[str, list[_Linear]]:
    """The layer's linears by module name ("self_attn", "mlp"), in the adapter's order."""
    names: list[str] = list(sm.linear_names(layer))
    out: dict[str, list[_Linear]] = {}
    marker = f".{layer}."
    for full in names:
        prefix_end = full.find(marker)
        if prefix_end < 0:
            raise ModelError(f"{full}: linear name lacks the layer index {layer}")
        rel = full[prefix_end + len(marker) :]
        parts = rel.split(".")
        lin = _Linear(full, rel, parts[-1], ".".join(parts[:-1]))
        out.setdefault(lin.module, []).append(lin)
    return out


def _module_kind(linears: Sequence[_Linear]) -> str:
    kinds = {lin.kind for lin in linears}
    if kinds <= set(ATTN_KINDS):
        return "self_attn"
    if kinds <= set(MLP_KINDS):
        return "mlp"
    raise UnsupportedArchitectureError(
        f"module {linears[0].module!r} has linears {sorted(kinds)}; measurement knows attention "
        f"{ATTN_KINDS} and MLP {MLP_KINDS}"
    )


# ---------------------------------------------------------------------------------------------
# The job directory


def _job_header(
    model_h: str, cal_h: str, cand_h: str, rows: int, length: int, num_layers: int
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


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def measure(
    model_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    calibration: str | os.PathLike[str] = "default",
    rows: int = 16,
    length: int = 2048,
    device: str | torch.device | None = None,
    job_dir: str | os.PathLike[str] | None = None,
    candidates: Mapping[str, Sequence[QParams]] | None = None,
    write_exllamav2: str | os.PathLike[str] | None = None,
    seed: int = 0,
    progress: bool = True,
    on_layer_done: Callable[[int], None] | None = None,
) -> Path:
    """Measure ``model_dir`` and write the native measurement file to ``out_path``.

    ``candidates`` replaces the config set of the named linear kinds (default: EXL2's per-matrix
    sets). ``write_exllamav2`` also writes exllamav2's ``measurement.json`` (converted in Python
    from the native object). The job dir (default ``<out_path>.job``) holds the per-layer
    checkpoint; a rerun with the same model, calibration and candidates resumes from it.
    ``on_layer_done(i)`` runs after layer ``i`` is checkpointed.
    """
    from tqdm.auto import tqdm

    from exl2rs.calibration import load_rows
    from exl2rs.streaming import StreamingModel

    model_dir = Path(model_dir)
    out_path = Path(out_path)
    if rows <= 0 or length <= 0:
        raise CalibrationError(f"rows and length must be positive, got {rows} x {length}")
    dev = torch.device(device if device is not None else _default_device())
    torch.manual_seed(seed)
    sm = StreamingModel(model_dir, device=str(dev))
    tokens = load_rows(calibration, sm.tokenizer, rows, length, seed=seed)
    cands = default_candidates(candidates)
    num_layers = int(sm.num_layers)
    header = _job_header(
        model_hash(model_dir), _tokens_hash(tokens), cands.digest(), rows, length, num_layers
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

    def config_index(q: QParams) -> int:
        key = _config_key(q)
        if key not in index:
            index[key] = len(configs)
            configs.append(_config_dict(q))
        return index[key]

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

    bar = tqdm(
        total=num_layers, initial=start_layer, desc="measure", unit="layer", disable=not progress
    )
    try:
        for layer in range(start_layer, num_layers):
            t0 = time.perf_counter()
            block = sm.load_block(layer)
            by_module = _layer_linears(sm, layer)
            steps = sum(
                len(cands.for_group([g.kind for g in grp]))
                for lins in by_module.values()
                for grp in _input_groups(lins)
            )
            inner = tqdm(total=steps, desc=f"layer {layer}", leave=False, disable=not progress)

            def tick(what: str, inner: Any = inner) -> None:
                inner.set_postfix_str(what, refresh=False)
                inner.update(0)

            for module_name, lins in by_module.items():
                kind = _module_kind(lins)
                module_full = lins[0].full_name.rsplit(".", 1)[0]
                forward = sm.attn_forward if kind == "self_attn" else sm.mlp_forward
                table = cands.attn_rows if kind == "self_attn" else cands.mlp_rows
                states, recs, mod = _measure_module(
                    sm=sm,
                    block=block,
                    layer=layer,
                    module_full=module_full,
                    module_kind=kind,
                    linears=lins,
                    table=table,
                    cands=cands,
                    states=states,
                    forward=forward,
                    config_index=config_index,
                    device=dev,
                    tick=tick,
                )
                del module_name
                linears_out.extend(recs)
                modules_out.append(mod)
                inner.update(sum(len(r["options"]) for r in recs))
            inner.close()
            del block
            states_name = f"states-{layer + 1:05d}.safetensors"
            _save_states(job_path / states_name, states)
            old = job["states"] if job is not None else None
            job = {
                **header,
                "next_layer": layer + 1,
                "states": states_name,
                "configs": configs,
                "linears": linears_out,
                "modules": modules_out,
            }
            _write_job(job_path, job)
            if old and old != states_name:
                (job_path / old).unlink(missing_ok=True)
            bar.update(1)
            bar.set_postfix(layer=layer, s=f"{time.perf_counter() - t0:.1f}")
            if on_layer_done is not None:
                on_layer_done(layer)
    finally:
        bar.close()

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
            "source": str(calibration),
        },
        "candidates_hash": header["candidates_hash"],
        "configs": configs,
        "linears": linears_out,
        "modules": modules_out,
    }
    _save_native(native, out_path)
    if write_exllamav2 is not None:
        atomic_write_bytes(Path(write_exllamav2), _json_bytes(to_exllamav2(native)))
    # The checkpoint is spent once the file is written.
    if job is not None:
        (job_path / job["states"]).unlink(missing_ok=True)
    (job_path / "job.json").unlink(missing_ok=True)
    try:
        job_path.rmdir()
    except OSError:
        pass
    return out_path


def _save_native(native: dict[str, Any], path: Path) -> None:
    # The lead's Rust-validated writer, once it exists; plain atomic JSON until then.
    try:
        measurement_io = importlib.import_module("exl2rs.measurement_io")
    except ImportError:
        atomic_write_bytes(path, _json_bytes(native))
        return
    measurement_io.save_native(native, path)


def _qparams_from_native(c: dict[str, Any]) -> dict[str, Any]:
    """exllamav2's QParams dict ({"group_size": {"4": 128}, ...}) from a native config entry."""
    return {
        "group_size": {str(b): int(g) for b, g in zip(c["bits"], c["group_size"], strict=True)},
        "bits": [int(b) for b in c["bits"]],
        "bits_prop": [float(p) for p in c["bits_prop"]],
        "scale_bits": int(c["scale_bits"]),
    }


def to_exllamav2(native: Mapping[str, Any]) -> dict[str, Any]:
    """exllamav2's ``measurement.json`` object (its §3.3 form) from a native measurement."""
    configs = native["configs"]
    out: dict[str, Any] = {}
    for mod in native["modules"]:
        rows = []
        for row in mod["rows"]:
            entry: dict[str, Any] = {"accuracy": row["accuracy"], "total_bits": row["total_bits"]}
            for kind, idx in row["configs"].items():
                entry[kind] = _qparams_from_native(configs[idx])
            rows.append(entry)
        out[mod["name"]] = rows
    # exllamav2 indexes modules as embedding, (attn, mlp) per layer, final norm, head.
    return {"measurement": out, "last_module_idx": 2 * int(native["model"]["num_layers"]) + 1}


# ---------------------------------------------------------------------------------------------
# CLI


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
    parser.add_argument("--seed", type=int, default=0)
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
        )
    except Exl2Error as exc:
        print(f"exl2rs measure: error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0
