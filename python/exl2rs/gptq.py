"""EXL2's adaptive GPTQ, rebuilt in device-agnostic PyTorch.

Conventions (shared by measurement, quantization and export):

* A linear weight ``W`` is ``[out_features, in_features]`` (torch layout). GPTQ works on the
  transposed, act-order permuted ``Wt[perm] : [K, N]`` with ``K = in_features`` ("rows", EXL2's
  term) and ``N = out_features``.
* ``H`` is the MEAN of ``x xᵀ`` over calibration tokens (EXL2 divides by the number of sequences
  instead; the scale does not change GPTQ because damping is relative to ``mean(diag H)``, but a
  per-token mean makes ``tr(ΔW H ΔWᵀ)`` comparable across calibration sets of different sizes).
* Output is exactly what the EXL2 format stores: integer codes per act-order row, one 4-bit scale
  code ``qs`` per group and output column, one fp16 ``scale_max`` per group, and the permutation.
  Dequantization is ``w = (q - 2^(b-1)) · (qs+1)² · scale_max / 256`` in fp32, bit-identical to
  ``QuantResult.weight``.
* Memory: the configs of one call run in batches of at most ``max_batch_bytes`` of working set
  (``BATCH_BYTES_PER_WEIGHT`` bytes per weight and config); :func:`quantize_many_compact` keeps
  only uint8 codes (1 byte per weight) between batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from exl2rs.errors import HessianError, NonFiniteError

__all__ = [
    "BATCH_BYTES_PER_WEIGHT",
    "DEFAULT_DAMP",
    "DEFAULT_MAX_BATCH_BYTES",
    "CompactResult",
    "GroupLike",
    "Hessian",
    "Prepared",
    "QParamsLike",
    "QuantResult",
    "ScaleSearch",
    "accumulate_hessian",
    "batch_size",
    "default_max_batch_bytes",
    "dequantize",
    "prepare",
    "quantize",
    "quantize_many",
    "quantize_many_compact",
    "rtn_quantize",
    "weighted_error",
]

DEFAULT_DAMP = 0.12  # EXL2's percdamp (b112b21)
MAX_DAMP_RETRIES = 10
# EXL2's clip-multiplier grid: 97 points linear in [0.70, 1.20].
P_GRID = torch.linspace(0.70, 1.20, 97, dtype=torch.float64).tolist()
EXL2_NORM = 3.5
# Rows per lazy-batch block: rank-1 updates stay inside it, everything else is one matmul.
LAZY_BLOCK_ROWS = 32
# Peak working set of one config in a GPTQ batch, bytes per weight: int16 codes and fp32
# quantized rows, plus either the fp32 working copy (during GPTQ) or the fp32 [N, K] result
# (built after the working copy is freed).
BATCH_BYTES_PER_WEIGHT = 2 + 4 + 4
# Budget for one batch on CPU; on CUDA it is CUDA_TOTAL_FRACTION of the device's memory. Not
# of the memory free at the time: the batch split must not depend on what else runs, so that
# a measurement on one GPU model is reproducible (cuBLAS may pick other kernels for other
# batch counts).
DEFAULT_MAX_BATCH_BYTES = 2 << 30
CUDA_TOTAL_FRACTION = 0.25

# "hessian" (default): bracketed search on the Hessian-weighted loss; "hessian_full": the same
# loss over all 97 grid points (the exhaustive reference); "exl2": EXL2's own rule.
ScaleSearch = Literal["hessian", "hessian_full", "exl2"]


class GroupLike(Protocol):
    """One quantization group: ``rows`` act-order rows from ``row_start`` at ``bits`` bits."""

    @property
    def bits(self) -> int: ...
    @property
    def row_start(self) -> int: ...
    @property
    def rows(self) -> int: ...


class QParamsLike(Protocol):
    """What GPTQ needs from a config: its group layout (``exl2rs.qparams.QParams`` provides it)."""

    def groups(self, rows: int) -> Sequence[GroupLike]: ...


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise NonFiniteError(f"{what}: {bad} non-finite value(s) (NaN/inf) of {t.numel()}")


class Hessian:
    """Running fp32 sum of ``x xᵀ`` over calibration tokens; ``matrix()`` is the per-token mean."""

    def __init__(
        self, in_features: int, *, name: str, device: torch.device | str | None = None
    ) -> None:
        if in_features <= 0:
            raise ValueError(f"{name}: in_features must be positive, got {in_features}")
        self.name = name
        self.in_features = in_features
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.count = 0

    def add(self, x: torch.Tensor, *, chunk_tokens: int = 8192) -> None:
        """Accumulate inputs ``x[..., in_features]`` (any float dtype, any device)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{self.name}: input has {x.shape[-1]} features, Hessian expects {self.in_features}"
            )
        flat = x.reshape(-1, self.in_features)
        for start in range(0, flat.shape[0], chunk_tokens):
            part = flat[start : start + chunk_tokens].to(self.sum.device, torch.float32)
            _check_finite(part, f"{self.name}: calibration input")
            self.sum.addmm_(part.T, part)
        self.count += flat.shape[0]

    def matrix(self) -> torch.Tensor:
        """``H = Σ x xᵀ / count`` (fp32)."""
        if self.count == 0:
            raise HessianError(
                f"{self.name}: no calibration tokens reached this layer (empty Hessian)"
            )
        h = self.sum / self.count
        _check_finite(h, f"{self.name}: Hessian")
        return h


def accumulate_hessian(
    inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    name: str,
    device: torch.device | str | None = None,
) -> Hessian:
    """Build a :class:`Hessian` from one tensor or a sequence of tensors ``[..., in_features]``."""
    chunks = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    if not chunks:
        raise HessianError(f"{name}: no calibration inputs given")
    hess = Hessian(chunks[0].shape[-1], name=name, device=device or chunks[0].device)
    for c in chunks:
        hess.add(c)
    return hess


@dataclass(frozen=True)
class Prepared:
    """Factorisation of one Hessian, shared by every linear reading the same input."""

    name: str
    hessian: torch.Tensor  # mean H, undamped, original order [K, K]
    perm: torch.Tensor  # act-order: perm[i] = original input row at position i (int64)
    invperm: torch.Tensor  # argsort(perm)
    hinv_upper: torch.Tensor  # upper Cholesky factor U of (H_perm + damp I)^-1, Uᵀ U = H^-1
    damp: float  # absolute damping finally added to the diagonal
    retries: int  # extra damping rounds needed

    @property
    def in_features(self) -> int:
        return int(self.hessian.shape[0])


def prepare(
    hessian: Hessian | torch.Tensor,
    damp: float = DEFAULT_DAMP,
    *,
    name: str | None = None,
    max_retries: int = MAX_DAMP_RETRIES,
) -> Prepared:
    """Act-order permutation and damped inverse factor of ``H``.

    Damping is ``damp · mean(diag H)`` (at least 1e-5), added again on each failed Cholesky, at most
    ``max_retries`` times (EXL2's cumulative rule); after that :class:`HessianError` names the
    layer.
    """
    if isinstance(hessian, Hessian):
        label = name or hessian.name
        h = hessian.matrix()
    else:
        label = name or "<unnamed>"
        h = hessian.to(torch.float32)
        _check_finite(h, f"{label}: Hessian")
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"{label}: Hessian must be square, got shape {tuple(h.shape)}")
    if not damp > 0:
        raise ValueError(f"{label}: damp must be positive, got {damp}")
    perm = torch.argsort(torch.diag(h), descending=True, stable=True)
    h_perm = h[perm][:, perm]
    step = max(damp * float(torch.diag(h).mean()), 1e-5)
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(max_retries + 1):
        total = step * (attempt + 1)
        chol, info = torch.linalg.cholesky_ex(h_perm + total * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            upper, info2 = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info2) == 0 and bool(torch.isfinite(upper).all()):
                return Prepared(
                    name=label,
                    hessian=h,
                    perm=perm,
                    invperm=torch.argsort(perm),
                    hinv_upper=upper,
                    damp=total,
                    retries=attempt,
                )
    raise HessianError(
        f"{label}: Hessian is not positive definite even after {max_retries} extra damping "
        f"rounds (damping reached {step * (max_retries + 1):.3g} = "
        f"{(max_retries + 1) * damp:.3g} x mean(diag H)); check the calibration inputs"
    )


@dataclass(frozen=True)
class QuantResult:
    """A quantized matrix in EXL2's stored form plus its dequantized weight and error."""

    name: str
    group_bits: tuple[int, ...]  # bits of each group, act-order
    group_rows: tuple[int, ...]  # rows of each group
    codes: torch.Tensor  # [K, N] int16, act-order rows, values in [0, 2^bits)
    scales: torch.Tensor  # [groups, N] uint8, stored 4-bit code qs in [0, 15]
    scale_max: torch.Tensor  # [groups] fp16; scale = (qs+1)^2 * scale_max / 256
    perm: torch.Tensor  # [K] int64
    invperm: torch.Tensor  # [K] int64
    weight: torch.Tensor  # W_q, [N, K] fp32, original order
    err: float  # tr(ΔW H ΔWᵀ) with the undamped mean H

    def group_codes(self, g: int) -> torch.Tensor:
        start = sum(self.group_rows[:g])
        return self.codes[start : start + self.group_rows[g]]


@dataclass(frozen=True)
class CompactResult:
    """A :class:`QuantResult` without its fp32 weight, for holding many candidates at once.

    ``codes`` are uint8 (every width is at most 8 bits): about 1 byte per weight instead of the
    6 of ``codes`` + ``weight``; :func:`dequantize` rebuilds the weight bit-identically.
    """

    name: str
    group_bits: tuple[int, ...]
    group_rows: tuple[int, ...]
    codes: torch.Tensor  # [K, N] uint8, act-order rows
    scales: torch.Tensor  # [groups, N] uint8
    scale_max: torch.Tensor  # [groups] fp16
    perm: torch.Tensor  # [K] int64 (shared by every config of one call)
    invperm: torch.Tensor  # [K] int64 (shared)
    err: float

    @classmethod
    def of(cls, res: QuantResult) -> CompactResult:
        return cls(
            name=res.name,
            group_bits=res.group_bits,
            group_rows=res.group_rows,
            codes=res.codes.to(torch.uint8),
            scales=res.scales,
            scale_max=res.scale_max,
            perm=res.perm,
            invperm=res.invperm,
            err=res.err,
        )

    @property
    def nbytes(self) -> int:
        """Bytes this candidate holds on its own (the permutation is shared, not counted)."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.scale_max))


def weighted_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(Δ H Δᵀ)`` for ``Δ : [N, K]`` (fp32 product, fp64 final sum)."""
    return float(((delta @ hessian) * delta).sum(dtype=torch.float64))


def _group_scales(
    x: torch.Tensor, bits: int, row_weight: torch.Tensor, mode: ScaleSearch
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale codes ``qs+1 ∈ [1, 16]`` ``[S, N]`` and fp16 ``scale_max`` ``[S]`` for ``S`` groups.

    ``x : [S, rows, N]`` holds one group of each of ``S`` configs (same rows and bits).
    ``exl2``: EXL2's rule — sqrt-companded codes from the per-column max and one clip multiplier
    per group from 97 points in [0.70, 1.20], chosen on the unweighted ``Σ|err|^3.5``.
    ``hessian``: the multiplier is scored by ``Σ_r err_r² / U_rr²`` — the loss GPTQ incurs on row
    ``r`` (Uᵀ U = H⁻¹) — coarse-to-fine over the same grid, then each column's code is refined by
    ±1 on that loss (columns are independent once ``scale_max`` is fixed). ``hessian_full``: the
    same loss over every grid point, then the same refinement (the exhaustive reference).
    """
    maxq = (1 << bits) - 1
    zero = 1 << (bits - 1)
    base = (x.abs().amax(dim=1) + 1e-12) / (maxq / 2)  # [S, N]
    smax_t = base.amax(dim=1)  # [S]
    q16 = torch.clamp(torch.round(torch.sqrt(base / smax_t[:, None]) * 16), 1, 16)
    grid = torch.tensor(P_GRID, dtype=x.dtype, device=x.device)
    s_count = x.shape[0]

    lo, hi = float(-zero), float(maxq - zero)
    q2 = (q16 * q16)[:, None, :]  # [S, 1, N]

    def cost_of(scale: torch.Tensor) -> torch.Tensor:
        """Per-column cost ``[S, P, N]`` of scales ``[S, P, N]``.

        The error factors as ``(round(t) − t) · scale`` with ``t = x / scale``, so the row sum
        runs on the unit-free residual and the scale power is applied once per column.
        """
        t = x[:, None] * (1.0 / scale)[:, :, None, :]  # [S, P, rows, N]
        d = torch.round(t).clamp_(lo, hi).sub_(t)
        if mode == "exl2":
            return d.abs_().pow_(EXL2_NORM).sum(dim=2) * scale.pow(EXL2_NORM)
        return torch.matmul(row_weight, d.square_()) * scale.square()

    def costs(p_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cost ``[S, len]`` of the multipliers ``grid[p_idx]`` (``p_idx : [S, len]``), and per
        column ``[S, len, N]``."""
        out = []
        per = max(1, (1 << 20) // max(1, x[0].numel() * s_count))
        for c0 in range(0, p_idx.shape[1], per):
            sm = _fp16(grid[p_idx[:, c0 : c0 + per]] * smax_t[:, None])  # [S, P]
            out.append(cost_of(q2 * sm[:, :, None] / 256))
        col = torch.cat(out, dim=1)
        return col.sum(dim=2), col

    def keep(idx: torch.Tensor, cost: torch.Tensor, col: torch.Tensor) -> tuple[torch.Tensor, ...]:
        j = torch.argmin(cost, dim=1, keepdim=True)
        return idx.gather(1, j), cost.gather(1, j), col.gather(1, j[:, :, None].expand(-1, -1, n))

    n_grid, n = len(P_GRID), x.shape[2]
    if mode != "hessian":
        idx = torch.arange(n_grid, device=x.device).expand(s_count, n_grid)
        best, _, best_col = keep(idx, *costs(idx))
        best_i = best[:, 0]
    else:
        # Coarse to fine: every 16th point, then a bracket of ±8, ±4, ±2, ±1 around the best;
        # the best's cost (total and per column) is carried, never recomputed.
        idx = torch.arange(0, n_grid, 16, device=x.device).expand(s_count, -1)
        best, best_cost, best_col = keep(idx, *costs(idx))
        for step in (8, 4, 2, 1):
            pair = (best + torch.tensor([-step, step], device=x.device)[None, :]).clamp(
                0, n_grid - 1
            )
            cost, col = costs(pair)
            best, best_cost, best_col = keep(
                torch.cat([best, pair], 1),
                torch.cat([best_cost, cost], 1),
                torch.cat([best_col, col], 1),
            )
        best_i = best[:, 0]
    smax = _fp16(grid[best_i] * smax_t)  # [S]
    if mode != "exl2":
        # Each column's code ±1 on the same loss (the centre is the carried best).
        cands = torch.stack([q16 - 1, q16, q16 + 1], dim=1).clamp(1, 16)  # [S, 3, N]
        side = cands[:, 0::2]
        side_cost = cost_of(side * side * smax[:, None, None] / 256)  # [S, 2, N]
        cost = torch.stack([side_cost[:, 0], best_col[:, 0], side_cost[:, 1]], dim=1)
        q16 = cands.gather(1, torch.argmin(cost, dim=1, keepdim=True))[:, 0]
    return q16, smax


def _fp16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).to(t.dtype)


def _rtn(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | float, maxq: torch.Tensor | float
) -> torch.Tensor:
    q = torch.round(x / scale).add_(zero)
    return (
        torch.minimum(q.clamp_(min=0), torch.as_tensor(maxq, dtype=q.dtype)).sub_(zero).mul_(scale)
    )


def _layout(qparams: QParamsLike, rows: int, name: str) -> list[tuple[int, int, int]]:
    groups = [(int(g.bits), int(g.row_start), int(g.rows)) for g in qparams.groups(rows)]
    pos = 0
    for bits, start, n in groups:
        if start != pos or n <= 0 or not 1 <= bits <= 8:
            raise ValueError(f"{name}: invalid group layout {groups} for {rows} rows")
        pos += n
    if pos != rows:
        raise ValueError(f"{name}: groups cover {pos} rows, matrix has {rows}")
    return groups


def _check_weight(w: torch.Tensor, prepared: Prepared, name: str) -> None:
    if w.ndim != 2 or w.shape[1] != prepared.in_features:
        raise ValueError(
            f"{name}: weight shape {tuple(w.shape)} does not match the Hessian "
            f"({prepared.in_features} input features, from {prepared.name})"
        )
    _check_finite(w, f"{name}: weight")


def quantize(
    weight: torch.Tensor,
    prepared: Prepared,
    qparams: QParamsLike,
    *,
    name: str = "<unnamed>",
    scale_search: ScaleSearch = "hessian",
) -> QuantResult:
    """GPTQ-quantize ``weight [N, K]`` to ``qparams`` (act-order, fp32 error feedback)."""
    return quantize_many(weight, prepared, [qparams], name=name, scale_search=scale_search)[0]


def default_max_batch_bytes(device: torch.device | str) -> int:
    """Batch budget on ``device``: ``DEFAULT_MAX_BATCH_BYTES`` on CPU; on CUDA a fixed fraction
    of the device's total memory (the same split on every run on one GPU model)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return DEFAULT_MAX_BATCH_BYTES
    return int(torch.cuda.get_device_properties(dev).total_memory * CUDA_TOTAL_FRACTION)


def batch_size(k: int, n: int, configs: int, max_batch_bytes: int) -> int:
    """Configs per GPTQ batch: as many as fit ``max_batch_bytes`` (at least one), balanced so
    the batches of one call differ by at most one config."""
    if configs <= 0:
        return 0
    fit = max(1, max_batch_bytes // max(1, k * n * BATCH_BYTES_PER_WEIGHT))
    batches = -(-configs // fit)
    return -(-configs // batches)


def _batches(
    weight: torch.Tensor,
    prepared: Prepared,
    configs: Sequence[QParamsLike],
    name: str,
    scale_search: ScaleSearch,
    error_feedback: bool,
    max_batch_bytes: int | None,
) -> Iterator[list[QuantResult]]:
    """The results of ``configs`` in order, one list per batch; each batch runs when the
    previous one has been consumed, so a caller that drops it bounds the peak."""
    _check_weight(weight, prepared, name)
    dev = prepared.hinv_upper.device
    k = prepared.in_features
    n = int(weight.shape[0])
    layouts = [_layout(q, k, name) for q in configs]
    w32 = weight.to(dev, torch.float32)
    done = 0
    while done < len(configs):
        budget = default_max_batch_bytes(dev) if max_batch_bytes is None else max_batch_bytes
        size = batch_size(k, n, len(configs) - done, budget)
        part = layouts[done : done + size]
        done += size
        yield _quantize_batch(w32, prepared, part, name, scale_search, error_feedback)


def quantize_many(
    weight: torch.Tensor,
    prepared: Prepared,
    configs: Sequence[QParamsLike],
    *,
    name: str = "<unnamed>",
    scale_search: ScaleSearch = "hessian",
    error_feedback: bool = True,
    max_batch_bytes: int | None = None,
) -> list[QuantResult]:
    """GPTQ-quantize one weight to several configs at once (one result per config).

    The configs share the permutation and ``H⁻¹`` factor, so their GPTQ recursions run side by side
    as one ``[C, K, N]`` tensor: each row step and each lazy-batch update serves every config.
    Lazy-batch blocks are ``LAZY_BLOCK_ROWS`` rows; a group's scales are found on its
    error-compensated rows when GPTQ reaches the group (rows past the block get the pending update
    applied first), which is the same arithmetic as EXL2's block = group.
    ``error_feedback=False`` gives round-to-nearest with the same layout and scales.

    The configs run in batches whose working set (``BATCH_BYTES_PER_WEIGHT`` per weight and
    config) fits ``max_batch_bytes`` (default :func:`default_max_batch_bytes`), one batch when
    all fit; results do not depend on the batching. The results themselves hold 6 bytes per
    weight and config: :func:`quantize_many_compact` keeps 1.
    """
    out: list[QuantResult] = []
    for batch in _batches(
        weight, prepared, configs, name, scale_search, error_feedback, max_batch_bytes
    ):
        out.extend(batch)
    return out


def quantize_many_compact(
    weight: torch.Tensor,
    prepared: Prepared,
    configs: Sequence[QParamsLike],
    *,
    name: str = "<unnamed>",
    scale_search: ScaleSearch = "hessian",
    error_feedback: bool = True,
    max_batch_bytes: int | None = None,
) -> list[CompactResult]:
    """:func:`quantize_many` keeping only :class:`CompactResult` s: each batch's fp32 weights
    are dropped before the next batch runs, so the peak is one batch plus 1 byte per weight and
    config."""
    out: list[CompactResult] = []
    for batch in _batches(
        weight, prepared, configs, name, scale_search, error_feedback, max_batch_bytes
    ):
        out.extend(CompactResult.of(r) for r in batch)
        del batch  # the loop variable would keep this batch alive while the next one runs
    return out


def _quantize_batch(
    w32: torch.Tensor,
    prepared: Prepared,
    layouts: list[list[tuple[int, int, int]]],
    name: str,
    scale_search: ScaleSearch,
    error_feedback: bool,
) -> list[QuantResult]:
    """GPTQ of ``w32 [N, K]`` (fp32, on the factor's device) to every layout, as one batch."""
    codes, qweight, scales, smaxes = _gptq_rows(
        w32, prepared, layouts, scale_search, error_feedback
    )
    results = []
    for ci, lay in enumerate(layouts):
        # One config at a time: the [N, K] weight, its delta and H-product are the only
        # temporaries, never a [C, N, K] one.
        w_q = qweight[ci][prepared.invperm].T.contiguous()
        results.append(
            QuantResult(
                name=name,
                group_bits=tuple(g[0] for g in lay),
                group_rows=tuple(g[2] for g in lay),
                codes=codes[ci],
                scales=scales[ci],
                scale_max=smaxes[ci],
                perm=prepared.perm,
                invperm=prepared.invperm,
                weight=w_q,
                err=weighted_error(w32 - w_q, prepared.hessian),
            )
        )
    return results


def _gptq_rows(
    w32: torch.Tensor,
    prepared: Prepared,
    layouts: list[list[tuple[int, int, int]]],
    scale_search: ScaleSearch,
    error_feedback: bool,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The GPTQ recursion of one batch: codes and quantized rows ``[C, K, N]`` (act-order),
    scale codes and ``scale_max`` per config. The fp32 working copy dies on return."""
    dev = prepared.hinv_upper.device
    k = prepared.in_features
    c_count = len(layouts)
    u = prepared.hinv_upper
    diag = torch.diag(u)
    row_weight_all = 1.0 / (diag * diag)
    work = w32.T[prepared.perm].contiguous().expand(c_count, -1, -1).clone()  # [C, K, N]
    n = work.shape[2]
    codes = torch.empty(c_count, k, n, dtype=torch.int16, device=dev)
    qweight = torch.empty(c_count, k, n, dtype=torch.float32, device=dev)
    scales = [torch.empty(len(lay), n, dtype=torch.uint8, device=dev) for lay in layouts]
    smaxes = [torch.empty(len(lay), dtype=torch.float16, device=dev) for lay in layouts]
    # Per config: current scale [N], zero, maxq; starts[r] = [(config, group index)].
    cur_scale = torch.ones(c_count, n, dtype=torch.float32, device=dev)
    cur_zero = torch.zeros(c_count, 1, dtype=torch.float32, device=dev)
    cur_maxq = torch.ones(c_count, 1, dtype=torch.float32, device=dev)
    starts: dict[int, list[tuple[int, int]]] = {}
    for ci, lay in enumerate(layouts):
        for gi, (_, start, _) in enumerate(lay):
            starts.setdefault(start, []).append((ci, gi))

    for b0 in range(0, k, LAZY_BLOCK_ROWS):
        b1 = min(k, b0 + LAZY_BLOCK_ROWS)
        block = work[:, b0:b1]  # view: in-block updates land in `work`
        errs = torch.zeros(c_count, b1 - b0, n, dtype=torch.float32, device=dev)
        for r in range(b0, b1):
            if r in starts:
                _start_groups(
                    r,
                    starts[r],
                    layouts,
                    work,
                    errs,
                    u,
                    b0,
                    b1,
                    row_weight_all,
                    scale_search,
                    scales,
                    smaxes,
                    cur_scale,
                    cur_zero,
                    cur_maxq,
                )
            lr = r - b0
            x = block[:, lr]  # [C, N]
            q = torch.round(x / cur_scale).add_(cur_zero).clamp_(min=0)
            q = torch.minimum(q, cur_maxq)
            codes[:, r] = q.to(torch.int16)
            qh = q.sub_(cur_zero).mul_(cur_scale)
            qweight[:, r] = qh
            if error_feedback:
                e = (x - qh) / u[r, r]
                errs[:, lr] = e
                if r + 1 < b1:
                    col = u[r, r + 1 : b1, None].expand(c_count, -1, 1)
                    rest = block[:, lr + 1 :]
                    rest.baddbmm_(col, e[:, None, :], alpha=-1.0)
        if error_feedback and b1 < k:
            # In place (beta = 1): no [C, K - b1, N] temporary per block.
            tail = work[:, b1:]
            tail.baddbmm_(u[b0:b1, b1:].T.expand(c_count, -1, -1), errs, alpha=-1.0)
    return codes, qweight, scales, smaxes


def _start_groups(
    r: int,
    starting: list[tuple[int, int]],
    layouts: list[list[tuple[int, int, int]]],
    work: torch.Tensor,
    errs: torch.Tensor,
    u: torch.Tensor,
    b0: int,
    b1: int,
    row_weight_all: torch.Tensor,
    mode: ScaleSearch,
    scales: list[torch.Tensor],
    smaxes: list[torch.Tensor],
    cur_scale: torch.Tensor,
    cur_zero: torch.Tensor,
    cur_maxq: torch.Tensor,
) -> None:
    """Find scales for every config whose next group starts at row ``r``, batched by shape.

    Configs whose layouts agree on every group up to this one have run identical recursions so
    far, so their rows are identical: the search runs once per such prefix.
    """
    by_shape: dict[tuple[int, int], dict[tuple[tuple[int, int, int], ...], list[int]]] = {}
    for ci, gi in starting:
        bits, _, rows = layouts[ci][gi]
        prefix = tuple(layouts[ci][: gi + 1])
        by_shape.setdefault((rows, bits), {}).setdefault(prefix, []).append(ci)
    for (rows, bits), by_prefix in by_shape.items():
        sharing = list(by_prefix.items())
        cis = torch.tensor([same[0] for _, same in sharing], device=work.device)
        end = r + rows
        x = work[cis, r:end].clone()  # [S, rows, N]
        if end > b1:
            # Rows past this block still miss the block's updates from rows b0..r-1.
            pending = torch.matmul(u[b0:r, b1:end].T, errs[cis, : r - b0])
            x[:, b1 - r :] -= pending
        q16, smax = _group_scales(x, bits, row_weight_all[r:end], mode)
        scale = q16 * q16 * smax.to(torch.float32)[:, None] / 256
        for j, (prefix, same) in enumerate(sharing):
            gi = len(prefix) - 1
            for ci in same:
                scales[ci][gi] = (q16[j] - 1).to(torch.uint8)
                smaxes[ci][gi] = smax[j].to(torch.float16)
                cur_scale[ci] = scale[j]
                cur_zero[ci, 0] = float(1 << (bits - 1))
                cur_maxq[ci, 0] = float((1 << bits) - 1)


def rtn_quantize(
    weight: torch.Tensor,
    prepared: Prepared,
    qparams: QParamsLike,
    *,
    name: str = "<unnamed>",
    scale_search: ScaleSearch = "exl2",
) -> QuantResult:
    """Round-to-nearest baseline: same layout, permutation and scales as GPTQ, no error feedback."""
    return quantize_many(
        weight, prepared, [qparams], name=name, scale_search=scale_search, error_feedback=False
    )[0]


def dequantize(result: QuantResult | CompactResult) -> torch.Tensor:
    """Rebuild ``W [N, K]`` from the stored fields alone, as a loader of packed tensors does."""
    k, n = int(result.codes.shape[0]), int(result.codes.shape[1])
    # Groups fill one act-order buffer and it is scattered straight into W's transposed view:
    # two [N, K] fp32 tensors at peak, not four (cat, permute, transpose).
    rows = torch.empty(k, n, dtype=torch.float32, device=result.codes.device)
    start = 0
    smax = result.scale_max.to(torch.float32)
    for g, (bits, count) in enumerate(zip(result.group_bits, result.group_rows, strict=True)):
        qs1 = result.scales[g].to(torch.float32) + 1
        scale = qs1 * qs1 * float(smax[g]) / 256
        dst = rows[start : start + count]
        dst.copy_(result.codes[start : start + count])
        dst.sub_(float(1 << (bits - 1))).mul_(scale)
        start += count
    out = torch.empty(n, k, dtype=torch.float32, device=rows.device)
    out.T.index_copy_(0, result.perm, rows)
    return out
