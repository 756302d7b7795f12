"""annotate_memory: bytes, storage and category per value, and the joint memory simulation.

Writes into ``node.meta["sac"]`` for every node that produces tensors:

* ``nbytes``: new bytes the node allocates (0 for views and other aliases: storage-aware);
* ``alloc_bytes``: the same, rounded as the target device's allocator rounds (CUDA: 512 bytes);
* ``storage_owner``: the node whose allocation this value lives in (itself, or a view's base);
* ``category``: parameter, buffer, input, gradient, activation (a forward value alive at the end of
  forward) or temporary.

and a :class:`MemorySimulation` into ``gm.meta["sac"]["annotate_memory"]``: the joint graph run in
its order. ``recomputed`` names forward values that backward rebuilds instead of keeping (default:
those the user wrapped in ``torch.utils.checkpoint``): they are freed after their last forward use
and live again from their first backward need (or the rebuild of a value made from them) to their
last. The result has the peak, the live bytes at the end of forward and per step, and per-module
snapshots ("current" at the module's exit and "peak" while it runs), as PyTorch's MemTracker
reports them.

The simulation is a list of :class:`~sac_compiler.passes.memory_model.Lifetime` records measured by
:func:`~sac_compiler.passes.memory_model.peak_sweep`, with the rules of
:data:`~sac_compiler.passes.memory_model.RULES` that apply to it; the partitioned simulation
(:func:`simulate_partitioned`) shares both (:mod:`sac_compiler.passes.partitioned_memory`).
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from sac_compiler.passes import partitioned_memory
from sac_compiler.passes.annotate_ops import (
    fuses_pointwise_inputs,
    is_pointwise_op,
)
from sac_compiler.passes.memory_model import (
    CUDA_ROUNDING,
    GRADIENTS_HELD,
    JOINT,
    LIVENESS,
    LOSS_MEMORY,
    RULES,
    Freed,
    Lifetime,
    category_timeline,
    enabled_rules,
    live_by,
    peak_sweep,
    round_allocation,
    rounding_device,
    rules_disabled,
    tensor_nbytes,
)
from sac_compiler.passes.memory_rules import (
    accumulated_reductions,
    allocated_by,
    ancestors,
    attention_backward_workspace,
    broadcast_copies,
    channels_last_copies,
    column_reductions_scheduled,
    drawn_in_kernel,
    embedding_accumulator,
    forward_part,
    fused_recompute_groups,
    fused_runs_until,
    inductor_addmm,
    inductor_inlined,
    inplace_pointwise,
    reuse_freed_buffers,
    runs_channels_last,
    storage_owners,
    transient_buffers,
)
from sac_compiler.passes.partitioned_memory import PartitionedPeak, simulate_partitioned
from sac_compiler.passes.record import (
    MemoryCategory,
    Side,
    call_functions,
    get_record,
    graph_results,
    tensor_values,
    update_record,
)
from torch import fx

log = logging.getLogger(__name__)

__all__ = [
    "CUDA_ROUNDING",
    "RULES",
    "Lifetime",
    "MemorySimulation",
    "ModuleMemory",
    "PartitionedPeak",
    "accumulated_reductions",
    "annotate_memory",
    "inductor_addmm",
    "peak_sweep",
    "round_allocation",
    "rules_disabled",
    "simulate_partitioned",
    "tensor_nbytes",
]

# the names the tests know these by
_attention_backward_workspace = attention_backward_workspace
_broadcast_copies = broadcast_copies
_drawn_in_kernel = drawn_in_kernel
_fused_recompute_groups = fused_recompute_groups
_inductor_inlined = inductor_inlined
_graph_liveness = partitioned_memory._graph_liveness


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
    timeline: list[tuple[str, int]] = field(repr=False)  # (node, live bytes after it)
    step_peaks: list[int] = field(repr=False)  # live bytes while each node runs (after its allocations)
    first_backward: int = field(repr=False)  # index of the first backward node in the graph order
    module_memory: dict[str, ModuleMemory] = field(repr=False)
    optimizer_state_bytes: int = 0
    # the optimizer step's peak, less what is held outside the graph but freed before it
    # (freed_before_optimizer): below 0 when that is more than the graph's own step
    optimizer_step_peak_bytes: int = 0
    lifetimes: tuple[Lifetime, ...] = field(default=(), repr=False, compare=False)
    # fsdp_sharding: live bytes while FSDP2 copies this graph's gradients into the reduce-scatter's
    # input after it (0 without sharding), and this rank's shards of the parameters and gradients
    reduce_scatter_peak_bytes: int = 0
    sharded_param_bytes: int = 0
    sharded_grad_bytes: int = 0
    # of end_of_forward_bytes, the caller's loss counted there (loss_memory): held once in a step,
    # not by each run of a graph that runs several times (SACConfig.runs_per_step)
    loss_bytes: int = 0

    def snapshot(self, kind: str = "peak") -> dict[str, int]:
        """``{"Total": bytes, <category>: bytes}`` at the peak (``"peak"``) or the end (``"current"``)."""
        if kind == "peak":
            out = {c.value: b for c, b in self.peak_by_category.items()}
            out["Total"] = self.peak_bytes
            return out
        if kind == "current":
            return {"Total": self.timeline[-1][1] if self.timeline else 0}
        raise ValueError(f"snapshot kind must be 'peak' or 'current', got {kind!r}")

    def category_timeline(self) -> list[tuple[int, str, dict[MemoryCategory, int]]]:
        """(step, node, live bytes by category while it runs) for every step of the graph."""
        return category_timeline(self.lifetimes, [name for name, _ in self.timeline])


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
    disabled_rules: Iterable[str] = (),
    loss_memory: int = 0,
    sharding: Any = None,
    freed_before_optimizer: int = 0,
    gradients_held: int = 0,
) -> MemorySimulation:
    """Annotate bytes and categories; simulate the joint graph in its order; return the result.

    ``annotate=False`` only simulates (a planner trying recompute sets): no node records, no
    per-module memory, nothing stored on the graph. ``hold_outputs``: the caller keeps the forward
    outputs to the end (as without the ``outputs_dropped`` rule). ``disabled_rules``: rules the
    simulation leaves out (:data:`RULES`). ``loss_memory``: bytes the caller's own code holds
    between forward and backward (a loss computed outside), counted at the end of forward only.
    ``sharding``: the graph's FSDP2 parameters and their shards (a
    :class:`sac_compiler.distributed.FSDPSharding`; the ``fsdp_sharding`` rule).
    ``freed_before_optimizer``: bytes counted as held outside the graph while it runs that are
    freed before the optimizer step (what the step's earlier graphs hold for their backwards, for a
    graph after a graph break): the optimizer step's peak is that much lower against them.
    ``gradients_held``: bytes of gradients of parameters the graph does not read that the step's
    backward makes before this graph's backward (the rest of the model after a graph break, an
    eager head): counted from the graph's first backward node through the optimizer step.
    """
    from sac_compiler.capture import InputKind, capture_info

    rules = enabled_rules(JOINT, fused_pointwise, disabled_rules)
    if "fsdp_sharding" not in rules or (sharding is not None and not sharding.shard_bytes):
        sharding = None
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
    owner = storage_owners(nodes)

    # 2. Bytes per allocation.
    nbytes: dict[fx.Node, int] = {}
    for node in nodes:
        if owner[node] is not node:
            continue
        vals = tensor_values(node)
        if node.op == "call_function" and any(u.target is operator.getitem for u in node.users):
            vals = []  # a multi-output op: its getitem users own the bytes
        nbytes[node] = sum(tensor_nbytes(v) for v in vals)

    # pointwise_fusion: values Inductor may fold into their consumers' kernels (sized 0 below,
    # once the recomputed values are known)
    fusable: set[fx.Node] = set()
    returned_nodes = set(outputs)
    if "pointwise_fusion" in rules:
        for node in call_functions(gm):
            if owner[node] is node and is_pointwise_op(node) and node not in returned_nodes and node.users:
                # (a forward value only backward reads, such as the one-hot of a cross-entropy's
                # targets that Inductor's joint passes compute apart: fusable in backward's kernels)
                same_side = [u for u in node.users if _side(u) == _side(node)]
                if all(fuses_pointwise_inputs(u) for u in same_side):
                    fusable.add(node)

    first_backward = next((i for i, n in enumerate(nodes) if n.op == "call_function" and _side(n) == Side.BACKWARD),
                          len(nodes) - 1)
    if "column_reduction_order" in rules:
        # the backward as Inductor schedules it once it fuses column reductions (a recomputed value
        # a moved kernel reads is then rebuilt earlier): what reads through a backward value folded
        # into its readers reads its inputs; a forward value is a buffer to backward
        folded = inductor_inlined([n for n in nodes[first_backward:] if n in fusable],
                                  lambda n: [u for u in n.users if _side(u) == Side.BACKWARD], owner,
                                  realize="realize_thresholds" in rules)
        nodes = column_reductions_scheduled(
            nodes, owner, lambda n: n.op == "placeholder" or _side(n) == Side.FORWARD or n not in folded,
            start=first_backward)

    # 3. Last use of every allocation (through its aliases).
    index = {node: i for i, node in enumerate(nodes)}
    last_use: dict[fx.Node, int] = {}
    for node in nodes:
        for arg in node.all_input_nodes:
            base = owner[arg]
            last_use[base] = max(last_use.get(base, -1), index[node])
    end = len(nodes) - 1
    # Gradients stay (they become .grad); forward outputs are held only when asked (outputs_dropped)
    hold = hold_outputs or "outputs_dropped" not in rules
    held = {owner[n] for n in grad_outputs | (fwd_outputs if hold else set())}

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

    # 5. Lifetimes.
    device = rounding_device(target_device, rules)
    alloc = {n: round_allocation(b, device) for n, b in nbytes.items()}
    remat_alloc = dict(alloc)  # the size of a value's second life, rebuilt in backward
    static = [n for n in nodes if n.op == "placeholder" and "tangents" not in n.name]
    tangents = [n for n in nodes if n.op == "placeholder" and "tangents" in n.name]
    opt_state = _optimizer_state_bytes(optimizer, optimizer_state_bytes, info, gm, alloc,
                                       rounded="cuda_rounding" in rules, sharding=sharding)
    # fsdp_sharding: the parameters' shards, alive throughout (the placeholders of FSDP parameters
    # are their all-gathered copies, which the graph reads while it runs)
    shards = round_allocation(sharding.sharded_param_bytes, device) if sharding is not None else 0
    static_bytes = sum(alloc.get(n, 0) for n in static) + opt_state + shards

    if recomputed is None:
        recomputed = {n.name for n in nodes if get_record(n).user_recompute}
    runs_at = ({mm: index[add] for mm, add in inductor_addmm(nodes, target_device, "far_addmm_apart" in rules).items()}
               if "addmm_fold" in rules else {})
    # Inductor's layout optimization of the forward (channels_last_copies, conv_workspace)
    forward_nodes = forward_part(nodes)
    channels_last = runs_channels_last(forward_nodes, target_device, rules)
    transients = transient_buffers(nodes, index, runs_at, device, rules, channels_last)
    for mm in runs_at:
        alloc[mm] = 0  # the addmm writes the sum: the product is no buffer of its own
    moved_by = dict.fromkeys(runs_at, "addmm_fold")
    if "accumulation_fusion" in rules:
        for red, chain_end in accumulated_reductions(nodes, "accumulation_apart" in rules).items():
            runs_at[red] = index[chain_end]
            alloc[red] = 0  # summed inside the fused kernel: no buffer of its own
            moved_by[red] = "accumulation_fusion"
    uses_of: dict[fx.Node, set[int]] = {}
    for node in nodes:
        if owner[node] is not node:
            continue  # an alias reads nothing itself; its users count as uses of its base
        for arg in node.all_input_nodes:
            if node.op == "output":
                continue  # returning a value is not a use: see ``released`` below
            uses_of.setdefault(owner[arg], set()).add(runs_at.get(node, index[node]))
    rematerialized = _backward_needs(nodes, owner, index, uses_of, recomputed, first_backward,
                                     rerun="multi_output_rerun" in rules)
    # the allocations a forward op reads or the forward returns: a recomputed value that only
    # backward reads is not computed in forward at all
    read_in_forward = {owner[a] for n in nodes if n.op == "call_function" and _side(n) == Side.FORWARD
                       for a in n.all_input_nodes} | {owner[n] for n in fwd_outputs}
    realize = "realize_thresholds" in rules

    # pointwise_fusion: rebuilt in backward, a fusable value is a buffer only if a non-fusing op
    # reads it there; otherwise it is recomputed inside each kernel that reads it
    def bw_readers(node: fx.Node) -> list[fx.Node]:
        return [u for u in node.users if _side(u) == Side.BACKWARD or u in rematerialized]

    inline = {node for node in fusable
              if node in rematerialized and all(fuses_pointwise_inputs(u) for u in bw_readers(node))}
    # ... unless Inductor stores it for reading too many buffers (it and the backward's own
    # fused values make up the backward graph Inductor lowers)
    inlined_bw = inductor_inlined(
        [n for n in nodes if n in inline or (n in fusable and _side(n) == Side.BACKWARD)], bw_readers, owner,
        realize=realize)
    inline &= inlined_bw
    remat_rule: dict[fx.Node, str] = {}  # the rule that last changed a rebuilt value's second life
    for node in inline:
        remat_alloc[node] = 0
        remat_rule[node] = "pointwise_fusion"
    # An inline value is recomputed inside every kernel that reads it: what it is rebuilt from
    # must exist until its last read, not only at its first.
    for node in sorted(inline, key=index.__getitem__, reverse=True):
        needed = rematerialized[node]
        if not needed:
            continue
        for arg in node.all_input_nodes:
            base = owner[arg]
            if rematerialized.get(base):
                rematerialized[base].add(max(needed))
    chain_kernels: list[tuple[int, set[fx.Node]]] = []
    if "recompute_chain_kernel" in rules:
        needed_now = {n for n, needed in rematerialized.items() if needed}
        for group in fused_recompute_groups(nodes, needed_now, owner,
                                            inline if "inlined_value_links_none" in rules else ()):
            earliest = min(min(rematerialized[n]) for n in group)
            chain_kernels.append((earliest, ancestors(group, needed_now, owner)))
            for node in chain_kernels[-1][1]:
                if earliest < min(rematerialized[node]):
                    remat_rule[node] = "recompute_chain_kernel"
                rematerialized[node].add(earliest)
                if "random_drawn_in_chain" in rules and drawn_in_kernel(
                        node, group, (u for u in node.users if _side(u) == Side.BACKWARD or u in needed_now)):
                    remat_alloc[node] = 0
                    remat_rule[node] = "random_drawn_in_chain"
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
    returned = {owner[n] for n in fwd_outputs} - held

    def released(node: fx.Node) -> bool:
        """A forward output the caller drops before backward (outputs_dropped)."""
        return node in returned and not any(i >= first_backward for i in uses_of.get(node, ()))

    # dying_input_reuse: a chain's kernel is the last reader of the kept values only it reads; an
    # output of the same size takes over such a value's buffer (as in the partitioned simulation)
    handed_over: dict[fx.Node, tuple[int, fx.Node]] = {}  # kept values whose buffer a rebuilt one takes: when, which
    adopting: set[fx.Node] = set()  # rebuilt values taking one (no allocation of their own)
    for step, kernel in (chain_kernels if "dying_input_reuse" in rules else ()):
        dying: list[fx.Node] = []
        for node in sorted(kernel, key=index.__getitem__):
            for arg in node.all_input_nodes:
                base = owner[arg]
                if (base in kernel or base in dying or base in handed_over or base in rematerialized
                        or base.op == "placeholder" or base in held or held_for_recompute.get(base) != step
                        or any(i >= first_backward for i in uses_of.get(base, ()))
                        or released(base)):  # a dropped output is gone before backward
                    continue
                dying.append(base)
        for node in sorted(kernel, key=index.__getitem__):
            needed = rematerialized.get(node)
            if not needed or min(needed) != step or not remat_alloc.get(node, 0) or node in adopting:
                continue
            match = next((d for d in dying if alloc.get(d, 0) == remat_alloc[node]), None)
            if match is not None:
                dying.remove(match)
                handed_over[match] = (step, node)
                adopting.add(node)
                remat_rule[node] = "dying_input_reuse"
    fused_fw = [n for n in nodes if n in fusable and _side(n) == Side.FORWARD and n not in held_for_recompute
                and (n in rematerialized or not any(_side(u) == Side.BACKWARD for u in n.users))]
    # a kept value is written out for backward; a recomputed one is not
    for node in inductor_inlined(fused_fw, lambda n: [u for u in n.users if _side(u) == Side.FORWARD], owner,
                                 realize=realize):
        alloc[node] = 0
    for node in inlined_bw:
        if _side(node) == Side.BACKWARD:
            alloc[node] = 0
    # A fused value runs inside the kernels of its readers on its side: what it reads lives until
    # they run.
    runs_until = fused_runs_until(
        nodes, index, {n: [u for u in n.users if _side(u) == _side(n)]
                       for n in fusable if alloc.get(n) == 0})
    for node, until in runs_until.items():
        for arg in node.all_input_nodes:
            uses_of.setdefault(owner[arg], set()).add(until)

    if "inplace_pointwise" in rules:
        # a kernel's output written into a dying buffer it reads (as in the partitioned simulation);
        # values with a second life in backward neither give nor take one here
        last_at = {base: max(uses | ({held_for_recompute[base]} if base in held_for_recompute else set()))
                   for base, uses in uses_of.items() if uses}
        not_given = (held | set(rematerialized) | set(handed_over) | returned
                     | {n for n in nodes if n.op == "placeholder"})
        sizes = {n: alloc.get(n, 0) for n in nodes if owner[n] is n and n.op == "call_function"
                 and (n not in rematerialized or alloc.get(n, 0) == 0)}
        inplace_pointwise(nodes, sizes, {}, owner, {n: runs_at.get(n, index[n]) for n in nodes},
                          last_at, not_given, handed_over, adopting, {}, exclusive=False, side_of=_side,
                          padded_layout="padded_layout" in rules)

    # MemTracker's split of the live bytes: made in forward / made in backward / gradients.
    phase_of = {n: ("grad" if categories[n] == MemoryCategory.GRADIENT
                    else "act" if _side(n) == Side.FORWARD and n.op != "placeholder" else "temp")
                for n in nodes if n.op != "output"}
    lifetimes = [Lifetime(n.name, alloc.get(n, 0), -1, None, categories[n]) for n in static]
    if opt_state:
        lifetimes.append(Lifetime("optimizer_state", opt_state, -1, None, MemoryCategory.OPTIMIZER_STATE))
    if sharding is not None:
        lifetimes.append(Lifetime("fsdp_parameter_shards", shards, -1, None, MemoryCategory.PARAMETER,
                                  "fsdp_sharding"))
        if sharding.prefetch_bytes and first_backward < end:
            # the block whose backward runs next is all-gathered while this one's runs
            lifetimes.append(Lifetime("fsdp_prefetch", round_allocation(sharding.prefetch_bytes, device),
                                      first_backward, None, MemoryCategory.PARAMETER, "fsdp_sharding",
                                      phase="temp"))
    # for buffer_reuse: the allocations that may take a freed buffer, and the frees that may hand
    # theirs over, each in the order the steps make them (positions in ``lifetimes``)
    takers: list[int] = []
    givers: list[int] = []
    inputs_deleted = "inputs_deleted" in rules

    def add(node: fx.Node, life: Lifetime, takes: bool = True, gives: bool | None = None) -> None:
        """``gives`` None: a free Inductor may hand over unless it deletes an input of the backward
        graph (a tangent, or a value forward saved for it)."""
        if takes:
            takers.append(len(lifetimes))
        if life.free_step is not None and life.freed is Freed.AFTER:
            if gives is None:
                gives = not inputs_deleted or (node.op != "placeholder" and not (
                    life.free_step >= first_backward and _side(node) == Side.FORWARD))
            if gives:
                givers.append(len(lifetimes))
        lifetimes.append(life)
    static_set, tangent_set = set(static), set(tangents)
    for node in nodes:
        if owner[node] is not node or node.op == "output" or node in static_set:
            continue
        made = allocated_by(node) if "multi_output_at_op" in rules else node
        start_at = first_backward if node in tangent_set else runs_at.get(made, index[made])
        rule = moved_by[made] if made in runs_at else "multi_output_at_op" if made is not node else LIVENESS
        cat, phase = categories[node], phase_of[node]
        early, accumulator = embedding_accumulator(node, device, rules)
        if start_at >= first_backward:
            if accumulator:
                add(node, Lifetime(node.name, accumulator, first_backward if early else start_at, index[node],
                                   cat, "fp32_accumulator", phase=phase))
            elif early:
                start_at, rule = first_backward, "embedding_grad_early"  # the output is the accumulator
        size = alloc.get(node, 0)
        if size == 0 and nbytes.get(node, 0):
            rule = moved_by.get(node, "pointwise_fusion")
        if node in held:
            add(node, Lifetime(node.name, size, start_at, None, cat, rule, phase=phase))
            continue
        uses = sorted(uses_of.get(node, ()))
        if released(node):  # the caller drops it (model(x).sum().backward()) before backward
            add(node, Lifetime(node.name, size, start_at, first_backward - 1, cat, "outputs_dropped",
                               Freed.RELEASED, phase))
            continue
        if node in held_for_recompute:  # kept so that a recomputed value can be rebuilt from it
            uses = sorted(set(uses) | {held_for_recompute[node]})
        if node in rematerialized:
            fw_uses = [i for i in uses if i < first_backward]
            if node in read_in_forward:  # else the partitioner leaves it out of the forward graph
                add(node, Lifetime(node.name, size, start_at, fw_uses[-1] if fw_uses else start_at, cat, rule,
                                   phase=phase))
            needed = rematerialized[node]
            if needed:  # rematerialised for its first backward need, kept to its last
                add(node, Lifetime(node.name, remat_alloc.get(node, 0), min(needed), max(needed), cat,
                                   remat_rule.get(node, LIVENESS), phase=phase),
                    takes=node not in adopting, gives=True)
            continue
        if node in adopting:  # it writes over an input dying in its kernel (inplace_pointwise)
            rule = "inplace_pointwise"
        if node in handed_over:  # its buffer is written over by the value taking it
            step, taker = handed_over[node]
            add(node, Lifetime(node.name, size, start_at, step - 1, cat,
                               "dying_input_reuse" if taker in rematerialized else "inplace_pointwise",
                               Freed.HANDED_OVER, phase, taker.name), takes=node not in adopting)
        else:
            add(node, Lifetime(node.name, size, start_at, uses[-1] if uses else start_at, cat, rule, phase=phase),
                takes=node not in adopting)
    for node, step, nbytes_, rule in transients:
        lifetimes.append(Lifetime(node.name, nbytes_, step, step, MemoryCategory.TEMPORARY, rule, phase="temp"))
    if "channels_last_copies" in rules:
        for node, copy in channels_last_copies(forward_nodes, target_device, channels_last).items():
            # held to the input's last reader: a backward op, or a forward op rebuilt in backward
            reads = [index[u] if _side(u) == Side.BACKWARD or not rematerialized.get(u) else max(rematerialized[u])
                     for u in node.users]
            saved = any(i >= first_backward for i in reads)
            lifetimes.append(Lifetime(f"{node.name} (channels-last copy)", round_allocation(copy, device), 0,
                                      max(reads), MemoryCategory.ACTIVATION if saved else MemoryCategory.TEMPORARY,
                                      "channels_last_copies", phase="act"))
    loss_bytes = 0
    if loss_memory and 0 < first_backward <= end:
        # the caller's loss, between the graphs: from the end of forward until backward begins
        loss_bytes = loss_memory
        lifetimes.append(Lifetime(LOSS_MEMORY, loss_memory, first_backward - 1, first_backward - 1,
                                  MemoryCategory.TEMPORARY, freed=Freed.RELEASED, phase="temp"))
    if gradients_held and 0 < first_backward <= end:
        lifetimes.append(Lifetime(GRADIENTS_HELD, gradients_held, first_backward, None, MemoryCategory.GRADIENT,
                                  phase="grad"))
    if "buffer_reuse" in rules:
        reuse_freed_buffers(lifetimes, takers, givers, len(nodes), (first_backward,))

    sweep = peak_sweep(lifetimes, len(nodes), key=(lambda life: life.phase) if annotate else None)
    peak, peak_step = sweep.peak_bytes, sweep.peak_step
    peak_cats = live_by(lifetimes, 3 * peak_step + 1, lambda life: life.category)
    end_of_forward = sweep.timeline[first_backward - 1][1] if first_backward >= 1 else sweep.timeline[-1][2]
    module_live: dict[str, dict[str, Any]] = {}
    if annotate:
        assert sweep.by_key is not None
        for node, totals, phases in zip(nodes, sweep.timeline, sweep.by_key):
            for moment, total, live in zip(("before", "during", "after"), totals, phases):
                view = {"total": total, "act": live.get("act", 0), "temp": live.get("temp", 0),
                        "grad": live.get("grad", 0)}
                _track_modules(node, moment, view, module_live)

    gathered = 0  # fsdp_sharding: the all-gathered parameters FSDP frees after backward
    sharded_grads = 0
    reduce_scatter_peak = 0
    if sharding is not None:
        gathered = sum(alloc.get(n, 0) for n in static if n.name in sharding.shard_bytes)
        sharded_grads = shards
        # after the graph, FSDP copies the unsharded gradients into the reduce-scatter's input
        # (every gradient padded to world_size shards) beside all the graph leaves
        reduce_scatter_peak = sweep.timeline[-1][2] + round_allocation(sharding.reduce_scatter_bytes, device)
    step_peak = _optimizer_step_peak(optimizer, static_bytes - gathered, opt_state, alloc, grad_owners,
                                     _sharded_gradients(nodes, owner, n_fwd, sharding), sharded_grads)
    # not clamped at 0: what is freed is counted outside the graph, which can hold more than the
    # graph's own optimizer step (a small graph after a graph break); the planner adds it back
    step_peak -= freed_before_optimizer
    if optimizer is not None:  # the other graphs' gradients are there when the optimizer steps
        step_peak += gradients_held
    last = max(step_peak, reduce_scatter_peak)
    result = MemorySimulation(
        peak_bytes=max(peak, last),
        peak_node=((nodes[peak_step].name if peak_step >= 0 else "start") if peak >= last
                   else "optimizer.step" if step_peak >= reduce_scatter_peak else "reduce_scatter"),
        peak_by_category={c: b for c, b in peak_cats.items() if b},
        end_of_forward_bytes=end_of_forward,
        static_bytes=static_bytes,
        timeline=[(node.name, after) for node, (_, _, after) in zip(nodes, sweep.timeline)],
        step_peaks=[during for _, during, _ in sweep.timeline],
        first_backward=first_backward,
        module_memory={fqn: _module_memory(v) for fqn, v in module_live.items()},
        optimizer_state_bytes=opt_state,
        optimizer_step_peak_bytes=step_peak,
        lifetimes=tuple(lifetimes),
        reduce_scatter_peak_bytes=reduce_scatter_peak,
        sharded_param_bytes=shards,
        sharded_grad_bytes=sharded_grads,
        loss_bytes=loss_bytes,
    )
    if annotate:
        graph_results(gm)["annotate_memory"] = result
    return result


def _backward_needs(
    nodes: list[fx.Node],
    owner: dict[fx.Node, fx.Node],
    index: dict[fx.Node, int],
    uses_of: dict[fx.Node, set[int]],
    recomputed: set[str],
    first_backward: int,
    rerun: bool = True,
) -> dict[fx.Node, set[int]]:
    """Backward steps at which each recomputed forward allocation must exist.

    Its own backward uses, and the step at which any recomputed value computed from it is
    rematerialised (recomputing ``relu(addmm)`` needs ``addmm`` alive at that moment; rebuilding
    attention's output needs q, k and v: the op that makes it reruns, with ``rerun``, the
    ``multi_output_rerun`` rule).
    """
    members = [n for n in nodes if n.name in recomputed and owner[n] is n and _side(n) == Side.FORWARD]
    needs = {n: {i for i in uses_of.get(n, ()) if i >= first_backward} for n in members}
    for node in sorted(members, key=index.__getitem__, reverse=True):
        if not needs[node]:
            continue
        at = min(needs[node])
        # one output of a multi-output op (attention's) is rebuilt by rerunning the op, which
        # reads the op's inputs then
        rebuilt_by = (node.args[0] if rerun and node.target is operator.getitem and isinstance(node.args[0], fx.Node)
                      else node)
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


def _parameter_bytes(info: Any, alloc: dict[fx.Node, int], gm: fx.GraphModule, sharding: Any = None) -> int:
    """Bytes of the parameters a rank's optimizer steps: the graph's parameters, FSDP's as shards."""
    from sac_compiler.capture import InputKind

    if info is None:
        return 0
    params = {i.name for i in info.inputs if i.kind == InputKind.PARAMETER}
    shards = sharding.shard_bytes if sharding is not None else {}
    return sum(shards[n.name] if n.name in shards else alloc.get(n, 0)
               for n in gm.graph.find_nodes(op="placeholder") if n.name in params)


def _optimizer_state_bytes(
    optimizer: torch.optim.Optimizer | None,
    explicit: int | None,
    info: Any,
    gm: fx.GraphModule,
    alloc: dict[fx.Node, int],
    rounded: bool = True,
    sharding: Any = None,
) -> int:
    """Optimizer state: measured from a stepped optimizer, else estimated from its type (rounded
    for the target device with ``rounded``); under FSDP (``sharding``) of the parameters' shards."""
    if explicit is not None:
        if explicit < 0:
            raise ValueError(f"optimizer_state_bytes must be >= 0, got {explicit}")
        return int(explicit)
    if optimizer is None:
        return 0
    device = info.target_device if info is not None and rounded else None
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
    return int(per_param * _parameter_bytes(info, alloc, gm, sharding))


def _momentum(optimizer: torch.optim.Optimizer) -> float:
    return 1.0 if any(g.get("momentum", 0) for g in optimizer.param_groups) else 0.0


def _sharded_gradients(nodes: list[fx.Node], owner: dict[fx.Node, fx.Node], num_fwd_outputs: int,
                       sharding: Any) -> set[fx.Node]:
    """The allocations of the graph's gradients of FSDP's parameters (FSDP reduce-scatters them to
    shards). The joint graph's outputs after the forward's are its inputs' gradients, in order."""
    if sharding is None:
        return set()
    out = nodes[-1]
    grads = list(out.args[0])[num_fwd_outputs:]
    primals = [n for n in nodes if n.op == "placeholder" and not n.name.startswith("tangents")]
    return {owner[g] for p, g in zip(primals, grads) if isinstance(g, fx.Node) and p.name in sharding.shard_bytes}


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
    fsdp_grads: set[fx.Node] = frozenset(),
    sharded_grads: int = 0,
) -> int:
    """Peak during optimizer.step(): parameters, state, gradients, and the step's temporaries.

    Foreach Adam-style steps materialise one parameter-sized temporary (``_foreach_sqrt`` of the
    second moment); other optimizers are counted without temporaries. Under FSDP ``static_bytes``
    holds no all-gathered parameters, and the gradients of FSDP's parameters (``fsdp_grads``, the
    graph's unsharded ones) are their shards (``sharded_grads``).
    """
    if optimizer is None:
        return 0
    grads = sum(alloc.get(n, 0) for n in grad_owners - fsdp_grads) + sharded_grads
    temporaries = 0
    if type(optimizer).__name__ in ("Adam", "AdamW", "NAdam", "RAdam"):
        temporaries = opt_state // 2
    return static_bytes + grads + temporaries

