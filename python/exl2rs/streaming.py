"""Layer-streamed fp32 forward passes over a HF model folder.

Only one decoder block (and the states the caller holds) is resident at a time, so peak memory
scales with the model's width, not its depth. The model skeleton is built on the meta device;
each block is a copy of the skeleton's transformers decoder layer with its fp32 weights read from
the safetensors shards alone. The forward passes are transformers' own modules, driven with the
model's own rotary embedding and mask helpers, so results match ``AutoModelForCausalLM``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from exl2rs.errors import ModelError, NonFiniteError
from exl2rs.models import Adapter, adapter_for

# Rows of a [rows, seq, hidden] batch are sent to the device in chunks of about this many
# tokens, which bounds activation memory (attention scores, MLP intermediates) per call.
DEFAULT_CHUNK_TOKENS = 8192
ROTARY_MODULE = "model.rotary_emb"

_Context = tuple[Any, Any, torch.Tensor]  # (position_embeddings, attention mask, position_ids)


def _check_finite(tensor: torch.Tensor, what: str) -> None:
    # A sum is much faster than an elementwise test and is NaN/inf whenever any element is;
    # only then (or when a finite sum overflows) is the exact count computed.
    if bool(torch.isfinite(tensor.sum())):
        return
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise NonFiniteError(f"{what}: {bad} of {tensor.numel()} values are NaN or inf")


class _TensorIndex:
    """Tensor name -> safetensors file, from the shard index json or the files themselves."""

    def __init__(self, model_dir: Path) -> None:
        from safetensors import safe_open

        self.model_dir = model_dir
        self.files: dict[str, Path] = {}
        index_path = model_dir / "model.safetensors.index.json"
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ModelError(f"{index_path}: not a safetensors index ({exc})") from exc
            for name, file in weight_map.items():
                path = model_dir / file
                if not path.is_file():
                    raise ModelError(f"{index_path}: shard {file} (holding {name}) is missing")
                self.files[name] = path
            return
        shards = sorted(model_dir.glob("*.safetensors"))
        if not shards:
            raise ModelError(f"{model_dir}: no *.safetensors weights found")
        for shard in shards:
            try:
                with safe_open(str(shard), framework="pt") as f:
                    for name in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                        self.files[name] = shard
            except Exception as exc:
                raise ModelError(f"{shard}: unreadable safetensors file ({exc})") from exc

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Read the named tensors, opening each shard once."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.files:
                raise ModelError(f"{self.model_dir}: tensor {name} not found in the safetensors")
            by_file.setdefault(self.files[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for path, file_names in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                for name in file_names:
                    out[name] = f.get_tensor(name)
        return out

    def with_prefix(self, prefix: str) -> list[str]:
        return [name for name in self.files if name.startswith(prefix)]


class StreamingModel:
    """A causal LM run one decoder block at a time, in fp32.

    ``states`` are fp32 ``[rows, seq, hidden]`` tensors and may live on the CPU while the blocks
    run on ``device``; every forward returns its result on the device of its input.
    """

    def __init__(
        self,
        model_dir: str | Path,
        device: str | torch.device = "cpu",
        *,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise ModelError(f"{self.model_dir}: no config.json (not a HF model folder)")
        self.device = torch.device(device)
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
        self.chunk_tokens = chunk_tokens
        self.config: Any = AutoConfig.from_pretrained(self.model_dir)
        self.adapter: Adapter = adapter_for(self.config)
        self.config._attn_implementation = self.adapter.attn_implementation
        self.num_layers: int = int(self.config.num_hidden_layers)
        self._index = _TensorIndex(self.model_dir)
        self._check_tensors_present()

        with torch.device("meta"):
            skeleton: Any = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
                self.config,
                dtype=torch.float32,
                attn_implementation=self.adapter.attn_implementation,
            )
        self._meta_layers: nn.ModuleList = skeleton.get_submodule(self.adapter.layer_prefix)
        self._meta_norm: nn.Module = skeleton.get_submodule(self.adapter.final_norm)
        rotary_cls = type(skeleton.get_submodule(ROTARY_MODULE))
        # Rotary tables are computed at construction, so build the real one on the CPU.
        self._rotary: nn.Module = rotary_cls(config=self.config).to(self.device)
        self._norm: nn.Module | None = None
        self._tokenizer: Any = None
        self._rope_cache: dict[tuple[int, str], Any] = {}

    # -- metadata --------------------------------------------------------------------------

    def _check_tensors_present(self) -> None:
        needed = [self.adapter.embed_weight]
        for i in range(self.num_layers):
            if not self._index.with_prefix(f"{self.adapter.layer_name(i)}."):
                needed.append(f"{self.adapter.layer_name(i)}.*")
        missing = [name for name in needed if name not in self._index]
        if missing:
            raise ModelError(
                f"{self.model_dir}: config.json declares {self.num_layers} layers but the "
                f"safetensors lack {', '.join(missing[:5])}"
            )
        tied = bool(getattr(self.config, "tie_word_embeddings", False))
        if not tied and self.adapter.head_weight not in self._index:
            raise ModelError(
                f"{self.model_dir}: no {self.adapter.head_weight} and tie_word_embeddings is false"
            )

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
            except (OSError, ValueError) as exc:
                raise ModelError(f"{self.model_dir}: cannot load the tokenizer ({exc})") from exc
        return self._tokenizer

    def _check_layer(self, i: int) -> None:
        if not isinstance(i, int) or not 0 <= i < self.num_layers:
            raise ModelError(
                f"{self.model_dir}: layer index {i!r} out of range [0, {self.num_layers})"
            )

    def linear_names(self, i: int) -> list[str]:
        """Full names of layer ``i``'s decoder linears, e.g. ``model.layers.0.self_attn.q_proj``."""
        self._check_layer(i)
        return self.adapter.linear_names(i)

    def linear(self, block: nn.Module, name: str) -> nn.Linear:
        """The ``nn.Linear`` of ``block`` with full name ``name`` (as from :meth:`linear_names`)."""
        layer_prefix = f"{self.adapter.layer_prefix}."
        if not name.startswith(layer_prefix) or name.count(".") < layer_prefix.count(".") + 1:
            raise ModelError(f"{name!r} is not a decoder linear name under {layer_prefix}")
        relative = name[len(layer_prefix) :].split(".", 1)[-1]
        try:
            module = block.get_submodule(relative)
        except AttributeError as exc:
            raise ModelError(f"{name}: no such submodule in the decoder block") from exc
        if not isinstance(module, nn.Linear):
            raise ModelError(f"{name} is {type(module).__name__}, not nn.Linear")
        return module

    # -- weights ---------------------------------------------------------------------------

    def _load_tensors(self, prefix: str, expected: dict[str, torch.Size]) -> dict[str, Any]:
        names = [prefix + key for key in expected]
        missing = [n for n in names if n not in self._index]
        if missing:
            raise ModelError(f"{self.model_dir}: missing tensors {', '.join(missing[:8])}")
        unexpected = sorted(set(self._index.with_prefix(prefix)) - set(names))
        if unexpected:
            raise ModelError(
                f"{self.model_dir}: unexpected tensors {', '.join(unexpected[:8])} "
                f"(the {type(self.config).__name__} layer does not have them)"
            )
        state: dict[str, Any] = {}
        for full, tensor in self._index.read(names).items():
            key = full[len(prefix) :]
            if tensor.shape != expected[key]:
                raise ModelError(
                    f"{self._index.files[full]}: {full} has shape {tuple(tensor.shape)}, "
                    f"the config implies {tuple(expected[key])}"
                )
            tensor = tensor.to(torch.float32)
            _check_finite(tensor, f"weight {full} in {self._index.files[full].name}")
            state[key] = nn.Parameter(tensor.to(self.device), requires_grad=False)
        return state

    def _materialize(self, meta: nn.Module, prefix: str) -> nn.Module:
        module = copy.deepcopy(meta, memo={id(self.config): self.config})
        expected = {k: v.shape for k, v in module.state_dict().items()}
        module.load_state_dict(self._load_tensors(prefix, expected), strict=True, assign=True)
        leftover = [n for n, t in module.named_buffers() if t.is_meta]
        if leftover:
            raise ModelError(f"{prefix}: buffers {leftover} are not stored in the checkpoint")
        module.eval()
        module.requires_grad_(False)
        return module

    def load_block(self, i: int) -> nn.Module:
        """Decoder layer ``i`` with fp32 weights on ``device``, read from the safetensors."""
        self._check_layer(i)
        return self._materialize(self._meta_layers[i], f"{self.adapter.layer_name(i)}.")

    def _embedding_weight(self) -> torch.Tensor:
        name = self.adapter.embed_weight
        weight = self._index.read([name])[name].to(torch.float32)
        _check_finite(weight, f"weight {name}")
        return weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings, fp32 ``[rows, seq, hidden]`` on the CPU."""
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ModelError(
                f"embed: expected integer input_ids of shape [rows, seq], got "
                f"{input_ids.dtype} {tuple(input_ids.shape)}"
            )
        weight = self._embedding_weight()
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= len(weight)):
            raise ModelError(
                f"embed: token ids must lie in [0, {len(weight)}), got "
                f"[{int(input_ids.min())}, {int(input_ids.max())}]"
            )
        states = nn.functional.embedding(input_ids.cpu().long(), weight)
        if self.adapter.scale_embeddings:
            # Gemma scales by sqrt(hidden) cast to the weight dtype (fp32 here).
            states = states * torch.tensor(self.config.hidden_size**0.5, dtype=torch.float32)
        return states

    def _final_norm(self) -> nn.Module:
        if self._norm is None:
            self._norm = self._materialize(self._meta_norm, f"{self.adapter.final_norm}.")
        return self._norm

    def _head_weight(self) -> torch.Tensor:
        name = self.adapter.head_weight
        if name not in self._index:  # tied to the embeddings (checked in __init__)
            name = self.adapter.embed_weight
        weight = self._index.read([name])[name].to(torch.float32)
        _check_finite(weight, f"weight {name}")
        return weight.to(self.device)

    # -- forward passes --------------------------------------------------------------------

    def _context(self, x: torch.Tensor, i: int) -> _Context:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        seq = x.shape[1]
        layer_type = self.adapter.layer_type(self.config, i)
        position_ids = torch.arange(seq, device=x.device).unsqueeze(0)
        rope_type = layer_type if self.adapter.rope_per_layer_type else ""
        key = (seq, rope_type)
        if key not in self._rope_cache:
            if self.adapter.rope_per_layer_type:
                rope = self._rotary(x, position_ids, layer_type)
            else:
                rope = self._rotary(x, position_ids)
            # Keep only the current sequence length: callers use one length at a time.
            self._rope_cache = {k: v for k, v in self._rope_cache.items() if k[0] == seq}
            self._rope_cache[key] = rope
        make_mask = (
            create_sliding_window_causal_mask
            if layer_type == "sliding_attention"
            else create_causal_mask
        )
        mask = make_mask(
            config=self.config,
            inputs_embeds=x,
            attention_mask=None,
            cache=None,
            position_ids=position_ids,
        )
        return self._rope_cache[key], mask, position_ids

    def _chunks(self, states: torch.Tensor) -> Iterator[slice]:
        rows_per_chunk = max(1, self.chunk_tokens // max(1, states.shape[1]))
        for start in range(0, states.shape[0], rows_per_chunk):
            yield slice(start, start + rows_per_chunk)

    def _run(
        self,
        states: torch.Tensor,
        i: int,
        what: str,
        fn: Callable[[torch.Tensor, _Context], torch.Tensor],
    ) -> torch.Tensor:
        self._check_layer(i)
        if states.dim() != 3 or states.shape[-1] != self.config.hidden_size:
            raise ModelError(
                f"{what}: expected states [rows, seq, {self.config.hidden_size}], "
                f"got {tuple(states.shape)}"
            )
        _check_finite(states, f"input states of {what}")
        out = torch.empty(states.shape, dtype=torch.float32, device=states.device)
        with torch.no_grad():
            for rows in self._chunks(states):
                x = states[rows].to(self.device, torch.float32)
                out[rows] = fn(x, self._context(x, i)).to(out.device)
        _check_finite(out, f"output of {what}")
        return out

    def attn_forward(self, block: nn.Module, i: int, states: torch.Tensor) -> torch.Tensor:
        """Attention half of layer ``i``, including the residual add."""
        a = self.adapter
        attn = block.get_submodule(a.attn_module)

        def fn(x: torch.Tensor, ctx: _Context) -> torch.Tensor:
            rope, mask, position_ids = ctx
            h = block.get_submodule(a.attn_pre_norm)(x)
            h, _ = attn(
                hidden_states=h,
                position_embeddings=rope,
                attention_mask=mask,
                position_ids=position_ids,
            )
            if a.attn_post_norm is not None:
                h = block.get_submodule(a.attn_post_norm)(h)
            out: torch.Tensor = x + h
            return out

        return self._run(states, i, f"{a.layer_name(i)}.{a.attn_module}", fn)

    def mlp_forward(self, block: nn.Module, i: int, states: torch.Tensor) -> torch.Tensor:
        """MLP half of layer ``i``, including the residual add."""
        a = self.adapter
        mlp = block.get_submodule(a.mlp_module)

        def fn(x: torch.Tensor, ctx: _Context) -> torch.Tensor:
            h = mlp(block.get_submodule(a.mlp_pre_norm)(x))
            if a.mlp_post_norm is not None:
                h = block.get_submodule(a.mlp_post_norm)(h)
            out: torch.Tensor = x + h
            return out

        return self._run(states, i, f"{a.layer_name(i)}.{a.mlp_module}", fn)

    def block_forward(self, block: nn.Module, i: int, states: torch.Tensor) -> torch.Tensor:
        """The whole decoder layer ``i`` (transformers' own forward)."""

        def fn(x: torch.Tensor, ctx: _Context) -> torch.Tensor:
            rope, mask, position_ids = ctx
            y = block(x, attention_mask=mask, position_embeddings=rope, position_ids=position_ids)
            out: torch.Tensor = y[0] if isinstance(y, tuple) else y
            return out

        return self._run(states, i, self.adapter.layer_name(i), fn)

    # -- backward passes (sensitivities) -----------------------------------------------------

    def _head(self, h: torch.Tensor, norm: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = norm(h) @ weight.T
        softcap = getattr(self.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    def head_loss_grad(
        self,
        states: torch.Tensor,
        input_ids: torch.Tensor,
        *,
        sample: torch.Generator | None = None,
    ) -> tuple[float, torch.Tensor]:
        """Summed next-token cross-entropy of ``input_ids`` from the final ``states`` (before
        the final norm), and its gradient with respect to those states (CPU fp32).

        With ``sample`` the labels are instead drawn from the model's own next-token
        distribution (one per position, from that generator, on the CPU): the squared
        gradients then estimate the model's true Fisher (the Gauss-Newton matrix of the
        cross-entropy) without bias, where the data's labels give the empirical Fisher."""
        if states.shape[:2] != input_ids.shape:
            raise ModelError(
                f"head_loss_grad: states {tuple(states.shape)} do not match input_ids "
                f"{tuple(input_ids.shape)}"
            )
        norm, weight = self._final_norm(), self._head_weight()
        grad = torch.zeros(states.shape, dtype=torch.float32)
        total = 0.0
        for rows in self._chunks(states):
            h = states[rows].to(self.device, torch.float32).requires_grad_(True)
            with torch.enable_grad():
                logits = self._head(h, norm, weight)[:, :-1]
                if sample is None:
                    labels = input_ids[rows, 1:].to(self.device).long()
                else:
                    probs = torch.softmax(logits.detach().float(), dim=-1).cpu()
                    drawn = torch.multinomial(
                        probs.reshape(-1, probs.shape[-1]), 1, generator=sample
                    )
                    labels = drawn.reshape(probs.shape[:-1]).to(self.device)
                loss = nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum"
                )
                (g,) = torch.autograd.grad(loss, h)
            total += float(loss.detach())
            grad[rows] = g.cpu()
        return total, grad

    def block_vjp(
        self,
        block: nn.Module,
        i: int,
        states: torch.Tensor,
        grad_out: torch.Tensor,
        on_output_grad: Callable[[str, torch.Tensor], None],
    ) -> torch.Tensor:
        """Backward through decoder layer ``i``: from its input ``states`` and the gradient of
        a loss with respect to its output, the gradient with respect to its input (CPU fp32).
        ``on_output_grad(name, g)`` receives the gradient of each decoder linear's output,
        chunk by chunk (``name`` as from :meth:`linear_names`)."""
        if grad_out.shape != states.shape:
            raise ModelError(
                f"block_vjp: grad {tuple(grad_out.shape)} does not match states "
                f"{tuple(states.shape)}"
            )
        hooks = []
        for name in self.linear_names(i):

            def capture(_m: nn.Module, _x: Any, y: torch.Tensor, name: str = name) -> None:
                y.register_hook(lambda g: on_output_grad(name, g))  # type: ignore[no-untyped-call]

            hooks.append(self.linear(block, name).register_forward_hook(capture))
        grad_in = torch.empty(states.shape, dtype=torch.float32)
        try:
            for rows in self._chunks(states):
                x = states[rows].to(self.device, torch.float32).requires_grad_(True)
                rope, mask, position_ids = self._context(x, i)
                with torch.enable_grad():
                    y = block(
                        x, attention_mask=mask, position_embeddings=rope, position_ids=position_ids
                    )
                    y = y[0] if isinstance(y, tuple) else y
                    (g,) = torch.autograd.grad(y, x, grad_out[rows].to(self.device))
                grad_in[rows] = g.cpu()
        finally:
            for h in hooks:
                h.remove()
        _check_finite(grad_in, f"input gradient of {self.adapter.layer_name(i)}")
        return grad_in

    def head_logits(self, states: torch.Tensor) -> torch.Tensor:
        """Final norm + lm_head (+ Gemma's logit softcapping): fp32 logits on the CPU."""
        if states.dim() != 3 or states.shape[-1] != self.config.hidden_size:
            raise ModelError(
                f"head_logits: expected states [rows, seq, {self.config.hidden_size}], "
                f"got {tuple(states.shape)}"
            )
        _check_finite(states, "input states of the head")
        norm = self._final_norm()
        weight = self._head_weight()
        out = torch.empty((*states.shape[:2], weight.shape[0]), dtype=torch.float32)
        with torch.no_grad():
            for rows in self._chunks(states):
                h = states[rows].to(self.device, torch.float32)
                out[rows] = self._head(h, norm, weight).cpu()
        return out

    def final_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states after the last decoder layer (before the final norm), streamed."""
        states = self.embed(input_ids)
        for i in range(self.num_layers):
            block = self.load_block(i)
            states = self.block_forward(block, i, states)
            del block
        return states

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full-model fp32 logits ``[rows, seq, vocab]`` computed block by block."""
        return self.head_logits(self.final_states(input_ids))
