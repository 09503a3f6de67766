"""Shared pytest fixtures: the real SmolLM2 / wiki fixtures and tiny random models."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from exl2rs.fixtures import smollm2_dir as fetch

    return fetch()


@pytest.fixture(scope="session")
def wiki_text() -> str:
    from exl2rs.fixtures import wiki_text as fetch

    return fetch()


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def save_tiny_model(
    config: Any, out: Path, *, seed: int = 0, tokenizer_from: Path | None = None
) -> Path:
    """Save a randomly initialised causal LM built from ``config`` as a HF folder."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random norms (not all ones) so a wrong norm placement cannot go unnoticed.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_from / name).is_file():
                shutil.copy2(tokenizer_from / name, out / name)
    return out


@pytest.fixture(scope="session")
def tiny_model() -> Callable[..., Path]:
    """``save_tiny_model`` as a fixture, for tests that build their own architectures."""
    return save_tiny_model


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A 2-layer, hidden-64 random Llama with SmolLM2's tokenizer (vocab 49152), tied head."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    config.architectures = ["LlamaForCausalLM"]
    return save_tiny_model(
        config, tmp_path_factory.mktemp("tiny_llama"), tokenizer_from=smollm2_dir
    )
