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
(``plan_offload``, and in the backend ``plan_with_offload``, checked on the exact simulation),
and emits a plan (``tag_offload`` and ``offload_partitioning``). With ``offload=True`` the
backend takes such a plan where it is faster than recomputation alone or where recomputation
alone cannot meet the budget; ``offload_note`` says why offload is not offered where it is not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
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


def partitioner_config(bandwidth: float, prefetch: bool | None = None, cuda: bool | None = None,
                       sink_wait: bool = True) -> dict[str, Any]:
    """The ``torch._functorch.config`` entries a compile with offloaded values needs, as the
    installed torch names them (an entry it lacks is left out).

    ``bandwidth``: the link's bytes/s, for the prefetch's copy-time estimate (PyTorch takes GiB/s).
    ``cuda``: the graph runs on a CUDA device (None: where CUDA is available). The copies get a
    stream of their own, except for a CPU graph where torch has an accelerator (a CUDA build, a
    GPU present or not): PyTorch's stream pass asks the accelerator for the graph device's stream,
    which the CPU is not. ``prefetch``: move reloads
    earlier with PyTorch's prefetch, which measures each backward op on the GPU while partitioning;
    None: as ``cuda``. ``sink_wait``: the forward waits for its copies at its end (False: each
    right after it is issued, ``forward_copies_synchronous``)."""
    from torch._functorch import config as functorch_config

    if cuda is None:
        cuda = torch.cuda.is_available()
    if prefetch is None:
        prefetch = cuda
    wanted = {
        "enable_activation_offloading": True,
        "activation_offload_separate_stream": bool(cuda) or torch.accelerator.current_accelerator() is None,
        # the forward waits for its copies at its end (the program counts them there), then
        # place_offload_waits moves each wait to where its copy is expected to be done; or, not
        # sunk, right after each copy (forward_copies_synchronous)
        "activation_offload_sink_wait": bool(sink_wait),
        "activation_reload_prefetch": bool(prefetch),
        "activation_offload_cpu_gpu_bw": bandwidth / 2**30,
    }
    return {name: value for name, value in wanted.items() if hasattr(functorch_config, name)}


@contextlib.contextmanager
def offload_partitioning(bandwidth: float, prefetch: bool | None = None,
                         cuda: bool | None = None, sink_wait: bool = True) -> Iterator[dict[str, Any]]:
    """Within the block, PyTorch's partitioner offloads the values ``tag_offload`` tagged
    (``partitioner_config``'s arguments). Raises RuntimeError (with ``offload_support``'s reason)
    where the installed torch cannot."""
    reason = offload_support()
    if reason is not None:
        raise RuntimeError(reason)
    from torch._functorch import config as functorch_config

    mend_stream_op_fakes()
    entries = partitioner_config(bandwidth, prefetch, cuda, sink_wait)
    with functorch_config.patch(**entries):
        yield entries


def mend_stream_op_fakes() -> bool:
    """torch 2.11 registers the fake function of ``streams::record_stream`` (the op its offload
    pass records a copied value's stream with) with another op's arguments, ``(src_stream_index,
    wait_event_index, to_dealloc)`` for ``(tensor, stream_index)``: Inductor, which runs the
    partitioned graphs on fake tensors, then fails on the offload pass's copies ("missing 1
    required positional argument: 'to_dealloc'"). Registers the right one (the op returns nothing)
    where the installed fake does not take ``(tensor, stream_index)``. Returns whether the fake
    takes them now (True too where there is no such op to mend: nothing to fail on)."""
    op = _record_stream_op()
    if op is None or _takes_tensor_and_stream(getattr(op, "_abstract_fn", None)):
        return True
    if not hasattr(op, "register_fake"):
        return False
    op.register_fake(_record_stream_fake)
    return _takes_tensor_and_stream(getattr(op, "_abstract_fn", None))


def stream_op_fakes_usable() -> bool:
    """Whether Inductor can run ``streams.record_stream`` on fake tensors, or
    :func:`mend_stream_op_fakes` can make it so (nothing is registered here)."""
    op = _record_stream_op()
    return op is None or hasattr(op, "register_fake") or _takes_tensor_and_stream(getattr(op, "_abstract_fn", None))


def _record_stream_op() -> Any:
    """torch's ``streams::record_stream`` custom op object (None where this torch has none)."""
    try:
        from torch._dynamo.variables import streams
    except ImportError:
        return None
    return getattr(streams, "record_stream", None)


def _takes_tensor_and_stream(fake: Any) -> bool:
    if fake is None:
        return False
    try:
        inspect.signature(fake).bind(None, 0)
    except (TypeError, ValueError):
        return False
    return True


def _record_stream_fake(tensor: torch.Tensor, stream_index: int) -> None:
    return None


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
                           wait_after: Mapping[str, str] | None = None,
                           ) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Tag a plan on an annotated joint graph (``plan_graph.tag_graph``, then ``tag_offload``) and
    split it with PyTorch's min-cut partitioner under ``offload_partitioning``: the forward graph
    copies the offloaded values to the host, the backward graph reloads them.

    ``reload_before`` (``reload_anchors``): start each reload where the plan starts it, before the
    named backward op, instead of by PyTorch's prefetch (which is then off). ``wait_after``
    (``wait_anchors``): wait for each copy after the named forward op rather than at the end."""
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
    if wait_after:
        place_offload_waits(fw, wait_after)
    return fw, bw


def reloads_placeable() -> bool:
    """Whether the installed torch's offload pass emits ``ao.reload`` ops, which ``place_reloads``
    moves to where the plan starts them (torch 2.13); else PyTorch's own prefetch places them."""
    with contextlib.suppress(ImportError):
        from torch._functorch._activation_offloading import activation_offloading  # noqa: F401 (registers ao)
    return getattr(getattr(torch.ops, "ao", None), "reload", None) is not None


def waits_mid_forward() -> bool:
    """Whether the forward waits for each copy where it is expected to be done
    (``place_offload_waits`` moves the ``ao.wait_tensor`` ops of torch 2.13), rather than at its end."""
    return reloads_placeable() and getattr(getattr(torch.ops, "ao", None), "wait_tensor", None) is not None


def forward_copies_synchronous(compiler: str) -> bool:
    """Whether the forward must wait for each copy to the host as soon as it is issued, so that
    no copy overlaps the forward's compute (PyTorch's ``activation_offload_sink_wait`` off).

    So under Inductor where torch's offload pass has no ``ao`` ops (torch 2.11: ``prims.device_put``
    between stream ops). Nothing in that graph keeps the copied value alive until the copy's wait:
    Inductor takes the copy for a finished read and lets the next kernel write into the value's
    buffer (a pointwise op done in place) while the copy stream still reads it: with the waits at
    the end of forward the gradients are wrong, with each wait right after its copy they are
    eager's (docs/results.md). The ``ao`` ops' wait takes the value as its keepalive (torch 2.13), so there the copies
    overlap; so they do on the eager route, which runs no kernel in place of another."""
    return compiler == "inductor" and not waits_mid_forward()


def reloads_at_first_read(compiler: str) -> bool:
    """Whether each reload is issued just before its value's first backward read, PyTorch's
    prefetch off: under Inductor where the installed torch's reloads cannot be moved to where the
    plan starts them (no ``ao.reload``, torch 2.11). PyTorch's prefetch there moves reloads by
    estimates of its own, which the plan cannot count: the partitioned graphs then peaked above
    the plan (docs/results.md). On the eager route the prefetch stays: it measured under its plan
    there."""
    return compiler == "inductor" and not reloads_placeable()


def recompilable_outside_dynamo() -> bool:
    """Whether a graph with offloaded values can be compiled outside Dynamo's own compile (a plan
    made again at run time, ``sac_compiler.enforce``). torch 2.11's offload pass names its copy
    stream and events through Dynamo's table of objects the frame's bytecode makes (its stream
    ops' ``new_stream`` / ``new_event``), which only Dynamo's compile of the frame fills: a graph
    planned again at run time fails there ("Index not registered in
    index_to_user_object_weakref"). torch 2.13's ``ao`` ops hold their stream themselves."""
    return reloads_placeable()


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
    reload_op = getattr(getattr(torch.ops, "ao", None), "reload", None)
    moves = []
    for node in bw.graph.nodes:  # in the order of their first reads, as they were inserted
        if reload_op is None or node.target is not reload_op.default:
            continue
        source = node.args[0]
        name = source.name[len(_CPU_OFFLOAD):] if source.name.startswith(_CPU_OFFLOAD) else source.name
        wait = next((u for u in node.users if u.target is torch.ops.ao.wait_tensor.default), None)
        if wait is not None:  # to no later than its wait
            moves.append(_Move(node, name, after=None, until=wait, until_included=True))
    return _move_to_anchors(bw, moves, reload_before, before=True)


@dataclass(frozen=True)
class _Move:
    """One op to move next to the op its value's anchor names: only where that op runs after
    ``after`` (None: anywhere before) and before ``until`` (or is it, ``until_included``)."""

    node: fx.Node
    value: str
    after: fx.Node | None
    until: fx.Node
    until_included: bool = False


def _move_to_anchors(gm: fx.GraphModule, moves: Iterable[_Move], anchors: Mapping[str, str],
                     before: bool) -> dict[str, str]:
    """Move each op of ``moves`` just before (``before``) or just after its value's anchor op (the
    op ``anchors`` names for the value) where that op is a call in the allowed span, then lint and
    recompile ``gm``. Returns the moves made (value -> op)."""
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    by_name = {n.name: n for n in gm.graph.nodes}
    moved: dict[str, str] = {}
    for move in list(moves):
        anchor = by_name.get(anchors.get(move.value, ""))
        if anchor is None or anchor.op != "call_function":
            continue
        if move.after is not None and position[anchor] <= position[move.after]:
            continue
        if position[anchor] > position[move.until] or (position[anchor] == position[move.until]
                                                       and not move.until_included):
            continue
        if before:
            anchor.prepend(move.node)
        else:
            anchor.append(move.node)
        moved[move.value] = anchor.name
    gm.graph.lint()
    gm.recompile()
    return moved


# PyTorch's name for a value's host copy (torch._functorch._activation_offloading's CPU_OFFLOAD_PREFIX)
_CPU_OFFLOAD = "cpu_offload_"


def build_offload_problem(analysis: Any, problem: Any, bandwidth: float | None = None,
                          host_budget: int | None = None, min_bytes: int = 0,
                          synchronous: bool = False, reloads_at_first_use: bool = False) -> Any:
    """The offload program's problem for an annotated joint graph and its savings problem
    (``plan_graph.build_plan_problem``).

    The compute timeline is the runtime annotation of each op: a forward value may start its copy
    to the host once its last forward reader has run; backward step ``t`` takes its op's time. The
    values offered are those PyTorch's partitioner can offload (``offload_refusal``) that backward
    reads, of at least ``min_bytes``. ``bandwidth`` defaults to the device spec's
    ``host_link_bandwidth``. ``synchronous``: the forward waits for each copy as it is issued
    (``forward_copies_synchronous``); ``reloads_at_first_use``: each reload is issued at its
    value's first backward read (``reloads_at_first_read``)."""
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
    done_at = _forward_done_at(analysis)
    forward_ms = max(done_at.values(), default=0.0)
    last_read = {base: done_at[node] for base, node in _last_forward_readers(analysis).items()}
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
    # values are gone only at the end, after the forward's waits for their copies: until then, the
    # forward's last op included, they are all there. Split the two.
    sim = analysis.memory
    end = sim.end_of_forward_bytes
    inside = max(sim.step_peaks[:fb], default=0)
    if problem.baseline and problem.baseline[0] == max(end, inside):
        problem = dataclasses.replace(problem, baseline=(end, *problem.baseline[1:]))
        forward_peak = max(end, inside)
    else:
        forward_peak = None
    # where the forward waits for each copy once it is done (place_offload_waits), the values whose
    # copies finish before the peak's op starts are gone there
    forward_peak_ms = None
    if forward_peak is not None and fb > 0 and (waits_mid_forward() or synchronous):
        peak_node = nodes[max(range(fb), key=lambda j: sim.step_peaks[j])]
        own = (get_record(peak_node).runtime_ms or 0.0) if peak_node.op == "call_function" else 0.0
        forward_peak_ms = min(forward_ms, max(0.0, done_at[peak_node] - own))
    return OffloadProblem(savings=problem, step_ms=tuple(step_ms), forward_ms=forward_ms, ready_ms=ready,
                          bandwidth=float(bandwidth), host_budget=host_budget, forward_peak=forward_peak,
                          forward_peak_ms=forward_peak_ms, forward_copies_synchronous=synchronous,
                          reloads_at_first_use=reloads_at_first_use)


def _last_forward_readers(analysis: Any) -> dict[fx.Node, fx.Node]:
    """For each value of the joint graph's forward (views counted as their base), the last forward
    op that reads it, or the op that makes it where none does: where its copy to the host starts
    (PyTorch's offload pass inserts the copy after the last use)."""
    from sac_compiler.plan_graph import _owner_map

    gm = analysis.graph.gm
    owner = _owner_map(gm)
    last: dict[fx.Node, fx.Node] = {}
    for node in list(gm.graph.nodes)[:analysis.memory.first_backward]:
        if node.op != "call_function":
            continue
        last.setdefault(owner.get(node, node), node)
        for arg in node.all_input_nodes:
            last[owner.get(arg, arg)] = node
    return last


def _forward_done_at(analysis: Any) -> dict[fx.Node, float]:
    """The forward's compute timeline: for each node of the joint graph's forward, the time (ms,
    from the runtime annotations) at which it has run."""
    elapsed = 0.0
    done_at: dict[fx.Node, float] = {}
    for node in list(analysis.graph.gm.graph.nodes)[:analysis.memory.first_backward]:
        if node.op == "call_function":
            elapsed += get_record(node).runtime_ms or 0.0
        done_at[node] = elapsed
    return done_at


def wait_anchors(analysis: Any, problem: Any, offloaded: Iterable[str]) -> dict[str, str]:
    """For each offloaded value, the forward op after which its copy to the host has finished: the
    copies run on one stream, first in, first out, each from the time its value's last forward
    reader has run (``problem.ready_ms``; candidate order at a tie, as the offload program and its
    replay order them) and for ``bytes / problem.bandwidth``; the op is the first
    whose compute ends at or after that. The forward waits for the copy there
    (``place_offload_waits``) and frees the value, instead of at its end. A value whose copy the
    forward's compute cannot hide has no op: its wait stays at the end."""
    sizes = {c.name: c.nbytes for c in problem.savings.candidates}
    index = {c.name: i for i, c in enumerate(problem.savings.candidates)}
    order = [(problem.ready_ms[name], name) for name in sorted(
        (n for n in offloaded if n in problem.ready_ms), key=lambda n: (problem.ready_ms[n], index[n]))]
    done_at = [(t, node.name) for node, t in _forward_done_at(analysis).items() if node.op == "call_function"]
    anchors: dict[str, str] = {}
    free_at = 0.0  # when the copy stream is next free
    for ready, name in order:
        finish = max(ready, free_at) + 1e3 * sizes.get(name, 0) / problem.bandwidth
        free_at = finish
        after = next((op for t, op in done_at if t >= finish and t > ready), None)
        if after is not None:
            anchors[name] = after
    return anchors


def place_offload_waits(fw: fx.GraphModule, wait_after: Mapping[str, str]) -> dict[str, str]:
    """Move each offloaded value's wait for its copy (``ao.wait_tensor``, which PyTorch's
    ``activation_offload_sink_wait`` puts at the end of forward) to just after the forward op named
    in ``wait_after`` (``wait_anchors``): the value is freed on the device there, mid-forward. A wait
    is left where it is when that op is not in the graph or not after the value's copy started.
    Returns the moves made (value -> op). Only the ``ao`` ops' layout (torch 2.13) is moved."""
    wait_op = getattr(getattr(torch.ops, "ao", None), "wait_tensor", None)
    offload_op = getattr(getattr(torch.ops, "ao", None), "offload", None)
    if wait_op is None or offload_op is None:
        return {}
    moves = []
    for wait in fw.graph.nodes:
        if wait.target is not wait_op.default or not isinstance(wait.args[0], fx.Node) \
                or wait.args[0].target is not offload_op.default:
            continue
        copy = wait.args[0]
        value = copy.args[0]
        # after the copy started, before where the wait is now
        moves.append(_Move(wait, value.name if isinstance(value, fx.Node) else "", after=copy, until=wait))
    return _move_to_anchors(fw, moves, wait_after, before=False)


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

    Returns an outcome without a plan, and the reason, when the installed torch cannot offload or
    the device spec has no link bandwidth; raises the solver's InfeasibleError when no plan fits.
    (The backend plans through ``plan_with_offload``, on the exact simulation.)"""
    from sac_compiler.plan_graph import (
        _solver_options,
        _torch_threads_kept,
        build_plan_problem,
    )
    from sac_compiler.solvers.offload_plan import solve_offload_plan, with_budget

    reason = offload_support() or _link_note(analysis, bandwidth)
    if reason is not None:
        return OffloadOutcome(reason=reason)
    problem, _, _ = build_plan_problem(analysis, fused_pointwise=config.compiler == "inductor")
    offload_problem = with_budget(build_offload_problem(analysis, problem, bandwidth, config.host_memory_budget,
                                                        synchronous=forward_copies_synchronous(config.compiler),
                                                        reloads_at_first_use=reloads_at_first_read(config.compiler)),
                                  budget)
    options = options if options is not None else _solver_options(config, analysis)  # the planner's own
    with _torch_threads_kept():  # the solver's OpenMP runtime may reset torch's thread count
        plan = solve_offload_plan(offload_problem, options)
    return OffloadOutcome(plan=plan, problem=offload_problem)


def offload_note(config: Any, analysis: Any = None, bandwidth: float | None = None) -> str | None:
    """Why offload is not offered for this graph (a sentence for the report), or None: offered, or
    ``config.offload`` off. Offered on a CUDA graph run once per step, where the installed torch
    offloads through its partitioner and the link's bandwidth is known."""
    if not getattr(config, "offload", False):
        return None
    reason = offload_support() or _link_note(analysis, bandwidth)
    if reason is not None:
        return reason
    if getattr(config, "compiler", "inductor") == "inductor" and not reloads_placeable() \
            and not stream_op_fakes_usable():
        # the stream-op layout (no ao.reload) fails under Inductor where streams.record_stream's
        # fake function takes other arguments (torch 2.11) and cannot be mended (offload_partitioning
        # mends it where it can)
        return (f"torch {torch.__version__}'s offload pass puts its copies on a stream through stream ops "
                "(streams.record_stream) whose fake function Inductor cannot call: with this torch offload "
                "is offered on the eager route (compiler='eager')")
    if analysis is not None:
        graph = analysis.graph
        if torch.device(graph.target_device).type != "cuda":
            return (f"the graph runs on {graph.target_device}: offload copies CUDA activations to host memory, "
                    "a CPU graph's host memory is its device memory")
        if getattr(config, "runs_per_step", 1) > 1:
            return "the graph runs several times in a step (runs_per_step > 1): offload is planned for one run"
        if graph.sharding() is not None or getattr(config, "world_size", 1) > 1:
            return "the graph runs on several ranks: offload is planned for one GPU"
    return None


def _link_note(analysis: Any, bandwidth: float | None) -> str | None:
    spec = getattr(analysis, "device_spec", None)
    if bandwidth is None and spec is not None and spec.host_link_bandwidth is None:
        return f"device spec {spec.name} has no host_link_bandwidth: offload is not offered"
    return None


_MEASURED_BANDWIDTH: dict[str, float] = {}


def link_bandwidth(analysis: Any) -> float:
    """The host link's bytes/s per direction for this graph's plan: measured once per CUDA device
    (a 64 MiB copy from the device to pinned host memory, the median of 5 after a warm-up; small
    next to a step, as it runs while the graph compiles) when
    the graph's device is the GPU this process runs on and the plan is for it, else the device
    spec's ``host_link_bandwidth``."""
    device = torch.device(analysis.graph.target_device)
    spec = analysis.device_spec
    if device.type == "cuda" and torch.cuda.is_available() and _spec_is_this_gpu(spec, device):
        key = torch.cuda.get_device_name(device)
        if key not in _MEASURED_BANDWIDTH:
            _MEASURED_BANDWIDTH[key] = _measure_link(device)
        return _MEASURED_BANDWIDTH[key]
    if spec.host_link_bandwidth is None:
        raise ValueError(f"device spec {spec.name} has no host_link_bandwidth")
    return float(spec.host_link_bandwidth)


def _spec_is_this_gpu(spec: Any, device: torch.device) -> bool:
    return bool(spec.matches(torch.cuda.get_device_name(device)))


def _measure_link(device: torch.device, nbytes: int = 64 * 2**20, repeats: int = 5) -> float:
    return nbytes / (transfer_ms(device, nbytes, "d2h", repeats) / 1e3)


def transfer_ms(device: torch.device, nbytes: int, direction: str = "d2h", repeats: int = 5) -> float:
    """Milliseconds of one ``nbytes`` copy between the CUDA ``device`` and pinned host memory
    (``direction``: "d2h" or "h2d"), timed with CUDA events: the median of ``repeats`` copies
    after one that warms the path up."""
    if direction not in ("d2h", "h2d"):
        raise ValueError(f"direction must be 'd2h' or 'h2d', got {direction!r}")
    device_buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
    host_buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    target, source = (host_buffer, device_buffer) if direction == "d2h" else (device_buffer, host_buffer)
    times = []
    for i in range(repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(source, non_blocking=True)
        end.record()
        end.synchronize()
        if i:
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def offloaded_simulation(sim: Any, problem: Any, offload: Mapping[str, int],
                         freed_after: Mapping[str, int] | None = None) -> Any:
    """The joint-graph simulation ``sim`` (of a plan's recomputation) with ``offload`` (value ->
    reload start on the savings program's step axis) applied as the partitioned graphs run it: an
    offloaded value is on the device through the forward (its copy finishes by the forward's end,
    where the forward waits for it), gone from the end of forward, and allocated again from the
    backward step its reload starts at (step ``s`` is the backward's ``s``-th op). ``freed_after``:
    value -> the forward step (node index) after which the forward waits for its copy
    (``wait_anchors``): gone from the next step."""
    if not offload:
        return sim
    nbytes = {c.name: c.nbytes for c in problem.candidates}
    fb = sim.first_backward
    steps = list(sim.step_peaks)
    for name, start in offload.items():
        for j in range(fb, min(fb + start - 1, len(steps))):
            steps[j] -= nbytes[name]
    for name, after in (freed_after or {}).items():
        if name in offload:
            for j in range(after + 1, min(fb, len(steps))):
                steps[j] -= nbytes[name]
    end = sim.end_of_forward_bytes - sum(nbytes[name] for name in offload)
    from sac_compiler.plan_graph import _after_graph

    graph_peak = max([*steps, end])
    # the simulation's own peak where no step holds it (the optimizer step after the graph)
    peak = max(graph_peak, _after_graph(sim))
    return dataclasses.replace(sim, peak_bytes=peak, end_of_forward_bytes=end, step_peaks=steps)


@dataclass(frozen=True)
class OffloadChoice:
    """A keep / recompute / offload plan and its simulation (``offloaded_simulation``)."""

    plan: Any  # solvers.offload_plan.OffloadPlan
    simulation: Any
    problem: Any  # solvers.offload_plan.OffloadProblem
    time_ms: float  # recompute time, keep costs and the transfer time compute does not hide
    recompute_only_ms: float | None = None  # the recompute-only plan's, where the caller compared


_OFFLOAD_ROUNDS = 4


def plan_with_offload(analysis: Any, config: Any, problem: Any, goal: int, options: Any,
                      simulate: Any) -> OffloadChoice | None:
    """The fastest keep / recompute / offload plan whose simulation fits ``goal`` (bytes of the
    graph's step, outside memory excluded), or None when none does.

    The program (``solve_offload_plan``) counts memory on the savings program's model; its plan is
    then checked on the exact simulation of its recomputation (``simulate(recompute)``) with the
    offloaded values taken out (``offloaded_simulation``), and planned again lower by the excess
    where it is over, at most ``_OFFLOAD_ROUNDS`` times."""
    from sac_compiler.plan_graph import _torch_threads_kept
    from sac_compiler.solvers import InfeasibleError, NoSolutionError
    from sac_compiler.solvers.offload_plan import solve_offload_plan, with_budget
    from sac_compiler.solvers.savings_plan import plan_time_ms

    compiler = getattr(config, "compiler", "inductor")
    synchronous = forward_copies_synchronous(compiler)
    offload_problem = build_offload_problem(analysis, problem, link_bandwidth(analysis),
                                            getattr(config, "host_memory_budget", None), synchronous=synchronous,
                                            reloads_at_first_use=reloads_at_first_read(compiler))
    position = {n.name: i for i, n in enumerate(analysis.graph.gm.graph.nodes)}
    readers = {base.name: reader.name for base, reader in _last_forward_readers(analysis).items()}
    target = goal
    for _ in range(_OFFLOAD_ROUNDS):
        try:
            with _torch_threads_kept():  # the solver's OpenMP runtime may reset torch's thread count
                plan = solve_offload_plan(with_budget(offload_problem, target), options)
        except (InfeasibleError, NoSolutionError):
            return None
        freed_after: dict[str, int] = {}
        if synchronous:  # freed once its copy is done, before the op after its last forward read
            freed_after = {name: position[readers[name]] for name in plan.offload if name in readers}
        elif waits_mid_forward():
            freed_after = {name: position[op] for name, op in
                           wait_anchors(analysis, offload_problem, plan.offload).items()}
        sim = offloaded_simulation(simulate(plan.recompute), problem, plan.offload, freed_after)
        if sim.peak_bytes <= goal:
            time_ms = plan_time_ms(problem, plan.recompute, plan.kept_for_recompute) + plan.stall_ms
            return OffloadChoice(plan, sim, offload_problem, time_ms)
        target -= sim.peak_bytes - goal
    return None


__all__ = [
    "OffloadChoice",
    "OffloadOutcome",
    "link_bandwidth",
    "offloaded_simulation",
    "plan_with_offload",
    "build_offload_problem",
    "offload_note",
    "offload_partitioning",
    "offload_refusal",
    "offload_support",
    "partition_with_offload",
    "place_offload_waits",
    "place_reloads",
    "reload_anchors",
    "recompilable_outside_dynamo",
    "reloads_at_first_read",
    "reloads_placeable",
    "wait_anchors",
    "waits_mid_forward",
    "partitioner_config",
    "plan_offload",
    "tag_offload",
]
