"""The sequential quantize pass: GPTQ block by block on states from the already-quantized blocks.

Order inside a decoder block follows exllamav2 (attention first, then the MLP), with one
strengthening: every linear's Hessian comes from inputs produced by the already-quantized
upstream linears. exllamav2 collects the o_proj and down_proj Hessians in the same forward as
q/k/v (resp. gate/up), i.e. from unquantized upstream weights; here the attention is re-run after
q/k/v are quantized to collect o_proj's inputs, and the MLP after gate/up for down_proj's.

For every linear: GPTQ with its allocated config, pack with :func:`exl2rs.packing.pack_exl2`,
dequantize the packed tensors back and compare with GPTQ's fake-quantized weight (a mismatch
aborts naming the layer), then put the dequantized weight into the block so everything
downstream sees exactly what a loader will compute. The head is quantized at ``head_bits`` on the
final normed states. A calibration-perplexity check on the first rows (quantized model vs the
fp32 model) fails loudly when the result is broken.

The job directory holds ``out_tensor/<block>.safetensors`` (one file per decoder block, plus
``lm_head``), the hidden states needed to continue and ``quant_progress.json``; each is written
atomically, so a killed run resumes after its last finished block and writes the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from exl2rs import gptq
from exl2rs.atomic import atomic_write_bytes
from exl2rs.errors import Exl2Error, JobError, ModelError
from exl2rs.packing import Exl2Tensors, pack_exl2
from exl2rs.qparams import HEAD_BITS, QParams, head_config

__all__ = [
    "HEAD_NAME",
    "QuantizationError",
    "QuantizeResult",
    "decoder_linears",
    "quantize_model",
    "strategy_digest",
    "uniform_strategy",
]

PROGRESS_FORMAT = "exl2rs.quantize-job"
PROGRESS_VERSION = 1
PROGRESS_FILE = "quant_progress.json"
TENSOR_DIR = "out_tensor"
HEAD_NAME = "lm_head"
# Packed → dequantized must reproduce GPTQ's weight up to fp16 rounding of the stored scale.
DEQUANT_RTOL = 2.0**-10
# Default bound of the final check: quantized calibration perplexity over the fp32 one.
DEFAULT_MAX_PPL_RATIO = 3.0
DEFAULT_PPL_ROWS = 8

Event = Callable[[dict[str, Any]], None]


class QuantizationError(Exl2Error):
    """The quantize pass produced something wrong (packing mismatch, broken model)."""


@dataclass(frozen=True)
class QuantizeResult:
    """What the pass produced: the tensors folder and the per-layer log."""

    job_dir: Path
    tensors_dir: Path
    linears: list[dict[str, Any]]  # name, desc, bits, bpw, err, rel_err, seconds
    modules: list[dict[str, Any]]  # name, rfn, seconds
    head: dict[str, Any]  # name, desc, bits, bpw, err (absent when head_bits is None)
    cal_ppl_fp32: float
    cal_ppl_quant: float
    seconds: float
    resumed_from: int = 0


def decoder_linears(adapter: Any, num_layers: int) -> list[str]:
    """Every decoder linear of the model, in quantization order."""
    return [name for i in range(num_layers) for name in adapter.linear_names(i)]


def uniform_strategy(names: list[str], config: QParams) -> dict[str, QParams]:
    """The same config for every linear (the uniform-GPTQ / RTN baselines)."""
    return {n: config for n in names}


def strategy_digest(strategy: Mapping[str, QParams]) -> str:
    """Order-independent hash of a strategy (linear name → config)."""
    canon = {k: strategy[k].to_dict() for k in sorted(strategy)}
    return hashlib.sha256(json.dumps(canon, sort_keys=True).encode()).hexdigest()


def _tokens_hash(tokens: torch.Tensor) -> str:
    t = tokens.to(torch.int64).contiguous().cpu()
    h = hashlib.sha256(str(tuple(t.shape)).encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()


# -- small pieces --------------------------------------------------------------------------


class _HessianHook:
    def __init__(self, hessian: gptq.Hessian) -> None:
        self.hessian = hessian

    def __call__(self, _module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self.hessian.add(args[0].detach())


@contextmanager
def _collecting(linear: nn.Linear, name: str, device: torch.device) -> Iterator[gptq.Hessian]:
    """A Hessian of ``linear``'s inputs over every forward inside the ``with``."""
    hess = gptq.Hessian(int(linear.in_features), name=name, device=device)
    handle = linear.register_forward_pre_hook(_HessianHook(hess))
    try:
        yield hess
    finally:
        handle.remove()


def _relative_error(y_q: torch.Tensor, y_ref: torch.Tensor) -> float:
    """Mean over rows of ‖y_q − y_ref‖_F / ‖y_ref‖_F (exllamav2's rfn_error), fp64 sums."""
    num = (y_q.double() - y_ref.double()).flatten(1).norm(dim=1)
    den = y_ref.double().flatten(1).norm(dim=1).clamp_min(1e-30)
    return float((num / den).mean())


def _pack(result: gptq.QuantResult) -> Exl2Tensors:
    return pack_exl2(
        result.codes.cpu().numpy(),
        list(zip(result.group_bits, result.group_rows, strict=True)),
        result.scales.cpu().numpy().astype(np.int32) + 1,
        result.scale_max.cpu().float().numpy(),
        result.perm.cpu().numpy(),
    )


def _verify_packed(name: str, packed: Exl2Tensors, result: gptq.QuantResult) -> torch.Tensor:
    """Dequantize ``packed`` and check it against GPTQ's weight; returns it as ``[N, K]`` fp32."""
    deq = torch.from_numpy(packed.dequantize()).T.contiguous()  # [N, K]
    fake = result.weight.detach().cpu().to(torch.float32)
    if deq.shape != fake.shape:
        raise QuantizationError(
            f"{name}: packed tensors dequantize to shape {tuple(deq.shape)}, GPTQ's weight "
            f"is {tuple(fake.shape)}"
        )
    diff = (deq - fake).abs()
    bound = DEQUANT_RTOL * fake.abs() + 1e-6 * float(fake.abs().max().clamp_min(1e-30))
    if bool((diff > bound).any()):
        worst = int(torch.argmax(diff - bound))
        n, k = divmod(worst, fake.shape[1])
        raise QuantizationError(
            f"{name}: packed tensors do not reproduce the quantized weight: element "
            f"[{n}, {k}] dequantizes to {float(deq[n, k]):.6g}, GPTQ gave {float(fake[n, k]):.6g} "
            f"(max abs difference {float(diff.max()):.3g})"
        )
    return deq


def _state_dict(
    prefix: str, packed: Exl2Tensors, bias: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    out = {
        k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in packed.state_dict(prefix).items()
    }
    invperm = out[f"{prefix}.q_invperm"]
    out[f"{prefix}.q_perm"] = torch.argsort(invperm.to(torch.int64)).to(torch.int32)
    if bias is not None:
        out[f"{prefix}.bias"] = bias.detach().cpu().to(torch.float16).contiguous()
    return out


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save(tensors, metadata={"format": "pt"}))


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, allow_nan=False) + "\n").encode()


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    pred = logits[:, :-1].float()
    tgt = ids[:, 1:].to(pred.device).unsqueeze(-1)
    nll = torch.logsumexp(pred, dim=-1) - pred.gather(-1, tgt).squeeze(-1)
    return float(nll.double().sum()), int(nll.numel())


# -- the pass ------------------------------------------------------------------------------


@dataclass
class _Ctx:
    sm: Any  # StreamingModel
    strategy: Mapping[str, QParams]
    rtn: bool
    scale_search: gptq.ScaleSearch
    device: torch.device
    tensors_dir: Path
    linears_log: list[dict[str, Any]]
    modules_log: list[dict[str, Any]]


def _quantize_linear(
    ctx: _Ctx,
    block: nn.Module,
    full_name: str,
    prepared: gptq.Prepared,
    config: QParams,
    out: dict[str, torch.Tensor],
) -> None:
    """GPTQ one linear, pack, verify and put the dequantized weight back into ``block``."""
    t0 = time.perf_counter()
    lin = ctx.sm.linear(block, full_name)
    w = lin.weight.detach().to(torch.float32)
    if ctx.rtn:
        res = gptq.rtn_quantize(w, prepared, config, name=full_name)
    else:
        res = gptq.quantize(w, prepared, config, name=full_name, scale_search=ctx.scale_search)
    packed = _pack(res)
    deq = _verify_packed(full_name, packed, res)
    with torch.no_grad():
        lin.weight.copy_(deq.to(lin.weight.device, lin.weight.dtype))
    out.update(_state_dict(full_name, packed, lin.bias))
    out_f, in_f = int(w.shape[0]), int(w.shape[1])
    bits = int(config.total_bits(in_f, out_f))
    ref = gptq.weighted_error(w, prepared.hessian)
    ctx.linears_log.append(
        {
            "name": full_name,
            "desc": config.desc,
            "config": config.to_dict(),
            "bits": bits,
            "bpw": bits / (in_f * out_f),
            "err": res.err,
            "rel_err": res.err / ref if ref > 0 else 0.0,
            "seconds": round(time.perf_counter() - t0, 3),
        }
    )


def _quantize_half(
    ctx: _Ctx,
    block: nn.Module,
    layer: int,
    states: torch.Tensor,
    module: str,
    groups: list[tuple[str, list[str]]],
    forward: Callable[[nn.Module, int, torch.Tensor], torch.Tensor],
    out: dict[str, torch.Tensor],
) -> torch.Tensor:
    """Quantize one half (attention or MLP) of a block group by group; returns its output."""
    t0 = time.perf_counter()
    y_ref: torch.Tensor | None = None
    for shared_name, members in groups:
        head = ctx.sm.linear(block, members[0])
        # Inputs of this group come from the already-quantized linears before it.
        with _collecting(head, shared_name, ctx.device) as hess:
            y = forward(block, layer, states)
        if y_ref is None:
            y_ref = y  # the first forward still has this half's original weights
        prepared = gptq.prepare(hess)
        for name in members:
            _quantize_linear(ctx, block, name, prepared, ctx.strategy[name], out)
        del prepared
    y_q = forward(block, layer, states)
    assert y_ref is not None
    rfn = _relative_error(y_q, y_ref)
    ctx.modules_log.append(
        {"name": module, "rfn": rfn, "seconds": round(time.perf_counter() - t0, 3)}
    )
    return y_q


def _block_groups(sm: Any, layer: int) -> tuple[list[tuple[str, list[str]]], ...]:
    a = sm.adapter
    attn: list[tuple[str, list[str]]] = []
    mlp: list[tuple[str, list[str]]] = []
    base = a.layer_name(layer)
    for g in a.groups:
        names = [f"{base}.{g.module}.{n}" for n in g.linears]
        (attn if g.module == a.attn_module else mlp).append((a.shared_input_name(layer, g), names))
    return attn, mlp


def _check_strategy(strategy: Mapping[str, QParams], names: list[str]) -> None:
    missing = [n for n in names if n not in strategy]
    if missing:
        raise JobError(
            f"strategy has no config for {len(missing)} linear(s), e.g. {missing[0]!r} "
            f"(it must name every decoder linear)"
        )
    extra = sorted(set(strategy) - set(names))
    if extra:
        raise JobError(
            f"strategy names {len(extra)} linear(s) the model does not have, e.g. {extra[0]!r}"
        )
    for n in names:
        if not isinstance(strategy[n], QParams):
            raise JobError(f"strategy[{n!r}] is {type(strategy[n]).__name__}, expected QParams")


def _header(
    model_hash: str,
    tokens: torch.Tensor,
    strategy: Mapping[str, QParams],
    head_bits: int | None,
    rtn: bool,
    scale_search: str,
    ppl_rows: int,
) -> dict[str, Any]:
    return {
        "format": PROGRESS_FORMAT,
        "version": PROGRESS_VERSION,
        "model_hash": model_hash,
        "calibration_hash": _tokens_hash(tokens),
        "strategy_hash": strategy_digest(strategy),
        "head_bits": head_bits,
        "rtn": rtn,
        "scale_search": scale_search,
        "ppl_rows": ppl_rows,
    }


def _read_progress(job_dir: Path, header: dict[str, Any]) -> dict[str, Any] | None:
    path = job_dir / PROGRESS_FILE
    if not path.exists():
        return None
    try:
        prog = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise JobError(f"{path}: unreadable quantize checkpoint ({exc})") from exc
    if not isinstance(prog, dict) or prog.get("format") != PROGRESS_FORMAT:
        raise JobError(f"{path}: not an exl2rs quantize checkpoint (field 'format')")
    for key, value in header.items():
        if prog.get(key) != value:
            raise JobError(
                f"{path}: checkpoint belongs to another quantize run (field {key!r}: "
                f"checkpoint has {str(prog.get(key))[:20]!r}, this run {str(value)[:20]!r})"
            )
    return prog


def _load_states(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - name the unusable checkpoint
        raise JobError(f"{path}: cannot read the checkpointed hidden states ({exc})") from exc


def quantize_model(
    model_dir: str | os.PathLike[str],
    job_dir: str | os.PathLike[str],
    strategy: Mapping[str, QParams],
    calibration: torch.Tensor,
    *,
    head_bits: int | None = 6,
    device: str | torch.device | None = None,
    rtn: bool = False,
    scale_search: gptq.ScaleSearch = "hessian",
    ppl_rows: int = DEFAULT_PPL_ROWS,
    max_ppl_ratio: float | None = DEFAULT_MAX_PPL_RATIO,
    progress: bool = True,
    on_event: Event | None = None,
    on_layer_done: Callable[[int], None] | None = None,
    model_hash: str | None = None,
) -> QuantizeResult:
    """Quantize every decoder linear of ``model_dir`` to ``strategy`` (name → config) and the
    head to ``head_bits`` (None keeps the head unquantized), sequentially on ``calibration``
    token ids ``[rows, length]``. Packed tensors go to ``job_dir/out_tensor``.

    ``rtn``: round-to-nearest (no error feedback, EXL2's unweighted scale search) for the decoder
    linears, same layouts; the head is GPTQ-quantized either way. The final check computes the
    calibration perplexity of the first ``ppl_rows`` rows for the fp32 model and the quantized
    one and raises :class:`QuantizationError` when the quantized one exceeds
    ``max_ppl_ratio`` × fp32 (or is not finite). ``max_ppl_ratio=None`` keeps only the
    finiteness check: for baselines (round-to-nearest at low bits) whose perplexity is the
    point of the run, however bad.
    """
    from tqdm.auto import tqdm

    from exl2rs.measure import model_hash as hash_model
    from exl2rs.streaming import StreamingModel

    t_start = time.perf_counter()
    model_path, job = Path(model_dir), Path(job_dir)
    if head_bits is not None and head_bits not in HEAD_BITS:
        raise JobError(f"head_bits must be one of {list(HEAD_BITS)}, got {head_bits!r}")
    if max_ppl_ratio is not None and not max_ppl_ratio > 1.0:
        raise ValueError(f"max_ppl_ratio must exceed 1, got {max_ppl_ratio}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sm = StreamingModel(model_path, device=dev)
    vocab = int(sm.config.vocab_size)
    if calibration.ndim != 2 or calibration.dtype.is_floating_point or calibration.numel() == 0:
        raise JobError(
            f"calibration: expected integer token ids [rows, length], got "
            f"{calibration.dtype} {tuple(calibration.shape)}"
        )
    if int(calibration.min()) < 0 or int(calibration.max()) >= vocab:
        raise JobError(
            f"calibration: token ids span [{int(calibration.min())}, {int(calibration.max())}], "
            f"the vocabulary has {vocab}"
        )
    tokens = calibration.to(torch.int64).cpu()
    n_ppl = max(1, min(ppl_rows, int(tokens.shape[0])))
    names = decoder_linears(sm.adapter, sm.num_layers)
    _check_strategy(strategy, names)
    header = _header(
        model_hash or hash_model(model_path),
        tokens,
        strategy,
        head_bits,
        rtn,
        scale_search,
        n_ppl,
    )
    tensors_dir = job / TENSOR_DIR
    tensors_dir.mkdir(parents=True, exist_ok=True)
    prog = _read_progress(job, header)
    emit: Event = on_event or (lambda _e: None)

    if prog is None:
        states = sm.embed(tokens)
        ref_states = states[:n_ppl].clone()
        start, linears_log, modules_log = 0, [], []
    else:
        saved = _load_states(job / prog["states"])
        states, ref_states = saved["states"], saved["ref_states"]
        start = int(prog["next_layer"])
        linears_log, modules_log = list(prog["linears"]), list(prog["modules"])
    ctx = _Ctx(sm, strategy, rtn, scale_search, dev, tensors_dir, linears_log, modules_log)

    total_steps = sm.num_layers + 1
    bar = tqdm(
        total=total_steps, initial=start, desc="quantize", unit="layer", disable=not progress
    )
    try:
        for layer in range(start, sm.num_layers):
            t0 = time.perf_counter()
            block = sm.load_block(layer)
            # fp32 reference rows for the final perplexity check (original weights).
            ref_states = sm.block_forward(block, layer, ref_states)
            attn_groups, mlp_groups = _block_groups(sm, layer)
            out: dict[str, torch.Tensor] = {}
            a = sm.adapter
            base = a.layer_name(layer)
            states = _quantize_half(
                ctx,
                block,
                layer,
                states,
                f"{base}.{a.attn_module}",
                attn_groups,
                sm.attn_forward,
                out,
            )
            states = _quantize_half(
                ctx,
                block,
                layer,
                states,
                f"{base}.{a.mlp_module}",
                mlp_groups,
                sm.mlp_forward,
                out,
            )
            del block
            _save_tensors(tensors_dir / f"{base}.safetensors", out)
            states_name = f"states-{layer + 1:05d}.safetensors"
            _save_tensors(
                job / states_name,
                {"states": states.contiguous(), "ref_states": ref_states.contiguous()},
            )
            old = prog["states"] if prog is not None else None
            prog = {
                **header,
                "next_layer": layer + 1,
                "states": states_name,
                "linears": linears_log,
                "modules": modules_log,
            }
            atomic_write_bytes(job / PROGRESS_FILE, _json_bytes(prog))
            if old and old != states_name:
                (job / old).unlink(missing_ok=True)
            seconds = time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(layer=layer, s=f"{seconds:.1f}", rfn=f"{modules_log[-1]['rfn']:.4f}")
            emit(
                {
                    "stage": "quantize",
                    "layer": base,
                    "completion": (layer + 1) / total_steps,
                    "seconds": round(seconds, 3),
                    "rfn": modules_log[-1]["rfn"],
                }
            )
            if on_layer_done is not None:
                on_layer_done(layer)

        head_log, ppl_ref, ppl_q = _quantize_head(
            ctx, states, ref_states, tokens[:n_ppl], head_bits
        )
        bar.update(1)
    finally:
        bar.close()
    emit({"stage": "quantize", "layer": HEAD_NAME, "completion": 1.0, "cal_ppl": ppl_q})
    too_high = max_ppl_ratio is not None and ppl_q > max_ppl_ratio * ppl_ref
    if not math.isfinite(ppl_q) or too_high:
        bound = "finite" if max_ppl_ratio is None else f"{max_ppl_ratio:g} x fp32"
        raise QuantizationError(
            f"the quantized model is broken: calibration perplexity {ppl_q:.4g} on the first "
            f"{n_ppl} rows vs {ppl_ref:.4g} for the fp32 model (bound: {bound}); "
            "check the strategy (bits too low?) and the per-layer rfn log in "
            f"{job / PROGRESS_FILE}"
        )
    return QuantizeResult(
        job_dir=job,
        tensors_dir=tensors_dir,
        linears=linears_log,
        modules=modules_log,
        head=head_log,
        cal_ppl_fp32=ppl_ref,
        cal_ppl_quant=ppl_q,
        seconds=time.perf_counter() - t_start,
        resumed_from=start,
    )


def _quantize_head(
    ctx: _Ctx,
    states: torch.Tensor,
    ref_states: torch.Tensor,
    ppl_tokens: torch.Tensor,
    head_bits: int | None,
) -> tuple[dict[str, Any], float, float]:
    """Quantize the head on the final normed states; returns its log and both perplexities.

    The head is not checkpointed separately: it is one GPTQ call, cheaper than re-reading it.
    """
    sm = ctx.sm
    norm = sm._final_norm()  # noqa: SLF001 - the streaming model owns the materialised norm
    weight = sm._head_weight()  # noqa: SLF001 - tied heads resolve to the embeddings there
    path = ctx.tensors_dir / f"{HEAD_NAME}.safetensors"
    log: dict[str, Any] = {}
    q_weight = weight
    if head_bits is not None:
        t0 = time.perf_counter()
        hess = gptq.Hessian(int(weight.shape[1]), name=HEAD_NAME, device=ctx.device)
        with torch.no_grad():
            for rows in sm._chunks(states):  # noqa: SLF001 - same chunking as the forwards
                hess.add(norm(states[rows].to(ctx.device)))
        prepared = gptq.prepare(hess)
        config = head_config(head_bits)
        # Always GPTQ, also for ``rtn``: baselines differ in the decoder linears only (what bpw
        # counts), and EXL2's unweighted scale search over a vocab-sized head is very slow.
        res = gptq.quantize(weight, prepared, config, name=HEAD_NAME, scale_search=ctx.scale_search)
        packed = _pack(res)
        q_weight = _verify_packed(HEAD_NAME, packed, res).to(ctx.device)
        _save_tensors(path, _state_dict(HEAD_NAME, packed, None))
        out_f, in_f = int(weight.shape[0]), int(weight.shape[1])
        bits = int(config.total_bits(in_f, out_f))
        log = {
            "name": HEAD_NAME,
            "desc": config.desc,
            "config": config.to_dict(),
            "bits": bits,
            "bpw": bits / (in_f * out_f),
            "err": res.err,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        del prepared, res
    else:
        path.unlink(missing_ok=True)

    softcap = getattr(sm.config, "final_logit_softcapping", None)
    sums = {"ref": [0.0, 0], "quant": [0.0, 0]}
    with torch.no_grad():
        for r in range(int(ppl_tokens.shape[0])):
            ids = ppl_tokens[r : r + 1]
            for key, st, w in (("ref", ref_states, weight), ("quant", states, q_weight)):
                logits = norm(st[r : r + 1].to(ctx.device)) @ w.T
                if softcap:
                    logits = torch.tanh(logits / softcap) * softcap
                s, c = _nll(logits, ids)
                sums[key][0] += s
                sums[key][1] += c
    ppl_ref = math.exp(sums["ref"][0] / sums["ref"][1])
    ppl_q = math.exp(sums["quant"][0] / sums["quant"][1])
    if not math.isfinite(ppl_ref):
        raise ModelError(f"{sm.model_dir}: the fp32 model's calibration perplexity is {ppl_ref}")
    log["cal_ppl_fp32"] = ppl_ref
    log["cal_ppl_quant"] = ppl_q
    return log, ppl_ref, ppl_q
