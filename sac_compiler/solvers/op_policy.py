"""Which ops of one module to save under a memory budget: a 0/1 knapsack with ties.

Port of ``get_optimal_checkpointing_policy_per_module`` from PyTorch's
``torch.distributed._tools.sac_ilp`` (itself adapted from xformers), on python-mip.

For ops ``i`` with memory ``mem_i`` and runtime ``t_i`` and a binary ``x_i`` (1: save,
0: recompute)::

    maximize   sum_i t_i x_i                       (= minimize recomputation time)
    subject to x_v = 0                             for view-like ops v
               x_o = x_p                           for in-place op o on parent p != o
               x_o = 1                             for in-place op o that is its own parent
               x_r = 1                             for random ops, if force_store_random
               x_r1 = x_r2 = ...                   for random ops, otherwise
               sum_i mem_i x_i <= budget * sum_i mem_i

Differences from PyTorch: the budget cap is ``floor(budget * total)`` up to a 1e-9
relative tolerance for integral memory (PyTorch's ``ceil`` can admit one byte more
than the budget), and an infeasible instance raises ``InfeasibleError`` explaining why
instead of returning ``[]``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from enum import IntEnum

from sac_compiler.sac_stats import SACStats
from sac_compiler.solvers._mip import (
    BINARY,
    InfeasibleError,
    SolverOptions,
    new_model,
    solve,
    xsum,
)

__all__ = [
    "PolicyCost",
    "SACDecision",
    "evaluate_policy",
    "get_optimal_checkpointing_policy_per_module",
]

# Relative slack on the memory cap, so that e.g. 120/420 * 420 admits 120 bytes.
_BUDGET_RTOL = 1e-9


class SACDecision(IntEnum):
    RECOMPUTE = 0
    SAVE = 1


@dataclass(frozen=True)
class PolicyCost:
    """Cost of a save/recompute policy.

    Attributes:
        saved_memory: bytes of the saved ops.
        saved_runtime: ms of the saved ops (the MILP objective).
        recomputation_time: ms of the recomputed ops.
    """

    saved_memory: float
    saved_runtime: float
    recomputation_time: float


def evaluate_policy(sac_stats: SACStats, policy: list[int]) -> PolicyCost:
    """Memory and runtime of ``policy`` (1: save, 0: recompute), recomputed from scratch."""
    if len(policy) != len(sac_stats.func_names):
        raise ValueError(
            f"policy has {len(policy)} decisions for {len(sac_stats.func_names)} ops"
        )
    saved = [i for i, decision in enumerate(policy) if decision == SACDecision.SAVE]
    saved_runtime = sum(sac_stats.runtimes[i] for i in saved)
    return PolicyCost(
        saved_memory=sum(sac_stats.memory[i] for i in saved),
        saved_runtime=saved_runtime,
        recomputation_time=sum(sac_stats.runtimes) - saved_runtime,
    )


def _check_sac_stats(sac_stats: SACStats) -> None:
    n = len(sac_stats.func_names)
    if len(sac_stats.runtimes) != n or len(sac_stats.memory) != n:
        raise ValueError(
            f"SACStats has {n} func_names, {len(sac_stats.runtimes)} runtimes and "
            f"{len(sac_stats.memory)} memory entries; they must have one entry per op"
        )
    indices = [
        *sac_stats.view_like_ops,
        *sac_stats.rand_ops,
        *(i for pair in sac_stats.inplace_ops for i in pair),
    ]
    bad = sorted({i for i in indices if not 0 <= i < n})
    if bad:
        raise ValueError(f"SACStats op indices {bad} are outside [0, {n})")


def _memory_cap(memory: list[int], memory_budget: float) -> float:
    total = sum(memory)
    cap = memory_budget * total + _BUDGET_RTOL * max(abs(total), 1)
    if all(float(mem).is_integer() for mem in memory):
        return math.floor(cap)
    return cap


def _forced_groups(sac_stats: SACStats) -> tuple[set[int], set[int]]:
    """Ops the constraints force to be saved, and ops forced to be recomputed.

    Follows the equality ties (in-place op = parent, random op = random op) from
    the ops fixed directly: in-place ops on their own parent and, under
    ``force_store_random``, random ops are saved; view-like ops are recomputed.
    """
    parent = list(range(len(sac_stats.func_names)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    ties = [(op, op_parent) for op, op_parent in sac_stats.inplace_ops if op != op_parent]
    if not sac_stats.force_store_random:
        ties += list(itertools.pairwise(sac_stats.rand_ops))
    for i, j in ties:
        parent[find(i)] = find(j)

    saved_roots = {find(op) for op, op_parent in sac_stats.inplace_ops if op == op_parent}
    if sac_stats.force_store_random:
        saved_roots |= {find(i) for i in sac_stats.rand_ops}
    recomputed_roots = {find(i) for i in sac_stats.view_like_ops}
    ops = range(len(parent))
    return (
        {i for i in ops if find(i) in saved_roots},
        {i for i in ops if find(i) in recomputed_roots},
    )


def _explain_infeasible(sac_stats: SACStats, memory_budget: float, cap: float) -> str | None:
    must_save, must_recompute = _forced_groups(sac_stats)
    conflict = sorted(must_save & must_recompute)
    if conflict:
        names = [sac_stats.func_names[i] for i in conflict]
        return (
            f"ops {conflict} ({names}) must be both saved (in-place on their own "
            "parent, or random with force_store_random) and recomputed (tied to a "
            "view-like op); check the SACStats view_like_ops / inplace_ops"
        )
    forced_memory = sum(sac_stats.memory[i] for i in must_save)
    if forced_memory > cap:
        total = sum(sac_stats.memory)
        return (
            f"memory_budget {memory_budget:.4g} allows {cap} of {total} bytes, but ops "
            f"{sorted(must_save)} must be saved and need {forced_memory} bytes; use "
            f"memory_budget >= {forced_memory / total:.4g}"
        )
    return None


def get_optimal_checkpointing_policy_per_module(
    sac_stats: SACStats,
    memory_budget: float,
    options: SolverOptions | None = None,
) -> list[int]:
    """The save (1) / recompute (0) decision per op that minimizes recomputation time.

    Args:
        sac_stats: the module's op statistics.
        memory_budget: the fraction in [0, 1] of the ops' total memory that may be saved.
        options: solver options; ``SolverOptions()`` (CBC) by default.

    Returns:
        One decision per op, in op order.

    Raises:
        ValueError: ``memory_budget`` outside [0, 1] or inconsistent ``sac_stats``.
        InfeasibleError: the ops that must be saved do not fit in the budget.
    """
    if not 0 <= memory_budget <= 1:
        raise ValueError(
            f"memory_budget must be a fraction between 0 and 1, got {memory_budget}"
        )
    _check_sac_stats(sac_stats)
    options = options if options is not None else SolverOptions()
    num_ops = len(sac_stats.func_names)
    if num_ops == 0:
        return []
    max_memory = _memory_cap(sac_stats.memory, memory_budget)
    reason = _explain_infeasible(sac_stats, memory_budget, max_memory)
    if reason is not None:
        raise InfeasibleError(f"no checkpointing policy is feasible: {reason}")

    model = new_model("SAC-per-module", "MAX", options)
    # x[i] == 1: save op i; x[i] == 0: recompute it.
    x = [model.add_var(name=f"x_{i}", var_type=BINARY) for i in range(num_ops)]

    # Random ops are all saved under force_store_random, otherwise all alike
    # (they share the RNG state).
    if sac_stats.force_store_random:
        for i in sac_stats.rand_ops:
            model += x[i] == SACDecision.SAVE.value
    else:
        for i1, i2 in itertools.pairwise(sac_stats.rand_ops):
            model += x[i1] == x[i2]

    # View-like ops are always recomputed.
    for i in sac_stats.view_like_ops:
        model += x[i] == SACDecision.RECOMPUTE.value

    # In-place ops follow their parent; one that is its own parent is saved.
    for op, op_parent in sac_stats.inplace_ops:
        if op != op_parent:
            model += x[op] == x[op_parent]
        else:
            model += x[op] == SACDecision.SAVE.value

    # Saved memory stays within the budget.
    model += xsum(sac_stats.memory[i] * x[i] for i in range(num_ops)) <= max_memory

    # Maximize the runtime of saved ops, i.e. minimize recomputation time.
    model.objective = xsum(sac_stats.runtimes[i] * x[i] for i in range(num_ops))

    solve(model, options)
    policy = [round(x[i].x) for i in range(num_ops)]
    cost = evaluate_policy(sac_stats, policy)
    assert cost.saved_memory <= max_memory, (
        f"solver returned a policy saving {cost.saved_memory} > {max_memory} bytes"
    )
    return policy
