"""Transcode an exl2rs EXL2 directory into a GPTQ-v1 checkpoint (GPTQModel / vLLM).

Each EXL2 linear must use ONE bit width GPTQ has (2, 3, 4 or 8; ``vllm=True``: 4 or 8, the
Marlin widths) and groups of one size. The transcoding is lossless apart from rounding the
scales to fp16: the codes are kept, ``zero = 2^(b-1)`` (stored as ``zero - 1``, the v1 rule),
``scales[g, n] = (q_scale[g, n] + 1)^2 * q_scale_max[g] / 256`` and ``g_idx`` maps each input
row to its act-order group (``desc_act=True``, symmetric). The most common width/group size is
the base config; every other linear gets a GPTQModel/vLLM ``dynamic`` ``+:`` rule. Linears vLLM
fuses (q/k/v → qkv_proj, gate/up → gate_up_proj) must agree and share one rule that matches
both the separate and the fused names. A quantized head is written dequantized as fp16
``lm_head.weight`` (GPTQ heads are conventionally unquantized), untied from the embeddings.

    exl2rs export-gptq EXL2DIR OUTDIR [--vllm] [--force]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exl2rs import packing
from exl2rs.errors import Exl2Error, ModelError
from exl2rs.load import CheckpointIndex, quantized_prefixes, scan_checkpoint

__all__ = ["GPTQ_BITS", "VLLM_BITS", "GptqExport", "LinearSpec", "dynamic_rules", "export_gptq"]

GPTQ_BITS = (2, 3, 4, 8)
VLLM_BITS = (4, 8)  # gptq_marlin: uint4b8, uint8b128 (sym)
# vLLM's fused layers: (shared-input group name in exl2rs.models) → fused module name.
FUSED_NAMES = {"qkv": "qkv_proj", "gate_up": "gate_up_proj"}
# Files of an EXL2 directory that describe the EXL2 encoding, not the model.
_EXL2_ONLY = ("exl2rs_strategy.json", "measurement.json")


class GptqExportError(Exl2Error):
    """An EXL2 directory cannot be transcoded to GPTQ as asked (the message says which linear
    and why)."""


@dataclass(frozen=True)
class LinearSpec:
    """One transcoded linear: width, group size (rows per group) and shape."""

    name: str
    bits: int
    group_size: int
    in_features: int
    out_features: int


@dataclass
class GptqExport:
    """What :func:`export_gptq` wrote."""

    out_dir: Path
    base_bits: int
    base_group_size: int
    dynamic: dict[str, dict[str, int]]
    linears: list[LinearSpec]
    head_dequantized: bool
    max_abs_error: float  # largest |W_gptq - W_exl2| over all linears (fp16 scale rounding)
    quantize_config: dict[str, Any] = field(default_factory=dict)


def _exl2_tensors(index: CheckpointIndex, prefix: str, out_features: int) -> packing.Exl2Tensors:
    from safetensors import safe_open

    def get(suffix: str) -> Any:
        name = f"{prefix}.{suffix}"
        with safe_open(index.tensors[name].file, framework="np") as f:
            return f.get_tensor(name)

    return packing.Exl2Tensors(
        q_weight=get("q_weight"),
        q_scale=get("q_scale"),
        q_scale_max=get("q_scale_max"),
        q_groups=get("q_groups"),
        q_invperm=get("q_invperm"),
        cols=out_features,
    )


def _single_width(name: str, u: packing.Exl2Unpacked, vllm: bool) -> tuple[int, int]:
    """(bits, group size) of a linear that GPTQ can express, else a clear refusal."""
    widths = sorted({b for b, _ in u.groups}, reverse=True)
    if len(widths) != 1:
        raise GptqExportError(
            f"{name}: mixes {widths} bit groups in one matrix; GPTQ has one width per linear. "
            "Convert with single-width candidates (restrict the candidate configs to one "
            "width per linear) to export GPTQ"
        )
    bits = widths[0]
    allowed = VLLM_BITS if vllm else GPTQ_BITS
    if bits not in allowed:
        why = "vLLM's Marlin kernels take 4 or 8 bits (--vllm)" if vllm else "GPTQ has 2/3/4/8"
        raise GptqExportError(f"{name}: {bits}-bit groups cannot be exported: {why}")
    rows = [r for _, r in u.groups]
    gs = rows[0]
    if any(r != gs for r in rows[:-1]) or rows[-1] > gs:
        raise GptqExportError(
            f"{name}: group sizes {sorted(set(rows))} differ; GPTQ needs one group size per "
            "linear (only the last group may be shorter)"
        )
    return bits, gs


def _fused_groups(config: dict[str, Any], names: list[str]) -> dict[str, list[str]]:
    """fused module name (e.g. ``model.layers.0.self_attn.qkv_proj``) → its member linears
    present in ``names``."""
    from exl2rs.models import adapter_for

    try:
        adapter = adapter_for(config)
    except Exl2Error:
        return {}
    present = set(names)
    fused: dict[str, list[str]] = {}
    for layer in range(int(config.get("num_hidden_layers", 0))):
        for group in adapter.groups:
            if group.name not in FUSED_NAMES:
                continue
            base = f"{adapter.layer_name(layer)}.{group.module}"
            members = [f"{base}.{n}" for n in group.linears if f"{base}.{n}" in present]
            if members:
                fused[f"{base}.{FUSED_NAMES[group.name]}"] = members
    return fused


def dynamic_rules(
    specs: list[LinearSpec], fused: dict[str, list[str]]
) -> tuple[int, int, dict[str, dict[str, int]]]:
    """(base bits, base group size, ``dynamic``): the most common (bits, group size) over the
    linears is the base; each other module — a fused group counts as one, and its members must
    agree — gets one ``+:`` rule that ``re.match`` finds for its own name (and, for a fused
    group, for the separate and the fused names)."""
    by_name = {s.name: s for s in specs}
    member_of = {m: f for f, ms in fused.items() for m in ms}
    for f, members in fused.items():
        configs = {(by_name[m].bits, by_name[m].group_size) for m in members}
        if len(configs) > 1:
            got = ", ".join(
                f"{m.rpartition('.')[2]}={by_name[m].bits}b/g{by_name[m].group_size}"
                for m in members
            )
            raise GptqExportError(
                f"{f}: vLLM fuses {', '.join(m.rpartition('.')[2] for m in members)} into one "
                f"layer, so they need one bit width and group size; got {got}. Tie them in the "
                "allocation (fused groups) and convert again"
            )
    counts = Counter((s.bits, s.group_size) for s in specs)
    base = max(counts, key=lambda c: (counts[c], c))
    dynamic: dict[str, dict[str, int]] = {}
    done: set[str] = set()
    for s in specs:
        if (s.bits, s.group_size) == base or s.name in done:
            continue
        owner = member_of.get(s.name)
        if owner is None:
            pattern = re.escape(s.name)
            done.add(s.name)
        else:
            parent, _, fused_leaf = owner.rpartition(".")
            leaves = [m.rpartition(".")[2] for m in fused[owner]] + [fused_leaf]
            pattern = rf"{re.escape(parent)}\.({'|'.join(map(re.escape, leaves))})"
            done.update(fused[owner])
        dynamic[f"+:^{pattern}$"] = {"bits": s.bits, "group_size": s.group_size}
    return base[0], base[1], dynamic


def resolve_dynamic(
    dynamic: dict[str, dict[str, int]], name: str, base: tuple[int, int]
) -> tuple[int, int]:
    """(bits, group size) a GPTQModel/vLLM loader gives module ``name``: the first ``+:`` rule
    whose regex ``re.match``es it, else the base."""
    for pattern, override in dynamic.items():
        if pattern.startswith("+:") and re.match(pattern[2:], name):
            return override.get("bits", base[0]), override.get("group_size", base[1])
    return base


def _module_shapes(directory: Path, config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in, out) features of every nn.Linear of the model the config describes."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(directory)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg)  # type: ignore[no-untyped-call]
    return {
        n: (int(m.in_features), int(m.out_features))
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    }


def export_gptq(
    exl2_dir: str | Path,
    out_dir: str | Path,
    *,
    vllm: bool = False,
    overwrite: bool = False,
) -> GptqExport:
    """Writes the GPTQ-v1 checkpoint of ``exl2_dir`` to ``out_dir`` (built in a temporary
    sibling folder and renamed into place, so a failed export leaves nothing behind)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, out = Path(exl2_dir), Path(out_dir)
    if out.exists() and not overwrite:
        raise GptqExportError(f"{out}: already exists (pass overwrite=True / --force)")
    if out.resolve() == src.resolve():
        raise GptqExportError(f"{out}: the output must not be the EXL2 directory itself")
    index = scan_checkpoint(src)
    config = json.loads((src / "config.json").read_text())
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != "exl2":
        raise ModelError(f"{src}/config.json: quant_method is {qc.get('quant_method')!r}, not exl2")
    prefixes = quantized_prefixes(index)
    shapes = _module_shapes(src, config)
    head = "lm_head"

    tensors: dict[str, torch.Tensor] = {}
    specs: list[LinearSpec] = []
    max_err = 0.0
    head_dequantized = False
    for prefix in prefixes:
        if prefix not in shapes:
            raise ModelError(f"{prefix}.q_weight: the config's model has no linear {prefix}")
        k, n = shapes[prefix]
        t = _exl2_tensors(index, prefix, n)
        w_exl2 = packing.dequantize_exl2(t)
        if w_exl2.shape != (k, n):
            raise ModelError(f"{prefix}: stored as {list(w_exl2.shape)}, the config gives {[k, n]}")
        if prefix == head:
            tensors[f"{head}.weight"] = torch.from_numpy(w_exl2.T.astype(np.float16).copy())
            head_dequantized = True
            continue
        u = t.unpack()
        bits, gs = _single_width(prefix, u, vllm)
        sq = u.scales.astype(np.float32) ** 2
        scales = sq * (u.scale_max.astype(np.float32)[:, None] / 256)
        zeros = np.full(scales.shape, 1 << (bits - 1), dtype=np.int32)
        g_idx = packing.gptq_g_idx(k, gs, u.perm)
        codes = u.codes[np.argsort(u.perm)]  # storage (act-) order → input-row order
        g = packing.pack_gptq(codes, zeros, scales, g_idx, bits)
        w_gptq = packing.dequantize_gptq(g)
        # The only change is the fp16 rounding of each scale: |q - z| · |Δs| per weight.
        err = float(np.abs(w_gptq - w_exl2).max())
        bound = float((np.abs(scales - scales.astype(np.float16)).max()) * (1 << (bits - 1)))
        if err > bound * 1.0001 + 1e-12:
            raise GptqExportError(
                f"{prefix}: GPTQ tensors dequantize {err:.3g} away from EXL2 (bound {bound:.3g})"
            )
        max_err = max(max_err, err)
        for key, value in g.state_dict(prefix).items():
            tensors[key] = torch.from_numpy(np.ascontiguousarray(value))
        specs.append(LinearSpec(prefix, bits, gs, k, n))

    quant_suffixes = ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm", "q_perm")
    quantized = set(prefixes)
    by_file: dict[Path, list[str]] = {}
    for name, info in index.tensors.items():
        owner, _, suffix = name.rpartition(".")
        if owner in quantized and suffix in quant_suffixes:
            continue
        by_file.setdefault(info.file, []).append(name)
    for file, names in by_file.items():
        with safe_open(file, framework="pt") as f:
            for name in names:
                tensors[name] = f.get_tensor(name)

    if not specs:
        raise GptqExportError(f"{src}: no quantized decoder linear to export")
    fused = _fused_groups(config, [s.name for s in specs])
    base_bits, base_gs, dynamic = dynamic_rules(specs, fused)
    quantize_config: dict[str, Any] = {
        "bits": base_bits,
        "group_size": base_gs,
        "damp_percent": 0.12,  # EXL2's damping, for the record (the codes are EXL2's)
        "desc_act": True,
        "static_groups": False,
        "sym": True,
        "true_sequential": True,
        "lm_head": False,
        "model_name_or_path": None,
        "model_file_base_name": "model",
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "format": "gptq",
        "pack_dtype": "int32",
        "dynamic": dynamic,
        "meta": {
            "quantizer": [f"exl2rs:{qc.get('exl2rs_version', 'unknown')}"],
            "source": "EXL2 transcoded by exl2rs export-gptq",
            "exl2_bits": qc.get("bits"),
        },
    }
    out_config = dict(config)
    out_config["quantization_config"] = quantize_config
    if head_dequantized:
        out_config["tie_word_embeddings"] = False

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(out_config, indent=2) + "\n")
        (tmp / "quantize_config.json").write_text(json.dumps(quantize_config, indent=2) + "\n")
        for extra in src.iterdir():
            skip = extra.suffix == ".safetensors" or extra.name.endswith(".index.json")
            if extra.is_file() and not skip and extra.name not in ("config.json", *_EXL2_ONLY):
                shutil.copy2(extra, tmp / extra.name)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return GptqExport(
        out, base_bits, base_gs, dynamic, specs, head_dequantized, max_err, quantize_config
    )


# -- CLI subcommand (dispatched by exl2rs.cli) ---------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "exl2_dir", type=Path, help="an exl2rs EXL2 directory (single-width linears)"
    )
    parser.add_argument("out_dir", type=Path, help="where to write the GPTQ-v1 checkpoint")
    parser.add_argument(
        "--vllm", action="store_true", help="refuse widths other than 4/8 (vLLM's Marlin kernels)"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing OUTDIR")


def run(args: argparse.Namespace) -> int:
    res = export_gptq(args.exl2_dir, args.out_dir, vllm=args.vllm, overwrite=args.force)
    widths = Counter(s.bits for s in res.linears)
    print(
        f"wrote {res.out_dir}: {len(res.linears)} linears "
        f"({', '.join(f'{n} x {b}-bit' for b, n in sorted(widths.items()))}), base "
        f"{res.base_bits}-bit g{res.base_group_size}, {len(res.dynamic)} dynamic rule(s), "
        f"max |W_gptq - W_exl2| = {res.max_abs_error:.3g}"
        + ("; head written as fp16" if res.head_dequantized else "")
    )
    return 0
