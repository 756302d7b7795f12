"""The partitioned graphs in the order Inductor's scheduler runs their kernels.

The partitioned simulation runs a graph's nodes in graph order, with rules for where Inductor
moves work (``recompute_chain_kernel``: a chain of recomputed values rebuilt in one kernel before
its first reader). Inductor's scheduler decides the order itself (its fusion, and in recent
versions its reordering for peak memory), and no fixed rule follows it on every plan. This module
asks Inductor: it lowers a graph on fake tensors up to its scheduler (a post-fusion hook reads the
scheduled nodes and stops the compile: no kernel is generated), takes each scheduled node's FX
origins, and reorders a copy of the graph so that every node runs with its first scheduled
kernel. :func:`simulate_in_inductor_order` simulates the partitioned backward so, without the
ordering rule the schedule replaces.

The schedule is the target device's: Inductor fuses and reorders a graph for CUDA otherwise than
for CPU (its reordering for peak memory can move recomputed matmuls to the start of a CUDA
backward it leaves in order on CPU; docs/results.md), so a graph is lowered on fake tensors of the
device it will run on. Lowering costs about as much as Inductor's own scheduling of the graph; the
backend does it with ``SACConfig.partition_order="inductor"``, and with ``"auto"`` where Inductor
compiles the graphs for a CUDA GPU this process sees.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised by the post-fusion hook once the schedule is read: nothing is generated."""


# the simulation's ordering rule that Inductor's schedule replaces
REPLACED_RULES = ("recompute_chain_kernel",)


def lower_to_schedule(gm: fx.GraphModule, backward: bool, read: Callable[[list[Any]], None],
                      reorder_for_peak_memory: bool = True) -> None:
    """Lower ``gm`` with Inductor up to its scheduler (its placeholders carry fake tensors) and
    call ``read`` with the scheduled nodes, in order, inside Inductor's graph context; nothing is
    generated. ``reorder_for_peak_memory``: Inductor's reordering by its peak estimate is applied
    (as Inductor does by default; the backend compiles with ``SACConfig.reorder_for_peak_memory``).
    Autotuning is off while lowering (``max_autotune`` set globally would benchmark every matmul's
    kernels on the device here, once per check): matmuls lower as the library calls they are by
    default. Raises RuntimeError where the installed torch has no post-fusion hook."""
    from torch._inductor import config
    from torch._inductor.compile_fx import compile_fx_inner

    if not hasattr(config, "_post_fusion_custom_pass"):
        raise RuntimeError(f"torch {torch.__version__}'s Inductor has no _post_fusion_custom_pass: its schedule "
                           "cannot be read; use partition_order='graph'")

    def hook(nodes: list[Any]) -> list[Any]:
        read(_reordered_for_peak_memory(nodes))
        raise _Stop

    # an input nothing reads may come without a value (a replayed record's RNG state: the record
    # keeps the random op itself, not the wrapper that read the state)
    missing = [n.name for n in gm.graph.nodes if n.op == "placeholder" and "val" not in n.meta and n.users]
    if missing:
        raise ValueError(f"input(s) {missing[:3]} of the graph carry no fake value to lower it with")
    inputs = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    # nothing is generated, so nothing is cached: the FX graph cache would hash the config, whose
    # hook (a local function) does not pickle, and warn that it bypasses the cache on every check
    caches = {name: False for name in ("fx_graph_cache", "fx_graph_remote_cache") if hasattr(config, name)}
    with config.patch(_post_fusion_custom_pass=hook, reorder_for_peak_memory=reorder_for_peak_memory,
                      max_autotune=False, max_autotune_gemm=False, **caches):
        try:
            compile_fx_inner(gm, inputs, is_backward=backward)
        except Exception as error:  # noqa: BLE001 - only the hook's own stop is expected
            cause: BaseException | None = error
            while cause is not None and not isinstance(cause, _Stop):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise


def _reordered_for_peak_memory(nodes: list[Any]) -> list[Any]:
    """The fused nodes in the order Inductor runs them: its scheduler reorders them after fusion
    (``torch._inductor.memory.reorder_for_peak_memory``, on by default), after the hook that hands
    them here has run."""
    from torch._inductor import config
    from torch._inductor.virtualized import V

    if not getattr(config, "reorder_for_peak_memory", False):
        return nodes
    from torch._inductor.memory import reorder_for_peak_memory
    from torch.utils._ordered_set import OrderedSet

    scheduler = V.graph.scheduler
    return reorder_for_peak_memory(list(nodes), scheduler.name_to_buf, scheduler.name_to_fused_node,
                                   OrderedSet(V.graph.graph_inputs.keys()), OrderedSet(V.graph.get_output_names()))


def node_origins(node: Any) -> list[str]:
    """The FX node names one scheduled node of Inductor's comes from."""
    return [o.name for part in node.get_nodes() if part.node is not None for o in getattr(part.node, "origins", ())]


def scheduled_origins(gm: fx.GraphModule, backward: bool, reorder_for_peak_memory: bool = True) -> list[list[str]]:
    """The FX node names behind each node Inductor's scheduler runs, in its order (the graph's
    placeholders carry fake tensors)."""
    found: list[list[str]] = []
    lower_to_schedule(gm, backward, lambda nodes: found.extend(node_origins(node) for node in nodes),
                      reorder_for_peak_memory)
    return found


def schedule_priority(gm: fx.GraphModule, scheduled: list[list[str]]) -> dict[str, int]:
    """Each node's place in the schedule: the first scheduled node it is an origin of; a node no
    kernel comes from (a view, a getitem) takes its earliest user's place."""
    first: dict[str, int] = {}
    for i, origins in enumerate(scheduled):
        for name in origins:
            first.setdefault(name, i)
    late = len(scheduled) + 1
    for node in reversed(list(gm.graph.nodes)):
        if node.name not in first:
            first[node.name] = min((first[u.name] for u in node.users if u.name in first), default=late)
    return first


def in_inductor_order(gm: fx.GraphModule, backward: bool, scheduled: list[list[str]] | None = None,
                      reorder_for_peak_memory: bool = True) -> fx.GraphModule:
    """A copy of ``gm`` whose nodes run in the order Inductor schedules their kernels
    (placeholders first, the output last, every node after its inputs)."""
    if scheduled is None:
        scheduled = scheduled_origins(gm, backward, reorder_for_peak_memory)
    priority = schedule_priority(gm, scheduled)
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    waiting = {n: len(set(n.all_input_nodes)) for n in nodes}
    last = len(scheduled) + 2

    def key(node: fx.Node) -> tuple[int, int]:
        rank = -1 if node.op == "placeholder" else last if node.op == "output" else priority[node.name]
        return rank, index[node]

    ready = [(key(n), index[n], n) for n in nodes if waiting[n] == 0]
    heapq.heapify(ready)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    while ready:
        _, _, node = heapq.heappop(ready)
        env[node] = graph.node_copy(node, lambda n: env[n])
        for user in node.users:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, (key(user), index[user], user))
    if len(env) != len(nodes):
        raise RuntimeError("the graph has a cycle: it cannot be reordered")
    return fx.GraphModule(gm, graph)


def lowers_for_cuda(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` can be lowered here as Inductor compiles it for a CUDA GPU: its tensors are
    fake tensors on a CUDA device, this process sees a GPU, and the installed torch has the hook
    the schedule is read with."""
    from torch._inductor import config

    if not hasattr(config, "_post_fusion_custom_pass") or not torch.cuda.is_available():
        return False
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    devices = {v.device.type for v in vals if isinstance(v, torch.Tensor)}
    return devices == {"cuda"}


class ScheduleRecorder:
    """Inductor's post-fusion hook for the backend's own compile of a graph: it reads the schedule
    of each backward Inductor compiles (the FX origins of its scheduled nodes, in the order
    Inductor runs them, as :func:`lower_to_schedule` reads them) and keeps the graph Inductor
    lowered (after its post-grad passes), and changes nothing. The check in Inductor's order then
    costs no lowering of its own (``SACConfig.partition_order="auto"``).

    Inductor's FX graph cache key pickles the config, hooks included: a recorder pickles as an
    empty one (a stable key). A compile the cache serves schedules nothing, and records nothing."""

    def __init__(self) -> None:
        self.active = False  # set where a plan is left for this compile's schedule to check
        self.found: list[tuple[fx.GraphModule, list[list[str]]]] = []

    def __call__(self, nodes: list[Any]) -> list[Any]:
        from torch._inductor.virtualized import V

        if self.active and getattr(V.graph, "is_backward", False):
            self.found.append((V.graph.module, [node_origins(node) for node in _reordered_for_peak_memory(nodes)]))
        return nodes

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (ScheduleRecorder, ())


def simulate_in_inductor_order(fw: fx.GraphModule, bw: fx.GraphModule, reorder_for_peak_memory: bool = True,
                               scheduled: list[list[str]] | None = None, **kwargs: Any) -> Any:
    """``simulate_partitioned`` of the forward in its own order and the backward in the order
    Inductor schedules it, without the ordering rule that order replaces (``REPLACED_RULES``).
    ``scheduled``: the schedule of ``bw`` already read (a :class:`ScheduleRecorder`'s, ``bw`` the
    graph it lowered); None: ``bw`` is lowered here to read it.

    The forward keeps its order: Inductor fuses a forward's loss (its log-softmax over the
    vocabulary and the loss) into reductions whose intermediates never exist, which the
    simulation's rules follow in graph order and not in the scheduled one (simulated in the
    scheduled order the recorded forwards came out far over their measured peaks; docs/results.md).
    Where the backward cannot be lowered (an Inductor error), it is
    simulated in graph order with its rules, and a warning says why."""
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensorMode

    from sac_compiler.passes.annotate_memory import simulate_partitioned
    from sac_compiler.passes.memory_model import rules_disabled

    vals = [n.meta.get("val") for n in bw.graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode(vals) or FakeTensorMode(allow_non_fake_inputs=True)
    try:
        with mode:
            ordered_bw = in_inductor_order(bw, backward=True, scheduled=scheduled,
                                           reorder_for_peak_memory=reorder_for_peak_memory)
    except Exception as error:  # noqa: BLE001 - the check goes on in graph order, and says so
        log.warning("sac: Inductor's schedule of the backward could not be read (%s: %s); its peak is simulated "
                    "in graph order", type(error).__name__, str(error).splitlines()[0][:200] if str(error) else "")
        return simulate_partitioned(fw, bw, **kwargs)
    with rules_disabled(*REPLACED_RULES):
        return simulate_partitioned(fw, ordered_bw, **kwargs)


__all__ = ["REPLACED_RULES", "ScheduleRecorder", "in_inductor_order", "lower_to_schedule", "lowers_for_cuda",
           "node_origins", "schedule_priority", "scheduled_origins", "simulate_in_inductor_order"]
