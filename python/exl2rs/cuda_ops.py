"""CUDA implementations of ``exl2rs::exl2_matmul`` and ``exl2rs::exl2_dequantize``.

Importing this module registers the kernels for the ``cuda`` device (``exl2rs.ops`` imports it
when CUDA is available). The extension is compiled by nvcc through
``torch.utils.cpp_extension.load`` on the first CUDA call, not at import, into
``$EXL2RS_CACHE/torch_extensions/<torch version>-<source hash>`` (default cache
``~/.cache/exl2rs``): a new torch or edited sources get a new folder, and a file lock keeps two
processes from building the same one at once.

Paths: ``M <= GEMV_MAX_ROWS`` activation rows use the GEMV kernel (fp32 accumulation, split-K
partial sums reduced in a fixed order, so results are bit-reproducible); larger batches
dequantize to x's dtype and call cuBLAS through ``torch.matmul``, in K chunks when the
temporary matrix would exceed ``DEQUANT_TEMP_BYTES``.
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import os
import shutil
import sys
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from exl2rs._core import PackError
from exl2rs.ops import Exl2Layout, _check, _check_x, parse_q_groups

__all__ = [
    "DEQUANT_TEMP_BYTES",
    "GEMV_MAX_ROWS",
    "KernelPlan",
    "build_dir",
    "load_extension",
    "plan_for",
    "source_dir",
]

GEMV_MAX_ROWS = 32
# Largest dequantized temporary for the large-batch path before it splits K into chunks.
DEQUANT_TEMP_BYTES = 1 << 30
# GEMV grids aim at this many blocks per SM (splitting K until they get there).
_BLOCKS_PER_SM = 4
_SOURCES = ("exl2_kernels.cuh", "exl2_launch.h", "exl2_launch.cu", "exl2_bindings.cpp")
_EXT_NAME = "exl2rs_cuda"


def source_dir() -> Path:
    """The kernel sources: ``exl2rs/cuda`` beside this file (checkout and installed wheel)."""
    return Path(__file__).resolve().parent / "cuda"


def _sources() -> list[Path]:
    root = source_dir()
    missing = [name for name in _SOURCES if not (root / name).is_file()]
    if missing:
        raise RuntimeError(
            f"exl2rs CUDA kernels: source files {missing} are missing from {root}; the "
            "installation is incomplete (reinstall exl2rs)"
        )
    return [root / name for name in _SOURCES]


def _source_hash() -> str:
    digest = hashlib.sha256()
    for path in _sources():
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def build_dir() -> Path:
    """Where the extension is built: one folder per torch version and source hash."""
    env = os.environ.get("EXL2RS_CACHE")
    cache = Path(env).expanduser() if env else Path.home() / ".cache" / "exl2rs"
    return cache / "torch_extensions" / f"{torch.__version__}-{_source_hash()}"


def _check_toolchain() -> None:
    """A clear error naming what is missing, before torch's builder fails less clearly."""
    from torch.utils import cpp_extension

    missing = []
    cuda_home = cpp_extension.CUDA_HOME
    nvcc = shutil.which("nvcc")
    if nvcc is None and cuda_home is not None:
        candidate = Path(cuda_home) / "bin" / "nvcc"
        nvcc = str(candidate) if candidate.is_file() else None
    if nvcc is None:
        missing.append(
            "nvcc (install the CUDA toolkit matching torch's CUDA "
            f"{torch.version.cuda}, or set CUDA_HOME)"
        )
    if not cpp_extension.is_ninja_available():
        missing.append("ninja (pip install ninja)")
    if torch.version.cuda is None:
        missing.append("a CUDA build of torch (this torch has no CUDA support)")
    if missing:
        raise RuntimeError(
            "exl2rs CUDA kernels cannot be built: missing " + "; ".join(missing) + ". The CPU "
            "reference (tensors on the CPU) works without them."
        )


@contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".exl2rs-build.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_load_lock = threading.Lock()


@lru_cache(maxsize=1)
def _load() -> Any:
    _check_toolchain()
    from torch.utils import cpp_extension

    folder = build_dir()
    with _build_lock(folder):
        built = any(folder.glob(f"{_EXT_NAME}*.so"))
        if not built:
            arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or "the GPUs present"
            print(
                f"exl2rs: compiling the CUDA kernels for {arch} (first use, about a minute) "
                f"in {folder}",
                file=sys.stderr,
                flush=True,
            )
        return cpp_extension.load(
            name=_EXT_NAME,
            sources=[str(p) for p in _sources() if p.suffix in (".cu", ".cpp")],
            extra_include_paths=[str(source_dir())],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "-lineinfo"],
            build_directory=str(folder),
            verbose=False,
        )


def load_extension() -> Any:
    """The compiled extension module (built on the first call)."""
    with _load_lock:
        return _load()


@dataclass(frozen=True)
class KernelPlan:
    """What the kernels need beyond the stored tensors, derived once per matrix.

    ``chunks`` int32 ``[C, 4]`` (storage row, rows, q_weight row, group << 4 | bits): runs of one
    width sized so each warp of a block decodes one super-block; ``group_rows`` int32 ``[G+1]``:
    first storage row of each group, then K.
    """

    layout: Exl2Layout
    chunks: torch.Tensor
    group_rows: torch.Tensor
    chunk_rows: tuple[int, ...]  # first storage row of each chunk, then K

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_rows) - 1


def _build_plan(
    q_groups: torch.Tensor, q_perm: torch.Tensor, qrows: int, ext: Any, op: str
) -> KernelPlan:
    layout = parse_q_groups(q_groups.cpu(), qrows, f"{op}: q_groups")
    k = layout.rows
    if q_perm.shape[0] != k:
        raise PackError(f"{op}: q_groups describes {k} input rows, q_perm has {q_perm.shape[0]}")
    # The kernels index x with q_perm: a bad entry would read out of bounds, so check once.
    lo, hi = int(q_perm.min()), int(q_perm.max())
    if lo < 0 or hi >= k:
        bad = lo if lo < 0 else hi
        raise PackError(f"{op}: q_perm holds {bad}, expected input rows in 0..{k - 1}")
    if k > 2**31 - 1 or qrows > 2**31 - 1:
        raise PackError(f"{op}: {k} rows exceed the kernels' 32-bit indexing")
    group_starts = [r0 for _, r0, _, _ in layout.groups] + [k]
    # Runs of consecutive groups of one width (contiguous in storage and in q_weight), cut
    # into chunks of the kernel's chunk size for that width.
    runs: list[list[int]] = []  # [bits, first row, rows, first q_weight row]
    for bits, r0, rows, q0 in layout.groups:
        if runs and runs[-1][0] == bits:
            runs[-1][2] += rows
        else:
            runs.append([bits, r0, rows, q0])
    table: list[tuple[int, int, int, int]] = []
    g = 0
    for bits, r0, rows, q0 in runs:
        step = int(ext.chunk_rows(bits))
        for r in range(0, rows, step):
            row = r0 + r
            while group_starts[g + 1] <= row:
                g += 1
            table.append((row, min(step, rows - r), q0 + r * bits // 32, (g << 4) | bits))
    device = q_groups.device
    return KernelPlan(
        layout=layout,
        chunks=torch.tensor(table, dtype=torch.int32, device=device),
        group_rows=torch.tensor(group_starts, dtype=torch.int32, device=device),
        chunk_rows=tuple(row for row, _, _, _ in table) + (k,),
    )


# Plans keyed by the identity of the (q_groups, q_perm) tensors of a loaded layer: a weak
# reference proves the tensor is the same object, the version counter that it was not modified
# in place since.
_plans: dict[tuple[int, int, int], tuple[Any, Any, int, int, KernelPlan]] = {}
_plans_lock = threading.Lock()


def plan_for(
    q_groups: torch.Tensor, q_perm: torch.Tensor, qrows: int, op: str = "exl2_matmul"
) -> KernelPlan:
    """The cached :class:`KernelPlan` of one matrix (built, and validated, on first use)."""
    key = (id(q_groups), id(q_perm), qrows)
    with _plans_lock:
        hit = _plans.get(key)
    if hit is not None:
        ref_g, ref_p, ver_g, ver_p, plan = hit
        if (
            ref_g() is q_groups
            and ref_p() is q_perm
            and ver_g == q_groups._version
            and ver_p == q_perm._version
        ):
            return plan
    plan = _build_plan(q_groups, q_perm, qrows, load_extension(), op)

    def forget(_: Any, key: tuple[int, int, int] = key) -> None:
        with _plans_lock:
            _plans.pop(key, None)

    entry = (
        weakref.ref(q_groups, forget),
        weakref.ref(q_perm, forget),
        q_groups._version,
        q_perm._version,
        plan,
    )
    with _plans_lock:
        _plans[key] = entry
    return plan


@lru_cache(maxsize=16)
def _sm_count(device_index: int) -> int:
    return int(torch.cuda.get_device_properties(device_index).multi_processor_count)


def _splits(m: int, n_pad: int, num_chunks: int, ext: Any, device: torch.device) -> int:
    """K splits so the GEMV grid fills the GPU (each split a range of chunks)."""
    tile = int(ext.gemv_batch_tile(m))
    tiles = math.ceil(n_pad / int(ext.tile_cols())) * math.ceil(m / tile)
    target = _BLOCKS_PER_SM * _sm_count(device.index if device.index is not None else 0)
    return max(1, min(num_chunks, math.ceil(target / tiles)))


def _aligned(q_weight: torch.Tensor) -> torch.Tensor:
    """q_weight contiguous and 16-byte aligned (the GEMV reads it with 128-bit loads)."""
    q_weight = q_weight.contiguous()
    if q_weight.data_ptr() % 16:
        q_weight = q_weight.clone()
    return q_weight


def _dequantize_storage(
    ext: Any,
    plan: KernelPlan,
    tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    c0: int,
    c1: int,
    out_features: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Storage-order rows of chunks ``[c0, c1)``."""
    q_weight, q_scale, q_scale_max = tensors
    r0, r1 = plan.chunk_rows[c0], plan.chunk_rows[c1]
    out: torch.Tensor = ext.dequantize(
        q_weight,
        q_scale,
        q_scale_max,
        plan.chunks,
        plan.group_rows,
        c0,
        c1 - c0,
        None,
        r0,
        r1 - r0,
        out_features,
        dtype,
    )
    return out


def _cuda_dequantize(
    q_weight: torch.Tensor,
    q_scale: torch.Tensor,
    q_scale_max: torch.Tensor,
    q_groups: torch.Tensor,
    q_perm: torch.Tensor,
    out_features: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    op = "exl2_dequantize"
    _check(q_weight, q_scale, q_scale_max, q_groups, q_perm, out_features, op)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise PackError(f"{op}: dtype must be float16, bfloat16 or float32, got {dtype}")
    ext = load_extension()
    plan = plan_for(q_groups, q_perm, q_weight.shape[0], op)
    k = plan.layout.rows
    out: torch.Tensor = ext.dequantize(
        _aligned(q_weight),
        q_scale.contiguous(),
        q_scale_max.contiguous(),
        plan.chunks,
        plan.group_rows,
        0,
        plan.num_chunks,
        q_perm.contiguous(),
        0,
        k,
        out_features,
        dtype,
    )
    return out


def _cuda_matmul(
    x: torch.Tensor,
    q_weight: torch.Tensor,
    q_scale: torch.Tensor,
    q_scale_max: torch.Tensor,
    q_groups: torch.Tensor,
    q_perm: torch.Tensor,
    out_features: int,
) -> torch.Tensor:
    op = "exl2_matmul"
    _check(q_weight, q_scale, q_scale_max, q_groups, q_perm, out_features, op)
    _check_x(x, q_weight, q_perm)
    ext = load_extension()
    plan = plan_for(q_groups, q_perm, q_weight.shape[0], op)
    k = plan.layout.rows
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    tensors = (_aligned(q_weight), q_scale.contiguous(), q_scale_max.contiguous())
    perm = q_perm.contiguous()
    if m == 0:
        return x.new_empty((*x.shape[:-1], out_features))
    if m <= GEMV_MAX_ROWS:
        splits = _splits(m, q_weight.shape[1], plan.num_chunks, ext, x.device)
        y: torch.Tensor = ext.gemv(
            x2, *tensors, perm, plan.chunks, plan.group_rows, out_features, splits
        )
    else:
        y = _dequant_matmul(ext, plan, tensors, perm, x2, out_features)
    return y.reshape(*x.shape[:-1], out_features)


def _dequant_matmul(
    ext: Any,
    plan: KernelPlan,
    tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    perm: torch.Tensor,
    x2: torch.Tensor,
    out_features: int,
) -> torch.Tensor:
    """Large batches: dequantize (storage order) and let cuBLAS multiply, in K chunks if the
    temporary would be large. x is gathered into storage order instead of permuting W."""
    k = plan.layout.rows
    dtype = x2.dtype
    row_bytes = out_features * x2.element_size()
    if k * row_bytes <= DEQUANT_TEMP_BYTES:
        w = _dequantize_storage(ext, plan, tensors, 0, plan.num_chunks, out_features, dtype)
        return torch.matmul(x2.index_select(1, perm), w)
    # Chunk boundaries at whole kernel chunks, each temporary at most DEQUANT_TEMP_BYTES (one
    # chunk at least); partial products summed in fp32.
    acc = torch.zeros((x2.shape[0], out_features), dtype=torch.float32, device=x2.device)
    max_rows = max(1, DEQUANT_TEMP_BYTES // row_bytes)
    c0 = 0
    while c0 < plan.num_chunks:
        c1 = c0 + 1
        while c1 < plan.num_chunks and plan.chunk_rows[c1 + 1] - plan.chunk_rows[c0] <= max_rows:
            c1 += 1
        w = _dequantize_storage(ext, plan, tensors, c0, c1, out_features, dtype)
        r0, r1 = plan.chunk_rows[c0], plan.chunk_rows[c1]
        acc += torch.matmul(x2.index_select(1, perm[r0:r1]), w).to(torch.float32)
        c0 = c1
    return acc.to(dtype)


torch.library.register_kernel("exl2rs::exl2_matmul", "cuda", _cuda_matmul)
torch.library.register_kernel("exl2rs::exl2_dequantize", "cuda", _cuda_dequantize)
