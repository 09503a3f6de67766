"""The sequential quantize pass (exl2rs.quantize) on SmolLM2 layers and tiny random Llamas."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from exl2rs import JobError, gptq
from exl2rs.calibration import load_rows
from exl2rs.packing import Exl2Tensors
from exl2rs.qparams import QParams
from exl2rs.quantize import (
    QuantizationError,
    _pack,
    _verify_packed,
    decoder_linears,
    quantize_model,
    uniform_strategy,
)
from exl2rs.streaming import StreamingModel

Q4 = QParams((4,), (1.0,), (128,))
Q2 = QParams((2,), (1.0,), (128,))
VOCAB = 512


def small_llama(out: Path, layers: int = 2, seed: int = 0) -> Path:
    """A random Llama (hidden 64, vocab 512, tied head) saved as a HF folder."""
    from transformers import LlamaConfig

    from conftest import save_tiny_model

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    config.architectures = ["LlamaForCausalLM"]
    return save_tiny_model(config, out, seed=seed)


def greedy_tokens(model_dir: Path, rows: int, length: int) -> torch.Tensor:
    """Sequences the fp32 model itself predicts (argmax), so its perplexity on them is low and
    a damaged model shows up as a much higher one."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    start = torch.arange(rows, dtype=torch.long)[:, None] * 37 % VOCAB
    with torch.no_grad():
        out = model.generate(start, max_new_tokens=length - 1, do_sample=False, min_length=length)
    return out[:, :length].contiguous()


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_llama(tmp_path_factory.mktemp("small"))


@pytest.fixture(scope="module")
def small_tokens(small_dir: Path) -> torch.Tensor:
    return greedy_tokens(small_dir, 4, 48)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    # Small matrices on a shared machine: one thread avoids thread-pool stalls.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def smol_l1() -> Path:
    from exl2rs.fixtures import truncated_model_dir

    return truncated_model_dir(1)


@pytest.fixture(scope="module")
def smol_tokens(smol_l1: Path) -> torch.Tensor:
    return load_rows("default", StreamingModel(smol_l1).tokenizer, 2, 128)


def _strategy(model: Path, config: QParams) -> dict[str, QParams]:
    sm = StreamingModel(model)
    return uniform_strategy(decoder_linears(sm.adapter, sm.num_layers), config)


def _tensors(prefix: str, d: dict[str, torch.Tensor]) -> Exl2Tensors:
    return Exl2Tensors(
        q_weight=d[f"{prefix}.q_weight"].numpy(),
        q_scale=d[f"{prefix}.q_scale"].numpy(),
        q_scale_max=d[f"{prefix}.q_scale_max"].numpy(),
        q_groups=d[f"{prefix}.q_groups"].numpy(),
        q_invperm=d[f"{prefix}.q_invperm"].numpy(),
        cols=int(d[f"{prefix}.q_weight"].shape[1]),
    )


def test_packed_tensors_dequantize_to_the_gptq_weight() -> None:
    torch.manual_seed(0)
    x, w = torch.randn(400, 96), torch.randn(40, 96)
    prepared = gptq.prepare(gptq.accumulate_hessian(x, name="t"))
    res = gptq.quantize(w, prepared, QParams((5, 3), (0.25, 0.75), (32, 32)), name="t")
    packed = _pack(res)
    deq = _verify_packed("t", packed, res)
    assert torch.equal(deq, res.weight)
    assert packed.q_weight.shape[1] == 64  # out_features 40 padded to 32
    # One flipped code must be caught and the layer named.
    bad = res.codes.clone()
    bad[3, 7] = (int(bad[3, 7]) + 1) % 8
    broken = gptq.QuantResult(**{**res.__dict__, "codes": bad})
    with pytest.raises(QuantizationError, match=r"^layer\.x: packed tensors"):
        _verify_packed("layer.x", _pack(broken), res)


def test_pass_on_a_smollm2_block(smol_l1: Path, smol_tokens: torch.Tensor, tmp_path: Path) -> None:
    res = quantize_model(
        smol_l1,
        tmp_path / "job",
        _strategy(smol_l1, Q4),
        smol_tokens,
        head_bits=None,
        progress=False,
    )
    assert [m["name"] for m in res.modules] == ["model.layers.0.self_attn", "model.layers.0.mlp"]
    assert all(0 < m["rfn"] < 0.05 for m in res.modules), res.modules
    # The stored tensors are what a loader sees: close to the source weights at 4 bits.
    stored = load_file(str(res.tensors_dir / "model.layers.0.safetensors"))
    src = StreamingModel(smol_l1).load_block(0)
    for rec in res.linears:
        name = rec["name"]
        w = src.get_submodule(name.split(".", 3)[-1]).weight.detach()
        deq = torch.from_numpy(_tensors(name, stored).dequantize()).T
        assert deq.shape == w.shape
        rel = float((deq - w).norm() / w.norm())
        assert 0 < rel < 0.15, (name, rel)
        perm = stored[f"{name}.q_perm"].long()
        assert torch.equal(torch.argsort(stored[f"{name}.q_invperm"].long()), perm)
        assert rec["bits"] == Q4.total_bits(w.shape[1], w.shape[0])
    assert res.cal_ppl_quant < 1.2 * res.cal_ppl_fp32


def test_gptq_beats_rtn_on_block_output_error(
    small_dir: Path, small_tokens: torch.Tensor, tmp_path: Path
) -> None:
    strategy = _strategy(small_dir, QParams((3,), (1.0,), (32,)))
    runs = {
        rtn: quantize_model(
            small_dir,
            tmp_path / f"rtn{int(rtn)}",
            strategy,
            small_tokens,
            rtn=rtn,
            progress=False,
        )
        for rtn in (False, True)
    }
    gq, rt = runs[False], runs[True]
    for g, r in zip(gq.modules, rt.modules, strict=True):
        assert g["name"] == r["name"]
        assert 0 < g["rfn"] < r["rfn"], (g, r)
    for g, r in zip(gq.linears, rt.linears, strict=True):
        assert g["name"] == r["name"] and g["bits"] == r["bits"]
    assert sum(x["err"] for x in gq.linears) < sum(x["err"] for x in rt.linears)


def test_broken_model_fails_the_perplexity_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import save_file

    import exl2rs.quantize as qmod

    # Large embeddings (tied head) make the random model confident, so its perplexity on its
    # own greedy text is low and a damaged head shows. The damage: a head whose packed
    # tensors pass the check but whose weight enters the model negated.
    model = small_llama(tmp_path / "peaked", seed=5)
    weights = load_file(str(model / "model.safetensors"))
    weights["model.embed_tokens.weight"] *= 40
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    tokens = greedy_tokens(model, 2, 32)
    verify = qmod._verify_packed

    def broken(name: str, packed: Exl2Tensors, res: gptq.QuantResult) -> torch.Tensor:
        deq = verify(name, packed, res)
        return -deq if name == "lm_head" else deq

    monkeypatch.setattr(qmod, "_verify_packed", broken)
    with pytest.raises(QuantizationError, match=r"broken: calibration perplexity .* x fp32"):
        quantize_model(model, tmp_path / "job", _strategy(model, Q4), tokens, progress=False)
    # Without the bound (baselines) the same model is written, its perplexity reported.
    res = quantize_model(
        model, tmp_path / "job2", _strategy(model, Q4), tokens, max_ppl_ratio=None, progress=False
    )
    assert res.cal_ppl_quant > 3 * res.cal_ppl_fp32


def test_strategy_must_cover_every_linear(small_dir: Path, tmp_path: Path) -> None:
    strategy = _strategy(small_dir, Q4)
    strategy.pop("model.layers.1.mlp.down_proj")
    tokens = torch.zeros(1, 16, dtype=torch.long)
    with pytest.raises(JobError, match=r"model\.layers\.1\.mlp\.down_proj"):
        quantize_model(small_dir, tmp_path, strategy, tokens, progress=False)
    strategy["model.layers.1.mlp.down_proj"] = Q4
    strategy["model.layers.9.mlp.down_proj"] = Q4
    with pytest.raises(JobError, match=r"does not have.*layers\.9"):
        quantize_model(small_dir, tmp_path, strategy, tokens, progress=False)


def test_bad_head_bits_and_tokens(small_dir: Path, tmp_path: Path) -> None:
    strategy = _strategy(small_dir, Q4)
    with pytest.raises(JobError, match=r"head_bits must be one of"):
        quantize_model(
            small_dir, tmp_path, strategy, torch.zeros(1, 8, dtype=torch.long), head_bits=7
        )
    with pytest.raises(JobError, match=r"token ids span \[0, 60000\].*vocabulary has 512"):
        quantize_model(small_dir, tmp_path, strategy, torch.tensor([[0, 60000]]), progress=False)


def test_resume_from_checkpoint_is_identical(small_dir: Path, tmp_path: Path) -> None:
    """A pass stopped after block 0 and resumed writes the same tensors as one run."""
    strategy = _strategy(small_dir, QParams((4, 3), (0.5, 0.5), (32, 32)))
    tokens = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(2))
    full = quantize_model(small_dir, tmp_path / "a", strategy, tokens, progress=False)

    class Stop(Exception):
        pass

    def stop(layer: int) -> None:
        raise Stop

    with pytest.raises(Stop):
        quantize_model(
            small_dir, tmp_path / "b", strategy, tokens, progress=False, on_layer_done=stop
        )
    assert not (tmp_path / "b/out_tensor/model.layers.1.safetensors").exists()
    resumed = quantize_model(small_dir, tmp_path / "b", strategy, tokens, progress=False)
    assert resumed.resumed_from == 1
    for f in sorted((tmp_path / "a/out_tensor").iterdir()):
        assert f.read_bytes() == (tmp_path / "b/out_tensor" / f.name).read_bytes(), f.name
    assert resumed.cal_ppl_quant == full.cal_ppl_quant
    # Another strategy on the same job dir is refused, naming the field.
    other = _strategy(small_dir, Q4)
    with pytest.raises(JobError, match=r"field 'strategy_hash'"):
        quantize_model(small_dir, tmp_path / "b", other, tokens, progress=False)
    assert np.isfinite(full.cal_ppl_fp32)
