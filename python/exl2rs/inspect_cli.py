"""``exl2rs inspect DIR``: what an EXL2 directory holds, checked against its config.

Prints the architecture, a per-linear table (config decoded from ``q_groups``: widths, group sizes,
rows per width; exact bits and bpw), the decoder bpw, the head, and the file bytes. Every
quantized linear the config implies is checked: present, dtypes, shapes (``q_weight`` rows equal
Σ rows_g·bits_g/32, ``N_pad`` = out_features rounded up to 32, ``q_scale`` / ``q_scale_max`` /
``q_groups`` / ``q_invperm`` consistent, ``q_invperm`` a permutation, widths non-increasing). A
directory that fails is refused with an error naming the tensor.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from exl2rs.errors import ModelError

__all__ = ["LinearInfo", "inspect_dir", "add_arguments", "run"]

VALID_BITS = (2, 3, 4, 5, 6, 8)
_DTYPES = {
    "q_weight": "I32",
    "q_scale": "I32",
    "q_scale_max": "F16",
    "q_groups": "I16",
    "q_invperm": "I32",
    "q_perm": "I32",
    "bias": "F16",
}


@dataclass(frozen=True)
class LinearInfo:
    name: str
    in_features: int
    out_features: int
    groups: list[tuple[int, int]]  # (bits, rows) in storage order
    group_sizes: dict[int, int]  # bits → group size (rows of its first group)
    bits: int  # exact stored bits (weights + scales + scale_max + groups + invperm)

    @property
    def bpw(self) -> float:
        return self.bits / (self.in_features * self.out_features)

    @property
    def desc(self) -> str:
        """exllamav2-style descriptor of the layout, e.g. ``0.1:4b_64g/0.9:3b_64g``."""
        k = self.in_features
        rows: dict[int, int] = {}
        for b, r in self.groups:
            rows[b] = rows.get(b, 0) + r
        return "/".join(f"{rows[b] / k:.3g}:{b}b_{self.group_sizes[b]}g" for b in rows)


def _header(path: Path) -> dict[str, Any]:
    """A safetensors file's JSON header (names, dtypes, shapes) without reading the data."""
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ModelError(f"{path}: truncated safetensors file")
        n = int.from_bytes(raw, "little")
        try:
            header: dict[str, Any] = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelError(f"{path}: corrupt safetensors header ({exc})") from exc
    header.pop("__metadata__", None)
    return header


def _expected_linears(config: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """Linear name → (in, out) for every decoder linear the config implies (meta model)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from exl2rs.models import adapter_for

    adapter = adapter_for(config)
    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "quantization_config"})
    with torch.device("meta"):
        model: Any = AutoModelForCausalLM.from_config(cfg)  # type: ignore[no-untyped-call]
    out: dict[str, tuple[int, int]] = {}
    for i in range(int(cfg.num_hidden_layers)):
        for name in adapter.linear_names(i):
            mod = model.get_submodule(name)
            out[name] = (int(mod.in_features), int(mod.out_features))
    head = model.get_submodule("lm_head")
    out["lm_head"] = (int(head.in_features), int(head.out_features))
    return out


def _check_linear(
    name: str,
    shape: tuple[int, int],
    tensors: Mapping[str, tuple[str, list[int]]],
    read: Any,
) -> LinearInfo:
    k, n = shape
    n_pad = -(-n // 32) * 32
    for leaf in ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm"):
        if f"{name}.{leaf}" not in tensors:
            raise ModelError(f"tensor {name}.{leaf} is missing (the config implies {name})")
    for leaf, want in _DTYPES.items():
        key = f"{name}.{leaf}"
        if key in tensors and tensors[key][0] != want:
            raise ModelError(f"tensor {key}: dtype {tensors[key][0]}, expected {want}")
    qw = tensors[f"{name}.q_weight"][1]
    groups_shape = tensors[f"{name}.q_groups"][1]
    if len(groups_shape) != 1 or groups_shape[0] % 2 or groups_shape[0] == 0:
        raise ModelError(f"tensor {name}.q_groups: shape {groups_shape}, expected [2 x groups]")
    g = groups_shape[0] // 2
    want_shapes = {
        "q_scale": [g, n_pad // 8],
        "q_scale_max": [g],
        "q_invperm": [k],
        "q_perm": [k],
        "bias": [n],
    }
    if len(qw) != 2 or qw[1] != n_pad:
        raise ModelError(
            f"tensor {name}.q_weight: shape {qw}, expected [rows, {n_pad}] "
            f"(out_features {n} padded to 32)"
        )
    for leaf, want_shape in want_shapes.items():
        key = f"{name}.{leaf}"
        if key in tensors and tensors[key][1] != want_shape:
            raise ModelError(f"tensor {key}: shape {tensors[key][1]}, expected {want_shape}")
    q_groups = np.asarray(read(f"{name}.q_groups"), dtype=np.int64)
    bits = q_groups[0::2].tolist()
    starts = q_groups[1::2].tolist() + [qw[0]]
    layout: list[tuple[int, int]] = []
    for i, b in enumerate(bits):
        if b not in VALID_BITS:
            raise ModelError(f"tensor {name}.q_groups: group {i} has {b} bits, not in {VALID_BITS}")
        if i and b > bits[i - 1]:
            raise ModelError(
                f"tensor {name}.q_groups: widths must not increase "
                f"(group {i}: {bits[i - 1]} -> {b})"
            )
        words = starts[i + 1] - starts[i]
        if words <= 0 or (words * 32) % b:
            raise ModelError(
                f"tensor {name}.q_groups: group {i} spans {words} q_weight rows, not a whole "
                f"number of {b}-bit rows"
            )
        layout.append((b, words * 32 // b))
    if starts[0] != 0:
        raise ModelError(f"tensor {name}.q_groups: first group starts at row {starts[0]}, not 0")
    total_rows = sum(r for _, r in layout)
    if total_rows != k:
        raise ModelError(
            f"tensor {name}.q_groups: groups cover {total_rows} input rows, in_features is {k}"
        )
    invperm = np.asarray(read(f"{name}.q_invperm"), dtype=np.int64)
    if not np.array_equal(np.sort(invperm), np.arange(k)):
        raise ModelError(f"tensor {name}.q_invperm is not a permutation of 0..{k - 1}")
    sizes: dict[int, int] = {}
    for b, r in layout:
        sizes.setdefault(b, r)
    # Exact stored bits as the cost model counts them: weights, 4-bit scales, fp16 scale_max,
    # the int16 group table and the int32 permutation (of the unpadded matrix).
    stored = sum(r * b for b, r in layout) * n + g * n * 4 + g * 16 + g * 2 * 16 + k * 32
    return LinearInfo(name, k, n, layout, sizes, int(stored))


def inspect_dir(path: str | Path) -> dict[str, Any]:
    """Check ``path`` and describe it: architecture, linears, bpw, head, bytes."""
    from safetensors import safe_open

    d = Path(path)
    if not d.is_dir():
        raise ModelError(f"{d}: not a directory")
    try:
        config = json.loads((d / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{d / 'config.json'}: unreadable config ({exc})") from exc
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "exl2":
        raise ModelError(f"{d / 'config.json'}: no quantization_config with quant_method 'exl2'")
    shards = sorted(d.glob("*.safetensors"))
    if not shards:
        raise ModelError(f"{d}: no *.safetensors shards")
    tensors: dict[str, tuple[str, list[int]]] = {}
    where: dict[str, Path] = {}
    for shard in shards:
        for name, info in _header(shard).items():
            if name in tensors:
                raise ModelError(
                    f"tensor {name} is stored twice ({where[name].name}, {shard.name})"
                )
            tensors[name] = (str(info["dtype"]), [int(s) for s in info["shape"]])
            where[name] = shard
    index = d / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        for name, file in weight_map.items():
            if name not in tensors or where[name].name != file:
                raise ModelError(f"{index}: maps tensor {name} to {file}, which does not hold it")

    def read(name: str) -> Any:
        with safe_open(str(where[name]), framework="numpy") as f:
            return f.get_tensor(name)

    expected = _expected_linears(config)
    linears: list[LinearInfo] = []
    head: LinearInfo | None = None
    for name, shape in expected.items():
        if name == "lm_head":
            if "lm_head.q_weight" in tensors:
                head = _check_linear(name, shape, tensors, read)
            continue
        if f"{name}.weight" in tensors:
            raise ModelError(f"tensor {name}.weight is unquantized; EXL2 stores {name}.q_weight")
        linears.append(_check_linear(name, shape, tensors, read))
    known = {f"{i.name}." for i in [*linears, *([head] if head else [])]}
    for name, (dtype, _) in tensors.items():
        if name.endswith((".q_weight", ".q_scale", ".q_groups", ".q_invperm")) and not any(
            name.startswith(p) for p in known
        ):
            raise ModelError(f"tensor {name} belongs to no linear of the config")
        if not name.startswith(tuple(known)) and dtype not in ("F16", "BF16", "F32"):
            raise ModelError(f"tensor {name}: dtype {dtype} for an unquantized tensor")
    strategy_path = d / "exl2rs_strategy.json"
    if strategy_path.is_file():
        doc = json.loads(strategy_path.read_text())
        for info in linears:
            entry = doc.get("linears", {}).get(info.name)
            if entry is not None and int(entry["bits"]) != info.bits:
                raise ModelError(
                    f"tensor {info.name}.q_groups: the tensors hold {info.bits} bits, "
                    f"{strategy_path.name} records {entry['bits']}"
                )
    dec_bits = sum(i.bits for i in linears)
    dec_numel = sum(i.in_features * i.out_features for i in linears)
    return {
        "path": str(d),
        "architecture": (config.get("architectures") or [config.get("model_type")])[0],
        "layers": int(config.get("num_hidden_layers", 0)),
        "quantization_config": qc,
        "linears": linears,
        "head": head,
        "decoder_bpw": dec_bits / dec_numel if dec_numel else 0.0,
        "decoder_bits": dec_bits,
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
        "file_bytes": sum(p.stat().st_size for p in d.iterdir() if p.is_file()),
        "tensor_file_bytes": sum(p.stat().st_size for p in shards),
    }


def _fmt_groups(info: LinearInfo) -> str:
    return " ".join(f"{b}b×{r}" for b, r in _merge(info.groups))


def _merge(groups: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for b, r in groups:
        if out and out[-1][0] == b:
            out[-1] = (b, out[-1][1] + r)
        else:
            out.append((b, r))
    return out


def format_report(rep: Mapping[str, Any]) -> str:
    lines = [
        f"{rep['path']}: {rep['architecture']}, {rep['layers']} layers, "
        f"quantized with {rep['quantization_config'].get('quantizer', 'exllamav2')} "
        f"(target {rep['quantization_config'].get('bits')} bpw)",
    ]
    rows = list(rep["linears"]) + ([rep["head"]] if rep["head"] else [])
    width = max(len(i.name) for i in rows)
    lines.append(
        f"{'linear':<{width}}  {'shape':>11}  {'bpw':>6}  {'bits':>10}  layout (rows per width)"
    )
    for i in rows:
        shape = f"{i.in_features}x{i.out_features}"
        lines.append(
            f"{i.name:<{width}}  {shape:>11}  {i.bpw:6.3f}  {i.bits:10d}  {i.desc}  "
            f"[{_fmt_groups(i)}]"
        )
    head = rep["head"]
    head_txt = (
        f"{head.bpw:.3f} bpw ({head.desc})"
        if head
        else ("tied embeddings (fp16)" if rep["tie_word_embeddings"] else "fp16 lm_head.weight")
    )
    lines.append(f"decoder: {rep['decoder_bpw']:.4f} bpw ({rep['decoder_bits']} bits)")
    lines.append(f"head: {head_txt}")
    lines.append(f"files: {rep['file_bytes']} bytes ({rep['tensor_file_bytes']} in safetensors)")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", type=Path, help="EXL2 model directory")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    rep = inspect_dir(args.dir)
    if args.json:
        out = dict(rep)
        out["linears"] = [
            {"name": i.name, "bits": i.bits, "bpw": i.bpw, "desc": i.desc, "groups": i.groups}
            for i in rep["linears"]
        ]
        h = rep["head"]
        out["head"] = None if h is None else {"bits": h.bits, "bpw": h.bpw, "desc": h.desc}
        print(json.dumps(out, indent=1))
    else:
        print(format_report(rep))
    return 0
