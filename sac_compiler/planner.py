"""The offline planner: the plan ``backend="sac"`` would make, without compiling or running anything.

    from sac_compiler.planner import budget_range, plan
    from sac_compiler.report import format_plan

    budgets = budget_range(model, tokens, device="H100-SXM")  # a BudgetRange, in bytes
    budgets.smallest_feasible_peak, budgets.no_recompute_peak
    result = plan(model, tokens, memory_budget="6GiB", device="H100-SXM")
    print(format_plan(result))

The model is captured on fake tensors (see ``capture_joint``), so a model of any size can be planned
on a laptop: build it on the ``meta`` device.

For N GPUs under FSDP2 (``fully_shard``), pass ``world_size=N``: without a process group the model is
traced under a fake one of N ranks (torch.distributed's ``fake`` backend) and planned as rank 0
plans it, each parameter and gradient counted as this rank's shard (see
:mod:`sac_compiler.distributed`). Give the block that each ``torch.compile`` call compiles (a
transformer block, as torchtitan compiles them): a model already wrapped with ``fully_shard``
under such a group is planned with FSDP2's own shards; an unwrapped one as ``fully_shard`` would
shard it, its neighbouring block taken to be like it (the all-gather FSDP2 prefetches in backward).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from sac_compiler.capture import JointGraph, attach_capture_info, capture_joint
from sac_compiler.config import SACConfig
from sac_compiler.distributed import fake_process_group
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


@contextlib.contextmanager
def _ranks(config: SACConfig) -> Iterator[None]:
    """Over several ranks, a fake process group of ``config.world_size`` while the model is traced
    and planned (an initialised group of that size is used as it is)."""
    if (config.world_size or 1) <= 1:
        yield
        return
    with fake_process_group(config.world_size or 1):
        yield


def _capture(model: Any, example_inputs: tuple[Any, ...], target_device: str, config: SACConfig) -> Any:
    return capture_joint(model, *example_inputs, target_device=target_device,
                         decompose=config.compiler == "inductor", world_size=config.world_size or 1, shard_all=True)


def as_partitioned(graph: JointGraph) -> JointGraph:
    """``graph`` (in place) as the backend plans it: with the dead-code removal and merged repeated
    computations PyTorch's partitioner applies before it partitions (``backend.partitioned_graph``),
    so that a joint-graph plan, a budget range or a sweep is of the graph the backend plans."""
    from sac_compiler.backend import partitioned_graph

    if graph.has_backward:
        partitioned_graph(graph.gm)
    return graph


_OFFLOAD_NOT_PARTITIONED = ("offload=True: the offline planner partitions no offload plan (PyTorch's offload pass "
                            "runs on a GPU's graphs); plan it with partition=False or compile it with backend='sac'")


def plan(model: torch.nn.Module, *example_inputs: Any, target_device: str = "cuda", partition: bool = True,
         **options: Any) -> GraphPlanResult:
    """Plan ``model(*example_inputs)`` with the backend's ``options`` (``memory_budget`` required;
    ``world_size=N``: as rank 0 of N under FSDP2, see the module's docstring).

    ``partition``: as the backend plans (:func:`plan_partitioned`): the plan is partitioned by
    PyTorch's partitioner and checked on the partitioned graphs, and planned again lower where they
    peak over the budget; ``result.partitioned`` is their simulated peak. ``False``: the
    joint-graph plan alone (faster; the backend may then plan otherwise)."""
    config = _config(options)
    if config.memory_budget is None:
        raise ValueError("plan() needs memory_budget=...; budget_range() tells which budgets are feasible")
    if partition and config.offload:
        raise ValueError(_OFFLOAD_NOT_PARTITIONED)
    with _ranks(config):
        graph = _capture(model, example_inputs, target_device, config)
        # a graph without backward (nothing requires grad) has no partition to check; the
        # partitioner merges the graph itself, a joint-graph plan needs it merged first
        if partition and graph.has_backward:
            return plan_partitioned(graph, config)
        return plan_joint(as_partitioned(graph), config)


def plan_partitioned(graph: JointGraph, config: SACConfig) -> GraphPlanResult:
    """The backend's plan for a captured joint graph, made as the backend makes it at compile time
    (:class:`sac_compiler.backend.SACPartitioner`): planned on the joint graph, tagged, partitioned
    by PyTorch's min-cut partitioner, the partitioned graphs simulated, and planned again lower
    while they peak over the budget less the planner's margin (or again higher where they leave
    room). The graph is traced on fake tensors of any device and planned for its
    ``target_device``; the graph's nodes are tagged with the plan. Memory the process would hold
    outside the graph on the GPU (``backend.held_outside``: other tensors, library workspaces) is
    not known here: leave room for it in an absolute budget."""
    from torch._guards import TracingContext, detect_fake_mode, tracing

    from sac_compiler.backend import SACPartitioner

    if config.memory_budget is None:
        raise ValueError("plan_partitioned needs memory_budget=...; budget_range() tells which budgets are feasible")
    if config.offload:
        raise ValueError(_OFFLOAD_NOT_PARTITIONED)
    if graph.source_gm is None or not graph.has_backward:
        raise ValueError("plan_partitioned needs a captured training graph (capture_joint with a backward)")
    partitioner = SACPartitioner(config, graph.source_gm)
    partitioner.target_device = graph.target_device
    partitioner.fsdp = graph.fsdp
    # the partitioner samples an RNG state for each recomputed random op on the graph's fake tensors
    fake_mode = detect_fake_mode([n.meta.get("val") for n in graph.gm.graph.find_nodes(op="placeholder")])
    try:
        with tracing(TracingContext(fake_mode)):
            partitioner(graph.gm, [], num_fwd_outputs=graph.num_fwd_outputs)
    finally:
        attach_capture_info(graph)  # the backend's entry takes the capture record off the graph
    result = partitioner.last_result
    assert result is not None  # with a budget the partitioner always plans
    return result


def budget_range(model: torch.nn.Module, *example_inputs: Any, target_device: str = "cuda", **options: Any) -> BudgetRange:
    """The smallest feasible peak, the least budget that plans, and the peak without recomputation, in bytes."""
    config = _config(options)
    with _ranks(config):
        graph = as_partitioned(_capture(model, example_inputs, target_device, config))
        result = plan_joint(graph, config)
        assert result.baseline_peak is not None  # plan_joint sets it on every graph it annotates
        low = smallest_feasible_peak(result.analysis, config)
    return BudgetRange(smallest_feasible_peak=low, no_recompute_peak=result.baseline_peak,
                       smallest_budget=least_budget(result.analysis, config, low))
