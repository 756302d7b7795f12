"""annotate_memory: bytes, storage and category per value, and a liveness simulation of the graph.

Writes into ``node.meta["sac"]`` for every node that produces tensors:

* ``nbytes``: new bytes the node allocates (0 for views and other aliases: storage-aware);
* ``alloc_bytes``: the same, rounded as the target device's allocator rounds (CUDA: 512 bytes);
* ``storage_owner``: the node whose allocation this value lives in (itself, or a view's base);
* ``category``: parameter, buffer, input, gradient, activation (a forward value alive at the end of
  forward) or temporary.

and a :class:`MemorySimulation` into ``gm.meta["sac"]["annotate_memory"]``: the graph is executed in
its order, each allocation freed after its last use, parameters, buffers and inputs alive
throughout, forward outputs and gradients held to the end. The result has the peak, the live bytes
at the end of forward, and per-module snapshots ("current" at the module's exit and "peak" while it
runs), as PyTorch's MemTracker reports them.

``recomputed`` names forward values that backward recomputes instead of keeping (default: those the
user wrapped in ``torch.utils.checkpoint``): they are freed after their last forward use and live
again from their first to their last backward use.

``fused_pointwise=True`` approximates Inductor: a pointwise op whose users on its side are all
pointwise or reduction ops, and which is not an output, is fused into them (no buffer), unless it is
kept for backward or folding it would read too many buffers (Inductor's realize thresholds);
recomputed in backward, it is a buffer only if a non-fusing op reads it there, and what it is made
from lives until its last read. A connected chain of recomputed pointwise values is rebuilt in one
kernel before the first of them is needed, and the embedding gradient's accumulator is filled as
backward starts, as Inductor's scheduler runs them; a matmul folded into a later add (``addmm``)
runs there, and a chain's kernel writes outputs into the saved inputs that die in it. On both
routes a matmul reading a broadcast operand holds a dense copy of it while it runs.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from sac_compiler.passes.annotate_ops import fuses_pointwise_inputs, is_alias_op, is_pointwise_op, op_name
from sac_compiler.passes.record import (
    MemoryCategory,
    Side,
    call_functions,
    get_record,
    graph_results,
    size_hint,
    tensor_values,
    update_record,
)

log = logging.getLogger(__name__)

CUDA_ROUNDING = 512


@dataclass(frozen=True)
class ModuleMemory:
    """Live bytes around one module's forward and backward (like MemTracker's snapshots).

    ``views`` holds the same six snapshots split as MemTracker splits them: ``act`` (live values
    made in forward), ``temp`` (made in backward, not gradients), ``grad`` (parameter gradients),
    and ``total`` (everything, parameters and optimizer state included).
    """

    pre_fw: int = 0
    post_fw: int = 0
    peak_fw: int = 0
    pre_bw: int = 0
    post_bw: int = 0
    peak_bw: int = 0
    views: dict[str, dict[str, int]] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class MemorySimulation:
    peak_bytes: int
    peak_node: str
    peak_by_category: dict[MemoryCategory, int]
    end_of_forward_bytes: int
    static_bytes: int
    timeline: list[tuple[str, int]] = field(repr=False)
    step_peaks: list[int] = field(repr=False)  # live bytes while each node runs (after its allocations)
    first_backward: int = field(repr=False)  # index of the first backward node in the graph order
    module_memory: dict[str, ModuleMemory] = field(repr=False)
    optimizer_state_bytes: int = 0
    optimizer_step_peak_bytes: int = 0

    def snapshot(self, kind: str = "peak") -> dict[str, int]:
        """``{"Total": bytes, <category>: bytes}`` at the peak (``"peak"``) or the end (``"current"``)."""
        if kind == "peak":
            out = {c.value: b for c, b in self.peak_by_category.items()}
            out["Total"] = self.peak_bytes
            return out
        if kind == "current":
            return {"Total": self.timeline[-1][1] if self.timeline else 0}
        raise ValueError(f"snapshot kind must be 'peak' or 'current', got {kind!r}")


def round_allocation(nbytes: int, device: torch.device | str | None) -> int:
    """Bytes the device allocator hands out for a request of ``nbytes`` (CUDA rounds to 512)."""
    if nbytes <= 0:
        return 0
    if device is not None and torch.device(device).type == "cuda":
        return -(-nbytes // CUDA_ROUNDING) * CUDA_ROUNDING
    return nbytes


def tensor_nbytes(t: torch.Tensor) -> int:
    """Bytes of the tensor's storage (sizes from hints where symbolic)."""
    try:
        return size_hint(t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):  # tensors without storage (some subclasses)
        return size_hint(t.numel()) * t.element_size()


def _side(node: fx.Node) -> Side:
    side = get_record(node).side
    if side is not None:
        return side
    return Side.BACKWARD if node.meta.get("partitioner_tag") == "is_backward" else Side.FORWARD


def annotate_memory(
    gm: fx.GraphModule,
    target_device: torch.device | str | None = None,
    num_fwd_outputs: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    optimizer_state_bytes: int | None = None,
    fused_pointwise: bool = False,
    recomputed: set[str] | None = None,
    hold_outputs: bool = False,
    annotate: bool = True,
) -> MemorySimulation:
    """Annotate bytes and categories; simulate liveness over the graph order; return the result.

    ``annotate=False`` only simulates (a planner trying recompute sets): no node records, no
    per-module memory, nothing stored on the graph.
    """
    from sac_compiler.capture import InputKind, capture_info

    info = capture_info(gm)
    if target_device is None:
        target_device = info.target_device if info is not None else None
    if num_fwd_outputs is None:
        num_fwd_outputs = info.num_fwd_outputs if info is not None else None
    input_kinds = {i.name: i.kind for i in info.inputs} if info is not None else {}

    nodes = list(gm.graph.nodes)
    output = nodes[-1]
    outputs = list(output.args[0]) if isinstance(output.args[0], (list, tuple)) else [output.args[0]]
    n_fwd = num_fwd_outputs if num_fwd_outputs is not None else len(outputs)
    fwd_outputs = {n for n in outputs[:n_fwd] if isinstance(n, fx.Node)}
    grad_outputs = {n for n in outputs[n_fwd:] if isinstance(n, fx.Node)}

    # 1. Storage owners: a view (or getitem of a view) lives in its base's allocation.
    owner: dict[fx.Node, fx.Node] = {}
    for node in nodes:
        if node.op == "call_function" and node.target is operator.getitem:
            owner[node] = node  # one output of a multi-output op: its own allocation
        elif node.op == "call_function" and is_alias_op(node) and node.all_input_nodes:
            base = next((a for a in node.args if isinstance(a, fx.Node)), node.all_input_nodes[0])
            owner[node] = owner.get(base, base)
        else:
            owner[node] = node

    # 2. Bytes per allocation.
    nbytes: dict[fx.Node, int] = {}
    for node in nodes:
        if owner[node] is not node:
            continue
        vals = tensor_values(node)
        if node.op == "call_function" and any(u.target is operator.getitem for u in node.users):
            vals = []  # a multi-output op: its getitem users own the bytes
        nbytes[node] = sum(tensor_nbytes(v) for v in vals)

    # With fused_pointwise, values Inductor folds into their consumers' kernels (sized 0 below,
    # once the recomputed values are known).
    fusable: set[fx.Node] = set()
    if fused_pointwise:
        for node in call_functions(gm):
            if owner[node] is node and is_pointwise_op(node) and node not in outputs:
                same_side = [u for u in node.users if _side(u) == _side(node)]
                if same_side and all(fuses_pointwise_inputs(u) for u in same_side):
                    fusable.add(node)

    # 3. Last use of every allocation (through its aliases).
    index = {node: i for i, node in enumerate(nodes)}
    last_use: dict[fx.Node, int] = {}
    for node in nodes:
        for arg in node.all_input_nodes:
            base = owner[arg]
            last_use[base] = max(last_use.get(base, -1), index[node])
    end = len(nodes) - 1
    # Gradients stay (they become .grad); forward outputs are held only when asked: in
    # ``model(x).sum().backward()`` the caller drops the output before backward runs.
    held = {owner[n] for n in grad_outputs | (fwd_outputs if hold_outputs else set())}
    first_backward = next((i for i, n in enumerate(nodes) if n.op == "call_function" and _side(n) == Side.BACKWARD), end)

    # 4. Categories.
    grad_owners = {owner[n] for n in grad_outputs}
    categories: dict[fx.Node, MemoryCategory] = {}
    for node in nodes:
        base = owner[node]
        if base.op == "placeholder":
            kind = input_kinds.get(base.name)
            categories[node] = {
                InputKind.PARAMETER: MemoryCategory.PARAMETER,
                InputKind.BUFFER: MemoryCategory.BUFFER,
            }.get(kind, MemoryCategory.INPUT if kind != InputKind.TANGENT and "tangents" not in base.name
                   else MemoryCategory.TEMPORARY)
        elif base in grad_owners:
            categories[node] = MemoryCategory.GRADIENT
        elif _side(base) == Side.FORWARD and (last_use.get(base, -1) >= first_backward or base in held):
            categories[node] = MemoryCategory.ACTIVATION
        else:
            categories[node] = MemoryCategory.TEMPORARY

    for node in nodes:
        if node.op == "output" or not annotate:
            continue
        own = owner[node] is node
        raw = nbytes.get(node, 0) if own else 0
        update_record(
            node,
            "annotate_memory",
            nbytes=raw,
            alloc_bytes=round_allocation(raw, target_device),
            storage_owner=owner[node].name,
            category=categories[node],
        )

    # 5. Liveness simulation: allocation and free events per step.
    alloc = {n: round_allocation(b, target_device) for n, b in nbytes.items()}
    remat_alloc = dict(alloc)  # the size of a value's second life, rebuilt in backward
    static = [n for n in nodes if n.op == "placeholder" and "tangents" not in n.name]
    tangents = [n for n in nodes if n.op == "placeholder" and "tangents" in n.name]
    live: dict[MemoryCategory, int] = {c: 0 for c in MemoryCategory}
    for n in static:
        live[categories[n]] += alloc.get(n, 0)
    opt_state = _optimizer_state_bytes(optimizer, optimizer_state_bytes, info, gm, alloc)
    live[MemoryCategory.OPTIMIZER_STATE] += opt_state
    static_bytes = sum(live.values())

    if recomputed is None:
        recomputed = {n.name for n in nodes if get_record(n).user_recompute}
    runs_at, copies = _transient_steps(nodes, index, target_device, fused_pointwise)
    for mm in runs_at:
        alloc[mm] = 0  # the addmm writes the sum: the product is no buffer of its own
    uses_of: dict[fx.Node, set[int]] = {}
    for node in nodes:
        if owner[node] is not node:
            continue  # an alias reads nothing itself; its users count as uses of its base
        for arg in node.all_input_nodes:
            if node.op == "output":
                continue  # returning a value is not a use: see ``released`` below
            uses_of.setdefault(owner[arg], set()).add(runs_at.get(node, index[node]))
    rematerialized = _backward_needs(nodes, owner, index, uses_of, recomputed, first_backward)
    # Rebuilt in backward, a fusable value is a buffer only if a non-fusing op reads it there;
    # otherwise it is recomputed inside each kernel that reads it.
    def bw_readers(node: fx.Node) -> list[fx.Node]:
        return [u for u in node.users if _side(u) == Side.BACKWARD or u in rematerialized]

    inline = {node for node in fusable
              if node in rematerialized and all(fuses_pointwise_inputs(u) for u in bw_readers(node))}
    # ... unless Inductor stores it for reading too many buffers (it and the backward's own
    # fused values make up the backward graph Inductor lowers)
    inlined_bw = _inductor_inlined(
        [n for n in nodes if n in inline or (n in fusable and _side(n) == Side.BACKWARD)], bw_readers, owner)
    inline &= inlined_bw
    for node in inline:
        remat_alloc[node] = 0
    # An inline value is recomputed inside every kernel that reads it: what it is rebuilt from
    # must exist until its last read, not only at its first.
    for node in sorted(inline, key=index.__getitem__, reverse=True):
        needed = rematerialized[node]
        if not needed:
            continue
        for arg in node.all_input_nodes:
            base = owner[arg]
            if base in rematerialized and rematerialized[base]:
                rematerialized[base].add(max(needed))
    chain_kernels: list[tuple[int, set[fx.Node]]] = []
    if fused_pointwise:  # Inductor rebuilds a chain of recomputed pointwise values in one kernel
        needed_now = {n for n, needed in rematerialized.items() if needed}
        for group in _fused_recompute_groups(nodes, needed_now, owner):
            earliest = min(min(rematerialized[n]) for n in group)
            chain_kernels.append((earliest, _ancestors(group, needed_now, owner)))
            for node in chain_kernels[-1][1]:
                rematerialized[node].add(earliest)
                if _drawn_in_kernel(node, group, (u for u in node.users if _side(u) == Side.BACKWARD or u in needed_now)):
                    remat_alloc[node] = 0
    # A kept value that a recomputed one is rebuilt from lives until that rebuild (until the
    # last read of an inline one).
    held_for_recompute: dict[fx.Node, int] = {}
    for node, needed in rematerialized.items():
        if not needed:
            continue
        for arg in node.all_input_nodes:
            base = owner[arg]
            if base not in rematerialized and base.op != "placeholder":
                at = max(needed) if node in inline else min(needed)
                held_for_recompute[base] = max(held_for_recompute.get(base, -1), at)
    # A chain's kernel is the last reader of the kept values only it reads: an output of the same
    # size takes over such a value's buffer (as in the partitioned simulation: see
    # ``_hand_over_dying_inputs``).
    handed_over: set[fx.Node] = set()  # kept values whose buffer a rebuilt one takes (not freed)
    adopting: set[fx.Node] = set()  # rebuilt values taking one (no allocation of their own)
    for step, kernel in chain_kernels:
        dying: list[fx.Node] = []
        for node in sorted(kernel, key=index.__getitem__):
            for arg in node.all_input_nodes:
                base = owner[arg]
                if (base in kernel or base in dying or base in handed_over or base in rematerialized
                        or base.op == "placeholder" or base in held or held_for_recompute.get(base) != step
                        or any(i >= first_backward for i in uses_of.get(base, ()))):
                    continue
                dying.append(base)
        for node in sorted(kernel, key=index.__getitem__):
            needed = rematerialized.get(node)
            if not needed or min(needed) != step or not remat_alloc.get(node, 0) or node in adopting:
                continue
            match = next((d for d in dying if alloc.get(d, 0) == remat_alloc[node]), None)
            if match is not None:
                dying.remove(match)
                handed_over.add(match)
                adopting.add(node)
    fused_fw = [n for n in nodes if n in fusable and _side(n) == Side.FORWARD and n not in held_for_recompute
                and (n in rematerialized or not any(_side(u) == Side.BACKWARD for u in n.users))]
    # a kept value is written out for backward; a recomputed one is not
    for node in _inductor_inlined(fused_fw, lambda n: [u for u in n.users if _side(u) == Side.FORWARD], owner):
        alloc[node] = 0
    for node in inlined_bw:
        if _side(node) == Side.BACKWARD:
            alloc[node] = 0
    # A fused value runs inside the kernels of its readers on its side: what it reads lives until
    # they run.
    runs_until = _fused_runs_until(
        nodes, index, {n: [u for u in n.users if _side(u) == _side(n)]
                       for n in fusable if alloc.get(n) == 0})
    for node, until in runs_until.items():
        for arg in node.all_input_nodes:
            uses_of.setdefault(owner[arg], set()).add(until)
    allocs: dict[int, list[tuple[fx.Node, int]]] = {}
    frees: dict[int, list[tuple[fx.Node, int]]] = {}
    returned = {owner[n] for n in fwd_outputs} - held
    released: list[fx.Node] = []
    rebuilt_events: set[int] = set()  # ids of the events of values rebuilt in backward
    for node in nodes:
        if owner[node] is not node or node.op == "output" or node in static:
            continue
        start_at = first_backward if node in tangents else runs_at.get(_made_by(node), index[_made_by(node)])
        accumulator = _inductor_accumulator(node, target_device) if fused_pointwise else None
        if accumulator is not None and start_at >= first_backward:
            if accumulator == 0:
                start_at = first_backward  # the output is the accumulator
            else:
                allocs.setdefault(first_backward, []).append((node, accumulator))
                frees.setdefault(index[node], []).append((node, accumulator))
        first = (node, alloc.get(node, 0))
        allocs.setdefault(start_at, []).append(first)
        if node in held:
            continue
        uses = sorted(uses_of.get(node, ()))
        if node in returned and not any(i >= first_backward for i in uses):
            released.append(first)  # the caller drops it (model(x).sum().backward()) before backward
            continue
        if node in held_for_recompute:  # kept so that a recomputed value can be rebuilt from it
            uses = sorted(set(uses) | {held_for_recompute[node]})
        if node in rematerialized:
            fw_uses = [i for i in uses if i < first_backward]
            frees.setdefault(fw_uses[-1] if fw_uses else start_at, []).append(first)
            needed = rematerialized[node]
            if needed:  # rematerialised for its first backward need, kept to its last
                second = (node, remat_alloc.get(node, 0))
                rebuilt_events.add(id(second))
                if node not in adopting:
                    allocs.setdefault(min(needed), []).append(second)
                frees.setdefault(max(needed), []).append(second)
            continue
        if node not in handed_over:
            frees.setdefault(uses[-1] if uses else start_at, []).append(first)

    total = static_bytes
    peak, peak_node, peak_cats = total, "start", dict(live)
    timeline: list[tuple[str, int]] = []
    step_peaks: list[int] = []
    end_of_forward = None
    module_live: dict[str, dict[str, Any]] = {}
    # MemTracker's split of the live bytes: made in forward / made in backward / gradients.
    phase_of = {n: ("grad" if categories[n] == MemoryCategory.GRADIENT
                    else "act" if _side(n) == Side.FORWARD and n.op != "placeholder" else "temp")
                for n in nodes if n.op != "output"}
    view = {"total": total, "act": 0, "temp": 0, "grad": 0}

    def change(event: tuple[fx.Node, int], sign: int) -> None:
        nonlocal total
        base, size = event
        b = sign * size
        live[categories[base] if base is not None else MemoryCategory.TEMPORARY] += b
        total += b
        view["total"] = total
        view[phase_of[base] if base is not None else "temp"] += b

    track = _track_modules if annotate else lambda *args: None
    def pooled(i: int, j: int) -> bool:
        """A free Inductor may reuse: not of an input of the backward graph (a tangent, or a value
        forward saved for it), which it deletes (see ``_reused_frees``)."""
        event = frees[i][j]
        base = event[0]
        if base is None or id(event) in rebuilt_events:
            return True
        return base.op != "placeholder" and not (i >= first_backward and _side(base) == Side.FORWARD)

    taken, held_frees = (_reused_frees(len(nodes), allocs, frees, lambda event: event[1], (first_backward,),
                                       pooled=pooled)
                         if fused_pointwise else ({}, set()))
    for i, node in enumerate(nodes):
        if i == first_backward:
            for event in released:
                change(event, -1)
        track(node, "before", view, module_live)
        for j, event in enumerate(allocs.get(i, [])):
            if (i, j) in taken:  # it takes over a held buffer: that one's bytes become its bytes
                freed_at, k = taken[(i, j)]
                change(frees[freed_at][k], -1)
            change(event, +1)
        if i in copies:
            change((None, copies[i]), +1)
        if total > peak:
            peak, peak_node, peak_cats = total, node.name, dict(live)
        if i == first_backward - 1:
            end_of_forward = total
        step_peaks.append(total)
        track(node, "during", view, module_live)
        if i in copies:
            change((None, copies[i]), -1)
        for j, event in enumerate(frees.get(i, [])):
            if (i, j) not in held_frees:
                change(event, -1)
        track(node, "after", view, module_live)
        timeline.append((node.name, total))
    if end_of_forward is None:
        end_of_forward = total

    step_peak = _optimizer_step_peak(optimizer, static_bytes, opt_state, alloc, grad_owners, info)
    result = MemorySimulation(
        peak_bytes=max(peak, step_peak),
        peak_node=peak_node if peak >= step_peak else "optimizer.step",
        peak_by_category={c: b for c, b in peak_cats.items() if b},
        end_of_forward_bytes=end_of_forward,
        static_bytes=static_bytes,
        timeline=timeline,
        step_peaks=step_peaks,
        first_backward=first_backward,
        module_memory={fqn: _module_memory(v) for fqn, v in module_live.items()},
        optimizer_state_bytes=opt_state,
        optimizer_step_peak_bytes=step_peak,
    )
    if annotate:
        graph_results(gm)["annotate_memory"] = result
    return result


# Inductor's lowering stores a pointwise value it would otherwise fold into its readers once
# folding would have it read too many buffers (torch._inductor.config: realize_reads_threshold
# with more than one reader, the accumulated-reads default always; their GPU values).
_REALIZE_READS = 4
_REALIZE_ACC_READS = 8


def _inductor_inlined(candidates: list[fx.Node], readers: Any, owner: dict[fx.Node, fx.Node]) -> set[fx.Node]:
    """The fusable ``candidates`` (in graph order) Inductor keeps folded into their readers.

    A folded value reads what its inputs read (the buffers; what folded inputs read in turn);
    it is stored instead when that is more than ``_REALIZE_ACC_READS`` buffers, or more than
    ``_REALIZE_READS`` with more than one reader (``readers(node)``). Scalars do not count.
    """
    inlined: set[fx.Node] = set()
    reads: dict[fx.Node, set[fx.Node]] = {}
    for node in candidates:
        read: set[fx.Node] = set()
        for arg in node.all_input_nodes:
            base = owner.get(arg, arg)
            if base in inlined:
                read |= reads[base]
            elif not _is_scalar(base):
                read.add(base)
        if len(read) > _REALIZE_ACC_READS or (len(readers(node)) > 1 and len(read) > _REALIZE_READS):
            continue
        inlined.add(node)
        reads[node] = read
    return inlined


def _column_reductions_scheduled(nodes: list[fx.Node], owner: dict[fx.Node, fx.Node],
                                 stored: Callable[[fx.Node], bool]) -> list[fx.Node]:
    """The graph's nodes in the order Inductor runs them once it has fused column reductions.

    A column reduction (a sum over every dimension but the last: a norm's weight gradient, a
    bias gradient) over a pointwise expression reads the buffers that expression reads. Inductor
    fuses column reductions of one size that read a common buffer of that size into one kernel,
    and its scheduler, visiting nodes depth first in graph order, pulls everything that kernel
    needs ahead of the nodes that stood between its first and its last member: those run after
    it. Seen in Inductor's generated backward of a 16-layer Llama on an H200 (torch 2.11): with
    the residual stream of the last layers rebuilt from one saved value, the weight gradients of
    four RMSNorms, from the final one to layer 14's, ran in one kernel after layer 14's
    feed-forward input gradients, and layer 15's weight-gradient matmuls after it, their inputs
    (three 88 MiB buffers) alive until then. Modelled so (the members keep their own steps),
    the simulation of that plan's partition gives 4963429376 bytes of extra peak against
    4963483648 measured (4.2520 GiB in graph order); placing the members' reads at the fused
    kernel as well gave 5198330880, 4.7% over. ``stored``: the nodes that are buffers (what an
    inlined pointwise value reads through)."""
    columns: list[tuple[fx.Node, int, set[fx.Node]]] = []
    for node in nodes:
        numel = _column_reduction_numel(node)
        if numel is None:
            continue
        reads: set[fx.Node] = set()
        seen: set[fx.Node] = set()
        stack = [node.args[0]]
        while stack:
            arg = stack.pop()
            base = owner.get(arg, arg)
            if base in seen:
                continue
            seen.add(base)
            if stored(base):
                if _numel(base) == numel:
                    reads.add(base)
            else:  # computed inline: it reads what its inputs are
                stack += base.all_input_nodes
        columns.append((node, numel, reads))
    by_read: dict[tuple[fx.Node, int], fx.Node] = {}
    links = [(by_read.setdefault((buffer, numel), node), node) for node, numel, reads in columns for buffer in reads]
    order = nodes
    for group in _linked_groups([c for c, _, _ in columns], links):
        at = {n: i for i, n in enumerate(order)}
        first = min(at[n] for n in group)
        needed: set[fx.Node] = set()
        stack = list(group)
        while stack:
            node = stack.pop()
            if node in needed or at[node] < first:
                continue
            needed.add(node)
            stack += node.all_input_nodes
        later = order[first:]
        order = order[:first] + [n for n in later if n in needed] + [n for n in later if n not in needed]
    return order


def _column_reduction_numel(node: fx.Node) -> int | None:
    """The input's element count of a sum over every dimension but the last, else None."""
    if node.op != "call_function" or op_name(node.target) != "aten.sum":
        return None
    source = node.args[0] if node.args else None
    val = source.meta.get("val") if isinstance(source, fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dim() < 2:
        return None
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None:
        return None
    dims = {d % val.dim() for d in ([dims] if isinstance(dims, int) else dims)}
    if dims != set(range(val.dim() - 1)):
        return None
    return size_hint(val.numel())


def _fused_recompute_groups(order: list[fx.Node], members: set[fx.Node],
                            owner: dict[fx.Node, fx.Node]) -> list[list[fx.Node]]:
    """Recomputed pointwise values Inductor rebuilds in one fused kernel.

    Recomputed values depend on nothing backward makes, so Inductor fuses a connected set of
    recomputed pointwise values (the residual stream of every layer) into one kernel, which runs
    before the first of them is needed, after the recomputed values it reads (matmuls included):
    each value stored there exists from then on. Returns the connected sets (in graph order);
    ``_ancestors`` gives what else they pull forward.
    """
    eligible = [n for n in order if n in members and is_pointwise_op(n)]
    ok = set(eligible)
    return _linked_groups(eligible, [(owner.get(a, a), node) for node in eligible for a in node.all_input_nodes
                                     if owner.get(a, a) in ok])


def _linked_groups(items: list[fx.Node], links: Iterable[tuple[fx.Node, fx.Node]]) -> list[list[fx.Node]]:
    """The sets of two or more ``items`` that ``links`` (pairs of items) connect, each in the items'
    order, ordered by their first item."""
    parent = {n: n for n in items}

    def root(n: fx.Node) -> fx.Node:
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for a, b in links:
        parent[root(a)] = root(b)
    groups: dict[fx.Node, list[fx.Node]] = {}
    for node in items:
        groups.setdefault(root(node), []).append(node)
    return [g for g in groups.values() if len(g) > 1]


def _fused_into_rebuild(
    nodes: list[fx.Node], kernel: set[fx.Node], step: int, index: dict[fx.Node, int],
    owner: dict[fx.Node, fx.Node], stored: Callable[[fx.Node], bool], made: Callable[[fx.Node], int],
) -> list[set[fx.Node]]:
    """Later pointwise kernels Inductor fuses into a rebuild kernel (``kernel``, run at ``step``).

    Its scheduler fuses kernels that read the same buffers when nothing between them is needed:
    a backward pointwise kernel whose every input exists at ``step`` (or is made in the kernel),
    that reads a buffer the kernel reads or makes, over as many elements as one of its outputs,
    runs inside it. Seen in Inductor's generated backward of the seed Transformer on an H200
    (torch 2.11): the GELU backward ran in the kernel rebuilding the GELU forward for the FC2
    weight gradient (both read the FC1 output), before that matmul rather than after it; the
    FC1 output died there, and the GELU backward wrote over the dying incoming gradient. Returns each fused
    kernel's nodes: the stored value (``stored``) and the unstored pointwise values it computes
    inline. ``made``: the step each stored value exists from (-1: an input of the graph)."""
    reads = set(kernel) | {owner.get(a, a) for n in kernel for a in n.all_input_nodes}
    numels = {_numel(n) for n in kernel if stored(n)}
    parts: list[set[fx.Node]] = []
    joined: set[fx.Node] = set()
    for node in nodes:
        if (index[node] <= step or node in kernel or node.op != "call_function" or not is_pointwise_op(node)
                or not stored(node) or _numel(node) not in numels):
            continue
        inline: set[fx.Node] = set()
        buffers: set[fx.Node] = set()
        stack, ok = [node], True
        while stack and ok:
            for arg in stack.pop().all_input_nodes:
                base = owner.get(arg, arg)
                if base in kernel or base in joined or base in buffers or base in inline:
                    buffers.add(base)
                elif base.op == "call_function" and is_pointwise_op(base) and not stored(base):
                    inline.add(base)
                    stack.append(base)
                elif made(base) <= step:
                    buffers.add(base)
                else:
                    ok = False
                    break
        if ok and buffers & reads:
            part = {node} | {n for n in inline if all(u is node or u in inline for u in n.users)}
            parts.append(part)
            joined |= part
    return parts


def _numel(node: fx.Node) -> int | None:
    val = node.meta.get("val")
    return size_hint(val.numel()) if isinstance(val, torch.Tensor) else None


def _ancestors(group: list[fx.Node], members: set[fx.Node], owner: dict[fx.Node, fx.Node]) -> set[fx.Node]:
    """The group and the recomputed values (``members``) it is made from, transitively."""
    seen: set[fx.Node] = set()
    stack = list(group)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack += [owner.get(a, a) for a in node.all_input_nodes if owner.get(a, a) in members]
    return seen


def _drawn_in_kernel(node: fx.Node, group: list[fx.Node], readers: Iterable[fx.Node]) -> bool:
    """A recomputed ``inductor_random`` that only the fused chain ``group`` reads: Inductor draws it
    inside the chain's kernel and never stores it (seen in its generated backward of the seed
    Transformer on an H200, torch 2.11), though its lowering stores the forward's."""
    # by name: Inductor registers its prims only once it is imported
    return op_name(node.target) == "prims.inductor_random" and set(readers) <= set(group)


def _inductor_accumulator(node: fx.Node, device: torch.device | str | None) -> int | None:
    """Inductor lowers ``embedding_dense_backward`` to a zero-filled accumulator that reads nothing,
    so its scheduler fills it as backward starts (seen on an H200, torch 2.11: the embedding's
    fp32 gradient of a bf16 model, live through the whole backward). None for other ops; else the
    bytes of a separate fp32 accumulator for a 16-bit gradient, or 0 when the output itself is it."""
    if node.op != "call_function" or node.target is not torch.ops.aten.embedding_dense_backward.default:
        return None
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    if val.dtype in (torch.float16, torch.bfloat16):
        return round_allocation(size_hint(val.numel()) * 4, device)
    return 0


# Operands a matmul reads through a dense layout; a broadcast one is first copied out.
_DENSE_OPERANDS = {
    torch.ops.aten.mm.default: (0, 1),
    torch.ops.aten.bmm.default: (0, 1),
    torch.ops.aten.addmm.default: (1, 2),
    torch.ops.aten.baddbmm.default: (1, 2),
}


def _broadcast_copies(node: fx.Node, device: torch.device | str | None) -> int:
    """Bytes a matmul copies its broadcast operands into for the duration of the op.

    A broadcast operand (stride 0 along a dimension of more than one element: the expanded
    tangent of ``loss.sum()`` read by the output layer's matmuls) is no layout BLAS takes: eager
    ATen clones it inside the op, Inductor fills a dense buffer just before the extern matmul and
    frees it after (seen in its generated backward of the seed Transformer on an H200, torch
    2.11: a 256 MiB fp32 copy before each of the two matmuls reading the logits' gradient)."""
    positions = _DENSE_OPERANDS.get(node.target) if node.op == "call_function" else None
    if not positions:
        return 0
    total = 0
    for i in positions:
        arg = node.args[i] if i < len(node.args) else None
        val = arg.meta.get("val") if isinstance(arg, fx.Node) else None
        if isinstance(val, torch.Tensor) and any(
                size_hint(st) == 0 and size_hint(sz) > 1 for sz, st in zip(val.shape, val.stride())):
            total += round_allocation(size_hint(val.numel()) * val.element_size(), device)
    return total


def _attention_backward_workspace(node: fx.Node, device: torch.device | str | None) -> int:
    """Bytes the memory-efficient attention backward allocates inside the op, on top of its outputs.

    Its kernel accumulates the query's gradient in an fp32 workspace (the query's elements, 4 bytes
    each) next to ``delta``, one fp32 value per query row and head. For fp32 inputs ATen computes
    ``delta`` first, as ``(grad_out * out).sum(-1).transpose(-2, -1).contiguous()``: the product and
    two deltas, before the workspace; for 16-bit inputs the kernel computes it. Measured on an H200
    (torch 2.11, 8 x 12 heads x 1024 x 64): 25952256 bytes above the three gradients in fp32 (the
    product and two deltas), 25583616 in bf16 (the workspace, 24 KiB more than the query's
    elements, and one delta)."""
    if node.op != "call_function" or node.target is not _EFFICIENT_ATTENTION_BACKWARD:
        return 0
    vals = [a.meta.get("val") if isinstance(a, fx.Node) else None for a in node.args[:2]]
    if not all(isinstance(v, torch.Tensor) for v in vals):
        return 0
    grad_out, query = vals
    delta = round_allocation(size_hint(grad_out.numel()) // max(1, size_hint(grad_out.shape[-1])) * 4, device)
    workspace = round_allocation(size_hint(query.numel()) * 4, device) + delta
    if grad_out.dtype != torch.float32:
        return workspace
    return max(workspace, round_allocation(size_hint(grad_out.numel()) * 4, device) + 2 * delta)


_EFFICIENT_ATTENTION_BACKWARD = torch.ops.aten._scaled_dot_product_efficient_attention_backward.default


def inductor_addmm(nodes: list[fx.Node], device: torch.device | str | None) -> dict[fx.Node, fx.Node]:
    """Matmuls Inductor folds into a later add: ``add(mm(a, b), c)`` becomes ``addmm(c, a, b)``
    (its post-grad ``addmm`` pattern: the mm's only reader, ``c`` a tensor of the operands' dtype
    that broadcasts to the product, and, on a GPU, not when every reader of the sum is pointwise).
    The matmul then runs where the add is: on the seed Transformer's tied embedding, the output
    layer's weight gradient moves from the start of backward to its end, and its operands live
    until then. Returns each such mm and its add."""
    on_gpu = device is not None and torch.device(device).type == "cuda"
    moved: dict[fx.Node, fx.Node] = {}
    for node in nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.add.Tensor or len(node.args) != 2:
            continue
        if node.kwargs.get("alpha", 1) != 1:
            continue
        for mm, inp in (node.args, node.args[::-1]):
            if not (isinstance(mm, fx.Node) and isinstance(inp, fx.Node) and mm.op == "call_function"
                    and mm.target is torch.ops.aten.mm.default and len(mm.users) == 1):
                continue
            vals = [x.meta.get("val") for x in (inp, *mm.args[:2]) if isinstance(x, fx.Node)]
            out = mm.meta.get("val")
            if len(vals) != 3 or not all(isinstance(v, torch.Tensor) for v in (*vals, out)):
                continue
            if len({v.dtype for v in vals}) != 1 or not _broadcasts_to(vals[0].shape, out.shape):
                continue
            if on_gpu and all(u.op != "output" and is_pointwise_op(u) for u in node.users):
                continue
            moved[mm] = node
            break
    return moved


def _transient_steps(nodes: list[fx.Node], index: dict[fx.Node, int], device: torch.device | str | None,
                     fused_pointwise: bool) -> tuple[dict[fx.Node, int], dict[int, int]]:
    """Where matmuls run, and the bytes ops hold only while they run: the step of each matmul
    Inductor folds into a later add (under ``fused_pointwise``), and per step the copies of
    broadcast matmul operands and the attention backward's workspace."""
    runs_at = {mm: index[add] for mm, add in (inductor_addmm(nodes, device) if fused_pointwise else {}).items()}
    copies: dict[int, int] = {}
    for node in nodes:
        copied = _broadcast_copies(node, device) + _attention_backward_workspace(node, device)
        if copied:
            step = runs_at.get(node, index[node])
            copies[step] = copies.get(step, 0) + copied
    return runs_at, copies


def _made_by(node: fx.Node) -> fx.Node:
    """The node whose step allocates ``node``: for one output of a multi-output op, the op (it
    writes all its outputs while its inputs still live), else the node itself."""
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node) \
            and node.args[0].op == "call_function":
        return node.args[0]
    return node


def _broadcasts_to(shape: Any, target: Any) -> bool:
    if len(shape) > len(target):
        return False
    return all(size_hint(s) in (1, size_hint(t)) for s, t in zip(reversed(shape), reversed(target)))


def _is_scalar(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return not isinstance(val, torch.Tensor) or val.dim() == 0


def _fused_runs_until(nodes: list[fx.Node], index: dict[fx.Node, int],
                      readers: dict[fx.Node, list[fx.Node]]) -> dict[fx.Node, int]:
    """For each fused node (``readers``: the nodes whose kernels it runs in), the last step at which
    it runs: its last reader's, or that reader's own if the reader is fused too."""
    until: dict[fx.Node, int] = {}
    for node in reversed(nodes):
        if readers.get(node):
            until[node] = max(until.get(u, index[u]) for u in readers[node])
    return until


def _backward_needs(
    nodes: list[fx.Node],
    owner: dict[fx.Node, fx.Node],
    index: dict[fx.Node, int],
    uses_of: dict[fx.Node, set[int]],
    recomputed: set[str],
    first_backward: int,
) -> dict[fx.Node, set[int]]:
    """Backward steps at which each recomputed forward allocation must exist.

    Its own backward uses, and the step at which any recomputed value computed from it is
    rematerialised (recomputing ``relu(addmm)`` needs ``addmm`` alive at that moment; rebuilding
    attention's output needs q, k and v: the op that makes it reruns).
    """
    members = [n for n in nodes if n.name in recomputed and owner[n] is n and _side(n) == Side.FORWARD]
    needs = {n: {i for i in uses_of.get(n, ()) if i >= first_backward} for n in members}
    for node in sorted(members, key=index.__getitem__, reverse=True):
        if not needs[node]:
            continue
        at = min(needs[node])
        # one output of a multi-output op (attention's) is rebuilt by rerunning the op, which
        # reads the op's inputs then
        rebuilt_by = node.args[0] if node.target is operator.getitem and isinstance(node.args[0], fx.Node) else node
        for arg in rebuilt_by.all_input_nodes:
            base = owner[arg]
            if base in needs:
                needs[base].add(at)
    return needs


def _track_modules(node: fx.Node, moment: str, view: dict[str, int], module_live: dict[str, dict[str, Any]]) -> None:
    """Record ``view`` for every module running ``node``: ``moment`` is "before", "during" or "after"."""
    record = get_record(node)
    if node.op != "call_function" or not record.module_stack:
        return
    phase = "fw" if record.side == Side.FORWARD else "bw"
    for fqn in record.module_stack:
        entry = module_live.setdefault(fqn, {})
        if moment == "before":
            entry.setdefault(f"pre_{phase}", dict(view))
        elif moment == "during":
            peak = entry.get(f"peak_{phase}")
            if peak is None or view["total"] > peak["total"]:
                entry[f"peak_{phase}"] = dict(view)
        else:
            entry[f"post_{phase}"] = dict(view)


def _module_memory(entry: dict[str, dict[str, int]]) -> ModuleMemory:
    totals = {key: snap["total"] for key, snap in entry.items()}
    return ModuleMemory(**totals, views=entry)


def _parameter_bytes(info: Any, alloc: dict[fx.Node, int], gm: fx.GraphModule) -> int:
    from sac_compiler.capture import InputKind

    if info is None:
        return 0
    params = {i.name for i in info.inputs if i.kind == InputKind.PARAMETER}
    return sum(alloc.get(n, 0) for n in gm.graph.find_nodes(op="placeholder") if n.name in params)


def _optimizer_state_bytes(
    optimizer: torch.optim.Optimizer | None,
    explicit: int | None,
    info: Any,
    gm: fx.GraphModule,
    alloc: dict[fx.Node, int],
) -> int:
    """Optimizer state: measured from a stepped optimizer, else estimated from its type."""
    if explicit is not None:
        if explicit < 0:
            raise ValueError(f"optimizer_state_bytes must be >= 0, got {explicit}")
        return int(explicit)
    if optimizer is None:
        return 0
    device = info.target_device if info is not None else None
    if optimizer.state:
        return sum(
            round_allocation(tensor_nbytes(v), device)
            for state in optimizer.state.values()
            for v in state.values()
            if isinstance(v, torch.Tensor) and v.dim() > 0
        )
    per_param = STATE_PER_PARAM.get(type(optimizer).__name__)
    if per_param is None:
        raise ValueError(
            f"cannot estimate the state of {type(optimizer).__name__} before its first step: "
            "run one optimizer.step() first or pass optimizer_state_bytes="
        )
    if callable(per_param):
        per_param = per_param(optimizer)
    return int(per_param * _parameter_bytes(info, alloc, gm))


def _momentum(optimizer: torch.optim.Optimizer) -> float:
    return 1.0 if any(g.get("momentum", 0) for g in optimizer.param_groups) else 0.0


# state bytes per parameter byte of the optimizers whose state is known before their first step
STATE_PER_PARAM: dict[str, Any] = {
    "Adam": 2.0,
    "AdamW": 2.0,
    "Adamax": 2.0,
    "NAdam": 2.0,
    "RAdam": 2.0,
    "Adagrad": 1.0,
    "RMSprop": 1.0,
    "SGD": _momentum,
}


def _optimizer_step_peak(
    optimizer: torch.optim.Optimizer | None,
    static_bytes: int,
    opt_state: int,
    alloc: dict[fx.Node, int],
    grad_owners: set[fx.Node],
    info: Any,
) -> int:
    """Peak during optimizer.step(): parameters, state, gradients, and the step's temporaries.

    Foreach Adam-style steps materialise one parameter-sized temporary (``_foreach_sqrt`` of the
    second moment); other optimizers are counted without temporaries.
    """
    if optimizer is None:
        return 0
    grads = sum(alloc.get(n, 0) for n in grad_owners)
    temporaries = 0
    if type(optimizer).__name__ in ("Adam", "AdamW", "NAdam", "RAdam"):
        temporaries = opt_state // 2
    return static_bytes + grads + temporaries


@dataclass(frozen=True)
class PartitionedPeak:
    """Peak of the partitioned forward then backward graphs, as they run."""

    peak_bytes: int
    peak_graph: str
    peak_node: str
    saved_bytes: int  # what the forward hands to the backward
    end_of_forward_bytes: int


def _graph_liveness(
    gm: fx.GraphModule,
    live_at_start: int,
    keep: set[str],
    device: torch.device | str | None,
    fused_pointwise: bool,
    placeholder_storage: dict[str, tuple[str, int]] | None = None,
    static_storage: frozenset[str] = frozenset(),
    recomputed: frozenset[str] = frozenset(),
    timeline: list[tuple[str, int]] | None = None,
) -> tuple[int, str, int, dict[str, int], dict[str, str]]:
    """Peak, its node, and the live bytes at the end of one graph run op by op.

    Placeholders are counted by the caller (``live_at_start``); outputs named in ``keep`` (and the
    allocations they alias) stay allocated at the end; everything else is freed after its last use.
    ``placeholder_storage`` names, per placeholder, the allocation it lives in and that
    allocation's bytes (allocations of the graph that made them: their names are that graph's):
    placeholders sharing one are freed once, after the last use of any of them, and one whose
    allocation is in ``static_storage`` is never freed. ``recomputed`` names the nodes that rebuild
    forward values (chains of them run as one kernel under ``fused_pointwise``). Returns the bytes
    of every allocation by name, and the allocation each node lives in, as well. ``timeline``
    receives (node, live bytes while it runs) for every node.
    """
    nodes = list(gm.graph.nodes)
    owner: dict[fx.Node, fx.Node] = {}
    for node in nodes:
        if node.op == "call_function" and node.target is not operator.getitem and is_alias_op(node) and node.all_input_nodes:
            base = next((a for a in node.args if isinstance(a, fx.Node)), node.all_input_nodes[0])
            owner[node] = owner.get(base, base)
        else:
            owner[node] = node
    out = nodes[-1]
    outputs = {owner[a] for a in out.all_input_nodes}
    sizes: dict[fx.Node, int] = {}
    for node in nodes:
        if node.op != "call_function" or owner[node] is not node:
            continue
        if any(u.target is operator.getitem for u in node.users):
            continue
        sizes[node] = round_allocation(sum(tensor_nbytes(v) for v in tensor_values(node)), device)
    if fused_pointwise:
        fused = [n for n in sizes if is_pointwise_op(n) and n not in outputs and n.users
                 and all(fuses_pointwise_inputs(u) for u in n.users)]
        for node in _inductor_inlined(fused, lambda n: list(n.users), owner):
            sizes[node] = 0
        nodes = _column_reductions_scheduled(nodes, owner, lambda n: sizes.get(n, 0) > 0 or n.op == "placeholder")
    index = {n: i for i, n in enumerate(nodes)}
    runs_at, copies = _transient_steps(nodes, index, device, fused_pointwise)
    for mm in runs_at:
        sizes[mm] = 0
    made_at = {node: runs_at.get(_made_by(node), index[_made_by(node)]) for node in sizes}
    # a chain of recomputed pointwise values runs as one kernel, before the first of them is needed,
    # with the later pointwise kernels Inductor fuses into it
    kernels: list[tuple[list[fx.Node], int, set[fx.Node], list[set[fx.Node]]]] = []
    moved: dict[fx.Node, int] = {}
    if fused_pointwise and recomputed:
        members = {n for n in nodes if n.name in recomputed and n.op == "call_function"}
        rebuilt_at: dict[fx.Node, int] = {}
        for group in _fused_recompute_groups(nodes, members, owner):
            earliest = min(index[n] for n in group)
            kernel = _ancestors(group, members, owner)
            kernels.append((group, earliest, kernel, []))
            for node in kernel:
                rebuilt_at[node] = min(rebuilt_at.get(node, earliest), earliest)
        for _, earliest, kernel, parts in kernels:
            parts += _fused_into_rebuild(
                nodes, kernel, earliest, index, owner, lambda n: sizes.get(n, 0) > 0,
                lambda n: -1 if n.op == "placeholder" else moved.get(n, rebuilt_at.get(n, made_at.get(n, index[n]))))
            for part in parts:
                for node in part:
                    moved[node] = earliest
    # a fused node runs inside the kernels of its readers: what it reads lives until they run
    runs_until = _fused_runs_until(nodes, {**index, **moved},
                                   {n: list(n.users) for n, size in sizes.items() if size == 0})
    last: dict[fx.Node, int] = {}
    for node in nodes:
        if node.op == "output":
            continue
        at = moved.get(node, runs_at.get(node, runs_until.get(node, index[node])))
        for arg in node.all_input_nodes:
            last[owner[arg]] = max(last.get(owner[arg], -1), at)
    kept = {owner[n] for n in nodes if n.name in keep}
    handed_over: set[fx.Node] = set()  # inputs whose buffer a fused kernel's output takes over
    adopting: set[fx.Node] = set()  # the outputs that take one over (no allocation of their own)
    if kernels:
        readers_of: dict[fx.Node, set[fx.Node]] = {}
        for node in nodes:
            if node.op == "output" or owner[node] is node:
                for arg in node.all_input_nodes:
                    readers_of.setdefault(owner[arg], set()).add(node)
        for group, earliest, kernel, parts in kernels:
            for node in kernel | {n for part in parts for n in part}:
                if node in made_at:
                    made_at[node] = min(made_at[node], earliest)
                    if node in kernel and node not in outputs and _drawn_in_kernel(node, group, node.users):
                        sizes[node] = 0
            # an output takes over an input that only its own part of the kernel reads
            same_step = kernel.union(*parts)
            for part in (kernel, *parts):
                _hand_over_dying_inputs(nodes, part, earliest, owner, readers_of, kept, static_storage,
                                        placeholder_storage or {}, sizes, made_at, last, handed_over, adopting,
                                        same_step)
    frees: dict[int, list[int]] = {}
    for node, size in sizes.items():
        if node in kept or node in handed_over:
            continue
        frees.setdefault(last.get(node, index[node]), []).append(size)
    # placeholders (saved activations in the backward) freed after the last use of their allocation
    input_frees: set[tuple[int, int]] = set()  # (step, position) of those frees: never reused
    storage = placeholder_storage or {}
    groups: dict[str, list[fx.Node]] = {}
    group_bytes: dict[str, int] = {}
    for node in nodes:
        if node.op != "placeholder":
            continue
        key, nbytes = storage.get(node.name, (node.name, -1))
        if nbytes < 0:
            nbytes = round_allocation(sum(tensor_nbytes(v) for v in tensor_values(node)), device)
        groups.setdefault(key, []).append(node)
        group_bytes[key] = max(group_bytes.get(key, 0), nbytes)
    for key, members in groups.items():
        if key in static_storage or any(m in kept or m in handed_over for m in members):
            continue
        uses = [last[m] for m in members if m in last]
        if uses:
            step_frees = frees.setdefault(max(uses), [])
            input_frees.add((max(uses), len(step_frees)))
            step_frees.append(group_bytes[key])
    allocs: dict[int, list[int]] = {}
    if fused_pointwise:
        for node in sizes:
            accumulator = _inductor_accumulator(node, device)
            if accumulator == 0:
                made_at[node] = 0  # the output is the accumulator, filled as the graph starts
            elif accumulator:
                allocs.setdefault(0, []).append(accumulator)
                frees.setdefault(index[node], []).append(accumulator)
    for node, size in sizes.items():
        if node.op == "call_function" and node not in adopting:
            allocs.setdefault(made_at[node], []).append(size)
    taken, held = (_reused_frees(len(nodes), allocs, frees, lambda size: size,
                                 pooled=lambda i, j: (i, j) not in input_frees)
                   if fused_pointwise else ({}, set()))
    total, peak, peak_node = live_at_start, live_at_start, "start"
    for i, node in enumerate(nodes):
        total += sum(size for j, size in enumerate(allocs.get(i, ())) if (i, j) not in taken)
        if timeline is not None:
            timeline.append((node.name, total + copies.get(i, 0)))
        if total + copies.get(i, 0) > peak:
            peak, peak_node = total + copies.get(i, 0), node.name
        total -= sum(size for j, size in enumerate(frees.get(i, ())) if (i, j) not in held)
    return peak, peak_node, total, {n.name: s for n, s in sizes.items()}, {n.name: owner[n].name for n in nodes}


def _hand_over_dying_inputs(
    nodes: list[fx.Node], kernel: set[fx.Node], step: int, owner: dict[fx.Node, fx.Node],
    readers_of: dict[fx.Node, set[fx.Node]], kept: set[fx.Node], static_storage: frozenset[str],
    storage: dict[str, tuple[str, int]], sizes: dict[fx.Node, int], made_at: dict[fx.Node, int],
    last: dict[fx.Node, int], handed_over: set[fx.Node], adopting: set[fx.Node], same_step: set[fx.Node],
) -> None:
    """A fused recompute kernel (``kernel``: the nodes it computes, run at ``step``) is the last
    reader of the inputs only it reads: they die in it, and Inductor writes an output of the same
    size into a dying input's buffer (``in_out_ptr``; ``# reuse`` of the input in the generated
    code). Seen in Inductor's generated backward of the seed Transformer on an H200 (torch 2.11):
    the kernel rebuilding the residual stream of all four layers wrote three of its eleven outputs
    into the dying matmul outputs it read. Marks the inputs whose buffer is taken over
    (``handed_over``, no longer freed) and the outputs taking one (``adopting``, no allocation of
    their own), and moves the last use of every dying input to ``step``.

    An input read by a value the kernel computes without storing it does not die there if a
    kernel running later (outside ``same_step``: the kernels run at ``step``) computes that value
    again from it."""
    position = {n: i for i, n in enumerate(nodes)}
    escaping: dict[fx.Node, bool] = {}

    def escapes(node: fx.Node) -> bool:
        if node not in escaping:
            escaping[node] = sizes.get(node, 0) == 0 and any(
                u.op != "output" and (u not in same_step or escapes(u)) for u in node.users)
        return escaping[node]

    keys: dict[str, list[fx.Node]] = {}
    for node in nodes:
        if node.op == "placeholder":
            keys.setdefault(storage.get(node.name, (node.name, -1))[0], []).append(node)
    dying: list[tuple[fx.Node, int]] = []
    seen: set[fx.Node] = set()
    for node in sorted(kernel, key=position.__getitem__):
        for arg in node.all_input_nodes:
            base = owner.get(arg, arg)
            if base in kernel or base in seen or base in kept or base in handed_over:
                continue
            seen.add(base)
            readers = readers_of.get(base, set())
            if not readers <= kernel or any(escapes(r) for r in readers):
                continue
            last[base] = step
            if base.op == "placeholder":
                key, nbytes = storage.get(base.name, (base.name, -1))
                # a saved value shares its forward allocation with other saved views of it
                if key in static_storage or len(keys.get(key, ())) != 1 or nbytes <= 0:
                    continue
                dying.append((base, nbytes))
            elif sizes.get(base, 0) > 0:
                dying.append((base, sizes[base]))
    stored = [n for n in sorted(kernel, key=position.__getitem__)
              if n.op == "call_function" and sizes.get(n, 0) > 0 and made_at.get(n) == step and n not in adopting]
    for out in stored:
        match = next((d for d in dying if d[1] == sizes[out]), None)
        if match is None:
            continue
        dying.remove(match)
        handed_over.add(match[0])
        adopting.add(out)


def _reused_frees(steps: int, allocs: dict[int, list[Any]], frees: dict[int, list[Any]], size_of: Any,
                  graph_starts: Iterable[int] = (), pooled: Callable[[int, int], bool] | None = None,
                  ) -> tuple[dict[tuple[int, int], tuple[int, int]], set[tuple[int, int]]]:
    """Inductor's buffer reuse: a buffer its generated code frees is not released to the allocator
    when a later buffer of the same size takes it over (``# reuse`` in the generated code; the
    pool is last in, first out, within one graph); it stays allocated until then.

    Events are keyed (step, position in that step's list). Returns the allocations that take over
    a freed buffer (each to the free it takes) and the frees so held. Inductor declines a reuse
    that would raise its own estimate of the graph's peak, but that estimate is not the
    allocator's: on an H200 (torch 2.11) the seed Transformer's backward held three fp32
    FFN-sized buffers from one layer's FFN backward through its attention backward, for the next
    layer's FFN, and peaked there, 110 MiB over the simulation without reuse. The simulation takes
    every reuse it can. ``graph_starts``: steps where a new graph begins (the pool empties).

    A graph's inputs are freed, never reused (``del`` in the generated code: Inductor's wrapper
    keeps ``InputBuffer``s out of its pool): ``pooled(step, position)`` says which frees may be
    taken over. On the seed Transformer's 50% plan (H200, torch 2.11) the saved FC1 output was
    deleted as the GELU backward ran, where the simulation held its 96 MiB for a later buffer.
    """
    starts = set(graph_starts)
    pool: dict[int, list[tuple[int, int]]] = {}  # size -> frees waiting for a taker
    taken: dict[tuple[int, int], tuple[int, int]] = {}
    for i in range(steps):
        if i in starts:
            pool = {}
        for j, event in enumerate(allocs.get(i, ())):
            size = size_of(event)
            if size and pool.get(size):
                taken[(i, j)] = pool[size].pop()
        for j, event in enumerate(frees.get(i, ())):
            size = size_of(event)
            if size and (pooled is None or pooled(i, j)):
                pool.setdefault(size, []).append((i, j))
    return taken, set(taken.values())


def simulate_partitioned(
    fw: fx.GraphModule,
    bw: fx.GraphModule,
    num_fwd_outputs: int,
    static_names: set[str],
    target_device: torch.device | str | None = None,
    fused_pointwise: bool = False,
    extra_static_bytes: int = 0,
    forward_names: frozenset[str] = frozenset(),
    timelines: dict[str, list[tuple[str, int]]] | None = None,
    hold_outputs: bool = False,
) -> PartitionedPeak:
    """Peak memory of the partitioned graphs: forward, then backward reading what forward saved.

    ``static_names``: forward placeholders that stay allocated throughout (parameters, buffers, user
    inputs); ``extra_static_bytes``: memory outside the graphs (optimizer state); ``forward_names``:
    the joint graph's forward nodes (the backward's nodes so named are recomputed); ``timelines``
    receives each graph's live bytes per node, under ``"forward"`` and ``"backward"``.
    ``hold_outputs``: the caller keeps forward's outputs through backward; else it drops them
    between the graphs (``model(x).sum().backward()``).
    """
    fw_placeholders = [n for n in fw.graph.nodes if n.op == "placeholder"]
    static = extra_static_bytes + sum(
        round_allocation(sum(tensor_nbytes(v) for v in tensor_values(n)), target_device) for n in fw_placeholders
    )
    out = next(iter(fw.graph.find_nodes(op="output")))
    outs = [a for a in out.args[0] if isinstance(a, fx.Node)]
    saved = outs[num_fwd_outputs:]
    keep_fw = {n.name for n in outs} | {n.name for n in fw_placeholders}
    fw_peak, fw_node, fw_end, fw_sizes, fw_owner = _graph_liveness(
        fw, static, keep_fw, target_device, fused_pointwise,
        timeline=None if timelines is None else timelines.setdefault("forward", []))
    saved_owners = {fw_owner[n.name] for n in saved}
    user_outputs = sum(fw_sizes.get(fw_owner[n.name], 0) for n in outs[:num_fwd_outputs]
                       if fw_owner[n.name] not in saved_owners)
    saved_bytes = sum(fw_sizes.get(name, 0) for name in saved_owners)
    # between the graphs the caller drops the outputs (model(x).sum().backward()), or holds them
    at_backward = fw_end if hold_outputs else fw_end - user_outputs
    bw_placeholders = [n for n in bw.graph.nodes if n.op == "placeholder"]
    tangents = sum(round_allocation(sum(tensor_nbytes(v) for v in tensor_values(n)), target_device)
                   for n in bw_placeholders if n.name.startswith("tangents"))
    # the backward's placeholders are counted in at_backward (saved) and tangents; static ones stay
    keep_bw = {n.name for n in bw_placeholders if n.name in static_names}
    bw_out = next(iter(bw.graph.find_nodes(op="output")))
    keep_bw |= {a.name for a in bw_out.all_input_nodes}
    # a saved value lives in its forward allocation: a view of a parameter is never freed, and
    # views of one activation free it once
    storage = {n.name: (fw_owner[n.name], fw_sizes.get(fw_owner[n.name], -1)) for n in saved}
    bw_peak, bw_node, _, _, _ = _graph_liveness(bw, at_backward + tangents, keep_bw, target_device, fused_pointwise,
                                                storage, frozenset(n.name for n in fw_placeholders),
                                                forward_names,
                                                None if timelines is None else timelines.setdefault("backward", []))
    if bw_peak >= fw_peak:
        return PartitionedPeak(bw_peak, "backward", bw_node, saved_bytes, fw_end)
    return PartitionedPeak(fw_peak, "forward", fw_node, saved_bytes, fw_end)
