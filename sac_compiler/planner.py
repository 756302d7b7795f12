"""The offline planner: the plan ``backend="sac"`` would make, without compiling or running anything.

    from sac_compiler.planner import budget_range, plan
    from sac_compiler.report import format_plan

    budgets = budget_range(model, tokens, device="H100-SXM")  # a BudgetRange, in bytes
    budgets.smallest_feasible_peak, budgets.no_recompute_peak
    result = plan(model, tokens, memory_budget="6GiB", device="H100-SXM")
    print(format_plan(result))

The model is captured on fake tensors (see ``capture_joint``), so a model of any size can be planned
on a laptop: build it on the ``meta`` device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sac_compiler.capture import capture_joint
from sac_compiler.config import SACConfig
from sac_compiler.plan_graph import (
    GraphPlanResult,
    least_budget,
    plan_joint,
    smallest_feasible_peak,
)


@dataclass(frozen=True)
class BudgetRange:
    """The budgets that make sense for one model and input: from the lowest reachable peak to no recompute."""

    smallest_feasible_peak: int
    no_recompute_peak: int
    # the least absolute memory_budget that plans: the smallest feasible peak, plus under Inductor
    # the margin the planner keeps for its simulation's error (a fraction of 0.0 needs no margin)
    smallest_budget: int


def _config(options: dict[str, Any]) -> SACConfig:
    return SACConfig.from_options(options)


def plan(model: torch.nn.Module, *example_inputs: Any, target_device: str = "cuda", **options: Any) -> GraphPlanResult:
    """Plan ``model(*example_inputs)`` with the backend's ``options`` (``memory_budget`` required)."""
    config = _config(options)
    if config.memory_budget is None:
        raise ValueError("plan() needs memory_budget=...; budget_range() tells which budgets are feasible")
    graph = capture_joint(model, *example_inputs, target_device=target_device,
                          decompose=config.compiler == "inductor")
    return plan_joint(graph, config)


def budget_range(model: torch.nn.Module, *example_inputs: Any, target_device: str = "cuda", **options: Any) -> BudgetRange:
    """The smallest feasible peak, the least budget that plans, and the peak without recomputation, in bytes."""
    config = _config(options)
    graph = capture_joint(model, *example_inputs, target_device=target_device,
                          decompose=config.compiler == "inductor")
    result = plan_joint(graph, config)
    assert result.baseline_peak is not None  # plan_joint sets it on every graph it annotates
    low = smallest_feasible_peak(result.analysis, config)
    return BudgetRange(smallest_feasible_peak=low, no_recompute_peak=result.baseline_peak,
                       smallest_budget=least_budget(result.analysis, config, low))
