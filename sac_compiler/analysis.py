"""Run the annotation passes over a captured graph: the one place that knows their order."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from sac_compiler.capture import JointGraph
from sac_compiler.device_specs import DeviceSpec, get_device_spec
from sac_compiler.passes.annotate_memory import MemorySimulation, annotate_memory
from sac_compiler.passes.annotate_modules import ModuleOrders, annotate_modules
from sac_compiler.passes.annotate_ops import annotate_ops
from sac_compiler.passes.annotate_runtime import annotate_runtime

log = logging.getLogger(__name__)

DEFAULT_CPU_SPEC = "H100-SXM"


def resolve_device_spec(device: str | DeviceSpec = "auto") -> DeviceSpec:
    """A spec by name; ``"auto"`` matches the visible GPU, or falls back to H100-SXM without CUDA."""
    if isinstance(device, DeviceSpec):
        return device
    if device == "auto" and not torch.cuda.is_available():
        log.info("no CUDA device: costs use the %s spec; pass device=<spec name> to choose another", DEFAULT_CPU_SPEC)
        return get_device_spec(DEFAULT_CPU_SPEC)
    return get_device_spec(device)


@dataclass(frozen=True)
class Analysis:
    graph: JointGraph
    orders: ModuleOrders
    inplace_parents: dict[str, str]
    memory: MemorySimulation
    runtime_ms: float
    device_spec: DeviceSpec
    # memory counted outside the graph while it runs but freed before the optimizer step (see
    # annotate_memory): every simulation of the graph's plans counts it so
    freed_before_optimizer: int = 0
    # what the planner's searches of this graph found that a later plan of it reuses (the lowest-peak
    # search: plan_graph._LowestMemo), whatever the budget: the backend plans one graph again for
    # lower targets, and a plan that finds none is dropped with its result
    searches: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


def analyze(
    graph: JointGraph,
    device: str | DeviceSpec = "auto",
    estimate_mode: str = "cost-model",
    optimizer: torch.optim.Optimizer | None = None,
    optimizer_state_bytes: int | None = None,
    fused_pointwise: bool = False,
    recomputed: set[str] | None = None,
    saved_for_backward: bool = True,
    hold_outputs: bool = False,
    loss_memory: int = 0,
    freed_before_optimizer: int = 0,
    gradients_held: int = 0,
) -> Analysis:
    """Annotate ``graph.gm`` with every pass; return their graph-level results.

    ``saved_for_backward=False``: leave out what PyTorch's default partition saves (the
    statistics need it; the backend's planning does not). ``hold_outputs``: the caller keeps the
    forward outputs until backward, ``loss_memory``: what its loss holds between forward and
    backward, ``freed_before_optimizer``: memory held outside the graph that the optimizer step
    no longer sees, ``gradients_held``: gradients other parameters have when the graph's backward
    starts (see ``annotate_memory``)."""
    spec = resolve_device_spec(device)
    orders = annotate_modules(graph.gm, graph.root_name)
    parents = annotate_ops(graph.gm, graph.source_gm, graph.num_fwd_outputs if graph.has_backward else None,
                           saved_for_backward=saved_for_backward)
    memory = annotate_memory(
        graph.gm,
        target_device=graph.target_device,
        num_fwd_outputs=graph.num_fwd_outputs,
        optimizer=optimizer,
        optimizer_state_bytes=optimizer_state_bytes,
        fused_pointwise=fused_pointwise,
        recomputed=recomputed,
        hold_outputs=hold_outputs,
        loss_memory=loss_memory,
        sharding=graph.sharding(),
        freed_before_optimizer=freed_before_optimizer,
        gradients_held=gradients_held,
    )
    runtime = annotate_runtime(graph.gm, spec, mode=estimate_mode)
    return Analysis(graph, orders, parents, memory, runtime, spec, freed_before_optimizer)


def summary_rows(analysis: Analysis) -> list[tuple[str, str]]:
    mem = analysis.memory
    gib = 2**30
    return [
        ("device spec", analysis.device_spec.name),
        ("graph nodes", str(len(mem.timeline))),  # as analysed: the partitioner may rewrite the graph since
        ("modules", str(len(analysis.orders.fw_pre_order))),
        ("predicted peak", f"{mem.peak_bytes / gib:.3f} GiB (at {mem.peak_node})"),
        ("live at end of forward", f"{mem.end_of_forward_bytes / gib:.3f} GiB"),
        ("static (params, buffers, inputs, optimizer)", f"{mem.static_bytes / gib:.3f} GiB"),
        ("estimated step time", f"{analysis.runtime_ms:.3f} ms"),
    ]
