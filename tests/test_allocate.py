"""Allocation from Python: problems from NumPy arrays, measurement files, solvers, errors, CLI."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import exl2rs
from exl2rs import allocation as A
from exl2rs.cli import main as cli_main
from exl2rs.synthetic import synthetic_measurement, synthetic_measurement_dict


def _random_problem(rng: np.random.Generator, items: int, options: int) -> exl2rs.Problem:
    bits, errs = [], []
    for _ in range(items):
        b = np.sort(rng.choice(np.arange(200, 900), size=options, replace=False)).astype(np.uint64)
        e = np.sort(rng.uniform(0.0, 1.0, size=options))[::-1].copy()
        bits.append(b)
        errs.append(e)
    return A.problem_from_arrays([f"i{k}" for k in range(items)], [100] * items, bits, errs)


def _brute_force(p: exl2rs.Problem, budget: int) -> float:
    opts = [p.options(i) for i in range(p.num_items)]
    best = float("inf")
    for combo in itertools.product(*opts):
        if sum(o[0] for o in combo) <= budget:
            best = min(best, sum(o[1] for o in combo))
    return best


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    items=st.integers(1, 5),
    options=st.integers(1, 4),
    frac=st.floats(0.0, 1.0),
)
def test_exact_matches_brute_force_and_heuristics_never_beat_it(
    seed: int, items: int, options: int, frac: float
) -> None:
    p = _random_problem(np.random.default_rng(seed), items, options)
    lo, hi = p.cost_range()
    budget = int(lo + frac * (hi - lo))
    exact = p.solve(target_bits=budget)
    assert exact.cost_bits <= budget
    assert exact.optimal
    assert exact.objective == pytest.approx(_brute_force(p, budget), rel=1e-9, abs=1e-12)
    for solver in ("greedy", "lagrangian", "minimax", "anneal"):
        s = p.solve(target_bits=budget, solver=solver, anneal_samples=4, anneal_iterations=50)
        assert s.cost_bits <= budget, solver
        assert s.objective >= exact.objective - 1e-9, solver
        if s.lower_bound is not None:
            assert s.lower_bound <= exact.objective + 1e-9, solver


def test_infeasible_target_names_the_range() -> None:
    p = _random_problem(np.random.default_rng(1), 4, 3)
    with pytest.raises(exl2rs.InfeasibleTargetError, match="feasible range is"):
        p.solve(target_bpw=0.1)
    with pytest.raises(ValueError, match="exactly one target"):
        p.solve(target_bpw=3.0, target_bits=10)


def test_malformed_problems_are_refused() -> None:
    with pytest.raises(ValueError, match="one entry per item"):
        A.problem_from_arrays(["a", "b"], [1], [[1]], [[0.0]])
    with pytest.raises(exl2rs.InvalidProblemError, match="has error NaN"):
        A.problem_from_arrays(["a"], [1], [[1, 2]], [[0.0, float("nan")]])
    with pytest.raises(ValueError, match="2 costs but 1 errors"):
        A.problem_from_arrays(["a"], [1], [[1, 2]], [[0.0]])
    with pytest.raises(exl2rs.InvalidProblemError):
        exl2rs.Problem.from_json("{not json")


def test_constraints_by_pattern() -> None:
    m = synthetic_measurement(3, 256, 512, 4, 2, seed=3)
    base = A.allocate(m, 5.0)
    pinned = A.allocate(m, 5.0, pin={"model.layers.0.*": "max"})
    for it in pinned.items:
        if it.name.startswith("model.layers.0."):
            opts = [o[0] for o in pinned_problem_options(m, it.name)]
            assert it.bits == max(opts)
    assert pinned.objective >= base.objective
    floor = A.allocate(m, 4.0, min_bpw={"*.down_proj": 5.0})
    assert all(i.bpw >= 5.0 for i in floor.items if i.name.endswith("down_proj"))
    with pytest.raises(exl2rs.InvalidProblemError, match="matches no item"):
        A.allocate(m, 4.0, pin={"nothing.*": "max"})


def pinned_problem_options(m: exl2rs.Measurement, name: str) -> list[tuple[int, float, int]]:
    p = m.linear_problem()
    return p.options(p.names.index(name))


def test_budget_kinds_and_fused_groups() -> None:
    m = synthetic_measurement(2, 256, 512, 4, 2, seed=5)
    p = m.linear_problem(fuse=True)
    assert len(p.groups) == 4  # (q,k,v) and (gate,up) per layer
    a = A.allocate(m, 3.5, fuse=True)
    by = {i.name: i for i in a.items}
    for layer in range(2):
        q = by[f"model.layers.{layer}.self_attn.q_proj"]
        assert by[f"model.layers.{layer}.self_attn.k_proj"].config == q.config
        assert by[f"model.layers.{layer}.self_attn.v_proj"].config == q.config
    nbytes = a.cost_bits // 8 + 1000
    b = A.allocate(m, bytes=nbytes, overhead=1000)
    assert b.cost_bits <= 8 * (nbytes - 1000)


def test_frontier_is_monotone() -> None:
    m = synthetic_measurement(2, 256, 512, 4, 2, seed=7)
    f = A.frontier(m, [2.5, 3.0, 4.0, 5.0, 6.0])
    objs = [s.objective for s in f.solutions if s is not None]
    assert objs == sorted(objs, reverse=True)
    assert all(s is None or s.optimal for s in f.solutions)
    assert "target" in f.table()


def test_measurement_round_trip_and_bad_files(tmp_path: Path) -> None:
    m = synthetic_measurement(2, 256, 512, 4, 2)
    path = tmp_path / "m.json"
    m.save(path)
    back = exl2rs.Measurement.load(path)
    assert back.to_json() == m.to_json()
    assert isinstance(A.load_measurement(path), exl2rs.Measurement)
    (tmp_path / "empty.json").write_text("")
    with pytest.raises(exl2rs.MeasurementFileError, match="empty.json"):
        exl2rs.Measurement.load(tmp_path / "empty.json")
    text = path.read_text()
    (tmp_path / "trunc.json").write_text(text[: len(text) // 2])
    with pytest.raises(exl2rs.MeasurementFileError, match="trunc.json"):
        exl2rs.Measurement.load(tmp_path / "trunc.json")
    d = synthetic_measurement_dict(2, 256, 512, 4, 2)
    d["linears"][0]["options"][0]["bits"] += 1
    with pytest.raises(exl2rs.MeasurementFileError, match="q_proj"):
        exl2rs.Measurement.from_json(json.dumps(d))
    d = synthetic_measurement_dict(2, 256, 512, 4, 2)
    d["format"] = "something-else"
    with pytest.raises(exl2rs.MeasurementFileError):
        exl2rs.Measurement.from_json(json.dumps(d))


def test_exllamav2_file_resolves_and_gives_a_strategy(tmp_path: Path) -> None:
    m = synthetic_measurement(2, 256, 512, 4, 2)
    path = tmp_path / "measurement.json"
    m.write_exllamav2(path)
    doc = json.loads(path.read_text())
    assert len(doc["measurement"]["model.layers.0.self_attn"]) == 19
    assert len(doc["measurement"]["model.layers.0.mlp"]) == 17
    dims = {
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    a = A.allocate(path, 4.0, dims=dims)
    strat = a.strategy()
    assert set(strat) == {
        "model.layers.0.self_attn",
        "model.layers.0.mlp",
        "model.layers.1.self_attn",
        "model.layers.1.mlp",
    }
    assert "q_proj" in strat["model.layers.0.self_attn"]
    with pytest.raises(exl2rs.InvalidProblemError, match="holds no shapes"):
        A.allocate(path, 4.0)


def test_cli_allocate_and_frontier(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = synthetic_measurement(2, 256, 512, 4, 2)
    path = tmp_path / "m.json"
    m.save(path)
    out = tmp_path / "alloc.json"
    strat = tmp_path / "strategy.json"
    assert (
        cli_main(["allocate", str(path), "-b", "4.0", "--json", str(out), "--strategy", str(strat)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "optimal=True" in printed and "model.layers.1.mlp.down_proj" in printed
    assert json.loads(out.read_text())["bpw"] <= 4.0
    assert "model.layers.0.self_attn" in json.loads(strat.read_text())
    assert cli_main(["frontier", str(path), "--from", "3", "--to", "4", "--step", "0.5"]) == 0
    assert cli_main(["allocate", str(path), "-b", "0.5"]) == 2
    assert "feasible range" in capsys.readouterr().err
