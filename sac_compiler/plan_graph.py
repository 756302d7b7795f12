"""The backend's work on one joint graph: annotate it, report it, and (with a budget) plan it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from sac_compiler.capture import JointGraph, attach_capture_info, describe_inputs
from sac_compiler.config import SACConfig

log = logging.getLogger(__name__)


@dataclass
class GraphPlanResult:
    """What the backend decided for one graph, and what the partitioner then did."""

    analysis: Any
    saved_by_partition: list[str] = field(default_factory=list)
    recomputed_by_partition: list[str] = field(default_factory=list)

    def check_partition(self, fw: fx.GraphModule, bw: fx.GraphModule) -> None:
        """Record which forward values the partitioned forward graph actually saves for backward."""
        out = next(iter(fw.graph.find_nodes(op="output")))
        num_fwd = self.analysis.graph.num_fwd_outputs
        self.saved_by_partition = [n.name for n in out.args[0][num_fwd:] if isinstance(n, fx.Node)]
        fw_names = {n.name for n in fw.graph.nodes if n.op == "call_function"}
        self.recomputed_by_partition = [n.name for n in bw.graph.nodes if n.op == "call_function" and n.name in fw_names]


def plan_and_tag(
    gm: fx.GraphModule, num_fwd_outputs: int, source_gm: fx.GraphModule, root_name: str, config: SACConfig
) -> GraphPlanResult | None:
    """Annotate the joint graph when a budget or a report asks for it; None when neither does."""
    if config.memory_budget is None and not config.report:
        return None
    from sac_compiler.analysis import analyze
    from sac_compiler.device_specs import get_device_spec  # noqa: F401 - resolves lazily in analyze

    import torch

    devices = [n.meta["val"].device for n in gm.graph.find_nodes(op="placeholder")
               if isinstance(n.meta.get("val"), torch.Tensor)]
    graph = JointGraph(
        gm=gm,
        num_fwd_outputs=num_fwd_outputs,
        inputs=describe_inputs(source_gm, gm, root_name),
        root_name=root_name,
        target_device=devices[0] if devices else torch.device("cpu"),
        has_backward=True,
        source_gm=source_gm,
    )
    attach_capture_info(graph)
    analysis = analyze(
        graph,
        device=config.device,
        estimate_mode=config.estimate_mode,
        optimizer=config.optimizer,
        optimizer_state_bytes=config.optimizer_state_bytes,
        fused_pointwise=config.compiler == "inductor",
    )
    if config.memory_budget is not None:
        raise NotImplementedError(
            "memory_budget planning is not available in this version of sac-compiler; "
            "leave memory_budget unset (the backend then partitions as torch.compile does)"
        )
    if config.report:
        from sac_compiler.report import write_report

        write_report(analysis, config.report)
    return GraphPlanResult(analysis)
