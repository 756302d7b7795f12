"""A long solve says so while it runs (sac_compiler.solvers._mip.solve)."""

from __future__ import annotations

import logging
import random

import pytest

from sac_compiler.solvers import _mip
from sac_compiler.solvers._mip import SolverOptions, new_model, solve, xsum


def _knapsack(n: int, solver: str):
    rng = random.Random(0)
    weights = [rng.randint(10, 1000) for _ in range(n)]
    values = [w + rng.randint(-5, 5) for w in weights]
    options = SolverOptions(solver=solver, mip_gap=0.0, time_limit_s=60)
    model = new_model("knapsack", "MAX", options)
    x = [model.add_var(var_type=_mip.BINARY) for _ in range(n)]
    model += xsum(w * v for w, v in zip(weights, x)) <= sum(weights) // 3
    model.objective = xsum(v * xi for v, xi in zip(values, x))
    return model, options


@pytest.mark.parametrize("solver", ["cbc", "highs"])
def test_a_long_solve_logs_its_progress_until_it_returns(solver, monkeypatch, caplog):
    monkeypatch.setattr(_mip, "PROGRESS_EVERY_S", 0.001)
    model, options = _knapsack(300, solver)
    with caplog.at_level(logging.INFO, logger=_mip.logger.name):
        outcome = solve(model, options)
    assert outcome.status in ("OPTIMAL", "FEASIBLE")
    progress = [r for r in caplog.records if "still solving" in r.getMessage()]
    assert progress, "no progress logged during the solve"
    assert all("knapsack" in r.getMessage() and "of at most 60 s" in r.getMessage() for r in progress)
    # the reporter stops with the solve: nothing more is logged after it returned
    count = len(progress)
    import time

    time.sleep(0.05)
    assert len([r for r in caplog.records if "still solving" in r.getMessage()]) == count


def test_a_short_solve_logs_nothing_at_info(caplog):
    model, options = _knapsack(5, "highs")
    with caplog.at_level(logging.INFO, logger=_mip.logger.name):
        solve(model, options)
    assert not [r for r in caplog.records if "still solving" in r.getMessage()]
