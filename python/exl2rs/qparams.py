"""EXL2 quantization configs. Bits are counted in Rust (one function, used everywhere)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from exl2rs import _core

LINEAR_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTN_KINDS = LINEAR_KINDS[:4]
MLP_KINDS = LINEAR_KINDS[4:]
# EXL2's head options (`-hb`): the widths of `head_config`.
HEAD_BITS = (2, 3, 4, 5, 6, 8)


@dataclass(frozen=True)
class Group:
    """``rows`` consecutive act-ordered input rows starting at ``row_start``, at ``bits`` bits."""

    bits: int
    row_start: int
    rows: int


@dataclass(frozen=True)
class QParams:
    """An EXL2 config: widths (descending), the row proportion of each, a group size per width."""

    bits: tuple[int, ...]
    bits_prop: tuple[float, ...]
    group_size: tuple[int, ...]
    scale_bits: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", tuple(int(b) for b in self.bits))
        object.__setattr__(self, "bits_prop", tuple(float(p) for p in self.bits_prop))
        object.__setattr__(self, "group_size", tuple(int(g) for g in self.group_size))
        _core.qparams_validate(self._tuple())

    def _tuple(self) -> tuple[list[int], list[float], list[int], int]:
        return list(self.bits), list(self.bits_prop), list(self.group_size), self.scale_bits

    @classmethod
    def _from_tuple(cls, t: tuple[list[int], list[float], list[int], int]) -> QParams:
        return cls(tuple(t[0]), tuple(t[1]), tuple(t[2]), t[3])

    @property
    def desc(self) -> str:
        """exllamav2's descriptor, e.g. ``0.05:3b_64g/0.95:2b_64g s4``."""
        return _core.qparams_desc(self._tuple())

    def total_bits(self, rows: int, cols: int) -> int:
        """Exact stored bits of a ``rows`` (in_features) × ``cols`` (out_features) matrix."""
        return _core.qparams_total_bits(self._tuple(), rows, cols)

    def bpw(self, rows: int, cols: int) -> float:
        return self.total_bits(rows, cols) / (rows * cols)

    def groups(self, rows: int) -> list[Group]:
        """The quantization groups in act-order row order."""
        return [Group(b, s, r) for b, s, r in _core.qparams_groups(self._tuple(), rows)]

    def to_dict(self) -> dict[str, Any]:
        """exllamav2's ``get_dict()`` form (group_size keyed by width as a string)."""
        out: dict[str, Any] = json.loads(_core.qparams_to_exllamav2_json(self._tuple()))
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QParams:
        return cls._from_tuple(_core.qparams_from_exllamav2_json(json.dumps(d)))

    def __str__(self) -> str:
        return self.desc


def candidates(linear: str) -> list[QParams]:
    """The unique configs of EXL2's tables for one linear kind (``q_proj`` … ``down_proj``)."""
    return [QParams._from_tuple(t) for t in _core.qparams_candidates(linear)]


def attn_table() -> list[dict[str, QParams]]:
    """EXL2's 19 joint attention rows, keyed q_proj, k_proj, v_proj, o_proj."""
    rows = _core.qparams_attn_table()
    return [dict(zip(ATTN_KINDS, (QParams._from_tuple(t) for t in r), strict=True)) for r in rows]


def mlp_table() -> list[dict[str, QParams]]:
    """EXL2's 17 joint MLP rows, keyed gate_proj, up_proj, down_proj."""
    rows = _core.qparams_mlp_table()
    return [dict(zip(MLP_KINDS, (QParams._from_tuple(t) for t in r), strict=True)) for r in rows]


def head_config(bits: int) -> QParams:
    """The head config for ``-hb bits`` (2, 3, 4, 5, 6 or 8)."""
    return QParams._from_tuple(_core.qparams_head_config(bits))


__all__ = [
    "ATTN_KINDS",
    "HEAD_BITS",
    "LINEAR_KINDS",
    "MLP_KINDS",
    "Group",
    "QParams",
    "attn_table",
    "candidates",
    "head_config",
    "mlp_table",
]
