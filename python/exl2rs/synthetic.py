"""Seeded synthetic measurements with EXL2's real candidate costs, for tests, benchmarks and
sweeps when no model is at hand. Errors follow the usual shape: roughly halving per extra bit,
scaled by a per-layer sensitivity, with multiplicative noise."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from exl2rs._core import Measurement
from exl2rs.qparams import ATTN_KINDS, MLP_KINDS, QParams, attn_table, candidates, mlp_table

LLAMA3_8B = {"layers": 32, "hidden": 4096, "inter": 14336, "heads": 32, "kv_heads": 8}
LLAMA3_70B = {"layers": 80, "hidden": 8192, "inter": 28672, "heads": 64, "kv_heads": 8}


def _shapes(hidden: int, inter: int, heads: int, kv_heads: int) -> dict[str, tuple[int, int]]:
    hd = hidden // heads
    return {
        "q_proj": (hidden, heads * hd),
        "k_proj": (hidden, kv_heads * hd),
        "v_proj": (hidden, kv_heads * hd),
        "o_proj": (heads * hd, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def synthetic_measurement_dict(
    layers: int, hidden: int, inter: int, heads: int, kv_heads: int, *, seed: int = 0
) -> dict[str, Any]:
    """A valid native measurement (as a dict) for a Llama-shaped model."""
    rng = np.random.default_rng(seed)
    shapes = _shapes(hidden, inter, heads, kv_heads)
    configs: list[QParams] = []
    index: dict[QParams, int] = {}
    for kind in ATTN_KINDS + MLP_KINDS:
        for q in candidates(kind):
            if q not in index:
                index[q] = len(configs)
                configs.append(q)
    # Linears that read one input are measured over the union of their candidates, so a
    # fused (tied) allocation can choose any config for the whole group, as the real pass does.
    fused = {"q_proj": ("q_proj", "k_proj", "v_proj"), "gate_proj": ("gate_proj", "up_proj")}
    fused["k_proj"] = fused["v_proj"] = fused["q_proj"]
    fused["up_proj"] = fused["gate_proj"]
    cands: dict[str, list[QParams]] = {}
    for kind in shapes:
        union: list[QParams] = []
        for member in fused.get(kind, (kind,)):
            union += [q for q in candidates(member) if q not in union]
        cands[kind] = union
    kind_sens = {k: float(rng.uniform(0.5, 2.0)) for k in shapes}
    linears: list[dict[str, Any]] = []
    modules: list[dict[str, Any]] = []
    for layer in range(layers):
        depth = 1.0 + 2.0 * float(np.exp(-layer / 3.0))  # early layers are more sensitive
        for module, kinds, table in (
            ("self_attn", ATTN_KINDS, attn_table()),
            ("mlp", MLP_KINDS, mlp_table()),
        ):
            rel: dict[tuple[str, QParams], float] = {}
            for kind in kinds:
                rows, cols = shapes[kind]
                energy = float(rows * cols) * float(rng.uniform(0.5, 1.5))
                sens = depth * kind_sens[kind] * float(rng.lognormal(0.0, 0.3))
                opts = []
                for q in cands[kind]:
                    bits = q.total_bits(rows, cols)
                    bpw = bits / (rows * cols)
                    r = sens * 0.08 * 2.0 ** (-(bpw - 2.0)) * float(rng.lognormal(0.0, 0.05))
                    rel[(kind, q)] = r
                    opts.append({"config": index[q], "bits": bits, "err": r * energy})
                name = f"model.layers.{layer}.{module}.{kind}"
                shared = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gu"}
                shared["up_proj"] = "gu"
                linears.append(
                    {
                        "name": name,
                        "layer": layer,
                        "module": module,
                        "kind": kind,
                        "in_features": rows,
                        "out_features": cols,
                        "shared_input": f"model.layers.{layer}.{module}.{shared.get(kind, kind)}",
                        "ref_energy": energy,
                        "samples": 4096,
                        "options": opts,
                    }
                )
            mrows = []
            for row in table:
                err = sum(rel[(k, row[k])] for k in kinds) / len(kinds)
                total = sum(row[k].total_bits(*shapes[k]) for k in kinds)
                mrows.append(
                    {
                        "accuracy": max(1e-6, 1.0 - 0.05 * err),
                        "total_bits": total,
                        "configs": {k: index[row[k]] for k in kinds},
                    }
                )
            modules.append(
                {"name": f"model.layers.{layer}.{module}", "kind": module, "rows": mrows}
            )
    return {
        "format": "exl2rs.measurement",
        "version": 1,
        "model": {
            "name": f"synthetic-llama-{layers}x{hidden}",
            "architecture": "LlamaForCausalLM",
            "hash": f"synthetic-{layers}-{hidden}-{inter}-{seed}",
            "num_layers": layers,
        },
        "calibration": {"hash": f"synthetic-{seed}", "rows": 1, "length": 4096, "source": "none"},
        "candidates_hash": "exl2-default",
        "configs": [
            {
                "bits": list(q.bits),
                "bits_prop": list(q.bits_prop),
                "group_size": list(q.group_size),
                "scale_bits": q.scale_bits,
            }
            for q in configs
        ],
        "linears": linears,
        "modules": modules,
    }


def synthetic_measurement(
    layers: int, hidden: int, inter: int, heads: int, kv_heads: int, *, seed: int = 0
) -> Measurement:
    """As :func:`synthetic_measurement_dict`, loaded (and validated) by the Rust core."""
    d = synthetic_measurement_dict(layers, hidden, inter, heads, kv_heads, seed=seed)
    return Measurement.from_json(json.dumps(d))
