"""Load an EXL2 directory into a transformers model whose quantized linears are
:class:`~exl2rs.quant_linear.QuantLinear`.

The model is built from ``config.json`` with its parameters on the meta device; every linear
(decoder linears and the head) whose ``<prefix>.q_weight`` is in the shards becomes a
``QuantLinear`` sized from the stored shapes; then every tensor is loaded strictly. A tensor
that is missing, unexpected, of the wrong shape or dtype is a :class:`ModelError` naming it and
its file, and the final check proves that every parameter and persistent buffer of the model
came from the files: a directory whose config and tensors disagree is refused, never filled with
random weights. Non-persistent buffers (rotary tables) are computed from the config, as
transformers does.

The same scan / replace / verify steps back the transformers quantizer
(:mod:`exl2rs.hf_quantizer`), so ``AutoModelForCausalLM.from_pretrained(DIR)`` after
``import exl2rs`` builds the same model.
"""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from exl2rs.errors import ModelError
from exl2rs.quant_linear import QuantLinear

__all__ = [
    "CheckpointIndex",
    "TensorInfo",
    "load",
    "quantized_prefixes",
    "replace_quantized_linears",
    "scan_checkpoint",
    "verify_loaded",
]

INDEX_FILE = "model.safetensors.index.json"
# Stored dtypes of the quantized tensors (the EXL2 format; contract of the exl2rs ops).
QUANT_DTYPES = {
    "q_weight": torch.int32,
    "q_scale": torch.int32,
    "q_scale_max": torch.float16,
    "q_groups": torch.int16,
    "q_invperm": torch.int32,
    "q_perm": torch.int32,
}
_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MODEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class TensorInfo:
    """Where one stored tensor lives and what the header says about it."""

    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype | None  # None: a dtype torch cannot represent


@dataclass(frozen=True)
class CheckpointIndex:
    """Every tensor of a directory's shards, from the safetensors headers alone."""

    directory: Path
    tensors: Mapping[str, TensorInfo]

    def where(self, name: str) -> str:
        return self.tensors[name].file.name

    def shapes(self, prefix: str) -> dict[str, tuple[int, ...]]:
        """The tensors stored under ``prefix.`` keyed by suffix (``q_weight``, ``bias``…)."""
        dot = prefix + "."
        return {
            k[len(dot) :]: v.shape
            for k, v in self.tensors.items()
            if k.startswith(dot) and "." not in k[len(dot) :]
        }


def _shard_files(directory: Path) -> list[Path]:
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise ModelError(f"{index}: not a safetensors index with a weight_map ({e})") from e
        files: list[str] = sorted({str(f) for f in weight_map.values()})
        missing = [f for f in files if not (directory / f).is_file()]
        if missing:
            raise ModelError(f"{index}: names shard(s) {missing} that are not in {directory}")
        return [directory / f for f in files]
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        raise ModelError(f"{directory}: no *.safetensors shards (and no {INDEX_FILE})")
    return shards


def scan_checkpoint(directory: str | Path) -> CheckpointIndex:
    """Reads the headers of every shard; a tensor in two shards, or one the index places in a
    shard that does not hold it, is refused."""
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    if not directory.is_dir():
        raise ModelError(f"{directory}: not a directory")
    tensors: dict[str, TensorInfo] = {}
    for file in _shard_files(directory):
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    sl = f.get_slice(name)
                    info = TensorInfo(file, tuple(sl.get_shape()), _ST_DTYPES.get(sl.get_dtype()))
                    if name in tensors:
                        raise ModelError(
                            f"{name}: stored in both {tensors[name].file.name} and {file.name}"
                        )
                    tensors[name] = info
        except SafetensorError as e:
            raise ModelError(f"{file}: unreadable safetensors file ({e})") from e
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        for name, shard in weight_map.items():
            if name not in tensors or tensors[name].file.name != Path(shard).name:
                got = tensors[name].file.name if name in tensors else "no shard"
                raise ModelError(f"{index.name}: maps {name} to {shard}, but it is in {got}")
        extra = sorted(set(tensors) - set(weight_map))
        if extra:
            raise ModelError(
                f"{index.name}: the shards hold {len(extra)} tensor(s) the weight_map does "
                f"not list, e.g. {extra[0]} in {tensors[extra[0]].file.name}"
            )
    return CheckpointIndex(directory, tensors)


def quantized_prefixes(index: CheckpointIndex) -> list[str]:
    """Modules stored as EXL2 tensors (those with a ``<prefix>.q_weight``)."""
    return sorted(k[: -len(".q_weight")] for k in index.tensors if k.endswith(".q_weight"))


def _module_at(model: nn.Module, name: str) -> tuple[nn.Module, str, nn.Module] | None:
    parent_name, _, attr = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError:
        return None
    child = getattr(parent, attr, None)
    return (parent, attr, child) if isinstance(child, nn.Module) else None


def replace_quantized_linears(
    model: nn.Module, index: CheckpointIndex, *, device: torch.device | str = "meta"
) -> list[str]:
    """Swaps each ``nn.Linear`` with stored ``q_weight`` for a ``QuantLinear`` of the stored
    shapes. Returns the replaced names; a ``q_weight`` with no matching linear is refused."""
    replaced = []
    for prefix in quantized_prefixes(index):
        found = _module_at(model, prefix)
        where = index.where(prefix + ".q_weight")
        linear = None if found is None else found[2]
        if found is None or not isinstance(linear, (nn.Linear, QuantLinear)):
            raise ModelError(
                f"{prefix}.q_weight ({where}): the model built from config.json has no linear "
                f"named {prefix}; the config and the tensors disagree"
            )
        parent, attr = found[0], found[1]
        shapes = index.shapes(prefix)
        q = QuantLinear.from_shapes(
            shapes, linear.out_features, name=f"{prefix} ({where})", device=device
        )
        if q.in_features != linear.in_features:
            raise ModelError(
                f"{prefix}.q_invperm ({where}): {q.in_features} input rows, but the config "
                f"gives {prefix} {linear.in_features} in_features"
            )
        has_bias = getattr(linear, "bias", None) is not None
        if has_bias != ("bias" in shapes):
            raise ModelError(
                f"{prefix}: the config's module {'has' if has_bias else 'has no'} bias, but "
                f"{prefix}.bias is {'missing from' if has_bias else 'stored in'} the shards"
            )
        setattr(parent, attr, q)
        replaced.append(prefix)
    return replaced


def _tied_keys(model: nn.Module) -> dict[str, str]:
    """state_dict key → the key it is tied to: transformers' declared ties (set up by
    ``tie_weights``) and tensors that already share storage (first name seen wins)."""
    seen: dict[int, str] = {}
    tied: dict[str, str] = dict(getattr(model, "all_tied_weights_keys", None) or {})
    for name, t in model.state_dict(keep_vars=True).items():
        key = id(t)
        if key in seen and name not in tied:
            tied[name] = seen[key]
        else:
            seen[key] = name
    return tied


def verify_loaded(model: nn.Module, index: CheckpointIndex) -> None:
    """After loading: every state_dict tensor of the model is a stored tensor (or tied to one)
    of the stored shape, nothing is left on the meta device, every stored tensor was used, and
    every ``QuantLinear`` is self-consistent. Raises :class:`ModelError` otherwise."""
    state = model.state_dict(keep_vars=True)
    tied = _tied_keys(model)
    quant = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for name, t in state.items():
        owner, _, suffix = name.rpartition(".")
        source = tied.get(name, name)
        if source not in index.tensors:
            if suffix == "q_perm" and owner in quant and f"{owner}.q_invperm" in index.tensors:
                pass  # rebuilt from q_invperm (exllamav2 does not store it)
            else:
                raise ModelError(
                    f"{name}: not stored in {index.directory} (the model would hold an "
                    "uninitialised tensor); the config and the tensors disagree"
                )
        elif index.tensors[source].shape != tuple(t.shape):
            raise ModelError(
                f"{name}: stored shape {list(index.tensors[source].shape)} in "
                f"{index.where(source)}, the model has {list(t.shape)}"
            )
        if t.is_meta:
            raise ModelError(f"{name}: was never loaded (still on the meta device)")
    unused = sorted(set(index.tensors) - set(state))
    if unused:
        raise ModelError(
            f"{unused[0]} ({index.where(unused[0])}) and {len(unused) - 1} more stored "
            "tensor(s) have no place in the model built from config.json"
        )
    for n, m in model.named_modules():
        if isinstance(m, QuantLinear):
            m.validate(n)
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear) and n in quant:
            raise ModelError(f"{n}: stored as EXL2 but still an nn.Linear")


def _read_tensors(index: CheckpointIndex, names: Iterable[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for n in names:
        by_file.setdefault(index.tensors[n].file, []).append(n)
    out: dict[str, torch.Tensor] = {}
    for file, keys in by_file.items():
        with safe_open(file, framework="pt", device="cpu") as f:
            for k in keys:
                out[k] = f.get_tensor(k)
    return out


def _head_name(model: Any) -> str | None:
    head = model.get_output_embeddings()
    for n, m in model.named_modules():
        if m is head:
            return str(n)
    return None


def load(
    directory: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float16,
    cache_weights: bool = False,
) -> Any:
    """Builds the transformers causal LM of an EXL2 directory with ``QuantLinear`` modules.

    ``dtype`` is the dtype of the unquantized tensors (embeddings, norms, a non-quantized head)
    and of the activations; quantized tensors keep their stored dtypes. ``cache_weights`` turns
    on each ``QuantLinear``'s dequantized-weight cache (fast repeated CPU forwards, 4 bytes per
    weight). Returns the model in eval mode on ``device``.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    if dtype not in MODEL_DTYPES:
        raise ModelError(f"load: dtype must be float16, bfloat16 or float32, got {dtype}")
    index = scan_checkpoint(directory)
    if not (directory / "config.json").is_file():
        raise ModelError(f"{directory}: no config.json")
    prefixes = quantized_prefixes(index)
    if not prefixes:
        raise ModelError(f"{directory}: no tensor ends in .q_weight; this is not an EXL2 model")
    config = AutoConfig.from_pretrained(directory)
    qc = getattr(config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if qc is not None and str(method) != "exl2":
        raise ModelError(
            f"{directory}/config.json: quantization_config.quant_method is {method!r}, "
            "expected 'exl2'"
        )
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # building the skeleton must not invoke any quantizer

    # Parameters on meta, buffers real: non-persistent buffers (rotary tables) are computed.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)  # type: ignore[no-untyped-call]
    head = _head_name(model)
    if head is not None and getattr(config, "tie_word_embeddings", False):
        # A stored head (quantized or not) is the head: EXL2 always writes it untied.
        if f"{head}.q_weight" in index.tensors or f"{head}.weight" in index.tensors:
            config.tie_word_embeddings = False
            with init_empty_weights(include_buffers=False):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)  # type: ignore[no-untyped-call]
    replace_quantized_linears(model, index)

    expected = model.state_dict(keep_vars=True)
    tied = _tied_keys(model)
    for name in expected:
        if name in tied or name in index.tensors:
            continue
        owner = name.rpartition(".")[0]
        if name.endswith(".q_perm") and f"{owner}.q_invperm" in index.tensors:
            continue
        raise ModelError(
            f"{name}: missing from {directory} (the model built from config.json needs it)"
        )
    to_load = [n for n in expected if n not in tied and n in index.tensors]
    unexpected = sorted(set(index.tensors) - set(to_load))
    if unexpected:
        raise ModelError(
            f"{unexpected[0]} ({index.where(unexpected[0])}): unexpected tensor, the model "
            f"built from config.json has no such parameter ({len(unexpected)} in all)"
        )
    state = _read_tensors(index, to_load)
    for name, value in state.items():
        want = expected[name]
        where = index.where(name)
        if tuple(value.shape) != tuple(want.shape):
            raise ModelError(
                f"{name} ({where}): stored shape {list(value.shape)}, the config gives "
                f"{list(want.shape)}"
            )
        suffix = name.rpartition(".")[2]
        owner = name.rpartition(".")[0]
        if owner in prefixes and suffix in QUANT_DTYPES:
            if value.dtype != QUANT_DTYPES[suffix]:
                raise ModelError(
                    f"{name} ({where}): stored as {value.dtype}, expected {QUANT_DTYPES[suffix]}"
                )
        elif owner in prefixes and suffix == "bias":
            pass  # QuantLinear keeps the stored fp16 bias
        elif not value.is_floating_point():
            raise ModelError(f"{name} ({where}): stored as {value.dtype}, expected a float")
        elif not bool(torch.isfinite(value).all()):
            raise ModelError(f"{name} ({where}): holds NaN or inf")
        else:
            state[name] = value.to(dtype)
        if owner in prefixes and suffix == "bias":
            state[name] = value.to(torch.float16)
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    verify_loaded(model, index)
    model.to(device)
    model.eval()
    if cache_weights:
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.cache_weight(True)
    model.config.quantization_config = qc
    return model


class _CallableModule(types.ModuleType):
    """Importing the submodule ``exl2rs.load`` rebinds the package attribute ``exl2rs.load``
    from the function to this module; making the module callable keeps
    ``exl2rs.load(DIR)`` working either way."""

    def __call__(
        self,
        directory: str | Path,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float16,
        cache_weights: bool = False,
    ) -> Any:
        return load(directory, device=device, dtype=dtype, cache_weights=cache_weights)


sys.modules[__name__].__class__ = _CallableModule
