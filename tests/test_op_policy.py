"""The per-module op policy: PyTorch's TestOptimalCheckpointingPolicy, both solvers."""

from __future__ import annotations

import pytest

from sac_compiler.sac_stats import SACStats
from sac_compiler.solvers import (
    InfeasibleError,
    SolverOptions,
    evaluate_policy,
    get_optimal_checkpointing_policy_per_module,
)
from tests.seed_data import seed_sac_stats

SOLVERS = ["cbc", "highs"]


# PyTorch's table, verbatim. Ops 0 (copy_ on its own storage) and 4 (dropout, 0 bytes)
# are always saved, 6 (the view t) never, 7 (relu_) follows its parent 5 (linear).
SEED_TABLE = [
    (0, [1, 0, 0, 0, 1, 0, 0, 0]),
    (100 / 420, [1, 0, 0, 0, 1, 1, 0, 1]),
    (120 / 420, [1, 0, 0, 1, 1, 0, 0, 0]),
    (200 / 420, [1, 0, 1, 0, 1, 1, 0, 1]),
    (220 / 420, [1, 0, 0, 1, 1, 1, 0, 1]),
    (320 / 420, [1, 0, 1, 1, 1, 1, 0, 1]),
    (420 / 420, [1, 1, 1, 1, 1, 1, 0, 1]),
]


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize(("memory_budget", "optimal_soln"), SEED_TABLE)
def test_seed_table(solver: str, memory_budget: float, optimal_soln: list[int]) -> None:
    soln = get_optimal_checkpointing_policy_per_module(
        sac_stats=seed_sac_stats(),
        memory_budget=memory_budget,
        options=SolverOptions(solver=solver),
    )
    assert soln == optimal_soln


def test_default_options_use_cbc_and_reproduce_the_table() -> None:
    for memory_budget, optimal_soln in SEED_TABLE:
        assert get_optimal_checkpointing_policy_per_module(seed_sac_stats(), memory_budget) == (
            optimal_soln
        )


def test_budget_is_inclusive_despite_float_rounding() -> None:
    # 120 / 420 * 420 is 119.99999999999999 in floating point; mm's 120 bytes must fit.
    policy = get_optimal_checkpointing_policy_per_module(seed_sac_stats(), 120 / 420)
    assert evaluate_policy(seed_sac_stats(), policy).saved_memory == 120


@pytest.mark.parametrize("memory_budget", [-0.1, 1.1])
def test_budget_outside_unit_interval(memory_budget: float) -> None:
    with pytest.raises(ValueError, match="memory_budget must be a fraction between 0 and 1"):
        get_optimal_checkpointing_policy_per_module(seed_sac_stats(), memory_budget)


def two_dropouts(force_store_random: bool) -> SACStats:
    """mm, dropout, mm, dropout: 100 bytes each; the mms are the expensive ones."""
    return SACStats(
        func_names=["aten.mm", "aten.native_dropout", "aten.mm", "aten.native_dropout"],
        runtimes=[10, 1, 10, 1],
        memory=[100, 100, 100, 100],
        view_like_ops=[],
        rand_ops=[1, 3],
        saved_autograd_ops=[],
        inplace_ops=[],
        force_store_random=force_store_random,
    )


@pytest.mark.parametrize("solver", SOLVERS)
def test_force_store_random(solver: str) -> None:
    options = SolverOptions(solver=solver)
    # Free choice: the two mms are worth saving, the dropouts are recomputed.
    assert get_optimal_checkpointing_policy_per_module(two_dropouts(False), 0.5, options) == [
        1, 0, 1, 0,
    ]
    # force_store_random: both dropouts are saved and fill the budget.
    assert get_optimal_checkpointing_policy_per_module(two_dropouts(True), 0.5, options) == [
        0, 1, 0, 1,
    ]
    # Random ops are all saved or all recomputed: with room for three ops, a lone
    # dropout cannot join the two mms (and both dropouts plus one mm are worth less).
    assert get_optimal_checkpointing_policy_per_module(two_dropouts(False), 0.75, options) == [
        1, 0, 1, 0,
    ]
    # force_store_random with a budget below the dropouts' 200 bytes is infeasible.
    with pytest.raises(InfeasibleError, match=r"memory_budget >= 0\.5"):
        get_optimal_checkpointing_policy_per_module(two_dropouts(True), 0.25, options)


def test_seed_stats_with_force_store_random_keep_the_table() -> None:
    # The only random op (dropout) costs 0 bytes and is saved anyway.
    for memory_budget, optimal_soln in SEED_TABLE:
        assert (
            get_optimal_checkpointing_policy_per_module(seed_sac_stats(True), memory_budget)
            == optimal_soln
        )


def test_empty_module_and_bad_stats() -> None:
    empty = SACStats([], [], [], [], [], [], [], False)
    assert get_optimal_checkpointing_policy_per_module(empty, 0.5) == []
    bad = seed_sac_stats()
    bad.view_like_ops = [8]
    with pytest.raises(ValueError, match=r"indices \[8\] are outside \[0, 8\)"):
        get_optimal_checkpointing_policy_per_module(bad, 0.5)
