"""The exl2rs::exl2_matmul / exl2_dequantize ops against the Rust reference dequantizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from exl2rs import PackError, ops, packing
from exl2rs.quant_linear import QuantLinear

BLOCK_ROWS = {2: 16, 3: 32, 4: 8, 5: 32, 6: 16, 8: 4}


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


LAYOUTS = [
    pytest.param([(2, 64)], 64, id="2b"),
    pytest.param([(3, 96)], 33, id="3b-odd-n"),
    pytest.param([(4, 32), (4, 32), (4, 24)], 64, id="4b-short-last-group"),
    pytest.param([(5, 64)], 31, id="5b-odd-n"),
    pytest.param([(6, 48)], 100, id="6b"),
    pytest.param([(8, 36)], 1, id="8b-one-column"),
    pytest.param([(8, 32), (6, 32), (5, 32), (4, 64), (3, 64), (2, 32)], 70, id="all-mixed"),
    pytest.param([(4, 128), (3, 32), (2, 96)], 96, id="4-3-2"),
]


@pytest.mark.parametrize(("groups", "n"), LAYOUTS)
def test_dequantize_is_bit_identical_to_rust(groups: list[tuple[int, int]], n: int) -> None:
    t = random_pack(groups, n, seed=len(groups) * 1000 + n)
    ref = packing.dequantize_exl2(t)
    w = ops.exl2_dequantize(*op_args(t), n, torch.float32)
    assert w.shape == (ref.shape[0], n)
    np.testing.assert_array_equal(w.numpy(), ref)
    w16 = ops.exl2_dequantize(*op_args(t), n, torch.float16)
    assert w16.dtype == torch.float16
    np.testing.assert_array_equal(w16.numpy(), ref.astype(np.float16))


@pytest.mark.parametrize(("groups", "n"), LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matmul_matches_dense(groups: list[tuple[int, int]], n: int, dtype: torch.dtype) -> None:
    t = random_pack(groups, n, seed=7 + n)
    w = torch.from_numpy(packing.dequantize_exl2(t)).double()
    k = w.shape[0]
    x = torch.randn(2, 3, k, dtype=torch.float64).to(dtype)
    y = ops.exl2_matmul(x, *op_args(t), n)
    assert y.dtype == dtype and y.shape == (2, 3, n)
    want = x.double() @ w
    # fp32 accumulation, then one rounding to x's dtype.
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert torch.allclose(y.double(), want, rtol=tol, atol=tol * float(want.abs().max()))


def test_identity_permutation_and_1d_input() -> None:
    t = random_pack([(4, 64)], 40, seed=3, act_order=False)
    w = torch.from_numpy(packing.dequantize_exl2(t))
    x = torch.randn(64)
    y = ops.exl2_matmul(x, *op_args(t), 40)
    assert y.shape == (40,)
    assert torch.allclose(y, x @ w, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    widths=st.lists(st.sampled_from([8, 6, 5, 4, 3, 2]), min_size=1, max_size=4),
    blocks=st.lists(st.integers(1, 3), min_size=4, max_size=4),
    n=st.integers(1, 80),
    seed=st.integers(0, 2**31),
)
def test_random_layouts_match_rust(widths: list[int], blocks: list[int], n: int, seed: int) -> None:
    groups = [
        (b, BLOCK_ROWS[b] * m)
        for b, m in zip(sorted(widths, reverse=True), blocks[: len(widths)], strict=True)
    ]
    t = random_pack(groups, n, seed)
    w = ops.exl2_dequantize(*op_args(t), n, torch.float32)
    np.testing.assert_array_equal(w.numpy(), packing.dequantize_exl2(t))


def test_large_matrix_is_chunked_correctly() -> None:
    # More rows per width than one unpack chunk holds (4M elements / 1000 columns = 4192
    # rows), with a partial last chunk.
    t = random_pack([(4, 8200), (3, 4224), (2, 2048)], 1000, seed=11)
    w = ops.exl2_dequantize(*op_args(t), 1000, torch.float32)
    np.testing.assert_array_equal(w.numpy(), packing.dequantize_exl2(t))


def test_opcheck() -> None:
    t = random_pack([(6, 32), (4, 64), (3, 32)], 48, seed=5)
    args = op_args(t)
    x = torch.randn(3, 128)
    torch.library.opcheck(torch.ops.exl2rs.exl2_matmul.default, (x, *args, 48))
    torch.library.opcheck(torch.ops.exl2rs.exl2_dequantize.default, (*args, 48, torch.float16))
    xg = torch.randn(3, 128, requires_grad=True)
    torch.library.opcheck(torch.ops.exl2rs.exl2_matmul.default, (xg, *args, 48))


def test_gradient_flows_to_x() -> None:
    t = random_pack([(4, 64)], 32, seed=9)
    w = torch.from_numpy(packing.dequantize_exl2(t))
    x = torch.randn(5, 64, requires_grad=True)
    ops.exl2_matmul(x, *op_args(t), 32).square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    (x2 @ w).square().sum().backward()
    assert x.grad is not None and x2.grad is not None
    assert torch.allclose(x.grad, x2.grad, atol=1e-4)


def test_fake_tensors_and_compile() -> None:
    t = random_pack([(4, 64)], 32, seed=2)
    args = op_args(t)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) for a in args]
        y = ops.exl2_matmul(torch.empty(7, 64, dtype=torch.bfloat16), *fake, 32)
        assert y.shape == (7, 32) and y.dtype == torch.bfloat16
        w = ops.exl2_dequantize(*fake, 32, torch.float16)
        assert w.shape == (64, 32) and w.dtype == torch.float16


def _bad(args: list[torch.Tensor], i: int, value: torch.Tensor) -> list[torch.Tensor]:
    out = list(args)
    out[i] = value
    return out


def test_bad_inputs_are_named() -> None:
    t = random_pack([(4, 32), (2, 32)], 40, seed=1)
    args = op_args(t)
    x = torch.randn(2, 64)
    with pytest.raises(PackError, match="q_weight must be a 2-D torch.int32"):
        ops.exl2_matmul(x, *_bad(args, 0, args[0].to(torch.int64)), 40)
    with pytest.raises(PackError, match="q_scale_max must be a 1-D torch.float16"):
        ops.exl2_matmul(x, *_bad(args, 2, args[2].float()), 40)
    with pytest.raises(PackError, match="q_groups must be a 1-D torch.int16"):
        ops.exl2_matmul(x, *_bad(args, 3, args[3].int()), 40)
    with pytest.raises(PackError, match="q_perm must be a 1-D torch.int32"):
        ops.exl2_matmul(x, *_bad(args, 4, args[4].long()), 40)
    with pytest.raises(PackError, match="last dim must equal the 64 input features"):
        ops.exl2_matmul(torch.randn(2, 63), *args, 40)
    with pytest.raises(PackError, match="x must be float16, bfloat16 or float32"):
        ops.exl2_matmul(x.double(), *args, 40)
    with pytest.raises(PackError, match="out_features=80 needs q_weight with 96 columns"):
        ops.exl2_matmul(x, *args, 80)
    with pytest.raises(PackError, match="q_scale must be"):
        ops.exl2_matmul(x, *_bad(args, 1, args[1][:, :2].contiguous()), 40)
    groups = args[3].clone()
    groups[2] = 7
    with pytest.raises(PackError, match="expected a bit width"):
        ops.exl2_matmul(x, *_bad(args, 3, groups), 40)
    groups = args[3].clone()
    groups[2] = 8  # an 8-bit group after a 4-bit one
    with pytest.raises(PackError, match="non-increasing"):
        ops.exl2_matmul(x, *_bad(args, 3, groups), 40)
    with pytest.raises(PackError, match="describes 64 input rows, q_perm has 63"):
        ops.exl2_dequantize(*_bad(args, 4, args[4][:63].contiguous()), 40, torch.float32)


def test_quant_linear_forward_cache_and_state_dict() -> None:
    t = random_pack([(5, 64), (3, 32)], 50, seed=4)
    shapes = {k.rpartition(".")[2]: v.shape for k, v in t.state_dict("p").items()}
    shapes["bias"] = (50,)
    q = QuantLinear.from_shapes(shapes, 50)
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in t.state_dict("").items()}
    state = {k.lstrip("."): v for k, v in state.items()}
    state["bias"] = torch.randn(50).half()
    # q_perm is absent (exllamav2 does not store it): rebuilt from q_invperm.
    q.load_state_dict(state, strict=True)
    q.validate("p")
    w = torch.from_numpy(packing.dequantize_exl2(t))
    x = torch.randn(4, 96)
    want = x @ w + state["bias"].float()
    assert torch.allclose(q(x), want, atol=1e-5)
    assert torch.equal(q.dequantize(), w)
    q.cache_weight(True)
    assert torch.allclose(q(x), want, atol=1e-5)
    assert q(x.half()).dtype == torch.float16
    q.q_perm[0], q.q_perm[1] = q.q_perm[1].clone(), q.q_perm[0].clone()
    with pytest.raises(Exception, match="q_perm is not argsort"):
        q.validate("p")


@pytest.mark.cuda
def test_ops_run_on_cuda() -> None:
    # The CUDA implementation (F's kernel when registered, else this reference) must agree.
    t = random_pack([(8, 32), (4, 64), (2, 32)], 70, seed=12)
    w = ops.exl2_dequantize(*op_args(t, "cuda"), 70, torch.float32)
    np.testing.assert_allclose(w.cpu().numpy(), packing.dequantize_exl2(t), rtol=1e-3, atol=1e-6)
    x = torch.randn(3, 128, device="cuda", dtype=torch.float16)
    y = ops.exl2_matmul(x, *op_args(t, "cuda"), 70)
    want = x.double().cpu() @ torch.from_numpy(packing.dequantize_exl2(t)).double()
    assert torch.allclose(y.double().cpu(), want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))
