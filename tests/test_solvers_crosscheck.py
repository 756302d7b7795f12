"""The op-policy MILP against brute force and CBC against HiGHS; solver options and status."""

from __future__ import annotations

import itertools
import logging
import random
from dataclasses import dataclass

import mip
import numpy as np
import pytest

from sac_compiler.sac_stats import SACStats
from sac_compiler.solvers import (
    InfeasibleError,
    NoSolutionError,
    SolverError,
    SolverOptions,
    _mip,
    evaluate_policy,
    get_optimal_checkpointing_policy_per_module,
)


def random_sac_stats(rng: random.Random, n_ops: int) -> SACStats:
    """Ops with views (0 bytes), in-place ops on an earlier op or on their own
    storage, and random ops, laid out the way the SAC estimator records them."""
    kinds = rng.choices(["plain", "view", "inplace", "rand"], weights=[5, 1, 2, 2], k=n_ops)
    kinds[0] = "plain"
    memory = [
        0 if k == "view" or rng.random() < 0.2 else rng.randint(1, 200) for k in kinds
    ]
    runtimes = [round(rng.uniform(0.1, 20.0), 3) for _ in kinds]
    view_like_ops = [i for i, k in enumerate(kinds) if k == "view"]
    rand_ops = [i for i, k in enumerate(kinds) if k == "rand"]
    inplace_ops = []
    for i, k in enumerate(kinds):
        if k == "inplace":
            parents = [j for j in range(i) if kinds[j] != "view"]
            own_storage = rng.random() < 0.2
            inplace_ops.append((i, i if own_storage else rng.choice(parents)))
    return SACStats(
        func_names=[f"aten.{k}_{i}" for i, k in enumerate(kinds)],
        runtimes=runtimes,
        memory=memory,
        view_like_ops=view_like_ops,
        rand_ops=rand_ops,
        saved_autograd_ops=[],
        inplace_ops=inplace_ops,
        force_store_random=rng.random() < 0.3,
    )


def feasible_policies(stats: SACStats, memory_budget: float) -> np.ndarray:
    """Every 0/1 policy that obeys the rules, straight from their definitions."""
    n = len(stats.func_names)
    x = np.array(list(itertools.product([0, 1], repeat=n)), dtype=np.int64).reshape(-1, n)
    ok = np.ones(len(x), dtype=bool)
    for v in stats.view_like_ops:
        ok &= x[:, v] == 0
    for op, parent in stats.inplace_ops:
        ok &= x[:, op] == (1 if op == parent else x[:, parent])
    if stats.rand_ops:
        rand = x[:, stats.rand_ops]
        if stats.force_store_random:
            ok &= rand.min(axis=1) == 1
        else:
            ok &= rand.min(axis=1) == rand.max(axis=1)
    total = sum(stats.memory)
    ok &= x @ np.array(stats.memory) <= memory_budget * total + 1e-9 * max(total, 1)
    return x[ok]


def brute_force_optimum(stats: SACStats, memory_budget: float) -> float | None:
    policies = feasible_policies(stats, memory_budget)
    if len(policies) == 0:
        return None
    return float((policies @ np.array(stats.runtimes)).max())


def obeys_rules(stats: SACStats, policy: list[int], memory_budget: float) -> bool:
    feasible = feasible_policies(stats, memory_budget)
    return bool((feasible == np.array(policy)).all(axis=1).any())


INSTANCES = [(seed, 2 + seed % 11) for seed in range(60)]  # 2 to 12 ops


@pytest.mark.parametrize("solver", ["cbc", "highs"])
@pytest.mark.parametrize(("seed", "n_ops"), INSTANCES)
def test_milp_matches_brute_force(solver: str, seed: int, n_ops: int) -> None:
    rng = random.Random(seed)
    stats = random_sac_stats(rng, n_ops)
    memory_budget = rng.choices([0.0, 1.0, round(rng.random(), 3)], weights=[1, 1, 6])[0]
    expected = brute_force_optimum(stats, memory_budget)
    options = SolverOptions(solver=solver, mip_gap=0.0)
    if expected is None:
        with pytest.raises(InfeasibleError):
            get_optimal_checkpointing_policy_per_module(stats, memory_budget, options)
        return
    policy = get_optimal_checkpointing_policy_per_module(stats, memory_budget, options)
    assert obeys_rules(stats, policy, memory_budget)
    assert evaluate_policy(stats, policy).saved_runtime == pytest.approx(expected, abs=1e-6)


def test_instances_exercise_every_rule() -> None:
    all_stats = [random_sac_stats(random.Random(seed), n) for seed, n in INSTANCES]
    assert any(s.view_like_ops for s in all_stats)
    assert any(len(s.rand_ops) > 1 and not s.force_store_random for s in all_stats)
    assert any(s.rand_ops and s.force_store_random for s in all_stats)
    assert any(op != parent for s in all_stats for op, parent in s.inplace_ops)
    assert any(op == parent for s in all_stats for op, parent in s.inplace_ops)


@pytest.mark.parametrize("seed", range(20))
def test_cbc_and_highs_agree(seed: int) -> None:
    rng = random.Random(1000 + seed)
    stats = random_sac_stats(rng, rng.randint(20, 60))
    stats.force_store_random = False
    stats.inplace_ops = [(op, parent) for op, parent in stats.inplace_ops if op != parent]
    memory_budget = round(rng.uniform(0.1, 0.9), 3)
    saved = {
        solver: evaluate_policy(
            stats,
            get_optimal_checkpointing_policy_per_module(
                stats, memory_budget, SolverOptions(solver=solver)
            ),
        ).saved_runtime
        for solver in ("cbc", "highs")
    }
    # Both stop within the default relative gap (1e-4) of the optimum.
    assert saved["cbc"] == pytest.approx(saved["highs"], rel=2e-4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"solver": "gurobi"}, r"solver must be one of \('cbc', 'highs'\)"),
        ({"solver": "CBC"}, r"solver must be one of"),
        ({"time_limit_s": 0}, r"time_limit_s must be None or a finite number of seconds > 0"),
        ({"time_limit_s": float("inf")}, r"time_limit_s"),
        ({"time_limit_s": True}, r"time_limit_s"),
        ({"mip_gap": -0.1}, r"mip_gap must be None or a relative gap in \[0, 1\)"),
        ({"mip_gap": 1.0}, r"mip_gap"),
        ({"threads": 0}, r"threads must be None or an int >= 1"),
        ({"threads": 2.0}, r"threads"),
        ({"verbose": 1}, r"verbose must be True or False"),
    ],
)
def test_solver_options_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SolverOptions(**kwargs)  # type: ignore[arg-type]


def test_solver_options_are_frozen_and_accept_valid_values() -> None:
    options = SolverOptions(solver="highs", time_limit_s=2.5, mip_gap=0.0, threads=1)
    with pytest.raises(AttributeError):
        options.solver = "cbc"  # type: ignore[misc]


def test_new_model_rejects_unknown_sense() -> None:
    with pytest.raises(ValueError, match="sense must be one of"):
        _mip.new_model("m", "maximize", SolverOptions())


def test_highs_without_highspy(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = _mip.importlib.util.find_spec
    monkeypatch.setattr(
        _mip.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "highspy" else real_find_spec(name, *a),
    )
    with pytest.raises(ImportError, match="pip install highspy"):
        _mip.new_model("m", "MIN", SolverOptions(solver="highs"))


@pytest.mark.parametrize("solver", ["cbc", "highs"])
def test_solve_reports_infeasible(solver: str) -> None:
    options = SolverOptions(solver=solver)
    model = _mip.new_model("tiny", "MAX", options)
    x = model.add_var(var_type=_mip.BINARY)
    model += x >= 2
    model.objective = _mip.xsum([x])
    with pytest.raises(InfeasibleError, match=r"tiny: .* proved that no solution"):
        _mip.solve(model, options)


@dataclass
class FakeModel:
    """Stands in for a python-mip model whose search ended with ``status``."""

    status: mip.OptimizationStatus
    name: str = "fake"
    objective_value: float = 10.0
    objective_bound: float = 12.0
    num_cols: int = 3
    num_int: int = 3
    num_rows: int = 2

    def optimize(self, max_seconds: float) -> mip.OptimizationStatus:
        return self.status


def test_solve_feasible_at_time_limit_warns_with_gap(caplog: pytest.LogCaptureFixture) -> None:
    options = SolverOptions(time_limit_s=1.0)
    with caplog.at_level(logging.WARNING, logger="sac_compiler.solvers._mip"):
        outcome = _mip.solve(FakeModel(mip.OptimizationStatus.FEASIBLE), options)  # type: ignore[arg-type]
    assert outcome.status == "FEASIBLE"
    assert outcome.gap == pytest.approx(0.2)
    assert "gap 20.00%" in caplog.text


@pytest.mark.parametrize(
    ("status", "error", "match"),
    [
        (mip.OptimizationStatus.NO_SOLUTION_FOUND, NoSolutionError, "raise SolverOptions"),
        (mip.OptimizationStatus.INT_INFEASIBLE, InfeasibleError, "no solution satisfies"),
        (mip.OptimizationStatus.UNBOUNDED, SolverError, "unbounded"),
        (mip.OptimizationStatus.ERROR, SolverError, "returned status ERROR"),
        (mip.OptimizationStatus.OTHER, SolverError, "returned status OTHER"),
    ],
)
def test_solve_raises_on_bad_status(
    status: mip.OptimizationStatus, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        _mip.solve(FakeModel(status), SolverOptions(time_limit_s=1.0))  # type: ignore[arg-type]


def test_solve_logs_size_and_time_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="sac_compiler.solvers._mip"):
        get_optimal_checkpointing_policy_per_module(random_sac_stats(random.Random(3), 8), 0.5)
    assert "SAC-per-module: 8 variables (8 integer)" in caplog.text
