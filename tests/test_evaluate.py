"""wiki-ho windows, perplexity and KL divergence; the fp32 SmolLM2 acceptance score."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from exl2rs.errors import Exl2Error, NonFiniteError
from exl2rs.evaluate import (
    EVAL_CHAR_END,
    EVAL_CHAR_START,
    REFERENCE_PPL_SMOLLM2_FP32,
    kl_divergence,
    perplexity,
    streamed_perplexity,
    wiki_ho_windows,
)
from exl2rs.streaming import StreamingModel


@pytest.fixture(scope="module")
def windows(tokenizer: Any, wiki_text: str) -> torch.Tensor:
    return wiki_ho_windows(tokenizer, wiki_text)


def test_windows_follow_the_protocol(windows: torch.Tensor, tokenizer: Any, wiki_text: str) -> None:
    assert windows.shape == (32, 512) and windows.dtype == torch.long
    region = wiki_text[EVAL_CHAR_START:EVAL_CHAR_END]
    ids = tokenizer(region, add_special_tokens=False)["input_ids"]
    assert windows.flatten().tolist() == ids[:16384]
    assert tokenizer.bos_token_id not in windows[:, 0].tolist()


def test_windows_need_the_whole_region(tokenizer: Any, wiki_text: str) -> None:
    with pytest.raises(Exl2Error, match="evaluation region needs"):
        wiki_ho_windows(tokenizer, wiki_text[: EVAL_CHAR_END - 1])


def one_hot_logits(vocab: int, scale: float) -> Any:
    """A logits_fn that predicts the next token of the batch with confidence ``scale``."""

    def fn(ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*ids.shape, vocab)
        logits[:, :-1].scatter_(-1, ids[:, 1:].unsqueeze(-1), scale)
        return logits

    return fn


def test_perplexity_known_values() -> None:
    ids = torch.randint(0, 50, (5, 9), generator=torch.Generator().manual_seed(0))
    uniform = perplexity(lambda x: torch.zeros(*x.shape, 50), ids, batch_size=2)
    assert uniform == pytest.approx(50.0, rel=1e-6)  # fp32 log-softmax
    # Logit s on the true token of V: p = e^s / (e^s + V - 1).
    s = 3.0
    want = (math.exp(s) + 49) / math.exp(s)
    assert perplexity(one_hot_logits(50, s), ids, batch_size=3) == pytest.approx(want, rel=1e-6)


def test_kl_divergence_known_values() -> None:
    ids = torch.randint(0, 20, (4, 6), generator=torch.Generator().manual_seed(0))
    fn = one_hot_logits(20, 2.0)
    assert kl_divergence(fn, fn, ids) == pytest.approx(0.0, abs=1e-7)
    uniform = kl_divergence(fn, lambda x: torch.zeros(*x.shape, 20), ids, batch_size=3)
    p = math.exp(2.0) / (math.exp(2.0) + 19)
    q = (1 - p) / 19
    want = p * math.log(p * 20) + 19 * q * math.log(q * 20)  # KL(P || uniform)
    assert uniform == pytest.approx(want, rel=1e-5)


def test_bad_logits_are_rejected() -> None:
    ids = torch.randint(0, 10, (2, 5))
    with pytest.raises(Exl2Error, match=r"returned shape \(2, 5\) .* expected \[b, s, vocab\]"):
        perplexity(lambda x: torch.zeros(*x.shape), ids)
    with pytest.raises(NonFiniteError, match="logits contain NaN"):
        perplexity(lambda x: torch.full((*x.shape, 10), float("nan")), ids)
    with pytest.raises(Exl2Error, match="token id 9 >= vocab 5"):
        perplexity(lambda x: torch.zeros(*x.shape, 5), torch.full((1, 4), 9))
    with pytest.raises(Exl2Error, match="LongTensor"):
        perplexity(lambda x: torch.zeros(*x.shape, 5), torch.zeros(4, 1, dtype=torch.long))


def test_streamed_and_logits_fn_paths_agree(tiny_llama_dir: Path, windows: torch.Tensor) -> None:
    model = StreamingModel(tiny_llama_dir)
    subset = windows[:3, :64]
    via_fn = perplexity(model.logits, subset, batch_size=2)
    assert streamed_perplexity(model, subset, head_rows=2) == pytest.approx(via_fn, rel=1e-6)
    assert kl_divergence(model.logits, model.logits, subset) == pytest.approx(0.0, abs=1e-6)


def test_fp32_smollm2_scores_the_reference(smollm2_dir: Path, windows: torch.Tensor) -> None:
    """The evaluator's acceptance test: 23.644 within 0.1% (DESIGN.md, wiki-ho)."""
    ppl = streamed_perplexity(smollm2_dir, windows)
    assert ppl == pytest.approx(REFERENCE_PPL_SMOLLM2_FP32, rel=1e-3)


def test_cli_subcommand(tiny_llama_dir: Path, tmp_path: Path, windows: torch.Tensor) -> None:
    import argparse
    import json

    from exl2rs import evaluate

    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    out = tmp_path / "eval.json"
    argv = [str(tiny_llama_dir), "--windows", "2", "--reference", str(tiny_llama_dir)]
    assert evaluate.run(parser.parse_args([*argv, "--json", str(out)])) == 0
    result = json.loads(out.read_text())
    model = StreamingModel(tiny_llama_dir)
    assert result["windows"] == 2 and result["predicted_tokens"] == 2 * 511
    assert result["perplexity"] == pytest.approx(streamed_perplexity(model, windows[:2]))
    assert result["kl_divergence"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(Exl2Error, match=r"--windows must be in \[1, 32\]"):
        evaluate.run(parser.parse_args([str(tiny_llama_dir), "--windows", "33"]))
