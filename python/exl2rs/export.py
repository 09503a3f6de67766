"""Compile the EXL2 model directory from the quantize pass's ``out_tensor`` folder.

Layout (what exllamav2 0.3.2's ``compile.py`` writes, plus what transformers needs):

* shards ``output.safetensors`` or ``output-0000i-of-0000N.safetensors`` of at most ``shard_mb``
  MiB each (0 = one shard), every shard with ``__metadata__ = {"format": "pt"}``, and
  ``model.safetensors.index.json`` (exllamav2 writes neither the metadata nor the index; both are
  harmless to it);
* per quantized linear ``<prefix>.q_weight / q_scale / q_scale_max / q_groups / q_invperm /
  q_perm`` (+ ``bias`` fp16); every other source tensor (embeddings, norms) as float16 under its
  source name; the head as ``lm_head.q_*`` when it was quantized, also for tied embeddings (as
  exllamav2 does: its ``lm_head`` module reads the tied embedding weight and is quantized like
  any other linear);
* ``config.json`` = the source config + ``quantization_config``; every other non-weight file of the
  source copied; ``exl2rs_strategy.json`` and the measurement files beside.

The directory is built in a temporary sibling, fsynced and renamed into place, so an interrupted
compile never leaves a half directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from exl2rs.errors import Exl2Error, ModelError

__all__ = [
    "EXL2_VERSION",
    "ExportError",
    "ExportResult",
    "STRATEGY_FILE",
    "compile_exl2",
    "strategy_document",
]

EXL2_VERSION = "0.3.2"  # the exllamav2 format version the directory follows
STRATEGY_FILE = "exl2rs_strategy.json"
INDEX_FILE = "model.safetensors.index.json"
MARKER_KEY = "quantizer"
Q_SUFFIXES = ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm", "q_perm", "bias")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


class ExportError(Exl2Error):
    """The EXL2 directory cannot be compiled (missing tensors, target in the way, ...)."""


@dataclass(frozen=True)
class ExportResult:
    path: Path
    shards: list[str]
    tensor_bytes: int  # bytes of tensor data (what -ss counts)
    file_bytes: int  # bytes of all files written


def strategy_document(
    bits: float,
    linears: Sequence[Mapping[str, Any]],
    head: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """``exl2rs_strategy.json``: per linear its config, exact bits and bpw."""
    entry = {
        str(r["name"]): {
            "desc": r["desc"],
            "config": r["config"],
            "bits": int(r["bits"]),
            "bpw": float(r["bpw"]),
        }
        for r in linears
    }
    total_bits = sum(int(r["bits"]) for r in linears)
    numel = sum(int(r["bits"]) / float(r["bpw"]) for r in linears if float(r["bpw"]) > 0)
    doc: dict[str, Any] = {
        "version": 1,
        "bits": bits,
        "decoder_bpw": total_bits / numel if numel else 0.0,
        "linears": entry,
    }
    if head:
        doc["head"] = {k: head[k] for k in ("desc", "config", "bits", "bpw") if k in head}
    return doc


def _source_tensor_files(model_dir: Path) -> dict[str, Path]:
    from safetensors import safe_open

    index = model_dir / INDEX_FILE
    files: dict[str, Path] = {}
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelError(f"{index}: not a safetensors index ({exc})") from exc
        for name, file in weight_map.items():
            files[name] = model_dir / file
        return files
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise ModelError(f"{model_dir}: no *.safetensors weights found")
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                files[name] = shard
    return files


def _order_key(name: str) -> tuple[int, int, str]:
    """exllamav2's module order: embeddings, layer 0 … N-1, final norm, head."""
    m = _LAYER_RE.search(name)
    if m:
        return (1, int(m.group(1)), name)
    if name.startswith("lm_head."):
        return (3, 0, name)
    if "embed" in name:
        return (0, 0, name)
    return (2, 0, name)


def _quantized_tensors(tensors_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    files = sorted(tensors_dir.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{tensors_dir}: no quantized tensors (run the quantize pass first)")
    for f in files:
        try:
            out.update(load_file(str(f)))
        except Exception as exc:  # noqa: BLE001 - name the unreadable file
            raise ExportError(f"{f}: unreadable quantized tensor file ({exc})") from exc
    return out


def _fp16(name: str, t: torch.Tensor, source: Path) -> torch.Tensor:
    if not t.is_floating_point():
        return t.contiguous()
    h = t.to(torch.float16)
    if not bool(torch.isfinite(h).all()) and bool(torch.isfinite(t).all()):
        big = float(t.abs().max())
        raise ExportError(
            f"{source}: tensor {name} does not fit float16 (max |value| {big:.4g} > 65504)"
        )
    return h.contiguous()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_replaceable(out_dir: Path) -> bool:
    """An existing target may be replaced if empty or an earlier exl2rs output."""
    if not out_dir.exists():
        return True
    if not out_dir.is_dir():
        return False
    if not any(out_dir.iterdir()):
        return True
    try:
        cfg = json.loads((out_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    return isinstance(qc, dict) and qc.get(MARKER_KEY) == "exl2rs"


def _shard_plan(
    names: list[str], sizes: dict[str, int], shard_bytes: int | None
) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for name in names:
        size = sizes[name]
        if shard_bytes is not None and size > shard_bytes:
            raise ExportError(
                f"tensor {name} ({size} bytes) does not fit in one shard of {shard_bytes} bytes; "
                "raise the shard size (-ss)"
            )
        if shard_bytes is not None and used + size > shard_bytes and shards[-1]:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def compile_exl2(
    model_dir: str | os.PathLike[str],
    tensors_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    bits: float,
    head_bits: int | None,
    calibration: Mapping[str, Any],
    strategy: Mapping[str, Any],
    quantized: Sequence[str],
    shard_mb: int = 8192,
    extra_files: Mapping[str, Path] | None = None,
    exl2rs_version: str | None = None,
) -> ExportResult:
    """Write the EXL2 directory ``out_dir``.

    ``quantized``: prefixes of the quantized linears (their ``.weight`` / ``.bias`` in the source
    are replaced by the packed tensors found in ``tensors_dir``). ``calibration``: ``rows``,
    ``length``, ``dataset`` for ``quantization_config``. ``strategy``: the
    ``exl2rs_strategy.json`` document. ``extra_files``: name in the output → file to copy
    (measurements). An existing ``out_dir`` is replaced only if it is empty or an exl2rs output.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    from exl2rs import __version__

    src, tdir, out = Path(model_dir), Path(tensors_dir), Path(out_dir)
    if shard_mb < 0:
        raise ExportError(f"shard size must be >= 0 MB (0 = unlimited), got {shard_mb}")
    cfg_path = src / "config.json"
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{cfg_path}: unreadable model config ({exc})") from exc
    if not _is_replaceable(out):
        raise ExportError(
            f"{out}: exists and is not an exl2rs output directory; refusing to overwrite it"
        )

    qtensors = _quantized_tensors(tdir)
    for prefix in quantized:
        for suffix in Q_SUFFIXES[:-1]:
            if f"{prefix}.{suffix}" not in qtensors:
                raise ExportError(f"{tdir}: quantized tensor {prefix}.{suffix} is missing")
    qset = set(quantized)
    source_files = _source_tensor_files(src)
    plain: dict[str, Path] = {}
    for name, path in source_files.items():
        prefix, _, leaf = name.rpartition(".")
        if prefix in qset and leaf in ("weight", "bias"):
            continue
        if name == "lm_head.weight" and "lm_head" in qset:
            continue
        plain[name] = path
    stray = sorted(n for n in qtensors if n.rpartition(".")[0] not in qset)
    if stray:
        raise ExportError(f"{tdir}: tensor {stray[0]} belongs to no quantized linear")

    tensors: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name, path in plain.items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for name in names:
                tensors[name] = _fp16(name, f.get_tensor(name), path)
    for name, t in qtensors.items():
        tensors[name] = t.contiguous()

    order = sorted(tensors, key=_order_key)
    sizes = {n: tensors[n].numel() * tensors[n].element_size() for n in order}
    shard_bytes = None if shard_mb == 0 else shard_mb * 1024**2
    plan = _shard_plan(order, sizes, shard_bytes)
    if len(plan) == 1:
        shard_names = ["output.safetensors"]
    else:
        shard_names = [f"output-{i + 1:05}-of-{len(plan):05}.safetensors" for i in range(len(plan))]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        weight_map: dict[str, str] = {}
        for fname, names in zip(shard_names, plan, strict=True):
            save_file({n: tensors[n] for n in names}, str(tmp / fname), metadata={"format": "pt"})
            _fsync(tmp / fname)
            weight_map.update({n: fname for n in names})
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        for item in sorted(src.iterdir()):
            if not item.is_file() or item.name in ("config.json", INDEX_FILE):
                continue
            if item.name.endswith(_WEIGHT_SUFFIXES) or item.name.startswith("."):
                continue
            shutil.copy2(item, tmp / item.name)
        config["quantization_config"] = {
            "quant_method": "exl2",
            "version": EXL2_VERSION,
            "bits": bits,
            "head_bits": head_bits,
            "calibration": dict(calibration),
            MARKER_KEY: "exl2rs",
            "exl2rs_version": exl2rs_version or __version__,
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / STRATEGY_FILE).write_text(json.dumps(strategy, indent=1) + "\n")
        for name, path in (extra_files or {}).items():
            shutil.copy2(path, tmp / name)
        for item in tmp.iterdir():
            item.chmod(0o644)
            _fsync(item)
        tmp.chmod(0o755)
        _fsync(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        _fsync(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    file_bytes = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    return ExportResult(out, shard_names, sum(sizes.values()), file_bytes)
