"""GPTQ against a straightforward reference, format invariants, error ordering, bad input."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from exl2rs import gptq
from exl2rs.errors import Exl2Error, HessianError, NonFiniteError
from exl2rs.qparams import QParams


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Small torch ops stall badly in a 2-thread pool on a shared 2-core machine.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _calib(k: int, tokens: int, seed: int) -> torch.Tensor:
    """Correlated inputs with a few strong channels, like transformer activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) * 0.15 + torch.eye(k)
    x = torch.randn(tokens, k, generator=g) @ mix
    x[:, : max(1, k // 16)] *= 6.0
    return x


def _weight(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 100)
    return torch.randn(n, k, generator=g) * 0.02


def _reference_gptq(w: torch.Tensor, h: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Textbook GPTQ, one row at a time with a full update of every later row, act-order,
    EXL2's damping and its scale rule (sqrt-coded per-column scales, 97-point clip search on
    Σ|err|^3.5). Returns the dequantized weight [N, K]."""
    k = h.shape[0]
    perm = torch.argsort(torch.diag(h), descending=True, stable=True)
    hp = h[perm][:, perm].double()
    hp += 0.12 * float(torch.diag(h).mean()) * torch.eye(k, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hp)), upper=True)
    u = u.float()
    wt = w.T[perm].clone()
    out = torch.empty_like(wt)
    maxq, zero = 2**bits - 1, 2 ** (bits - 1)
    scale = torch.ones(wt.shape[1])
    for r in range(k):
        if r % group == 0:
            x = wt[r : r + group]
            base = (x.abs().amax(0) + 1e-12) / (maxq / 2)
            top = float(base.max())
            q16 = torch.clamp(torch.round(torch.sqrt(base / top) * 16), 1, 16)
            best = (math.inf, 0.0)
            for i in range(97):
                p = 0.70 + 0.5 * i / 96
                sm = float(torch.tensor(p * top).half())
                s = q16 * q16 * sm / 256
                q = (torch.clamp(torch.round(x / s) + zero, 0, maxq) - zero) * s
                cost = float((q - x).abs().pow(3.5).sum())
                if cost < best[0]:
                    best = (cost, sm)
            scale = q16 * q16 * best[1] / 256
        q = (torch.clamp(torch.round(wt[r] / scale) + zero, 0, maxq) - zero) * scale
        out[r] = q
        e = (wt[r] - q) / u[r, r]
        wt[r + 1 :] -= torch.outer(u[r, r + 1 :], e)
    return out[torch.argsort(perm)].T


@pytest.fixture(scope="module")
def layer() -> tuple[torch.Tensor, gptq.Prepared]:
    x = _calib(256, 2048, seed=1)
    prepared = gptq.prepare(gptq.accumulate_hessian(x, name="test.layer"))
    return _weight(192, 256, seed=1), prepared


@pytest.mark.parametrize(("bits", "group"), [(4, 128), (3, 32), (6, 64)])
def test_matches_reference_gptq_single_width(
    layer: tuple[torch.Tensor, gptq.Prepared], bits: int, group: int
) -> None:
    w, prepared = layer
    qp = QParams(bits=(bits,), bits_prop=(1.0,), group_size=(group,))
    got = gptq.quantize(w, prepared, qp, scale_search="exl2")
    want = _reference_gptq(w, prepared.hessian, bits, group)
    # Lazy batching reorders fp32 sums, so a rare borderline rounding may flip.
    same = (got.weight == want).float().mean().item()
    assert same > 0.995
    ref_err = gptq.weighted_error(w - want, prepared.hessian)
    assert got.err == pytest.approx(ref_err, rel=2e-3)


def test_stored_fields_rebuild_weight_exactly(layer: tuple[torch.Tensor, gptq.Prepared]) -> None:
    w, prepared = layer
    qp = QParams(bits=(8, 4, 3), bits_prop=(0.05, 0.1, 0.85), group_size=(32, 128, 128))
    res = gptq.quantize(w, prepared, qp)
    groups = qp.groups(256)
    assert res.group_bits == tuple(g.bits for g in groups)
    assert res.group_rows == tuple(g.rows for g in groups)
    assert torch.equal(gptq.dequantize(res), res.weight)
    assert res.codes.dtype == torch.int16 and res.codes.shape == (256, 192)
    for g, grp in enumerate(groups):
        codes = res.group_codes(g)
        assert int(codes.min()) >= 0 and int(codes.max()) < 2**grp.bits
    assert res.scales.dtype == torch.uint8 and int(res.scales.max()) <= 15
    assert res.scale_max.dtype == torch.float16 and res.scale_max.shape == (len(groups),)
    assert torch.equal(res.perm[res.invperm], torch.arange(256))
    # Highest width on the most salient inputs (largest diag H).
    d = torch.diag(prepared.hessian)
    assert float(d[res.perm[0]]) == float(d.max())
    assert res.err == pytest.approx(gptq.weighted_error(w - res.weight, prepared.hessian))


def test_batched_configs_equal_single_runs(layer: tuple[torch.Tensor, gptq.Prepared]) -> None:
    from exl2rs.qparams import candidates

    w, prepared = layer
    configs = candidates("down_proj")[:6]
    many = gptq.quantize_many(w, prepared, configs)
    for q, res in zip(configs, many, strict=True):
        one = gptq.quantize(w, prepared, q)
        assert torch.equal(one.codes, res.codes), q.desc
        assert torch.equal(one.scale_max, res.scale_max)
        assert one.err == res.err


def test_batches_sized_to_the_budget_give_identical_results(
    layer: tuple[torch.Tensor, gptq.Prepared],
) -> None:
    from exl2rs.qparams import candidates

    w, prepared = layer
    configs = candidates("down_proj")[:5]
    per_config = 256 * 192 * gptq.BATCH_BYTES_PER_WEIGHT
    assert gptq.batch_size(256, 192, 5, 10 * per_config) == 5
    assert gptq.batch_size(256, 192, 5, 2 * per_config) == 2
    assert gptq.batch_size(256, 192, 5, 1) == 1
    assert gptq.batch_size(256, 192, 5, 4 * per_config) == 3  # 3 + 2, not 4 + 1
    whole = gptq.quantize_many(w, prepared, configs)
    for budget in (per_config, 2 * per_config):  # batches of 1 and of 2 (2 + 2 + 1)
        parts = gptq.quantize_many(w, prepared, configs, max_batch_bytes=budget)
        compact = gptq.quantize_many_compact(w, prepared, configs, max_batch_bytes=budget)
        for q, a, b, c in zip(configs, whole, parts, compact, strict=True):
            assert torch.equal(a.codes, b.codes), q.desc
            assert torch.equal(a.weight, b.weight), q.desc
            assert torch.equal(a.scales, b.scales) and torch.equal(a.scale_max, b.scale_max)
            assert a.err == b.err == c.err, q.desc
            assert c.codes.dtype == torch.uint8 and torch.equal(c.codes.to(torch.int16), a.codes)
            assert torch.equal(gptq.dequantize(c), a.weight), q.desc
            # uint8 codes plus one uint8 scale per group and column: ~1 byte per weight.
            assert c.nbytes / w.numel() < 1.05


def test_error_falls_as_bits_rise(layer: tuple[torch.Tensor, gptq.Prepared]) -> None:
    w, prepared = layer
    errs = [
        gptq.quantize(w, prepared, QParams(bits=(b,), bits_prop=(1.0,), group_size=(64,))).err
        for b in (2, 3, 4, 5, 6, 8)
    ]
    assert all(a > b for a, b in zip(errs, errs[1:], strict=False)), errs
    assert errs[-1] < 1e-3 * gptq.weighted_error(w, prepared.hessian)


def test_beats_rtn_and_exl2_rule_on_random_layers(
    layer: tuple[torch.Tensor, gptq.Prepared],
) -> None:
    from exl2rs.qparams import candidates

    w, prepared = layer
    configs = candidates("q_proj")
    ours = gptq.quantize_many(w, prepared, configs, scale_search="hessian")
    exl2 = gptq.quantize_many(w, prepared, configs, scale_search="exl2")
    for q, a, b in zip(configs, ours, exl2, strict=True):
        rtn = gptq.rtn_quantize(w, prepared, q)
        assert a.err < rtn.err and b.err < rtn.err, q.desc
    assert sum(a.err / b.err for a, b in zip(ours, exl2, strict=True)) / len(configs) < 1.0


def test_damping_retries_are_cumulative_and_bounded() -> None:
    k = 32
    h = torch.eye(k)
    h[5, 5] = -0.15  # needs a second damping round: step = 0.12 * mean(diag) ≈ 0.115
    prepared = gptq.prepare(h, name="x.q_proj")
    assert prepared.retries >= 1
    step = 0.12 * float(torch.diag(h).mean())
    assert prepared.damp == pytest.approx(step * (prepared.retries + 1))

    hopeless = -torch.eye(k)
    with pytest.raises(HessianError, match=r"model\.layers\.3\.mlp\.down_proj.*10 extra damping"):
        gptq.prepare(hopeless, name="model.layers.3.mlp.down_proj")


def test_nonfinite_inputs_name_the_layer() -> None:
    x = _calib(16, 64, seed=2)
    x[3, 4] = float("nan")
    with pytest.raises(NonFiniteError, match="layers.7.self_attn.qkv"):
        gptq.accumulate_hessian(x, name="model.layers.7.self_attn.qkv")

    h = torch.eye(16)
    h[0, 1] = float("inf")
    with pytest.raises(NonFiniteError, match="layers.1.mlp.down_proj: Hessian"):
        gptq.prepare(h, name="model.layers.1.mlp.down_proj")

    prepared = gptq.prepare(torch.eye(16), name="h")
    w = _weight(8, 16, seed=3)
    w[2, 2] = float("-inf")
    qp = QParams(bits=(4,), bits_prop=(1.0,), group_size=(32,))
    with pytest.raises(NonFiniteError, match="layers.2.mlp.up_proj: weight"):
        gptq.quantize(w, prepared, qp, name="model.layers.2.mlp.up_proj")
    assert issubclass(NonFiniteError, Exl2Error)


def test_bad_shapes_and_empty_hessian() -> None:
    hess = gptq.Hessian(16, name="model.layers.0.mlp.gate_up")
    with pytest.raises(HessianError, match="gate_up.*no calibration tokens"):
        hess.matrix()
    with pytest.raises(ValueError, match="gate_up: input has 8 features"):
        hess.add(torch.ones(4, 8))
    prepared = gptq.prepare(torch.eye(16), name="h")
    qp = QParams(bits=(4,), bits_prop=(1.0,), group_size=(32,))
    with pytest.raises(ValueError, match="o_proj: weight shape"):
        gptq.quantize(torch.ones(4, 12), prepared, qp, name="o_proj")


@pytest.mark.cuda
def test_cuda_matches_cpu(layer: tuple[torch.Tensor, gptq.Prepared]) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    w, prepared = layer
    qp = QParams(bits=(5, 4), bits_prop=(0.1, 0.9), group_size=(32, 64))
    cpu = gptq.quantize(w, prepared, qp)
    on_gpu = gptq.prepare(prepared.hessian.cuda(), name="test.layer")
    gpu = gptq.quantize(w.cuda(), on_gpu, qp)
    assert gpu.weight.device.type == "cuda"
    assert torch.equal(gptq.dequantize(gpu), gpu.weight)
    assert (gpu.codes.cpu() == cpu.codes).float().mean().item() > 0.99
    assert gpu.err == pytest.approx(cpu.err, rel=1e-2)


@pytest.mark.cuda
def test_cuda_batches_give_identical_results(layer: tuple[torch.Tensor, gptq.Prepared]) -> None:
    """Batch sizes differ between GPU models (the default budget is a fraction of the device's
    memory) and with ``max_batch_bytes``: the results must not depend on them (cuBLAS may pick
    other kernels for other batch counts)."""
    from exl2rs.qparams import candidates

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    w, prepared = layer
    on_gpu = gptq.prepare(prepared.hessian.cuda(), name="test.layer")
    assert gptq.default_max_batch_bytes("cuda") > 0
    configs = candidates("down_proj")[:5]
    whole = gptq.quantize_many(w.cuda(), on_gpu, configs)
    per_config = 256 * 192 * gptq.BATCH_BYTES_PER_WEIGHT
    for budget in (per_config, 2 * per_config):
        parts = gptq.quantize_many_compact(w.cuda(), on_gpu, configs, max_batch_bytes=budget)
        for q, a, b in zip(configs, whole, parts, strict=True):
            assert torch.equal(a.codes.to(torch.uint8), b.codes), q.desc
            assert torch.equal(gptq.dequantize(b), a.weight) and a.err == b.err, q.desc
