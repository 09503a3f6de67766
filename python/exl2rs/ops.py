"""The EXL2 matmul as ``torch.library`` ops, with a pure-PyTorch reference implementation.

``exl2rs::exl2_matmul(x, q_weight, q_scale, q_scale_max, q_groups, q_perm, out_features)``
returns ``x @ W`` (``[..., out_features]`` in x's dtype, accumulated in fp32) and
``exl2rs::exl2_dequantize(..., out_features, dtype)`` returns ``W [K, out_features]`` in the
original input-row order, where storage row ``i`` of group ``g`` (width ``b``) holds input row
``q_perm[i]``::

    W[q_perm[i], n] = (code[i, n] - 2^(b-1)) * (q_scale[g, n] + 1)^2 * q_scale_max[g] / 256

The reference is plain tensor arithmetic (integer shifts on the int32 words), so it runs on any
device torch supports; ``exl2rs.cuda_ops`` (if present) registers the CUDA kernels for the same
ops. Tensors must have the dtypes the EXL2 format stores: q_weight / q_scale / q_perm int32,
q_scale_max float16, q_groups int16. Bad input raises :class:`exl2rs.PackError`.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import torch

from exl2rs._core import PackError

__all__ = [
    "EXL2_BITS",
    "Exl2Layout",
    "exl2_dequantize",
    "exl2_matmul",
    "parse_q_groups",
]

EXL2_BITS = (2, 3, 4, 5, 6, 8)
ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
COL_ALIGN = 32
# Rows unpacked at once: bounds the temporaries to ~16 MiB each for any matrix width.
_UNPACK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class Exl2Layout:
    """The groups of one EXL2 matrix: per group (bits, first storage row, rows, first q_weight
    row), in storage order."""

    groups: tuple[tuple[int, int, int, int], ...]

    @property
    def rows(self) -> int:
        """Input rows K."""
        _, r0, rows, _ = self.groups[-1]
        return r0 + rows


def parse_q_groups(q_groups: torch.Tensor, qrows: int, what: str = "q_groups") -> Exl2Layout:
    """Reads the ``(bits, start q_weight row)`` table against the ``qrows`` of q_weight."""
    if q_groups.dim() != 1 or q_groups.numel() == 0 or q_groups.numel() % 2:
        raise PackError(
            f"{what}: expected a 1-D table of (bits, start row) pairs, got shape "
            f"{list(q_groups.shape)}"
        )
    table = [int(v) for v in q_groups.tolist()]
    n = len(table) // 2
    groups: list[tuple[int, int, int, int]] = []
    row = 0
    for g in range(n):
        bits, start = table[2 * g], table[2 * g + 1]
        end = table[2 * g + 3] if g + 1 < n else qrows
        if bits not in EXL2_BITS:
            raise PackError(f"{what}[{2 * g}] = {bits}: expected a bit width in {EXL2_BITS}")
        if g == 0 and start != 0:
            raise PackError(f"{what}[1] = {start}: the first group must start at q_weight row 0")
        if g > 0 and bits > groups[-1][0]:
            raise PackError(
                f"{what}: group {g} has {bits} bits after a {groups[-1][0]}-bit group; widths "
                "must be non-increasing"
            )
        span = end - start
        if span <= 0 or (span * 32) % bits:
            raise PackError(
                f"{what}[{2 * g + 1}] = {start}: group {g} ({bits} bits) would span {span} "
                f"q_weight rows (next start / q_weight rows = {end}); expected a positive "
                f"number of whole {bits}-bit blocks"
            )
        rows = span * 32 // bits
        groups.append((bits, row, rows, start))
        row += rows
    return Exl2Layout(tuple(groups))


def _check(
    q_weight: torch.Tensor,
    q_scale: torch.Tensor,
    q_scale_max: torch.Tensor,
    q_groups: torch.Tensor,
    q_perm: torch.Tensor,
    out_features: int,
    op: str,
) -> None:
    """Dtypes, ranks, shapes and devices; everything that needs no tensor values."""
    expect = (
        ("q_weight", q_weight, torch.int32, 2),
        ("q_scale", q_scale, torch.int32, 2),
        ("q_scale_max", q_scale_max, torch.float16, 1),
        ("q_groups", q_groups, torch.int16, 1),
        ("q_perm", q_perm, torch.int32, 1),
    )
    for name, t, dtype, ndim in expect:
        if t.dtype != dtype or t.dim() != ndim:
            raise PackError(
                f"{op}: {name} must be a {ndim}-D {dtype} tensor, got {t.dtype} {list(t.shape)}"
            )
        if t.device != q_weight.device:
            raise PackError(f"{op}: {name} is on {t.device}, q_weight on {q_weight.device}")
    n_pad = q_weight.shape[1]
    want_pad = -(-out_features // COL_ALIGN) * COL_ALIGN
    if out_features <= 0 or n_pad != want_pad:
        raise PackError(
            f"{op}: out_features={out_features} needs q_weight with {want_pad} columns "
            f"(padded to {COL_ALIGN}), got {list(q_weight.shape)}"
        )
    groups = q_scale_max.shape[0]
    if tuple(q_scale.shape) != (groups, n_pad // 8):
        raise PackError(
            f"{op}: q_scale must be [{groups}, {n_pad // 8}] (groups x padded columns / 8), "
            f"got {list(q_scale.shape)}"
        )
    if q_groups.shape[0] != 2 * groups:
        raise PackError(
            f"{op}: q_groups must hold {2 * groups} entries (2 per group of q_scale_max), got "
            f"{q_groups.shape[0]}"
        )


def _unpack_scales(q_scale: torch.Tensor, out_features: int) -> torch.Tensor:
    """``(qs + 1)^2`` as fp32 ``[G, out_features]`` from 8 4-bit values per word, LSB first."""
    shifts = torch.arange(0, 32, 4, device=q_scale.device, dtype=torch.int32)
    nibbles = (q_scale.unsqueeze(-1) >> shifts) & 0xF  # arithmetic shift; the mask fixes it
    qs1 = nibbles.reshape(q_scale.shape[0], -1)[:, :out_features].to(torch.float32) + 1
    return qs1 * qs1


def _width_runs(layout: Exl2Layout) -> list[tuple[int, int, int, int, list[int]]]:
    """Consecutive groups of one width (widths are non-increasing, so each width is one run):
    (bits, first storage row, rows, first q_weight row, group indices)."""
    runs: list[tuple[int, int, int, int, list[int]]] = []
    for g, (bits, r0, rows, q0) in enumerate(layout.groups):
        if runs and runs[-1][0] == bits:
            b, rr0, rrows, rq0, gs = runs[-1]
            runs[-1] = (b, rr0, rrows + rows, rq0, [*gs, g])
        else:
            runs.append((bits, r0, rows, q0, [g]))
    return runs


def _unpack_codes(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``[qrows·32/bits, N]`` (int32) of ``bits``-bit values packed LSB first along the
    rows of the int32 ``words`` (``[qrows, N]``).

    A block of ``bits/gcd`` words holds ``32/gcd`` values; value ``j`` of a block starts at bit
    ``j·bits`` of the block's little-endian bitstream, so every shift is a Python constant and
    each step is one vectorised op over all blocks and columns. Right shifts are arithmetic on
    int32; masking right after each shift keeps only real bits, and the high part of a value
    that straddles two words is masked before its left shift, so nothing overflows.
    """
    g = math.gcd(bits, 32)
    per_words, per_rows = bits // g, 32 // g
    blocks = words.view(-1, per_words, words.shape[1])
    out = torch.empty(
        (blocks.shape[0], per_rows, words.shape[1]), dtype=torch.int32, device=words.device
    )
    mask = (1 << bits) - 1
    for j in range(per_rows):
        word, shift = divmod(j * bits, 32)
        if shift + bits <= 32:
            torch.bitwise_and(blocks[:, word] >> shift, mask, out=out[:, j])
        else:  # straddles into the next word
            lo = (blocks[:, word] >> shift) & ((1 << (32 - shift)) - 1)
            hi = (blocks[:, word + 1] & ((1 << (shift + bits - 32)) - 1)) << (32 - shift)
            torch.bitwise_or(lo, hi, out=out[:, j])
    return out.view(-1, words.shape[1])


def _storage_weight(
    q_weight: torch.Tensor,
    q_scale: torch.Tensor,
    q_scale_max: torch.Tensor,
    q_groups: torch.Tensor,
    q_perm: torch.Tensor,
    out_features: int,
    op: str,
) -> torch.Tensor:
    """fp32 ``[K, out_features]`` weights in storage (act-) order."""
    _check(q_weight, q_scale, q_scale_max, q_groups, q_perm, out_features, op)
    qrows = q_weight.shape[0]
    layout = parse_q_groups(q_groups, qrows, f"{op}: q_groups")
    if layout.rows != q_perm.shape[0]:
        raise PackError(
            f"{op}: q_groups describes {layout.rows} input rows, q_perm has {q_perm.shape[0]}"
        )
    device = q_weight.device
    # (qs+1)² · max/256 per group and column is exact in fp32 ((qs+1)² has 9 significant
    # bits, an fp16 max/256 11), and (q - z) is a small integer, so the product below is
    # rounded once, as in the Rust reference: bit-identical results.
    smax = (q_scale_max.to(torch.float32) / 256)[:, None]
    scale = _unpack_scales(q_scale, out_features) * smax
    out = torch.empty((layout.rows, out_features), dtype=torch.float32, device=device)
    for bits, r0, rows, q0, groups in _width_runs(layout):
        # Whole blocks per chunk keep the temporaries bounded for any matrix size.
        block_rows = 32 // math.gcd(bits, 32)
        step = max(block_rows, _UNPACK_ELEMENTS // out_features // block_rows * block_rows)
        group_rows = torch.tensor([layout.groups[g][2] for g in groups], device=device)
        row_group = torch.repeat_interleave(torch.tensor(groups, device=device), group_rows)
        zero = float(1 << (bits - 1))
        for c0 in range(0, rows, step):
            c1 = min(c0 + step, rows)
            wq0, wq1 = q0 + c0 * bits // 32, q0 + c1 * bits // 32
            words = q_weight[wq0:wq1, :out_features]
            codes = _unpack_codes(words, bits).to(torch.float32)
            out[r0 + c0 : r0 + c1] = (codes - zero) * scale[row_group[c0:c1]]
    return out


def _check_x(x: torch.Tensor, q_weight: torch.Tensor, q_perm: torch.Tensor) -> None:
    if x.dtype not in ACTIVATION_DTYPES:
        raise PackError(f"exl2_matmul: x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != q_perm.shape[0]:
        raise PackError(
            f"exl2_matmul: x has shape {list(x.shape)}, its last dim must equal the "
            f"{q_perm.shape[0]} input features (K) of the matrix"
        )
    if x.device != q_weight.device:
        raise PackError(f"exl2_matmul: x is on {x.device}, the weights on {q_weight.device}")


@torch.library.custom_op("exl2rs::exl2_dequantize", mutates_args=())
def exl2_dequantize(
    q_weight: torch.Tensor,
    q_scale: torch.Tensor,
    q_scale_max: torch.Tensor,
    q_groups: torch.Tensor,
    q_perm: torch.Tensor,
    out_features: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``W [K, out_features]`` in ``dtype``, rows in the original input order."""
    ws = _storage_weight(
        q_weight, q_scale, q_scale_max, q_groups, q_perm, out_features, "exl2_dequantize"
    )
    w = torch.empty_like(ws).index_copy_(0, q_perm.to(torch.int64), ws)
    return w.to(dtype)


@exl2_dequantize.register_fake
def _(
    q_weight: torch.Tensor,
    q_scale: torch.Tensor,
    q_scale_max: torch.Tensor,
    q_groups: torch.Tensor,
    q_perm: torch.Tensor,
    out_features: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    _check(q_weight, q_scale, q_scale_max, q_groups, q_perm, out_features, "exl2_dequantize")
    return q_weight.new_empty((q_perm.shape[0], out_features), dtype=dtype)


@torch.library.custom_op("exl2rs::exl2_matmul", mutates_args=())
def exl2_matmul(
    x: torch.Tensor,
    q_weight: torch.Tensor,
    q_scale: torch.Tensor,
    q_scale_max: torch.Tensor,
    q_groups: torch.Tensor,
    q_perm: torch.Tensor,
    out_features: int,
) -> torch.Tensor:
    """``x @ W`` for ``x [..., K]``: ``[..., out_features]`` in x's dtype, fp32 accumulation."""
    _check_x(x, q_weight, q_perm)
    ws = _storage_weight(
        q_weight, q_scale, q_scale_max, q_groups, q_perm, out_features, "exl2_matmul"
    )
    # Gather the activations into storage order instead of permuting the weight (what the
    # EXL2 kernels do).
    xs = x.reshape(-1, x.shape[-1]).to(torch.float32).index_select(1, q_perm.to(torch.int64))
    y = xs @ ws
    return y.to(x.dtype).reshape(*x.shape[:-1], out_features)


@exl2_matmul.register_fake
def _(
    x: torch.Tensor,
    q_weight: torch.Tensor,
    q_scale: torch.Tensor,
    q_scale_max: torch.Tensor,
    q_groups: torch.Tensor,
    q_perm: torch.Tensor,
    out_features: int,
) -> torch.Tensor:
    _check(q_weight, q_scale, q_scale_max, q_groups, q_perm, out_features, "exl2_matmul")
    _check_x(x, q_weight, q_perm)
    return x.new_empty((*x.shape[:-1], out_features))


# Gradients flow to x only (the packed weights are frozen integers): dx = dy @ Wᵀ. This lets
# adapters (LoRA) train on top of a QuantLinear.
def _matmul_setup_context(
    ctx: torch.autograd.function.FunctionCtx,
    inputs: tuple[torch.Tensor, ...],
    output: torch.Tensor,
) -> None:
    x, q_weight, q_scale, q_scale_max, q_groups, q_perm, out_features = inputs
    ctx.save_for_backward(q_weight, q_scale, q_scale_max, q_groups, q_perm)
    ctx.out_features = out_features  # type: ignore[attr-defined]
    ctx.x_dtype = x.dtype  # type: ignore[attr-defined]


def _matmul_backward(
    ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
) -> tuple[torch.Tensor | None, ...]:
    q_weight, q_scale, q_scale_max, q_groups, q_perm = ctx.saved_tensors  # type: ignore[attr-defined]
    w = exl2_dequantize(
        q_weight,
        q_scale,
        q_scale_max,
        q_groups,
        q_perm,
        ctx.out_features,  # type: ignore[attr-defined]
        torch.float32,
    )
    dx = (grad.to(torch.float32) @ w.T).to(ctx.x_dtype)  # type: ignore[attr-defined]
    return dx, None, None, None, None, None, None


exl2_matmul.register_autograd(_matmul_backward, setup_context=_matmul_setup_context)


# F's CUDA kernels register themselves for both ops; they build on the first CUDA call.
if torch.cuda.is_available() and importlib.util.find_spec("exl2rs.cuda_ops") is not None:
    import exl2rs.cuda_ops  # noqa: F401
