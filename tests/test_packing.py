"""exl2rs.packing: EXL2 / GPTQ-v1 packing from NumPy and torch, round trips, dequantization
against plain NumPy formulas, and errors that name the tensor and value."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from exl2rs import Exl2Error, PackError
from exl2rs import packing as pk

RPB = {2: 16, 3: 32, 4: 8, 5: 32, 6: 16, 8: 4}  # rows per packed block


def ref_pack(codes: npt.NDArray[np.integer], bits: int) -> npt.NDArray[np.int32]:
    """Reference: code r of a column sits at bits [r*bits, r*bits + bits) of its stream."""
    rows, cols = codes.shape
    out = np.zeros((rows * bits // 32 + 1, cols), dtype=np.uint64)
    for r in range(rows):
        word, shift = divmod(r * bits, 32)
        v = codes[r].astype(np.uint64) << np.uint64(shift)
        out[word] |= v & np.uint64(0xFFFFFFFF)
        out[word + 1] |= v >> np.uint64(32)
    return out[:-1].astype(np.uint32).view(np.int32)


def exl2_case(
    rng: np.random.Generator, groups: list[tuple[int, int]], cols: int
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8], npt.NDArray[np.float32], npt.NDArray]:
    codes = np.concatenate([rng.integers(0, 2**b, (r, cols), dtype=np.uint8) for b, r in groups])
    scales = rng.integers(1, 17, (len(groups), cols), dtype=np.uint8)
    scale_max = rng.uniform(0.01, 2.0, len(groups)).astype(np.float32)
    perm = rng.permutation(codes.shape[0])
    return codes, scales, scale_max, perm


def ref_dequant_exl2(
    codes: npt.NDArray,
    groups: list[tuple[int, int]],
    scales: npt.NDArray,
    sm: npt.NDArray,
    perm: npt.NDArray,
) -> npt.NDArray[np.float32]:
    w = np.zeros(codes.shape, dtype=np.float32)
    r0 = 0
    for g, (b, r) in enumerate(groups):
        q = codes[r0 : r0 + r].astype(np.float32) - np.float32(2 ** (b - 1))
        qs = scales[g].astype(np.float32)
        w[perm[r0 : r0 + r]] = q * qs * qs * np.float32(sm[g]) / np.float32(256)
        r0 += r
    return w


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_columns_numpy_and_torch(bits: int) -> None:
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2**bits, (3 * RPB[bits], 45), dtype=np.int64)
    packed = pk.pack_columns(codes, bits)
    assert packed.dtype == np.int32 and packed.shape == (3 * RPB[bits] * bits // 32, 45)
    np.testing.assert_array_equal(packed, ref_pack(codes, bits))
    np.testing.assert_array_equal(pk.pack_columns(torch.from_numpy(codes), bits), packed)
    np.testing.assert_array_equal(pk.unpack_columns(packed, bits), codes)
    # Fortran-ordered and strided views are copied in logical order, not misread.
    np.testing.assert_array_equal(pk.pack_columns(np.asfortranarray(codes), bits), packed)
    wide = np.zeros((codes.shape[0], 90), dtype=np.uint8)
    wide[:, ::2] = codes
    np.testing.assert_array_equal(pk.pack_columns(wide[:, ::2], bits), packed)
    np.testing.assert_array_equal(pk.unpack_columns(np.asfortranarray(packed), bits), codes)


def test_exl2_roundtrip_numpy_and_torch() -> None:
    rng = np.random.default_rng(0)
    groups = pk.exl2_layout(576, [8, 4, 3], [0.05, 0.1, 0.85], [32, 128, 128])
    assert groups[-1][1] < 128  # a short last group
    codes, scales, sm, perm = exl2_case(rng, groups, 45)  # 45 columns: padded to 64
    t = pk.pack_exl2(codes, groups, scales, sm, perm)
    assert t.q_weight.shape == (sum(r * b // 32 for b, r in groups), 64)
    assert t.q_scale.shape == (len(groups), 8) and t.q_scale_max.dtype == np.float16
    assert t.q_groups.dtype == np.int16 and t.q_groups[0::2].tolist() == [b for b, _ in groups]
    np.testing.assert_array_equal(t.q_invperm, np.argsort(perm))

    tt = pk.pack_exl2(
        torch.from_numpy(codes.astype(np.int32)),
        groups,
        torch.from_numpy(scales.astype(np.int64)),
        torch.from_numpy(sm),
        torch.from_numpy(perm),
    )
    for name in ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm"):
        np.testing.assert_array_equal(getattr(tt, name), getattr(t, name))

    u = t.unpack()
    np.testing.assert_array_equal(u.codes, codes)
    np.testing.assert_array_equal(u.scales, scales)
    np.testing.assert_array_equal(u.perm, perm)
    assert u.groups == groups
    want = ref_dequant_exl2(codes, groups, scales, t.q_scale_max.astype(np.float32), perm)
    np.testing.assert_array_equal(t.dequantize(), want)
    keys = t.state_dict("model.layers.0.mlp.down_proj")
    assert "model.layers.0.mlp.down_proj.q_invperm" in keys and len(keys) == 5


@settings(max_examples=25, deadline=None)
@given(
    widths=st.lists(st.sampled_from([2, 3, 4, 5, 6, 8]), min_size=1, max_size=4),
    blocks=st.lists(st.integers(1, 3), min_size=4, max_size=4),
    cols=st.integers(1, 70),
    seed=st.integers(0, 2**32 - 1),
)
def test_exl2_roundtrip_property(
    widths: list[int], blocks: list[int], cols: int, seed: int
) -> None:
    widths = sorted(widths, reverse=True)
    groups = [(b, n * 32) for b, n in zip(widths, blocks, strict=False)]
    codes, scales, sm, perm = exl2_case(np.random.default_rng(seed), groups, cols)
    t = pk.pack_exl2(codes, groups, scales, sm, perm)
    u = t.unpack()
    np.testing.assert_array_equal(u.codes, codes)
    np.testing.assert_array_equal(u.perm, perm)
    want = ref_dequant_exl2(codes, groups, scales, t.q_scale_max.astype(np.float32), perm)
    np.testing.assert_array_equal(t.dequantize(), want)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_roundtrip(bits: int) -> None:
    rng = np.random.default_rng(bits)
    rows, cols, gs = 128, 64, 32
    codes = torch.randint(0, 2**bits, (rows, cols), generator=torch.Generator().manual_seed(1))
    zeros = rng.integers(1, 2**bits + 1, (rows // gs, cols))
    scales = rng.uniform(0.001, 0.1, (rows // gs, cols)).astype(np.float32)
    perm = rng.permutation(rows)
    g_idx = pk.gptq_g_idx(rows, gs, perm)
    t = pk.pack_gptq(codes, zeros, scales, g_idx, bits)
    assert t.qweight.shape == (rows * bits // 32, cols)
    assert t.qzeros.shape == (rows // gs, cols * bits // 32) and t.scales.dtype == np.float16
    np.testing.assert_array_equal(t.qweight, ref_pack(codes.numpy(), bits))
    np.testing.assert_array_equal(t.qzeros, ref_pack((zeros - 1).T, bits).T)
    u = t.unpack()
    np.testing.assert_array_equal(u.codes, codes.numpy())
    np.testing.assert_array_equal(u.zeros, zeros)
    s = t.scales.astype(np.float32)[g_idx]
    want = s * (codes.numpy().astype(np.float32) - zeros[g_idx].astype(np.float32))
    np.testing.assert_array_equal(t.dequantize(), want)


def test_errors_name_tensor_and_value() -> None:
    codes = np.zeros((16, 4), dtype=np.int32)
    codes[5, 2] = 4
    with pytest.raises(PackError, match=r"codes\[5, 2\] = 4 is out of range: expected a 2-bit"):
        pk.pack_columns(codes, 2)
    codes[5, 2] = -1
    with pytest.raises(PackError, match=r"codes\[5, 2\] = -1"):
        pk.pack_columns(codes, 2)
    with pytest.raises(PackError, match="unsupported bit width 7"):
        pk.pack_columns(np.zeros((32, 1), np.uint8), 7)
    with pytest.raises(PackError, match="expected an integer dtype, got float32"):
        pk.pack_columns(np.zeros((16, 1), np.float32), 2)
    with pytest.raises(PackError, match="expected a 2-D array"):
        pk.pack_columns(np.zeros(16, np.uint8), 2)
    with pytest.raises(PackError, match="multiple of 32"):
        pk.pack_exl2(np.zeros((16, 1), np.uint8), [(3, 16)], np.ones((1, 1), int), np.ones(1))
    with pytest.raises(PackError, match=r"q_scale: shape \[2, 1\]"):
        pk.pack_exl2(np.zeros((8, 1), np.uint8), [(4, 8)], np.ones((2, 1), int), np.ones(1))
    with pytest.raises(PackError, match=r"q_scale\[0, 0\] = 0"):
        pk.pack_exl2(np.zeros((8, 1), np.uint8), [(4, 8)], np.zeros((1, 1), int), np.ones(1))
    with pytest.raises(PackError, match="non-increasing"):
        pk.pack_exl2(
            np.zeros((40, 1), np.uint8), [(2, 32), (4, 8)], np.ones((2, 1), int), np.ones(2)
        )
    with pytest.raises(PackError, match=r"perm\[1\] = 0"):
        pk.pack_exl2(
            np.zeros((8, 1), np.uint8), [(4, 8)], np.ones((1, 1), int), np.ones(1), np.zeros(8, int)
        )
    with pytest.raises(PackError, match=r"qzeros\[0, 0\] = 0"):
        pk.pack_gptq(
            np.zeros((8, 8), int), np.zeros((1, 8), int), np.ones((1, 8)), np.zeros(8, int), 4
        )
    t = pk.pack_exl2(np.zeros((8, 1), np.uint8), [(4, 8)], np.ones((1, 1), int), np.ones(1))
    bad = pk.Exl2Tensors(
        t.q_weight, t.q_scale, t.q_scale_max, np.array([7, 0], np.int16), t.q_invperm, 1
    )
    with pytest.raises(PackError, match=r"q_groups\[0\] = 7"):
        bad.dequantize()
    assert issubclass(PackError, Exl2Error) and issubclass(PackError, Exception)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.int64])
@pytest.mark.parametrize("bits", [3, 5, 6])
def test_columns_any_integer_dtype(dtype: type[np.integer], bits: int) -> None:
    """Codes are read in their own dtype; 70 columns = one 64-column tile + a scalar tail."""
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2**bits, (2 * RPB[bits], 70)).astype(dtype)
    packed = pk.pack_columns(codes, bits)
    np.testing.assert_array_equal(packed, ref_pack(codes, bits))
    np.testing.assert_array_equal(pk.unpack_columns(packed, bits), codes)


@settings(max_examples=30, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4, 5, 6, 8]),
    blocks=st.integers(1, 3),
    cols=st.integers(1, 150),
    dtype=st.sampled_from([np.uint8, np.int8, np.int16, np.int32, np.int64]),
    data=st.data(),
)
def test_range_check_names_first_bad_code(
    bits: int, blocks: int, cols: int, dtype: type[np.integer], data: st.DataObject
) -> None:
    """The range check runs inside the packer; it must still report the first bad code."""
    rows = blocks * RPB[bits]
    codes = np.zeros((rows, cols), dtype=dtype)
    signed = np.issubdtype(dtype, np.signedinteger)
    bad = [2**bits] if 2**bits <= np.iinfo(dtype).max else []
    bad += [-1] if signed else []
    if not bad:
        return  # every uint8 value is a valid 8-bit code
    for _ in range(data.draw(st.integers(1, 3))):
        r, c = data.draw(st.integers(0, rows - 1)), data.draw(st.integers(0, cols - 1))
        codes[r, c] = data.draw(st.sampled_from(bad))
    r, c = (int(x[0]) for x in np.nonzero((codes < 0) | (codes >= 2**bits)))
    with pytest.raises(PackError, match=rf"^codes\[{r}, {c}\] = {codes[r, c]} is out of range"):
        pk.pack_columns(codes, bits)


def test_wide_values_are_not_truncated() -> None:
    codes = np.ones((8, 3), dtype=np.int64)
    codes[7, 2] = 256 + 1  # the low byte alone would be a valid code
    with pytest.raises(PackError, match=r"codes\[7, 2\] = 257"):
        pk.pack_columns(codes, 4)
    big = np.full((8, 1), np.iinfo(np.uint64).max, dtype=np.uint64)
    with pytest.raises(PackError, match=rf"codes\[0, 0\] = {np.iinfo(np.uint64).max}"):
        pk.pack_columns(big, 4)


def test_gptq_dequantize_3bit_straddling_rows() -> None:
    """GPTQ dequantization reads codes straight from qweight, including 3-bit codes split
    across two words (rows 10, 21 of each 32-row block)."""
    rng = np.random.default_rng(3)
    rows, cols = 64, 32  # 3-bit GPTQ zero points pack 32 columns per block
    codes = rng.integers(0, 8, (rows, cols))
    zeros = rng.integers(1, 9, (2, cols))
    scales = rng.uniform(-0.1, 0.1, (2, cols)).astype(np.float32)
    g_idx = pk.gptq_g_idx(rows, 32)
    t = pk.pack_gptq(codes, zeros, scales, g_idx, 3)
    s = t.scales.astype(np.float32)[g_idx]
    want = s * (codes.astype(np.float32) - zeros[g_idx].astype(np.float32))
    np.testing.assert_array_equal(t.dequantize(), want)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_unpack_columns_into_out(bits: int) -> None:
    """``out=`` is filled in place and returned; reusing it overwrites every code, including
    columns off the 64-column tile and outputs large enough to use streaming stores."""
    rng = np.random.default_rng(100 + bits)
    for rows, cols in [(RPB[bits], 7), (4 * RPB[bits], 130), (2048 // RPB[bits] * RPB[bits], 2048)]:
        codes = rng.integers(0, 2**bits, (rows, cols), dtype=np.uint8)
        packed = pk.pack_columns(codes, bits)
        out = np.full((rows, cols), 0xAA, dtype=np.uint8)
        got = pk.unpack_columns(packed, bits, out=out)
        assert got is out
        np.testing.assert_array_equal(out, codes)
        other = rng.integers(0, 2**bits, (rows, cols), dtype=np.uint8)
        assert pk.unpack_columns(pk.pack_columns(other, bits), bits, out) is out
        np.testing.assert_array_equal(out, other)
    # A big output (> the streaming threshold) at an odd address: a slice of a larger buffer.
    rows, cols = 4096 // RPB[bits] * RPB[bits], 4096
    codes = rng.integers(0, 2**bits, (rows, cols), dtype=np.uint8)
    buf = np.zeros(rows * cols + 64, dtype=np.uint8)
    out = buf[17 : 17 + rows * cols].reshape(rows, cols)
    assert pk.unpack_columns(pk.pack_columns(codes, bits), bits, out) is out
    np.testing.assert_array_equal(out, codes)
    assert not buf[:17].any() and not buf[17 + rows * cols :].any()


def test_unpack_columns_out_errors() -> None:
    codes = np.zeros((16, 64), dtype=np.uint8)
    packed = pk.pack_columns(codes, 2)
    want = r"does not match the expected \[16, 64\]"
    cases: list[tuple[object, str]] = [
        (np.zeros((16, 63), np.uint8), r"out: shape \[16, 63\] " + want),
        (np.zeros((64, 16), np.uint8), r"out: shape \[64, 16\] " + want),
        (np.zeros(16 * 64, np.uint8), r"out: shape \[1024\] " + want),
        (np.zeros((16, 64), np.int8), r"out: dtype int8 does not match: expected a C-contiguous"),
        (np.zeros((16, 64), np.int32), r"out: dtype int32 does not match"),
        (np.zeros((64, 16), np.uint8).T, r"out: the array of shape \[16, 64\] is not C-contiguous"),
        (np.zeros((16, 128), np.uint8)[:, ::2], r"is not C-contiguous"),
        ([[0] * 64] * 16, r"out: expected a C-contiguous, writeable uint8 array .* got list"),
        (torch.zeros((16, 64), dtype=torch.uint8), r"out: expected .* got Tensor"),
    ]
    for out, msg in cases:
        with pytest.raises(PackError, match=msg):
            pk.unpack_columns(packed, 2, out=out)  # type: ignore[arg-type]
    ro = np.zeros((16, 64), np.uint8)
    ro.flags.writeable = False
    with pytest.raises(PackError, match=r"out: the array of shape \[16, 64\] is read-only"):
        pk.unpack_columns(packed, 2, out=ro)
    # 8-bit codes need exactly the packed words' bytes: an out aliasing `packed` is refused.
    packed8 = pk.pack_columns(np.zeros((4, 8), np.uint8), 8)
    alias = packed8.view(np.uint8).reshape(4, 8)
    with pytest.raises(PackError, match="out: the array shares memory with `packed`"):
        pk.unpack_columns(packed8, 8, out=alias)
    # The width and the packed shape are checked before `out`, so the message names the cause.
    with pytest.raises(PackError, match="unsupported bit width 7"):
        pk.unpack_columns(packed, 7, out=np.zeros((16, 64), np.uint8))
    with pytest.raises(PackError, match=r"packed: shape \[2, 64\] .* multiple of 3"):
        pk.unpack_columns(np.zeros((2, 64), np.int32), 3, out=np.zeros((21, 64), np.uint8))
    assert issubclass(PackError, Exl2Error)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_columns_into_out(bits: int) -> None:
    """``out=`` is filled in place and returned; reusing it overwrites every word, for uint8
    and int8 codes (the AVX2 byte kernel) and a wide dtype, columns off the 32-column tile,
    and outputs large enough to use streaming stores."""
    rng = np.random.default_rng(200 + bits)
    for rows, cols in [(RPB[bits], 7), (4 * RPB[bits], 130), (2048 // RPB[bits] * RPB[bits], 2048)]:
        for dtype in [np.uint8, np.int8, np.int16]:
            hi = min(2**bits, 128) if dtype == np.int8 else 2**bits
            codes = rng.integers(0, hi, (rows, cols)).astype(dtype)
            out = np.full((rows * bits // 32, cols), 0x5A5A5A5A, dtype=np.int32)
            got = pk.pack_columns(codes, bits, out=out)
            assert got is out
            np.testing.assert_array_equal(out, ref_pack(codes, bits))
            np.testing.assert_array_equal(pk.unpack_columns(out, bits), codes)
            other = rng.integers(0, hi, (rows, cols)).astype(dtype)
            assert pk.pack_columns(other, bits, out) is out
            np.testing.assert_array_equal(out, pk.pack_columns(other, bits))
    # A big output (16 MiB, the streaming threshold) at an odd address: a slice of a larger
    # buffer; cols % 16 == 0, where the AVX2 packer streams.
    cols = 4096 + 16
    rows = -(-(2**27) // (bits * cols * RPB[bits])) * RPB[bits]
    codes = rng.integers(0, 2**bits, (rows, cols), dtype=np.uint8)
    qrows = rows * bits // 32
    buf = np.zeros(qrows * cols + 32, dtype=np.int32)
    out = buf[5 : 5 + qrows * cols].reshape(qrows, cols)
    assert pk.pack_columns(codes, bits, out) is out
    np.testing.assert_array_equal(pk.unpack_columns(out, bits), codes)
    np.testing.assert_array_equal(out, pk.pack_columns(codes, bits))
    assert not buf[:5].any() and not buf[5 + qrows * cols :].any()


def test_pack_columns_out_errors() -> None:
    codes = np.zeros((16, 64), dtype=np.uint8)
    want = r"does not match the expected \[4, 64\]"
    cases: list[tuple[object, str]] = [
        (np.zeros((4, 63), np.int32), r"out: shape \[4, 63\] " + want),
        (np.zeros((64, 4), np.int32), r"out: shape \[64, 4\] " + want),
        (np.zeros(4 * 64, np.int32), r"out: shape \[256\] " + want),
        (np.zeros((4, 64), np.uint32), r"out: dtype uint32 does not match: expected a C-cont"),
        (np.zeros((4, 64), np.int64), r"out: dtype int64 does not match"),
        (np.zeros((4, 64), np.uint8), r"out: dtype uint8 does not match"),
        (np.zeros((64, 4), np.int32).T, r"out: the array of shape \[4, 64\] is not C-contiguous"),
        (np.zeros((4, 128), np.int32)[:, ::2], r"is not C-contiguous"),
        ([[0] * 64] * 4, r"out: expected a C-contiguous, writeable int32 array .* got list"),
        (torch.zeros((4, 64), dtype=torch.int32), r"out: expected .* got Tensor"),
    ]
    for out, msg in cases:
        with pytest.raises(PackError, match=msg):
            pk.pack_columns(codes, 8, out=out)  # type: ignore[arg-type]
    ro = np.zeros((4, 64), np.int32)
    ro.flags.writeable = False
    with pytest.raises(PackError, match=r"out: the array of shape \[4, 64\] is read-only"):
        pk.pack_columns(codes, 8, out=ro)
    # 8-bit codes fill exactly their own bytes: an out aliasing `codes` is refused.
    alias = codes.view(np.int32).reshape(4, 64)
    with pytest.raises(PackError, match="out: the array shares memory with `codes`"):
        pk.pack_columns(codes, 8, out=alias)
    # The width and the row count are checked before `out`, so the message names the cause.
    with pytest.raises(PackError, match="unsupported bit width 7"):
        pk.pack_columns(codes, 7, out=np.zeros((4, 64), np.int32))
    with pytest.raises(PackError, match=r"codes: shape \[12\] .* multiple of 8"):
        pk.pack_columns(codes[:12], 4, out=np.zeros((1, 64), np.int32))
    # An out-of-range code is reported with `out` too.
    bad = codes.copy()
    bad[3, 9] = 4
    with pytest.raises(PackError, match=r"codes\[3, 9\] = 4 is out of range"):
        pk.pack_columns(bad, 2, out=np.zeros((1, 64), np.int32))


# Recycled results: large fresh outputs reuse the memory of dropped results of the same size.

MIN_POOLED = pk.output_cache_info()["min_pooled_bytes"]


@pytest.fixture
def output_cache() -> Iterator[None]:
    """A fresh, enabled pool for the test; the previous limit is restored after it."""
    before = pk.output_cache_info()["max_bytes"]
    pk.set_output_cache(256 << 20)
    pk.clear_output_cache()
    yield
    pk.set_output_cache(before)


def pooled_rows(bits: int, cols: int, out_bytes_per_row: float) -> int:
    """A row count (whole blocks) whose output is just above the pooling threshold."""
    rows = int(MIN_POOLED / (out_bytes_per_row * cols)) + 1
    return -(-rows // RPB[bits]) * RPB[bits]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_recycled_results_are_fully_overwritten(bits: int, output_cache: None) -> None:
    """A result that reuses a dropped one's memory (filled with garbage first) holds exactly
    the new codes/words, at a column count off the 64-column tile."""
    rng = np.random.default_rng(200 + bits)
    cols = 1069
    for op in ("unpack", "pack"):
        rows = pooled_rows(bits, cols, 1.0 if op == "unpack" else bits / 8)
        a = rng.integers(0, 2**bits, (rows, cols), dtype=np.uint8)
        b = rng.integers(0, 2**bits, (rows, cols), dtype=np.uint8)
        pa, pb = pk.pack_columns(a, bits), pk.pack_columns(b, bits)

        def run(c: npt.NDArray[np.uint8], p: npt.NDArray[np.int32], op: str = op) -> Any:
            return pk.unpack_columns(p, bits) if op == "unpack" else pk.pack_columns(c, bits)

        first = run(a, pa)
        assert type(first.base).__name__ == "OutputBuffer" and first.nbytes >= MIN_POOLED
        addr = first.ctypes.data
        first.view(np.uint8).fill(0xA5)
        del first
        hits = pk.output_cache_info()["hits"]
        second = run(b, pb)
        assert second.ctypes.data == addr, "the dropped result's memory is reused"
        assert pk.output_cache_info()["hits"] == hits + 1
        np.testing.assert_array_equal(second, b if op == "unpack" else ref_pack(b, bits))
        assert second.flags.writeable and second.flags.c_contiguous


def test_recycled_dequantize_outputs_are_fully_overwritten(output_cache: None) -> None:
    rng = np.random.default_rng(7)
    groups = pk.exl2_layout(1024, [8, 5, 4], [0.05, 0.1, 0.85], [32, 128, 128])
    cases = [exl2_case(rng, groups, 1069) for _ in range(2)]
    ts = [pk.pack_exl2(c, groups, s, m, p) for c, s, m, p in cases]
    first = ts[0].dequantize()
    assert first.nbytes >= MIN_POOLED and type(first.base).__name__ == "OutputBuffer"
    first.fill(np.nan)
    del first
    codes, scales, _, perm = cases[1]
    want = ref_dequant_exl2(codes, groups, scales, ts[1].q_scale_max.astype(np.float32), perm)
    np.testing.assert_array_equal(ts[1].dequantize(), want)

    rows, cols, gs, bits = 1024, 1088, 128, 4  # qzeros pack along columns: cols % 8 == 0
    gptq = []
    for seed in (1, 2):
        r = np.random.default_rng(seed)
        codes = r.integers(0, 2**bits, (rows, cols), dtype=np.uint8)
        zeros = r.integers(1, 2**bits + 1, (rows // gs, cols))
        scales = r.uniform(0.001, 0.1, (rows // gs, cols)).astype(np.float32)
        g_idx = pk.gptq_g_idx(rows, gs, r.permutation(rows))
        gptq.append((pk.pack_gptq(codes, zeros, scales, g_idx, bits), codes, zeros, g_idx))
    first = gptq[0][0].dequantize()
    assert type(first.base).__name__ == "OutputBuffer"
    first.fill(np.inf)
    del first
    t, codes, zeros, g_idx = gptq[1]
    s = t.scales.astype(np.float32)[g_idx]
    want = s * (codes.astype(np.float32) - zeros[g_idx].astype(np.float32))
    np.testing.assert_array_equal(t.dequantize(), want)


def test_live_results_and_views_are_never_recycled(output_cache: None) -> None:
    """Memory is recycled only when no array, view or torch tensor refers to it."""
    rng = np.random.default_rng(3)
    rows, cols = pooled_rows(4, 1024, 1.0), 1024
    codes = rng.integers(0, 16, (rows, cols), dtype=np.uint8)
    packed = pk.pack_columns(codes, 4)
    hits = pk.output_cache_info()["hits"]
    a = pk.unpack_columns(packed, 4)
    view = a[::3, 5:]
    tensor = torch.from_numpy(pk.unpack_columns(packed, 4))
    del a
    b = pk.unpack_columns(packed, 4)
    c = pk.unpack_columns(packed, 4)
    for x in (b, c, tensor.numpy()):
        assert not np.shares_memory(x, view)
    assert not np.shares_memory(b, c) and not np.shares_memory(b, tensor.numpy())
    np.testing.assert_array_equal(view, codes[::3, 5:])
    np.testing.assert_array_equal(tensor.numpy(), codes)
    assert pk.output_cache_info()["hits"] == hits
    del view
    d = pk.unpack_columns(packed, 4)  # the first result's memory is free now
    assert pk.output_cache_info()["hits"] == hits + 1
    np.testing.assert_array_equal(d, codes)


def test_output_cache_limit_and_small_results(output_cache: None) -> None:
    rng = np.random.default_rng(4)
    small = pk.unpack_columns(pk.pack_columns(rng.integers(0, 4, (64, 64)), 2), 2)
    assert type(small.base).__name__ != "OutputBuffer"  # below the threshold: plain NumPy
    rows, cols = pooled_rows(8, 1024, 1.0), 1024
    codes = rng.integers(0, 256, (rows, cols), dtype=np.uint8)
    packed = pk.pack_columns(codes, 8)
    del packed
    info = pk.output_cache_info()
    assert info["cached_buffers"] == 1 and info["cached_bytes"] == rows * cols
    pk.set_output_cache(0)  # disables recycling and frees the idle memory
    assert pk.output_cache_info()["cached_bytes"] == 0
    packed = pk.pack_columns(codes, 8)
    assert type(packed.base).__name__ != "OutputBuffer"
    np.testing.assert_array_equal(pk.unpack_columns(packed, 8), codes)
    with pytest.raises(ValueError, match="max_bytes"):
        pk.set_output_cache(-1)
    pk.set_output_cache(1 << 30)
    del packed
    pk.pack_columns(codes, 8)
    assert pk.output_cache_info()["cached_buffers"] == 1
    pk.clear_output_cache()
    info = pk.output_cache_info()
    assert (info["cached_buffers"], info["max_bytes"]) == (0, 1 << 30)
