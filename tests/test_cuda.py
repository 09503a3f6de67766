"""The CUDA kernels (``exl2rs.cuda_ops``) against the CPU reference ops.

Tests marked ``cuda`` need a GPU (and nvcc + ninja to build the extension) and are skipped
without one. The unmarked tests cover the host side on any machine: where the sources live,
the build folder key, the toolchain error, and the chunk plan the kernels walk (checked by
emulating the kernels' traversal in NumPy).
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from exl2rs import cuda_ops, ops, packing
from exl2rs._core import PackError

# Rows per chunk by width, as exl2_kernels.cuh defines them (Width<B>::kChunkRows); the GPU
# test test_chunk_sizes_match_kernel checks this table against the compiled extension.
CHUNK_ROWS = {2: 256, 3: 256, 4: 128, 5: 128, 6: 128, 8: 64}
ROWS_PER_BLOCK = {2: 16, 3: 32, 4: 8, 5: 32, 6: 16, 8: 4}
SUPER_ROWS = {b: CHUNK_ROWS[b] // 4 for b in CHUNK_ROWS}  # one warp's rows per chunk


class FakeExt:
    """The extension's geometry queries, for planning without a GPU."""

    @staticmethod
    def chunk_rows(bits: int) -> int:
        return CHUNK_ROWS[bits]


def random_pack(
    groups: list[tuple[int, int]], n: int, seed: int, act_order: bool = True
) -> packing.Exl2Tensors:
    rng = np.random.default_rng(seed)
    k = sum(r for _, r in groups)
    codes = np.concatenate([rng.integers(0, 1 << b, size=(r, n)) for b, r in groups])
    scales = rng.integers(1, 17, size=(len(groups), n))
    smax = rng.uniform(1e-3, 0.2, size=len(groups))
    perm = rng.permutation(k) if act_order else None
    return packing.pack_exl2(codes.astype(np.uint8), groups, scales, smax, perm)


def op_args(t: packing.Exl2Tensors, device: str = "cpu") -> list[torch.Tensor]:
    q_perm = np.argsort(t.q_invperm).astype(np.int32)
    arrays = (t.q_weight, t.q_scale, t.q_scale_max, t.q_groups, q_perm)
    return [torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in arrays]


def uniform_groups(bits: int, k: int, group_size: int) -> list[tuple[int, int]]:
    return [(bits, min(group_size, k - r)) for r in range(0, k, group_size)]


LAYOUTS = [
    pytest.param([(2, 512)], 64, id="2b"),
    pytest.param(uniform_groups(3, 384, 96), 33, id="3b-odd-n"),
    pytest.param(uniform_groups(4, 1000, 32), 200, id="4b-g32-short-last"),
    pytest.param(uniform_groups(5, 256, 64), 31, id="5b-n31"),
    pytest.param(uniform_groups(6, 208, 48), 100, id="6b"),
    pytest.param(uniform_groups(8, 100, 36) + [(8, 4)], 1, id="8b-one-column"),
    pytest.param([(8, 32), (6, 32), (5, 32), (4, 64), (3, 64), (2, 32)], 70, id="all-widths-mixed"),
    pytest.param(
        uniform_groups(8, 64, 32) + uniform_groups(4, 640, 128) + uniform_groups(3, 320, 32),
        160,
        id="8-4-3-wide",
    ),
]


# ---------------------------------------------------------------------------------------------
# Host side (any machine)


def test_sources_ship_inside_the_package() -> None:
    root = cuda_ops.source_dir()
    assert root.parent == Path(cuda_ops.__file__).resolve().parent
    for name in cuda_ops._SOURCES:
        assert (root / name).is_file(), name


def test_build_dir_changes_with_torch_and_sources(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EXL2RS_CACHE", str(tmp_path))
    first = cuda_ops.build_dir()
    assert first.parent == tmp_path / "torch_extensions"
    assert first.name.startswith(torch.__version__ + "-")
    copy = tmp_path / "src" / "cuda"
    copy.mkdir(parents=True)
    for name in cuda_ops._SOURCES:
        (copy / name).write_bytes((cuda_ops.source_dir() / name).read_bytes())
    monkeypatch.setattr(cuda_ops, "source_dir", lambda: copy)
    assert cuda_ops.build_dir() == first  # same bytes, same folder
    (copy / "exl2_launch.cu").write_text((copy / "exl2_launch.cu").read_text() + "\n// edit\n")
    assert cuda_ops.build_dir() != first
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert cuda_ops.build_dir().name.startswith("0.0.0-other-")


def test_missing_sources_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda_ops, "source_dir", lambda: tmp_path)
    with pytest.raises(RuntimeError, match="exl2_kernels.cuh"):
        cuda_ops.build_dir()


def test_missing_toolchain_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    monkeypatch.setattr(cuda_ops.shutil, "which", lambda _: None)
    with pytest.raises(RuntimeError, match=r"nvcc.*ninja"):
        cuda_ops._check_toolchain()


def decode(block: np.ndarray, bits: int, r: int) -> np.ndarray:
    """Code r minus the zero point from a block of words, as code_minus_zero() does."""
    wi, sh = divmod(r * bits, 32)
    v = block[wi] >> np.uint64(sh)
    if sh + bits > 32:  # straddles two words
        v |= block[wi + 1] << np.uint64(32 - sh)
    return (v & np.uint64((1 << bits) - 1)).astype(np.float64) - (1 << (bits - 1))


def emulate_gemv(plan: cuda_ops.KernelPlan, t: packing.Exl2Tensors, x: np.ndarray) -> np.ndarray:
    """The GEMV kernels' traversal in NumPy: chunk -> warp super-block -> word block, the group
    found by walking group_rows, each block's partial sum scaled by its group's scale."""
    chunks = plan.chunks.numpy()
    group_rows = plan.group_rows.numpy()
    perm = np.argsort(t.q_invperm)
    words = t.q_weight.view(np.uint32).astype(np.uint64)
    n_pad = words.shape[1]
    qs = (t.q_scale.view(np.uint32)[:, :, None] >> (4 * np.arange(8, dtype=np.uint32))) & 15
    sq = ((qs.reshape(qs.shape[0], -1) + 1.0) ** 2)[:, :n_pad]
    smax = t.q_scale_max.astype(np.float64) / 256
    xs_all = x[:, perm].astype(np.float64)
    y = np.zeros((x.shape[0], n_pad))
    seen = np.zeros(len(perm), dtype=int)
    for row0, rows, qrow0, gb in chunks:
        bits, g = int(gb) & 15, int(gb) >> 4
        rpb, wpb = ROWS_PER_BLOCK[bits], bits * ROWS_PER_BLOCK[bits] // 32
        for r_sb in range(0, rows, SUPER_ROWS[bits]):  # one warp each
            for r_blk in range(r_sb, min(r_sb + SUPER_ROWS[bits], rows), rpb):
                row = row0 + r_blk
                while group_rows[g + 1] <= row:
                    g += 1
                q0 = qrow0 + (r_blk // rpb) * wpb
                block = words[q0 : q0 + wpb]
                codes = np.stack([decode(block, bits, r) for r in range(rpb)])
                part = xs_all[:, row : row + rpb] @ codes
                y += part * (sq[g] * smax[g])
                seen[row : row + rpb] += 1
    assert (seen == 1).all(), "every storage row is visited exactly once"
    return y[:, : t.cols]


@pytest.mark.parametrize(("groups", "n"), LAYOUTS)
def test_plan_matches_layout_and_emulated_kernel(groups: list[tuple[int, int]], n: int) -> None:
    t = random_pack(groups, n, seed=len(groups) + n)
    q_weight, _, _, q_groups, q_perm = op_args(t)
    plan = cuda_ops._build_plan(q_groups, q_perm, q_weight.shape[0], FakeExt(), "test")
    chunks = plan.chunks.numpy()
    k = sum(r for _, r in groups)
    assert plan.chunk_rows[0] == 0 and plan.chunk_rows[-1] == k
    # Contiguous, in order, one width each, whole word blocks, at most one chunk size.
    bits_of_row = np.concatenate([[b] * r for b, r in groups])
    qrow_of_row = np.concatenate(
        [
            [q0 + i * b // 32 for i in range(r)]
            for (b, r), q0 in zip(groups, t.q_groups[1::2], strict=True)
        ]
    )
    for (row, rows, qrow, gb), nxt in zip(chunks, plan.chunk_rows[1:], strict=True):
        bits = int(gb) & 15
        assert row + rows == nxt
        assert (bits_of_row[row : row + rows] == bits).all()
        assert rows % ROWS_PER_BLOCK[bits] == 0 and 0 < rows <= CHUNK_ROWS[bits]
        assert qrow == qrow_of_row[row]
        g = int(gb) >> 4
        assert plan.group_rows[g] <= row < plan.group_rows[g + 1]
    x = np.random.default_rng(1).standard_normal((3, k))
    want = x @ packing.dequantize_exl2(t).astype(np.float64)
    # want uses fp32 weights (the Rust dequantizer), the emulation exact fp64 ones.
    got = emulate_gemv(plan, t, x)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * float(np.abs(want).max()))


def test_plan_rejects_out_of_range_perm() -> None:
    t = random_pack([(4, 64)], 32, seed=3)
    q_weight, _, _, q_groups, q_perm = op_args(t)
    q_perm[5] = 64
    with pytest.raises(PackError, match="q_perm holds 64"):
        cuda_ops._build_plan(q_groups, q_perm, q_weight.shape[0], FakeExt(), "exl2_matmul")
    with pytest.raises(PackError, match="q_perm has 63"):
        cuda_ops._build_plan(q_groups, q_perm[:63], q_weight.shape[0], FakeExt(), "exl2_matmul")


def test_plan_cache_is_per_tensor_and_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda_ops, "load_extension", FakeExt)
    t = random_pack([(4, 64), (3, 32)], 32, seed=4)
    q_weight, _, _, q_groups, q_perm = op_args(t)
    first = cuda_ops.plan_for(q_groups, q_perm, q_weight.shape[0])
    assert cuda_ops.plan_for(q_groups, q_perm, q_weight.shape[0]) is first
    assert cuda_ops.plan_for(q_groups.clone(), q_perm, q_weight.shape[0]) is not first
    q_perm.copy_(q_perm.flip(0))  # in place: the cached plan must not be reused
    assert cuda_ops.plan_for(q_groups, q_perm, q_weight.shape[0]) is not first


# The kernels themselves, run on the CPU by tests/cuda_emu.cpp (g++ + the CUDA headers that
# `make cuda-check` installs): the real device code, one host thread per CUDA thread.


def _cuda_include() -> Path | None:
    env = os.environ.get("EXL2RS_CUDA_INCLUDE")
    candidates = [Path(env)] if env else []
    candidates += sorted(Path(sys.prefix).glob("cuda-toolchain-*/nvidia/*/include"))
    for inc in candidates:
        if (inc / "crt" / "host_defines.h").is_file() and (inc / "cuda_fp16.h").is_file():
            return inc
    return None


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    inc = _cuda_include()
    if cxx is None or inc is None:
        pytest.skip("no g++ or CUDA headers (make cuda-check installs them) for the emulator")
    harness = Path(__file__).with_name("cuda_emu.cpp")
    digest = hashlib.sha256(harness.read_bytes())
    for name in cuda_ops._SOURCES:
        digest.update((cuda_ops.source_dir() / name).read_bytes())
    from exl2rs.fixtures import cache_dir

    exe = cache_dir() / "cuda-emu" / digest.hexdigest()[:16] / "emu"
    if not exe.is_file():
        exe.parent.mkdir(parents=True, exist_ok=True)
        tmp = exe.with_suffix(".tmp")
        cmd = [cxx, "-std=c++20", "-O1", "-pthread", "-isystem", str(inc)]
        cmd += ["-I", str(cuda_ops.source_dir()), str(harness), "-o", str(tmp)]
        subprocess.run(cmd, check=True)
        tmp.replace(exe)
    return exe


EMU_DTYPES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


def run_emulator(
    exe: Path,
    folder: Path,
    mode: str,
    t: packing.Exl2Tensors,
    plan: cuda_ops.KernelPlan,
    dtype: torch.dtype,
    x: torch.Tensor | None = None,
    splits: int = 1,
) -> torch.Tensor:
    q_perm = np.argsort(t.q_invperm).astype(np.int32)
    arrays = {
        "q_weight": t.q_weight,
        "q_scale": t.q_scale,
        "q_scale_max": t.q_scale_max,
        "q_perm": q_perm,
        "chunks": plan.chunks.numpy(),
        "group_rows": plan.group_rows.numpy(),
    }
    for name, a in arrays.items():
        (folder / name).write_bytes(np.ascontiguousarray(a).tobytes())
    k, (q, n_pad) = len(q_perm), t.q_weight.shape
    m = 0 if x is None else x.shape[0]
    if x is not None:
        (folder / "x").write_bytes(x.contiguous().view(torch.uint8).numpy().tobytes())
    dims = [m, k, n_pad, t.cols, q, len(t.q_scale_max), plan.num_chunks, splits]
    args = [str(exe), str(folder), mode, str(EMU_DTYPES[dtype])] + [str(v) for v in dims]
    subprocess.run(args, check=True)
    out = (folder / ("y" if mode == "gemv" else "w")).read_bytes()
    rows = m if mode == "gemv" else k
    flat = torch.frombuffer(bytearray(out), dtype=dtype)
    return flat.reshape(rows, t.cols).clone()


@pytest.mark.parametrize(("groups", "n"), LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_kernels_emulated_on_cpu(
    emulator: Path, tmp_path: Path, groups: list[tuple[int, int]], n: int, dtype: torch.dtype
) -> None:
    t = random_pack(groups, n, seed=7 * n + len(groups))
    q_weight, _, _, q_groups, q_perm = op_args(t)
    plan = cuda_ops._build_plan(q_groups, q_perm, q_weight.shape[0], FakeExt(), "emu")
    # Dequantize: bit-identical to the CPU reference op.
    w = run_emulator(emulator, tmp_path, "dequant", t, plan, dtype)
    assert torch.equal(w, ops.exl2_dequantize(*op_args(t), n, dtype))
    # Storage (act-) order in two chunk ranges with a row base, as the K-chunked path uses it.
    ws = run_emulator(emulator, tmp_path, "dequant_storage", t, plan, dtype)
    assert torch.equal(ws, w[torch.from_numpy(np.argsort(t.q_invperm))])
    # GEMV at every batch tile (1, 2-4, 8 rows), with and without split-K, each against the
    # fp64 reference; a rerun is bit-identical.
    k = sum(r for _, r in groups)
    gen = torch.Generator().manual_seed(n)
    for m, splits in ((1, 1), (3, plan.num_chunks), (8, 2), (13, min(3, plan.num_chunks))):
        x = torch.randn(m, k, generator=gen).to(dtype)
        y = run_emulator(emulator, tmp_path, "gemv", t, plan, dtype, x, splits)
        assert bool(torch.isfinite(y).all())
        assert rel_err(y, reference(x, t)) < TOL[dtype], (m, splits)
        again = run_emulator(emulator, tmp_path, "gemv", t, plan, dtype, x, splits)
        assert torch.equal(y, again)


# ---------------------------------------------------------------------------------------------
# GPU


def poison_allocator() -> None:
    """Fill freed blocks of the caching allocator with NaN, so an output the kernel forgets to
    write shows up as NaN instead of a stale, plausible value."""
    for mib in (1, 8, 64):
        torch.full((mib << 18,), float("nan"), device="cuda")
    torch.cuda.synchronize()


def reference(x: torch.Tensor, t: packing.Exl2Tensors) -> torch.Tensor:
    """fp64 x @ W on the CPU from the Rust dequantizer (independent of both ops)."""
    w = torch.from_numpy(packing.dequantize_exl2(t)).double()
    return x.double().cpu() @ w


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double().cpu() - want).norm() / want.norm().clamp_min(1e-30))


# fp16/bf16 outputs are rounded once; fp32 GEMV differs from fp64 by summation order only.
TOL = {torch.float16: 1.5e-3, torch.bfloat16: 1.2e-2, torch.float32: 1e-5}
# The large-batch path multiplies fp16/bf16 weights (one more rounding, then cuBLAS).
TOL_GEMM = {torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5}


@pytest.fixture(scope="module")
def ext() -> Any:
    return cuda_ops.load_extension()


@pytest.mark.cuda
def test_chunk_sizes_match_kernel(ext: Any) -> None:
    assert {b: int(ext.chunk_rows(b)) for b in CHUNK_ROWS} == CHUNK_ROWS
    assert int(ext.chunk_rows(7)) == 0


@pytest.mark.cuda
@pytest.mark.parametrize(("groups", "n"), LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dequantize_is_bit_identical_to_cpu_reference(
    groups: list[tuple[int, int]], n: int, dtype: torch.dtype
) -> None:
    t = random_pack(groups, n, seed=n)
    poison_allocator()
    got = ops.exl2_dequantize(*op_args(t, "cuda"), n, dtype)
    want = ops.exl2_dequantize(*op_args(t, "cpu"), n, dtype)
    assert got.dtype == dtype and got.shape == want.shape
    assert torch.equal(got.cpu(), want)


@pytest.mark.cuda
@pytest.mark.parametrize(("groups", "n"), LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 2, 3, 7, 8, 19, 32, 33, 130])
def test_matmul_matches_reference(
    groups: list[tuple[int, int]], n: int, dtype: torch.dtype, m: int
) -> None:
    t = random_pack(groups, n, seed=m + n)
    k = sum(r for _, r in groups)
    args = op_args(t, "cuda")
    for trial in range(2):  # fresh activations and a poisoned pool before every call
        x = torch.randn(m, k, device="cuda", generator=None).to(dtype)
        poison_allocator()
        y = ops.exl2_matmul(x, *args, n)
        assert y.dtype == dtype and y.shape == (m, n)
        assert bool(torch.isfinite(y).all()), f"trial {trial}: non-finite output"
        tol = TOL if m <= cuda_ops.GEMV_MAX_ROWS else TOL_GEMM
        assert rel_err(y, reference(x, t)) < tol[dtype]


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("m", [1, 4, 16])
def test_large_matrix_with_split_k(bits: int, m: int) -> None:
    k, n = 4096, 1536
    t = random_pack(uniform_groups(bits, k, 128), n, seed=bits * 100 + m)
    args = op_args(t, "cuda")
    plan = cuda_ops.plan_for(args[3], args[4], args[0].shape[0])
    assert (
        cuda_ops._splits(
            m, args[0].shape[1], plan.num_chunks, cuda_ops.load_extension(), torch.device("cuda")
        )
        > 1
    )
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    poison_allocator()
    y = ops.exl2_matmul(x, *args, n)
    assert rel_err(y, reference(x, t)) < TOL[torch.float16]


@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 5, 32, 64])
def test_two_runs_are_bit_identical(m: int) -> None:
    t = random_pack(uniform_groups(4, 2048, 32) + uniform_groups(3, 1024, 64), 2048, seed=m)
    args = op_args(t, "cuda")
    x = torch.randn(m, 3072, device="cuda", dtype=torch.float16)
    first = ops.exl2_matmul(x, *args, 2048)
    poison_allocator()
    second = ops.exl2_matmul(x, *args, 2048)
    assert torch.equal(first, second)


@pytest.mark.cuda
def test_k_chunked_large_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    t = random_pack(uniform_groups(6, 512, 64) + uniform_groups(4, 1024, 128), 96, seed=9)
    args = op_args(t, "cuda")
    x = torch.randn(100, 1536, device="cuda", dtype=torch.float16)
    whole = ops.exl2_matmul(x, *args, 96)
    monkeypatch.setattr(cuda_ops, "DEQUANT_TEMP_BYTES", 300 * 96 * 2)  # ~2 chunks per temp
    chunked = ops.exl2_matmul(x, *args, 96)
    want = reference(x, t)
    assert rel_err(whole, want) < TOL_GEMM[torch.float16]
    assert rel_err(chunked, want) < TOL_GEMM[torch.float16]


@pytest.mark.cuda
def test_batched_and_strided_inputs() -> None:
    t = random_pack(uniform_groups(5, 256, 32), 77, seed=5)
    args = op_args(t, "cuda")
    x3 = torch.randn(2, 3, 256, device="cuda", dtype=torch.bfloat16)
    y3 = ops.exl2_matmul(x3, *args, 77)
    assert y3.shape == (2, 3, 77)
    assert rel_err(y3.reshape(6, 77), reference(x3.reshape(6, 256), t)) < TOL[torch.bfloat16]
    xt = torch.randn(256, 4, device="cuda", dtype=torch.float16).T  # not contiguous
    assert rel_err(ops.exl2_matmul(xt, *args, 77), reference(xt, t)) < TOL[torch.float16]
    one = torch.randn(256, device="cuda", dtype=torch.float16)
    assert ops.exl2_matmul(one, *args, 77).shape == (77,)


@pytest.mark.cuda
def test_bad_inputs_raise_named_errors() -> None:
    t = random_pack([(4, 64)], 32, seed=6)
    args = op_args(t, "cuda")
    x = torch.randn(2, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(PackError, match="last dim"):
        ops.exl2_matmul(x[:, :63], *args, 32)
    with pytest.raises(PackError, match="q_scale_max"):
        ops.exl2_matmul(x, args[0], args[1], args[2].float(), args[3], args[4], 32)
    bad_perm = args[4].clone()
    bad_perm[0] = -1
    with pytest.raises(PackError, match="q_perm holds -1"):
        ops.exl2_matmul(x, *args[:4], bad_perm, 32)
    with pytest.raises(PackError, match="x is on"):
        ops.exl2_matmul(x.cpu(), *args, 32)


# ---------------------------------------------------------------------------------------------
# A real model: SmolLM2-135M, RTN-quantized into an EXL2 directory


def fixture_or_skip(name: str) -> Any:
    """A real fixture from the cache; skipped (not failed) on a GPU machine without network
    and without a carried ``$EXL2RS_CACHE``."""
    from exl2rs import fixtures

    try:
        return getattr(fixtures, name)()
    except Exception as exc:  # download or conversion failure: say what is missing
        pytest.skip(f"fixture {name} unavailable ({type(exc).__name__}: {exc})")


@pytest.fixture(scope="module")
def smollm2_exl2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from exl2_dirs import mixed, uniform, write_exl2_dir  # the loader tests' builder

    smollm2_dir = fixture_or_skip("smollm2_dir")

    def config_for(name: str) -> Any:
        # Most linears at 4 bits / group 32, the MLP down projections mixed 8/4/3/2.
        return mixed() if name.endswith("down_proj") else uniform(4, 32)

    out = tmp_path_factory.mktemp("smollm2_exl2")
    return write_exl2_dir(smollm2_dir, out, config_for=config_for, head_bits=6)


@pytest.fixture(scope="module")
def eval_windows(smollm2_exl2_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    from exl2rs.evaluate import wiki_ho_windows

    tokenizer = AutoTokenizer.from_pretrained(smollm2_exl2_dir)
    return wiki_ho_windows(tokenizer, fixture_or_skip("wiki_text"))[
        :8
    ]  # 8 of the 32 windows: a relative check


def _perplexity(model: Any, windows: torch.Tensor, device: str) -> float:
    from exl2rs.evaluate import perplexity

    def logits_fn(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(ids.to(device)).logits.float().cpu()

    return perplexity(logits_fn, windows, batch_size=4)


@pytest.mark.cuda
@pytest.mark.slow
def test_smollm2_perplexity_gpu_matches_cpu(
    smollm2_exl2_dir: Path, eval_windows: torch.Tensor
) -> None:
    from exl2rs.load import load

    cpu = load(smollm2_exl2_dir, device="cpu", dtype=torch.float32, cache_weights=True)
    ppl_cpu = _perplexity(cpu, eval_windows, "cpu")
    del cpu
    gpu = load(smollm2_exl2_dir, device="cuda", dtype=torch.float16)
    ppl_gpu = _perplexity(gpu, eval_windows, "cuda")
    assert math.isfinite(ppl_gpu) and math.isfinite(ppl_cpu)
    assert abs(ppl_gpu / ppl_cpu - 1) < 0.005, (ppl_gpu, ppl_cpu)


@pytest.mark.cuda
@pytest.mark.slow
def test_exllamav2_loads_exl2rs_output(smollm2_exl2_dir: Path, eval_windows: torch.Tensor) -> None:
    exllamav2 = pytest.importorskip("exllamav2")
    from exl2rs.load import load

    config = exllamav2.ExLlamaV2Config(str(smollm2_exl2_dir))
    config.max_seq_len = eval_windows.shape[1]
    theirs = exllamav2.ExLlamaV2(config)
    theirs.load()
    ids = eval_windows[:2, :256]
    with torch.no_grad():
        logits_theirs = theirs.forward(ids).float().cpu()
    del theirs
    torch.cuda.empty_cache()
    ours = load(smollm2_exl2_dir, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        logits_ours = ours(ids.cuda()).logits.float().cpu()
    assert logits_theirs.shape[-1] >= logits_ours.shape[-1]
    logits_theirs = logits_theirs[..., : logits_ours.shape[-1]]
    # exllamav2 accumulates in fp16 (we do not): agreement at fp16 level, same predictions.
    assert rel_err(logits_theirs, logits_ours.double()) < 2e-2
    agree = (logits_theirs.argmax(-1) == logits_ours.argmax(-1)).float().mean()
    assert float(agree) > 0.97
