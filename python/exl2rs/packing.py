"""EXL2 and GPTQ-v1 tensor packing: a typed facade over the Rust core.

Every function accepts NumPy arrays or (CPU or GPU) torch tensors and returns NumPy arrays in
the dtypes the formats store (int32 words, int16 ``q_groups``, float16 ``q_scale_max`` and
``scales``). Matrices are ``[rows, cols]`` = ``[in_features, out_features]``, the orientation both
formats use. Bad input raises :class:`exl2rs.PackError` naming the tensor and the value.

Large fresh results (4 MiB and up: :func:`pack_columns`, :func:`unpack_columns` and the
dequantizers) live in memory recycled from results of the same size that were dropped
earlier, so a loop over same-shaped matrices does not pay the kernel's first-touch page faults
on every call. At most 512 MiB of idle memory is kept (``EXL2RS_OUTPUT_CACHE_MB`` at import,
or :func:`set_output_cache`); :func:`output_cache_info` shows the counters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from exl2rs import _core
from exl2rs._core import PackError

if TYPE_CHECKING:
    import torch

    ArrayLike = npt.NDArray[Any] | torch.Tensor
else:
    ArrayLike = Any

__all__ = [
    "Exl2Tensors",
    "Exl2Unpacked",
    "GptqTensors",
    "GptqUnpacked",
    "PackError",
    "dequantize_exl2",
    "dequantize_gptq",
    "clear_output_cache",
    "exl2_layout",
    "gptq_g_idx",
    "output_cache_info",
    "pack_columns",
    "pack_exl2",
    "pack_gptq",
    "set_output_cache",
    "unpack_columns",
    "unpack_exl2",
    "unpack_gptq",
]

Groups = list[tuple[int, int]]


def _np(x: ArrayLike, name: str, ndim: int, kind: str) -> npt.NDArray[Any]:
    """``x`` as a NumPy array of the right rank and dtype kind ('i' integer, 'f' float)."""
    if not isinstance(x, np.ndarray):
        if type(x).__module__.split(".")[0] != "torch":
            kind_name = type(x).__name__
            raise PackError(f"{name}: expected a NumPy array or torch tensor, got {kind_name}")
        x = x.detach().cpu().numpy()
    if x.ndim != ndim:
        raise PackError(f"{name}: expected a {ndim}-D array, got shape {list(x.shape)}")
    ok = x.dtype.kind in "iu" if kind == "i" else x.dtype.kind in "fiu"
    if not ok or x.dtype == np.bool_:
        want = "an integer" if kind == "i" else "a numeric"
        raise PackError(f"{name}: expected {want} dtype, got {x.dtype}")
    return x


def _f32(x: ArrayLike, name: str, ndim: int) -> npt.NDArray[np.float32]:
    return np.ascontiguousarray(_np(x, name, ndim, "f"), dtype=np.float32)


def _i32(x: ArrayLike, name: str, ndim: int) -> npt.NDArray[np.int32]:
    a = _np(x, name, ndim, "i")
    if a.dtype == np.uint32:  # some writers store the words unsigned: same bits
        return np.ascontiguousarray(a).view(np.int32)
    if a.dtype != np.int32:
        raise PackError(f"{name}: expected int32 packed words, got {a.dtype}")
    return np.ascontiguousarray(a)


def pack_columns(
    codes: ArrayLike, bits: int, out: npt.NDArray[np.int32] | None = None
) -> npt.NDArray[np.int32]:
    """Packs ``[rows, cols]`` codes along the rows (LSB first) into ``[rows*bits/32, cols]``.

    Codes of any integer dtype are read in place (no conversion copy); the range check runs
    inside the packing kernel and names the first code outside ``0..2**bits - 1``.

    With ``out`` (a C-contiguous, writeable int32 NumPy array of exactly that shape) the words
    are written into it and it is returned: reusing one buffer skips allocating and
    first-touching a new array. On an out-of-range code the error is raised and ``out`` holds
    unspecified words."""
    return _core.pack_columns(_np(codes, "codes", 2, "i"), bits, out)


def unpack_columns(
    packed: ArrayLike, bits: int, out: npt.NDArray[np.uint8] | None = None
) -> npt.NDArray[np.uint8]:
    """Inverse of :func:`pack_columns`: ``[qrows, cols]`` words to ``[qrows*32/bits, cols]``
    uint8 codes.

    With ``out`` (a C-contiguous, writeable uint8 NumPy array of exactly that shape) the codes
    are written into it and it is returned: reusing one buffer skips allocating and
    first-touching a new array, which for 2/3-bit codes costs more than the unpacking (a fresh
    result of 4 MiB or more reuses a dropped one's memory when one of the same size is idle,
    see :func:`output_cache_info`)."""
    return _core.unpack_columns(_i32(packed, "packed", 2), bits, out)


def set_output_cache(max_bytes: int) -> None:
    """Limits the idle memory kept for recycling large results, in bytes (0 disables
    recycling and frees what is held)."""
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    _core.set_output_cache(max_bytes)


def clear_output_cache() -> None:
    """Frees the idle recycled memory now; the limit stays."""
    _core.clear_output_cache()


def output_cache_info() -> dict[str, int]:
    """Counters of the result-recycling pool: ``cached_bytes``, ``cached_buffers``,
    ``max_bytes``, ``hits``, ``misses`` and ``min_pooled_bytes`` (smaller results are plain
    NumPy arrays)."""
    return _core.output_cache_info()


def exl2_layout(
    rows: int, bits: Sequence[int], bits_prop: Sequence[float], group_size: int | Sequence[int]
) -> Groups:
    """exllamav2's ``(bits, rows)`` groups for a QParams over ``rows`` input rows."""
    gs = [group_size] * len(bits) if isinstance(group_size, int) else list(group_size)
    return _core.exl2_layout(rows, list(bits), list(bits_prop), gs)


@dataclass(frozen=True)
class Exl2Tensors:
    """The stored tensors of one EXL2 linear; ``cols`` is N before padding to 32."""

    q_weight: npt.NDArray[np.int32]
    q_scale: npt.NDArray[np.int32]
    q_scale_max: npt.NDArray[np.float16]
    q_groups: npt.NDArray[np.int16]
    q_invperm: npt.NDArray[np.int32]
    cols: int

    def state_dict(self, prefix: str) -> dict[str, npt.NDArray[Any]]:
        """Tensors keyed as exllamav2 names them, e.g. ``prefix + ".q_weight"``."""
        names = ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm")
        return {f"{prefix}.{n}": getattr(self, n) for n in names}

    def unpack(self) -> Exl2Unpacked:
        return unpack_exl2(self)

    def dequantize(self) -> npt.NDArray[np.float32]:
        return dequantize_exl2(self)


@dataclass(frozen=True)
class Exl2Unpacked:
    """What EXL2 tensors encode: codes and scales in storage (act-) order, and the permutation
    (storage row ``i`` is input row ``perm[i]``)."""

    codes: npt.NDArray[np.uint8]
    scales: npt.NDArray[np.uint8]
    scale_max: npt.NDArray[np.float32]
    perm: npt.NDArray[np.int64]
    groups: Groups


def pack_exl2(
    codes: ArrayLike,
    groups: Sequence[tuple[int, int]],
    scales: ArrayLike,
    scale_max: ArrayLike,
    perm: ArrayLike | None = None,
) -> Exl2Tensors:
    """Packs one EXL2 matrix.

    ``codes`` ``[K, N]`` in storage (act-) order, each below ``2**bits`` of its group;
    ``groups`` ``[(bits, rows), ...]`` with non-increasing widths; ``scales`` ``[G, N]`` in
    1..16; ``scale_max`` ``[G]`` (stored as float16, so it is rounded to float16 here, as the
    loader will see it); ``perm`` ``[K]``: storage row ``i`` is input row ``perm[i]``.
    """
    c = _np(codes, "codes", 2, "i")
    sm16 = _f32(scale_max, "q_scale_max", 1).astype(np.float16)
    p = None if perm is None else _np(perm, "perm", 1, "i")
    groups_list = [(int(b), int(r)) for b, r in groups]
    d = _core.exl2_pack(c, groups_list, _np(scales, "q_scale", 2, "i"), sm16.astype(np.float32), p)
    return Exl2Tensors(
        q_weight=d["q_weight"],
        q_scale=d["q_scale"],
        q_scale_max=sm16,
        q_groups=d["q_groups"],
        q_invperm=d["q_invperm"],
        cols=int(c.shape[1]),
    )


def _exl2_args(t: Exl2Tensors) -> tuple[Any, ...]:
    return (
        _i32(t.q_weight, "q_weight", 2),
        _i32(t.q_scale, "q_scale", 2),
        _f32(t.q_scale_max, "q_scale_max", 1),
        _np(t.q_groups, "q_groups", 1, "i"),
        _np(t.q_invperm, "q_invperm", 1, "i"),
        t.cols,
    )


def unpack_exl2(t: Exl2Tensors) -> Exl2Unpacked:
    d = _core.exl2_unpack(*_exl2_args(t))
    return Exl2Unpacked(d["codes"], d["scales"], d["scale_max"], d["perm"], d["groups"])


def dequantize_exl2(t: Exl2Tensors) -> npt.NDArray[np.float32]:
    """``[K, N]`` float32 weights in the original input-row order."""
    return _core.exl2_dequantize(*_exl2_args(t))


@dataclass(frozen=True)
class GptqTensors:
    """The stored tensors of one GPTQ v1 linear."""

    qweight: npt.NDArray[np.int32]
    qzeros: npt.NDArray[np.int32]
    scales: npt.NDArray[np.float16]
    g_idx: npt.NDArray[np.int32]
    bits: int

    def state_dict(self, prefix: str) -> dict[str, npt.NDArray[Any]]:
        names = ("qweight", "qzeros", "scales", "g_idx")
        return {f"{prefix}.{n}": getattr(self, n) for n in names}

    def unpack(self) -> GptqUnpacked:
        return unpack_gptq(self)

    def dequantize(self) -> npt.NDArray[np.float32]:
        return dequantize_gptq(self)


@dataclass(frozen=True)
class GptqUnpacked:
    codes: npt.NDArray[np.uint8]
    zeros: npt.NDArray[np.uint16]
    scales: npt.NDArray[np.float32]
    g_idx: npt.NDArray[np.int32]


def gptq_g_idx(
    rows: int, group_size: int | None = None, perm: ArrayLike | None = None
) -> npt.NDArray[np.int32]:
    """``g_idx``: with act-order ``perm``, input row ``perm[i]`` is in group
    ``i // group_size``; ``group_size`` None or -1 means one group."""
    gs = None if group_size is None or group_size == -1 else group_size
    p = None if perm is None else _np(perm, "perm", 1, "i")
    return _core.gptq_g_idx(rows, gs, p)


def pack_gptq(
    codes: ArrayLike, zeros: ArrayLike, scales: ArrayLike, g_idx: ArrayLike, bits: int
) -> GptqTensors:
    """Packs one GPTQ v1 matrix. ``zeros`` are the true zero points (1..2**bits; v1 stores
    zero - 1); ``scales`` are stored as float16."""
    s16 = _f32(scales, "scales", 2).astype(np.float16)
    d = _core.gptq_pack(
        _np(codes, "codes", 2, "i"),
        _np(zeros, "qzeros", 2, "i"),
        s16.astype(np.float32),
        _np(g_idx, "g_idx", 1, "i"),
        bits,
    )
    return GptqTensors(d["qweight"], d["qzeros"], s16, d["g_idx"], bits)


def _gptq_args(t: GptqTensors) -> tuple[Any, ...]:
    return (
        _i32(t.qweight, "qweight", 2),
        _i32(t.qzeros, "qzeros", 2),
        _f32(t.scales, "scales", 2),
        _np(t.g_idx, "g_idx", 1, "i"),
        t.bits,
    )


def unpack_gptq(t: GptqTensors) -> GptqUnpacked:
    d = _core.gptq_unpack(*_gptq_args(t))
    return GptqUnpacked(d["codes"], d["zeros"], d["scales"], d["g_idx"])


def dequantize_gptq(t: GptqTensors) -> npt.NDArray[np.float32]:
    """``[K, N]`` float32 weights: ``scales[g] * (q - zero[g])`` with ``g = g_idx[k]``."""
    return _core.gptq_dequantize(*_gptq_args(t))
