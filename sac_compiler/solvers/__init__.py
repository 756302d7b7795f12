"""Torch-free MILP solvers for selective activation checkpointing.

* ``get_optimal_checkpointing_policy_per_module``: which ops of one module to save
  under a fraction of its memory (``op_policy``).
* ``sac_milp``: which modules to checkpoint, and how much of each to discard, under a
  memory budget in GiB (``sac_milp``).

Both run on python-mip (CBC by default, HiGHS with ``SolverOptions(solver="highs")``).
"""

from sac_compiler.solvers._mip import (
    InfeasibleError,
    NoSolutionError,
    SolveOutcome,
    SolverError,
    SolverOptions,
)
from sac_compiler.solvers.op_policy import (
    PolicyCost,
    SACDecision,
    evaluate_policy,
    get_optimal_checkpointing_policy_per_module,
)
from sac_compiler.solvers.sac_milp import sac_milp

__all__ = [
    "InfeasibleError",
    "NoSolutionError",
    "PolicyCost",
    "SACDecision",
    "SolveOutcome",
    "SolverError",
    "SolverOptions",
    "evaluate_policy",
    "get_optimal_checkpointing_policy_per_module",
    "sac_milp",
]
