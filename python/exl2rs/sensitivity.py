"""Per-linear sensitivities: the Fisher of each decoder linear's output.

For a linear with output ``y``, a small output error ``Δy`` adds about
``½ Σ_t Σ_c F_tc Δy_tc²`` to KL(model ‖ quantized) and to the calibration cross-entropy's
second-order (Gauss-Newton) term, with ``F`` the diagonal of the model's Fisher:
``F_tc = E_{labels ~ model}[(∂L/∂y_tc)²]`` for ``L`` the next-token cross-entropy of labels
drawn from the model itself. With the per-linear mean ``s = mean_tc F_tc`` this is
``½ · s · tr(ΔW H ΔWᵀ)``: the measured GPTQ error times one number per linear, which makes
errors of different layers and kinds comparable (the raw errors grow with the residual
stream's depth while their effect on the loss shrinks; the relative ones over-weight linears
with small outputs, v_proj and k_proj).

The default estimator (``fisher="true"``) draws one label per position from the model and
differentiates its cross-entropy: unbiased for ``F``. ``"empirical"`` differentiates the text's
own next tokens instead (the empirical Fisher), which weights positions by how wrong the model
is rather than by how far its prediction can move; on SmolLM2 it over-weights the first layers
by 1.5–2× against the last, and its allocations lose at 2.5 bpw (benches/RESULTS.md, "Quality").

Streamed like the measurement: a forward pass keeps each layer's input states (CPU fp32,
``rows × length × hidden`` per layer), then the backward pass loads one layer at a time from
the head down. Cost ≈ three forward passes over the tokens.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from exl2rs.errors import MeasurementError
from exl2rs.streaming import StreamingModel

__all__ = [
    "DEFAULT_FISHER",
    "FISHER_KINDS",
    "FisherKind",
    "add_sensitivities",
    "linear_sensitivities",
]

FisherKind = Literal["true", "empirical"]
FISHER_KINDS: tuple[FisherKind, ...] = ("true", "empirical")
DEFAULT_FISHER: FisherKind = "true"


def linear_sensitivities(
    sm: StreamingModel,
    input_ids: torch.Tensor,
    *,
    progress: bool = False,
    on_layer: Callable[[int], None] | None = None,
    fisher: FisherKind = DEFAULT_FISHER,
    seed: int = 0,
) -> dict[str, float]:
    """``{linear name: mean squared output gradient}`` of the summed next-token cross-entropy of
    ``input_ids`` ``[rows, length]`` (each row at least 2 tokens).

    ``fisher="true"`` differentiates the cross-entropy of labels drawn from the model itself
    (seeded by ``seed``): the mean then estimates the diagonal of the model's Fisher, the matrix
    of the second-order change of KL(model ‖ perturbed) and of the cross-entropy's Gauss-Newton
    term. ``"empirical"`` uses the text's own next tokens (the empirical Fisher, which weights
    positions by how wrong the model is rather than by how much its prediction can move)."""
    if fisher not in FISHER_KINDS:
        raise ValueError(f"fisher must be one of {FISHER_KINDS}, got {fisher!r}")
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise MeasurementError(
            f"sensitivities need token rows of at least 2 tokens, got {tuple(input_ids.shape)}"
        )
    n = sm.num_layers
    bar = tqdm(total=2 * n, desc="sensitivity", unit="layer", disable=not progress)
    try:
        states = [sm.embed(input_ids)]
        for i in range(n):
            block = sm.load_block(i)
            states.append(sm.block_forward(block, i, states[-1]))
            del block
            bar.update(1)
        gen = torch.Generator().manual_seed(seed) if fisher == "true" else None
        _, grad = sm.head_loss_grad(states.pop(), input_ids, sample=gen)
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}

        def add(name: str, g: torch.Tensor) -> None:
            sums[name] = sums.get(name, 0.0) + float(g.double().square().sum())
            counts[name] = counts.get(name, 0) + g.numel()

        for i in reversed(range(n)):
            block = sm.load_block(i)
            grad = sm.block_vjp(block, i, states.pop(), grad, add)
            del block
            bar.update(1)
            if on_layer is not None:
                on_layer(i)
    finally:
        bar.close()
    missing = [name for i in range(n) for name in sm.linear_names(i) if name not in counts]
    if missing:
        raise MeasurementError(f"no output gradient reached {missing[0]} (is it used?)")
    return {name: sums[name] / counts[name] for name in sums}


def add_sensitivities(
    measurement: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    input_ids: torch.Tensor,
    *,
    device: str | None = None,
    progress: bool = False,
    fisher: FisherKind = DEFAULT_FISHER,
) -> bool:
    """Adds sensitivities to a native measurement written without them (before exl2rs recorded
    them), from ``input_ids`` of the model it measured; rewritten atomically. Returns False
    when the file already had them."""
    from exl2rs._core import Measurement
    from exl2rs.measure import model_hash

    path, model = Path(measurement), Path(model_dir)
    m = Measurement.load(path)
    if m.has_sensitivities:
        return False
    if m.model_hash != model_hash(model):
        raise MeasurementError(
            f"{path}: measured another model (hash {m.model_hash[:16]}…), not {model}"
        )
    sm = StreamingModel(model, device=device or "cpu")
    sens = linear_sensitivities(sm, input_ids, progress=progress, fisher=fisher)
    doc = json.loads(m.to_json())
    for rec in doc["linears"]:
        rec["sensitivity"] = sens[rec["name"]]
    # Validated before it replaces the file; the save is atomic.
    Measurement.from_json(json.dumps(doc)).save(path)
    return True
