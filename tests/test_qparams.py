"""The Python facade over the Rust bit accounting."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

import exl2rs
from exl2rs import qparams as q


def test_tables_have_exllamav2_shape() -> None:
    assert len(q.attn_table()) == 19
    assert len(q.mlp_table()) == 17
    assert [len(q.candidates(k)) for k in q.LINEAR_KINDS] == [14, 14, 15, 14, 13, 13, 14]


def test_published_llama3_8b_costs() -> None:
    row = q.attn_table()[6]
    shapes = {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "v_proj": (4096, 1024)}
    shapes["o_proj"] = (4096, 4096)
    assert sum(row[k].total_bits(*shapes[k]) for k in q.ATTN_KINDS) == 169_613_312
    assert abs(q.head_config(6).bpw(4096, 128_256) - 6.344) < 2e-3


def test_dict_round_trip_and_desc() -> None:
    cfg = q.QParams((8, 4), (0.05, 0.95), (32, 128))
    assert cfg.desc == "0.05:8b_32g/0.95:4b_128g s4"
    assert cfg.to_dict()["group_size"] == {"8": 32, "4": 128}
    assert q.QParams.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (((2, 3), (0.5, 0.5), (64, 64)), "descending"),
        (((7,), (1.0,), (64,)), "width 7"),
        (((4,), (0.9,), (64,)), "sum to"),
        (((4,), (1.0,), (48,)), "multiple of 32"),
    ],
)
def test_invalid_configs_raise_qparams_error(args: tuple, needle: str) -> None:
    with pytest.raises(exl2rs.QParamsError, match=needle):
        q.QParams(*args)


def test_unknown_kind_and_head_bits() -> None:
    with pytest.raises(ValueError, match="unknown linear kind"):
        q.candidates("lm_head")
    with pytest.raises(exl2rs.Exl2Error, match="expected one of"):
        q.head_config(7)


@given(
    rows=st.integers(min_value=32, max_value=20_000),
    cols=st.integers(min_value=1, max_value=5000),
    kind=st.sampled_from(q.LINEAR_KINDS),
    data=st.data(),
)
def test_groups_tile_rows_and_cost_matches_formula(rows: int, cols: int, kind: str, data) -> None:
    cfg = data.draw(st.sampled_from(q.candidates(kind)))
    groups = cfg.groups(rows)
    assert [g.row_start for g in groups] == [0] + [
        sum(g.rows for g in groups[: i + 1]) for i in range(len(groups) - 1)
    ]
    assert sum(g.rows for g in groups) == rows
    assert [g.bits for g in groups] == sorted((g.bits for g in groups), reverse=True)
    weights = sum(g.rows * cols * g.bits for g in groups)
    n = len(groups)
    assert cfg.total_bits(rows, cols) == weights + n * 48 + n * cols * 4 + rows * 32
