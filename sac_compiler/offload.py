"""Offloading saved values to pinned host memory through PyTorch's own partitioner.

PyTorch's min-cut partitioner can offload saved activations (``torch._functorch._activation_offloading``):
with ``torch._functorch.config.enable_activation_offloading`` it takes every forward value whose
node carries ``meta["should_offload"] = True`` and that it saves for backward, inserts an
``ao.offload`` (copy to pinned host memory) after the value's last forward read and an
``ao.reload`` before its first backward read, and with ``activation_offload_separate_stream`` runs
the copies on a transfer stream of their own. ``activation_offload_sink_wait`` moves the forward's
waits for those copies to the end of forward; ``activation_reload_prefetch`` moves each reload
earlier, by its own estimate of the copy time (``activation_offload_cpu_gpu_bw``) against each op's
time, which it measures on the GPU while partitioning.

``CheckpointPolicy.MUST_CPU_OFFLOAD`` names the choice, but the partitioner of torch 2.13 does not
read it (a node tagged so is saved like any other; see tests/test_offload.py): the tag it acts on
is ``should_offload`` on a value it saves, which ``tag_offload`` writes next to ``MUST_SAVE``.

This module builds the offload program's problem from an annotated joint graph
(``build_offload_problem``: the compute timeline from the runtime annotations, the link from the
device spec's ``host_link_bandwidth``, the values PyTorch's partitioner can offload), solves it
(``plan_offload``), and emits a plan (``tag_offload`` and ``offload_partitioning``). The backend's
planning path does not take it yet (``offload_note`` says so in the report).
"""

from __future__ import annotations

import contextlib
import dataclasses
import operator
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from sac_compiler.passes.record import Side, get_record

# What the partitioner's offload pass needs besides the tag: the switch and the transfer stream
# (without it the copies are synchronous and hide behind nothing).
_REQUIRED_CONFIG = ("enable_activation_offloading", "activation_offload_separate_stream")


def offload_support() -> str | None:
    """None when the installed torch offloads through its partitioner; else why it cannot (a
    sentence for the report)."""
    version = torch.__version__
    if not hasattr(CheckpointPolicy, "MUST_CPU_OFFLOAD"):
        return (f"torch {version} has no CheckpointPolicy.MUST_CPU_OFFLOAD: its partitioner cannot offload "
                "activations (torch 2.11 or later can)")
    from torch._functorch import config as functorch_config

    missing = [name for name in _REQUIRED_CONFIG if not hasattr(functorch_config, name)]
    if missing:
        return f"torch {version}'s torch._functorch.config has no {', '.join(missing)}: offload is not offered"
    try:
        from torch._functorch._activation_offloading import activation_offloading
    except ImportError:
        return f"torch {version} has no torch._functorch._activation_offloading: offload is not offered"
    if not hasattr(activation_offloading, "choose_offload_sets"):
        return (f"torch {version}'s activation offloading has no choose_offload_sets (the pass that reads "
                "should_offload): offload is not offered")
    return None


def partitioner_config(bandwidth: float, prefetch: bool | None = None, cuda: bool | None = None) -> dict[str, Any]:
    """The ``torch._functorch.config`` entries a compile with offloaded values needs, as the
    installed torch names them (an entry it lacks is left out).

    ``bandwidth``: the link's bytes/s, for the prefetch's copy-time estimate (PyTorch takes GiB/s).
    ``cuda``: the graph runs on a CUDA device (None: where CUDA is available). The copies get a
    stream of their own, except for a CPU graph on a machine with CUDA: PyTorch's stream pass asks
    the accelerator for the graph device's stream, which the CPU is not. ``prefetch``: move reloads
    earlier with PyTorch's prefetch, which measures each backward op on the GPU while partitioning;
    None: as ``cuda``."""
    from torch._functorch import config as functorch_config

    if cuda is None:
        cuda = torch.cuda.is_available()
    if prefetch is None:
        prefetch = cuda
    wanted = {
        "enable_activation_offloading": True,
        "activation_offload_separate_stream": bool(cuda) or not torch.cuda.is_available(),
        # the forward waits for its copies at its end, where the offload program expects it to
        "activation_offload_sink_wait": True,
        "activation_reload_prefetch": bool(prefetch),
        "activation_offload_cpu_gpu_bw": bandwidth / 2**30,
    }
    return {name: value for name, value in wanted.items() if hasattr(functorch_config, name)}


@contextlib.contextmanager
def offload_partitioning(bandwidth: float, prefetch: bool | None = None,
                         cuda: bool | None = None) -> Iterator[dict[str, Any]]:
    """Within the block, PyTorch's partitioner offloads the values ``tag_offload`` tagged
    (``partitioner_config``'s arguments). Raises RuntimeError (with ``offload_support``'s reason)
    where the installed torch cannot."""
    reason = offload_support()
    if reason is not None:
        raise RuntimeError(reason)
    from torch._functorch import config as functorch_config

    entries = partitioner_config(bandwidth, prefetch, cuda)
    with functorch_config.patch(**entries):
        yield entries


def offload_refusal(node: fx.Node, forward_outputs: set[fx.Node]) -> str | None:
    """Why PyTorch's partitioner would not offload this value (its ``can_offload`` rules), or None."""
    if node.op != "call_function" or get_record(node).side != Side.FORWARD:
        return "not a forward op"
    if node in forward_outputs:
        return "an output of the forward"
    if node.target is operator.getitem:
        return "an output of a multi-output op"
    if get_record(node).storage_owner not in (None, node.name):
        return "a view"
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return "not a tensor"
    if not val.is_contiguous():
        return "not contiguous"
    return None


def tag_offload(gm: fx.GraphModule, offload: Iterable[str], num_fwd_outputs: int) -> int:
    """Tag the values to offload for PyTorch's partitioner: ``MUST_SAVE`` (the cut saves them) and
    ``meta["should_offload"]`` (its offload pass copies them out and back). Other tags are left as
    they are (``plan_graph.tag_graph`` writes the keep / recompute plan). Returns how many were tagged.

    Raises ValueError for a name that is no value the partitioner can offload (``offload_refusal``;
    ``num_fwd_outputs``: how many of the joint graph's outputs are the model's)."""
    from sac_compiler.plan_graph import _owner_map

    wanted = set(offload)
    if not wanted:
        return 0
    owner = _owner_map(gm)
    out = next(iter(gm.graph.find_nodes(op="output")))
    outputs = {owner.get(a, a) for a in out.args[0][:num_fwd_outputs] if isinstance(a, fx.Node)}
    by_name = {n.name: n for n in gm.graph.nodes}
    unknown = sorted(wanted - set(by_name))
    if unknown:
        raise ValueError(f"cannot offload {unknown[:8]}: not in the graph")
    for name in sorted(wanted):
        node = by_name[name]
        reason = offload_refusal(node, outputs)
        if reason is not None:
            raise ValueError(f"cannot offload {name}: {reason}")
        node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
        node.meta["should_offload"] = True
    return len(wanted)


def partition_with_offload(gm: fx.GraphModule, joint_inputs: Any, num_fwd_outputs: int, recompute: Iterable[str],
                           offload: Iterable[str], bandwidth: float, prefetch: bool | None = None,
                           reload_before: Mapping[str, str] | None = None,
                           ) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Tag a plan on an annotated joint graph (``plan_graph.tag_graph``, then ``tag_offload``) and
    split it with PyTorch's min-cut partitioner under ``offload_partitioning``: the forward graph
    copies the offloaded values to the host, the backward graph reloads them.

    ``reload_before`` (``reload_anchors``): start each reload where the plan starts it, before the
    named backward op, instead of by PyTorch's prefetch (which is then off)."""
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    from sac_compiler.plan_graph import tag_graph

    tag_graph(gm, recompute)
    tag_offload(gm, offload, num_fwd_outputs)
    if reload_before:
        prefetch = False
    cuda = any(isinstance(x, torch.Tensor) and x.device.type == "cuda" for x in joint_inputs)
    with offload_partitioning(bandwidth, prefetch, cuda):
        fw, bw = min_cut_rematerialization_partition(gm, joint_inputs, num_fwd_outputs=num_fwd_outputs)
    if reload_before:
        place_reloads(bw, reload_before)
    return fw, bw


def reload_anchors(analysis: Any, offload: Mapping[str, int]) -> dict[str, str]:
    """For a plan's reload starts (value -> step), the backward op each reload is issued before: the
    op of that step in the joint graph (step ``t >= 1`` is the backward's ``t``-th op)."""
    nodes = list(analysis.graph.gm.graph.nodes)
    fb = analysis.memory.first_backward
    return {name: nodes[fb + step - 1].name for name, step in offload.items() if 0 < fb + step - 1 < len(nodes)}


def place_reloads(bw: fx.GraphModule, reload_before: Mapping[str, str]) -> dict[str, str]:
    """Move each offloaded value's reload (``ao.reload``) in the partitioned backward graph to just
    before the op named in ``reload_before`` (its wait stays before the first read). A reload is left
    where it is when that op is not in the graph or not before the reload's wait. Returns the moves
    made (value -> op). Only the ``ao`` ops' layout (torch 2.13) is moved; the older one
    (``prims.device_put`` between stream ops) keeps PyTorch's placement."""
    graph = bw.graph
    position = {n: i for i, n in enumerate(graph.nodes)}
    by_name = {n.name: n for n in graph.nodes}
    reload_op = getattr(getattr(torch.ops, "ao", None), "reload", None)
    moved: dict[str, str] = {}
    reloads = [n for n in graph.nodes if reload_op is not None and n.target is reload_op.default]
    for node in reloads:  # in the order of their first reads, as they were inserted
        source = node.args[0]
        name = source.name[len(_CPU_OFFLOAD):] if source.name.startswith(_CPU_OFFLOAD) else source.name
        anchor = by_name.get(reload_before.get(name, ""))
        wait = next((u for u in node.users if u.target is torch.ops.ao.wait_tensor.default), None)
        if anchor is None or anchor.op != "call_function" or wait is None or position[anchor] > position[wait]:
            continue
        anchor.prepend(node)
        moved[name] = anchor.name
    graph.lint()
    bw.recompile()
    return moved


# PyTorch's name for a value's host copy (torch._functorch._activation_offloading's CPU_OFFLOAD_PREFIX)
_CPU_OFFLOAD = "cpu_offload_"


def build_offload_problem(analysis: Any, problem: Any, bandwidth: float | None = None,
                          host_budget: int | None = None, min_bytes: int = 0) -> Any:
    """The offload program's problem for an annotated joint graph and its savings problem
    (``plan_graph.build_plan_problem``).

    The compute timeline is the runtime annotation of each op: a forward value may start its copy
    to the host once its last forward reader has run; backward step ``t`` takes its op's time. The
    values offered are those PyTorch's partitioner can offload (``offload_refusal``) that backward
    reads, of at least ``min_bytes``. ``bandwidth`` defaults to the device spec's
    ``host_link_bandwidth``."""
    from sac_compiler.plan_graph import _owner_map
    from sac_compiler.solvers.offload_plan import OffloadProblem

    if bandwidth is None:
        bandwidth = analysis.device_spec.host_link_bandwidth
        if bandwidth is None:
            raise ValueError(f"device spec {analysis.device_spec.name} has no host_link_bandwidth; give bandwidth=")
    gm = analysis.graph.gm
    nodes = list(gm.graph.nodes)
    fb = analysis.memory.first_backward
    owner = _owner_map(gm)
    elapsed = 0.0
    done_at: dict[fx.Node, float] = {}  # forward time at which each forward op has run
    for node in nodes[:fb]:
        if node.op == "call_function":
            elapsed += get_record(node).runtime_ms or 0.0
        done_at[node] = elapsed
    forward_ms = elapsed
    last_read: dict[fx.Node, float] = {}
    for node in nodes[:fb]:
        if node.op != "call_function":
            continue
        last_read.setdefault(owner.get(node, node), done_at[node])
        for arg in node.all_input_nodes:
            base = owner.get(arg, arg)
            last_read[base] = max(last_read.get(base, 0.0), done_at[node])
    steps = len(problem.baseline)
    step_ms = [0.0] * steps
    for t in range(1, steps):
        index = fb + t - 1
        if index < len(nodes) and nodes[index].op == "call_function":
            step_ms[t] = get_record(nodes[index]).runtime_ms or 0.0
    out = next(iter(gm.graph.find_nodes(op="output")))
    outputs = {owner.get(a, a) for a in out.args[0][: analysis.graph.num_fwd_outputs] if isinstance(a, fx.Node)}
    by_name = {n.name: n for n in nodes}
    ready: dict[str, float] = {}
    for c in problem.candidates:
        node = by_name.get(c.name)
        if node is None or c.first_use is None or c.nbytes < max(min_bytes, 1):
            continue
        if offload_refusal(node, outputs) is not None:
            continue
        ready[c.name] = last_read.get(node, done_at.get(node, forward_ms))
    # step 0 of the savings problem is the forward's peak or its end, whichever is higher; offloaded
    # values are gone only at the end (after the forward's waits for their copies): split the two
    sim = analysis.memory
    end = sim.end_of_forward_bytes
    inside = max(sim.step_peaks[:fb], default=0)
    if problem.baseline and inside > end and problem.baseline[0] == max(end, inside):
        problem = dataclasses.replace(problem, baseline=(end, *problem.baseline[1:]))
        forward_peak = inside
    else:
        forward_peak = None
    return OffloadProblem(savings=problem, step_ms=tuple(step_ms), forward_ms=forward_ms, ready_ms=ready,
                          bandwidth=float(bandwidth), host_budget=host_budget, forward_peak=forward_peak)


@dataclass(frozen=True)
class OffloadOutcome:
    """A keep / recompute / offload plan for one graph, or why there is none (``reason``)."""

    plan: Any = None  # solvers.offload_plan.OffloadPlan
    problem: Any = None  # solvers.offload_plan.OffloadProblem
    reason: str | None = None


def plan_offload(analysis: Any, config: Any, budget: int, options: Any = None,
                 bandwidth: float | None = None) -> OffloadOutcome:
    """Plan keep / recompute / offload for an annotated joint graph under ``budget`` device bytes
    (and ``config.host_memory_budget`` host bytes). Nothing is tagged: see ``tag_offload``.

    Returns an outcome without a plan, and the reason, when offload is off, the installed torch
    cannot offload, or the device spec has no link bandwidth; raises the solver's InfeasibleError
    when no plan fits."""
    from sac_compiler.plan_graph import (
        _solver_options,
        _torch_threads_kept,
        build_plan_problem,
    )
    from sac_compiler.solvers.offload_plan import solve_offload_plan, with_budget

    reason = offload_note(config, analysis, bandwidth)
    if reason is not None and not reason.startswith(_NOT_WIRED):
        return OffloadOutcome(reason=reason)
    problem, _, _ = build_plan_problem(analysis, fused_pointwise=config.compiler == "inductor")
    offload_problem = with_budget(build_offload_problem(analysis, problem, bandwidth, config.host_memory_budget), budget)
    options = options if options is not None else _solver_options(config, analysis)  # the planner's own
    with _torch_threads_kept():  # the solver's OpenMP runtime may reset torch's thread count
        plan = solve_offload_plan(offload_problem, options)
    return OffloadOutcome(plan=plan, problem=offload_problem)


_NOT_WIRED = "offload is planned by sac_compiler.offload.plan_offload"


def offload_note(config: Any, analysis: Any = None, bandwidth: float | None = None) -> str | None:
    """What the report says about offload for this graph: None when ``config.offload`` is off; else
    why it is not offered (the installed torch, the device spec's link), or that the backend's
    planning path does not take it yet."""
    if not getattr(config, "offload", False):
        return None
    reason = offload_support()
    if reason is not None:
        return reason
    spec = getattr(analysis, "device_spec", None)
    if bandwidth is None and spec is not None and spec.host_link_bandwidth is None:
        return f"device spec {spec.name} has no host_link_bandwidth: offload is not offered"
    return f"{_NOT_WIRED}; the backend's planning path does not take it yet"


__all__ = [
    "OffloadOutcome",
    "build_offload_problem",
    "offload_note",
    "offload_partitioning",
    "offload_refusal",
    "offload_support",
    "partition_with_offload",
    "place_reloads",
    "reload_anchors",
    "partitioner_config",
    "plan_offload",
    "tag_offload",
]
