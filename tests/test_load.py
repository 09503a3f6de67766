"""exl2rs.load and the transformers quantizer on small EXL2 directories built here."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import exl2rs
from exl2_dirs import mixed, tiny_llama_config, uniform, write_exl2_dir
from exl2rs import ModelError, QuantLinear, packing

VOCAB = 256


@pytest.fixture(scope="module")
def src_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model: Callable[..., Path]) -> Path:
    config = tiny_llama_config(VOCAB)
    path: Path = tiny_model(config, tmp_path_factory.mktemp("src"), seed=3)
    return path


@pytest.fixture(scope="module")
def exl2_dir(tmp_path_factory: pytest.TempPathFactory, src_dir: Path) -> Path:
    """Mixed 8/4/3/2-bit MLP, 4-bit attention with biases, a 6-bit head, two shards."""
    return write_exl2_dir(
        src_dir,
        tmp_path_factory.mktemp("exl2"),
        config_for=lambda n: mixed() if ".mlp." in n else uniform(4),
        shards=2,
    )


@pytest.fixture(scope="module")
def exl2_dir_tied(tmp_path_factory: pytest.TempPathFactory, src_dir: Path) -> Path:
    """3-bit everywhere, no stored q_perm (as exllamav2 writes), head = tied embedding."""
    return write_exl2_dir(
        src_dir,
        tmp_path_factory.mktemp("exl2_tied"),
        config_for=lambda n: uniform(3),
        head_bits=None,
        with_q_perm=False,
    )


def stored(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def dense_reference(src_dir: Path, directory: Path) -> Any:
    """The source model with every quantized weight replaced by the Rust dequantizer's output
    of the stored tensors and every other tensor rounded to fp16 as stored."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src_dir, dtype=torch.float32)
    tensors = stored(directory)
    prefixes = {k[: -len(".q_weight")] for k in tensors if k.endswith(".q_weight")}
    if "lm_head" in prefixes:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    with torch.no_grad():
        for name, p in model.named_parameters():
            prefix = name.rpartition(".")[0]
            if prefix in prefixes and name.endswith(".weight"):
                t = packing.Exl2Tensors(
                    *(
                        tensors[f"{prefix}.{n}"].numpy()
                        for n in ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm")
                    ),
                    cols=p.shape[0],
                )
                p.copy_(torch.from_numpy(packing.dequantize_exl2(t)).T)
            else:
                p.copy_(p.half().float())
    return model


def logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(ids).logits
    return out


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))


def test_load_gives_quant_linears_matching_the_dequantized_model(
    src_dir: Path, exl2_dir: Path, ids: torch.Tensor
) -> None:
    model = exl2rs.load(exl2_dir, dtype=torch.float32)
    quant = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(quant) == 2 * 7 + 1 and "lm_head" in quant
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    want = logits(dense_reference(src_dir, exl2_dir), ids)
    got = logits(model, ids)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def test_every_tensor_comes_from_the_files(exl2_dir: Path) -> None:
    model = exl2rs.load(exl2_dir, dtype=torch.float32)
    files = stored(exl2_dir)
    state = model.state_dict()
    assert set(state) == set(files)
    for name, t in state.items():
        assert torch.equal(t, files[name].to(t.dtype)), name


@pytest.fixture
def unregistered() -> Iterator[None]:
    """transformers as it is without exl2rs's registration."""
    from transformers.quantizers import auto

    saved = (
        auto.AUTO_QUANTIZER_MAPPING.pop("exl2"),
        auto.AUTO_QUANTIZATION_CONFIG_MAPPING.pop("exl2"),
    )
    try:
        yield
    finally:
        auto.AUTO_QUANTIZER_MAPPING["exl2"], auto.AUTO_QUANTIZATION_CONFIG_MAPPING["exl2"] = saved


@pytest.mark.parametrize("which", ["exl2_dir", "exl2_dir_tied"])
def test_from_pretrained_gives_the_same_model_as_load(
    which: str, request: pytest.FixtureRequest, ids: torch.Tensor
) -> None:
    from transformers import AutoModelForCausalLM

    directory: Path = request.getfixturevalue(which)
    loaded = exl2rs.load(directory, dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    assert {n for n, m in hf.named_modules() if isinstance(m, QuantLinear)} == {
        n for n, m in loaded.named_modules() if isinstance(m, QuantLinear)
    }
    assert torch.equal(logits(hf, ids), logits(loaded, ids))
    if which == "exl2_dir_tied":
        assert hf.lm_head.weight is hf.model.embed_tokens.weight
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_without_registration_transformers_silently_returns_random_weights(
    exl2_dir: Path, ids: torch.Tensor, unregistered: None
) -> None:
    # The trap the registration closes: no error, a model of random weights.
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(exl2_dir, dtype=torch.float32)
    assert not any(isinstance(m, QuantLinear) for m in hf.modules())
    want = logits(exl2rs.load(exl2_dir, dtype=torch.float32), ids)
    assert not torch.allclose(logits(hf, ids), want, atol=1e-2)


def test_import_registers_lazily() -> None:
    import subprocess
    import sys

    code = (
        "import sys, exl2rs; assert 'torch' not in sys.modules, 'torch imported';"
        "assert 'transformers' not in sys.modules;"
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as m;"
        "assert type(m['exl2']).__name__ == 'ABCMeta', m.get('exl2')"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_dtypes_and_weight_cache(exl2_dir: Path, ids: torch.Tensor) -> None:
    ref = logits(exl2rs.load(exl2_dir, dtype=torch.float32), ids)
    cached = logits(exl2rs.load(exl2_dir, dtype=torch.float32, cache_weights=True), ids)
    assert torch.allclose(cached, ref, atol=1e-4)
    for dtype in (torch.float16, torch.bfloat16):
        model = exl2rs.load(exl2_dir, dtype=dtype)
        assert model.model.embed_tokens.weight.dtype == dtype
        out = logits(model, ids)
        assert out.dtype == dtype
        assert float((out.float() - ref).abs().max()) < 0.05 * float(ref.abs().max())


# -- refusals ------------------------------------------------------------------------------


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_tensors(directory: Path, fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Applies ``fn`` to each shard's tensors and rewrites the shards and the index."""
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    weight_map: dict[str, str] = {}
    for f in sorted(directory.glob("*.safetensors")):
        tensors = load_file(f)
        fn(tensors)
        save_file(tensors, str(f), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, f.name))
    index["weight_map"] = weight_map
    index_path.write_text(json.dumps(index))


def edit_config(directory: Path, **changes: Any) -> None:
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def both_refuse(directory: Path, match: str) -> None:
    from transformers import AutoModelForCausalLM

    with pytest.raises(ModelError, match=match):
        exl2rs.load(directory)
    with pytest.raises(ModelError, match=match):
        AutoModelForCausalLM.from_pretrained(directory)


def test_missing_tensor_is_named(exl2_dir: Path, tmp_path: Path) -> None:
    d = copy_dir(exl2_dir, tmp_path / "d")
    name = "model.layers.1.mlp.up_proj.q_scale"
    edit_tensors(d, lambda t: t.pop(name, None))
    both_refuse(d, rf"{name}.*missing|{name}: not stored")


def test_missing_norm_is_named(exl2_dir: Path, tmp_path: Path) -> None:
    d = copy_dir(exl2_dir, tmp_path / "d")
    name = "model.layers.0.input_layernorm.weight"
    edit_tensors(d, lambda t: t.pop(name, None))
    both_refuse(d, name)


def test_unexpected_tensor_is_named(exl2_dir: Path, tmp_path: Path) -> None:
    d = copy_dir(exl2_dir, tmp_path / "d")

    def add(t: dict[str, torch.Tensor]) -> None:
        if "model.norm.weight" in t:
            t["model.layers.0.mlp.extra.weight"] = torch.zeros(4, dtype=torch.float16)

    edit_tensors(d, add)
    both_refuse(d, r"model\.layers\.0\.mlp\.extra\.weight")


def test_config_with_more_layers_than_tensors_is_refused(exl2_dir: Path, tmp_path: Path) -> None:
    d = copy_dir(exl2_dir, tmp_path / "d")
    edit_config(d, num_hidden_layers=3)
    both_refuse(d, r"model\.layers\.2\.")


def test_config_with_other_shapes_is_refused(exl2_dir: Path, tmp_path: Path) -> None:
    d = copy_dir(exl2_dir, tmp_path / "d")
    edit_config(d, intermediate_size=256)
    both_refuse(d, r"mlp\.(gate|up|down)_proj")


def test_quantized_tensor_of_the_wrong_dtype_is_refused(exl2_dir: Path, tmp_path: Path) -> None:
    d = copy_dir(exl2_dir, tmp_path / "d")
    name = "model.layers.0.self_attn.k_proj.q_groups"

    def widen(t: dict[str, torch.Tensor]) -> None:
        if name in t:
            t[name] = t[name].to(torch.int32)

    edit_tensors(d, widen)
    with pytest.raises(ModelError, match=rf"{name} \(output-0000\d-of-00002.safetensors\)"):
        exl2rs.load(d)


def test_corrupt_permutation_is_refused(exl2_dir: Path, tmp_path: Path) -> None:
    d = copy_dir(exl2_dir, tmp_path / "d")
    name = "model.layers.0.mlp.down_proj.q_invperm"

    def corrupt(t: dict[str, torch.Tensor]) -> None:
        if name in t:
            t[name][0] = t[name][1]

    edit_tensors(d, corrupt)
    both_refuse(d, r"model\.layers\.0\.mlp\.down_proj: q_invperm is not a permutation")


def test_index_pointing_to_the_wrong_shard_is_refused(exl2_dir: Path, tmp_path: Path) -> None:
    d = copy_dir(exl2_dir, tmp_path / "d")
    path = d / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    name = "model.norm.weight"
    index["weight_map"][name] = next(
        f for f in set(index["weight_map"].values()) if f != index["weight_map"][name]
    )
    path.write_text(json.dumps(index))
    with pytest.raises(ModelError, match=rf"maps {name} to"):
        exl2rs.load(d)


def test_not_an_exl2_dir(src_dir: Path, exl2_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not an EXL2 model"):
        exl2rs.load(src_dir)
    d = copy_dir(exl2_dir, tmp_path / "d")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "gptq"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="quant_method is 'gptq'"):
        exl2rs.load(d)
    with pytest.raises(ModelError, match="not a directory"):
        exl2rs.load(tmp_path / "nope")
    with pytest.raises(ModelError, match="dtype must be"):
        exl2rs.load(exl2_dir, dtype=torch.float64)


def test_quant_linear_reports_bits(exl2_dir: Path) -> None:
    model = exl2rs.load(exl2_dir)
    assert "bits=[8, 4, 3, 2]" in repr(model.model.layers[0].mlp.down_proj)
    assert np.all(model.model.layers[0].mlp.gate_proj.q_perm.numpy() >= 0)


# -- evaluation of a quantized directory ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_exl2_with_tokenizer(
    tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path
) -> Path:
    return write_exl2_dir(
        tiny_llama_dir,
        tmp_path_factory.mktemp("exl2_tok"),
        config_for=lambda n: uniform(4),
        head_bits=None,  # the tied 49152-row head stays the embedding: keeps the test fast
    )


def test_evaluate_quantized_dir(
    tiny_exl2_with_tokenizer: Path,
    tiny_llama_dir: Path,
    wiki_text: str,
    tokenizer: Any,
    tmp_path: Path,
) -> None:
    from exl2rs.cli import main
    from exl2rs.evaluate import (
        evaluate_model,
        kl_divergence,
        perplexity,
        streamed_perplexity,
        wiki_ho_windows,
    )
    from exl2rs.streaming import StreamingModel

    windows = wiki_ho_windows(tokenizer, wiki_text)[:1]
    res = evaluate_model(
        tiny_exl2_with_tokenizer, reference=tiny_llama_dir, num_windows=1, wiki_text=wiki_text
    )
    model = exl2rs.load(tiny_exl2_with_tokenizer, dtype=torch.float32)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return logits(model, x)

    ref = StreamingModel(tiny_llama_dir)
    assert res.windows == 1 and res.predicted_tokens == 511
    assert res.perplexity == pytest.approx(perplexity(fn, windows), rel=1e-5)
    assert res.reference_perplexity == pytest.approx(streamed_perplexity(ref, windows), rel=1e-5)
    # The eval path runs cached dense weights: the same numbers up to fp32 summation order.
    assert res.kl_divergence == pytest.approx(kl_divergence(ref.logits, fn, windows), rel=1e-2)
    assert res.kl_divergence is not None and res.kl_divergence > 1e-6
    out = tmp_path / "eval.json"
    argv = ["eval", str(tiny_exl2_with_tokenizer), "--reference", str(tiny_llama_dir)]
    assert main([*argv, "--windows", "1", "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["quantized"] is True
    assert saved["perplexity"] == pytest.approx(res.perplexity, rel=1e-6)
    assert saved["kl_divergence"] == pytest.approx(res.kl_divergence, rel=1e-6)
    assert main([*argv, "--windows", "0"]) == 2


def test_exllamav2_style_dir_without_index_or_metadata(
    exl2_dir_tied: Path, tmp_path: Path, ids: torch.Tensor
) -> None:
    # exllamav2's compile writes bare shards: no index, no {"format": "pt"}, no q_perm.
    d = copy_dir(exl2_dir_tied, tmp_path / "d")
    (d / "model.safetensors.index.json").unlink()
    for f in d.glob("*.safetensors"):
        save_file(load_file(f), str(f))
    want = logits(exl2rs.load(exl2_dir_tied, dtype=torch.float32), ids)
    assert torch.equal(logits(exl2rs.load(d, dtype=torch.float32), ids), want)


@pytest.mark.cuda
def test_load_on_cuda_matches_cpu(exl2_dir: Path, ids: torch.Tensor) -> None:
    cpu = logits(exl2rs.load(exl2_dir, dtype=torch.float32), ids)
    gpu = logits(exl2rs.load(exl2_dir, device="cuda", dtype=torch.float16), ids.cuda())
    assert gpu.device.type == "cuda"
    assert float((gpu.float().cpu() - cpu).abs().max()) < 0.02 * float(cpu.abs().max())
