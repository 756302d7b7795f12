"""The partitioned memory simulation: the forward graph, then the backward graph reading what
forward saved, each run op by op as :class:`~sac_compiler.passes.memory_model.Lifetime` records and
measured by :func:`~sac_compiler.passes.memory_model.peak_sweep`, with the rules of
:data:`~sac_compiler.passes.memory_model.RULES` that apply to it.

The plain model: the backward starts with what forward left (less the outputs the caller dropped)
and the tangents; a value is freed after its last use, a saved one after the last use of any view
of it, never if it is a view of a forward input; outputs stay to the end.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from sac_compiler.passes.annotate_ops import (
    fuses_pointwise_inputs,
    is_pointwise_op,
)
from sac_compiler.passes.memory_model import (
    LIVENESS,
    LOSS_MEMORY,
    PARTITIONED,
    Freed,
    Lifetime,
    category_timeline,
    enabled_rules,
    live_by,
    peak_sweep,
    round_allocation,
    rounding_device,
    tensor_nbytes,
)
from sac_compiler.passes.memory_rules import (
    accumulated_reductions,
    allocated_by,
    ancestors,
    channels_last_copies,
    column_reductions_scheduled,
    drawn_in_kernel,
    embedding_accumulator,
    fused_into_rebuild,
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
from sac_compiler.passes.record import MemoryCategory, tensor_values
from torch import fx


@dataclass(frozen=True)
class PartitionedPeak:
    """Peak of the partitioned forward then backward graphs, as they run."""

    peak_bytes: int
    peak_graph: str
    peak_node: str
    saved_bytes: int  # what the forward hands to the backward
    end_of_forward_bytes: int
    # per graph (forward, backward): its records and its steps' nodes, in the order simulated
    lifetimes: tuple[tuple[Lifetime, ...], ...] = field(default=(), repr=False, compare=False)
    steps: tuple[tuple[str, ...], ...] = field(default=(), repr=False, compare=False)

    def category_timeline(self) -> list[tuple[int, str, dict[MemoryCategory, int]]]:
        """(step, node, live bytes by category while it runs): the forward's steps, then the
        backward's (numbered on from the forward's)."""
        out: list[tuple[int, str, dict[MemoryCategory, int]]] = []
        for lifetimes, names in zip(self.lifetimes, self.steps):
            out += category_timeline(lifetimes, names, first_step=len(out))
        return out

    def live_at_peak(self) -> list[tuple[str, str, str, int]]:
        """(allocation, category, rule, bytes) of everything live while the peak's step runs,
        largest first: the simulation's side of a comparison with the allocator's
        (``plots.allocator_live_at_peak``)."""
        if not self.lifetimes:
            raise ValueError("this PartitionedPeak carries no lifetimes: simulate_partitioned records them")
        index = 0 if self.peak_graph == "forward" else 1
        lifetimes, names = self.lifetimes[index], self.steps[index]
        step = peak_sweep(lifetimes, len(names)).peak_step
        live = live_by(lifetimes, 3 * step + 1, key=lambda life: (life.name, life.category.value, life.rule))
        return sorted(((*k, size) for k, size in live.items() if size), key=lambda row: -row[3])


@dataclass(frozen=True)
class _GraphRun:
    """One graph of the partitioned simulation, run op by op."""

    peak_bytes: int
    peak_node: str
    end_bytes: int  # live after its last step
    sizes: dict[str, int]  # bytes of every allocation its nodes make, by node
    owner: dict[str, str]  # the allocation each node lives in
    lifetimes: tuple[Lifetime, ...]
    steps: tuple[str, ...]  # the nodes in the order run
    timeline: list[tuple[int, int, int]]


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
    disabled_rules: Iterable[str] = (),
    donated_storage: frozenset[str] = frozenset(),
) -> tuple[int, str, int, dict[str, int], dict[str, str]]:
    """Peak, its node, and the live bytes at the end of one graph run op by op (see
    :func:`_run_graph`); ``live_at_start``: the bytes alive as it starts, placeholders included.
    Returns the bytes of every allocation by name, and the allocation each node lives in, as well.
    ``timeline`` receives (node, live bytes while it runs) for every node; ``disabled_rules``: the
    rules left out (:data:`RULES`); ``donated_storage``: see :func:`_run_graph`."""
    rules = enabled_rules(PARTITIONED, fused_pointwise, disabled_rules)
    run = _run_graph(gm, {MemoryCategory.INPUT: live_at_start}, keep, device, rules,
                     placeholder_storage, static_storage, recomputed, donated_storage=donated_storage)
    if timeline is not None:
        timeline += [(name, during) for name, (_, during, _) in zip(run.steps, run.timeline)]
    return run.peak_bytes, run.peak_node, run.end_bytes, run.sizes, run.owner


def _run_graph(
    gm: fx.GraphModule,
    start: Mapping[MemoryCategory, int],
    keep: set[str],
    device: torch.device | str | None,
    rules: frozenset[str],
    placeholder_storage: dict[str, tuple[str, int]] | None = None,
    static_storage: frozenset[str] = frozenset(),
    recomputed: frozenset[str] = frozenset(),
    saved: frozenset[str] = frozenset(),
    kept_category: MemoryCategory = MemoryCategory.GRADIENT,
    input_category: Callable[[str], MemoryCategory] = lambda key: MemoryCategory.INPUT,
    donated_storage: frozenset[str] = frozenset(),
    loss_memory: int = 0,
    layout_copies: Mapping[str, int] | None = None,
    carried_copies: Mapping[str, int] | None = None,
    channels_last: bool = False,
) -> _GraphRun:
    """One graph run op by op: its lifetimes and their sweep.

    ``start``: the bytes alive as it starts, by category, placeholders included. Outputs named in
    ``keep`` (and the allocations they alias) stay allocated at the end; everything else is freed
    after its last use. ``placeholder_storage`` names, per placeholder, the allocation it lives in
    and that allocation's bytes (allocations of the graph that made them: their names are that
    graph's): placeholders sharing one are freed once, after the last use of any of them, and one
    whose allocation is in ``static_storage`` is never freed. ``recomputed`` names the nodes that
    rebuild forward values (chains of them run as one kernel: ``recompute_chain_kernel``).

    Categories: a placeholder's allocation ``input_category(its name)``, taken out of ``start``;
    the allocation of an output in ``saved`` (saved for the next graph) activation, of another kept
    one ``kept_category``, of anything else temporary. ``donated_storage``: the allocations of
    placeholders the graph may write over (the backward's saved values that alias no input or
    output of the forward: AOTAutograd donates them to Inductor). ``layout_copies``: placeholders
    the graph copies to channels-last as it starts, with the copies' bytes (``channels_last_copies``),
    kept where ``saved``; ``carried_copies``: such copies the previous graph saved, by the name of
    the placeholder they stand for, part of ``start`` (activations), freed after its last use.
    ``channels_last``: the convolutions run channels-last (Inductor optimized the forward's layout).
    """
    target, device = device, rounding_device(device, rules)
    nodes = list(gm.graph.nodes)
    owner = storage_owners(nodes)
    out = nodes[-1]
    outputs = {owner[a] for a in out.all_input_nodes}
    sizes: dict[fx.Node, int] = {}
    rule_of: dict[fx.Node, str] = {}  # the rule that last set a node's bytes or its step
    on_host = _on_host(target) if "host_copies" in rules else (lambda node: False)
    for node in nodes:
        if node.op != "call_function" or owner[node] is not node:
            continue
        if any(u.target is operator.getitem for u in node.users):
            continue
        if on_host(node):
            sizes[node] = 0
            rule_of[node] = "host_copies"
            continue
        sizes[node] = round_allocation(sum(tensor_nbytes(v) for v in tensor_values(node)), device)
    if "pointwise_fusion" in rules:
        fused = [n for n in sizes if is_pointwise_op(n) and n not in outputs and n.users
                 and all(fuses_pointwise_inputs(u) for u in n.users)]
        for node in inductor_inlined(fused, lambda n: list(n.users), owner, realize="realize_thresholds" in rules):
            sizes[node] = 0
            rule_of[node] = "pointwise_fusion"
    if "column_reduction_order" in rules:
        nodes = column_reductions_scheduled(nodes, owner, lambda n: sizes.get(n, 0) > 0 or n.op == "placeholder")
    index = {n: i for i, n in enumerate(nodes)}
    runs_at = ({mm: index[add] for mm, add in inductor_addmm(nodes, target, "far_addmm_apart" in rules).items()}
               if "addmm_fold" in rules else {})
    transients = transient_buffers(nodes, index, runs_at, device, rules, channels_last)
    for mm in runs_at:
        sizes[mm] = 0
        rule_of[mm] = "addmm_fold"
    if "accumulation_fusion" in rules:
        for red, chain_end in accumulated_reductions(nodes, "accumulation_apart" in rules).items():
            runs_at[red] = index[chain_end]
            sizes[red] = 0  # summed inside the fused kernel: no buffer of its own
            rule_of[red] = "accumulation_fusion"
    made_by = allocated_by if "multi_output_at_op" in rules else (lambda n: n)
    made_at = {node: runs_at.get(made_by(node), index[made_by(node)]) for node in sizes}
    for node in sizes:
        if made_by(node) is not node:
            rule_of.setdefault(node, "multi_output_at_op")
    # a chain of recomputed pointwise values runs as one kernel, before the first of them is needed,
    # with the later pointwise kernels Inductor fuses into it
    kernels: list[tuple[list[fx.Node], int, set[fx.Node], list[set[fx.Node]]]] = []
    moved: dict[fx.Node, int] = {}
    if "recompute_chain_kernel" in rules and recomputed:
        members = {n for n in nodes if n.name in recomputed and n.op == "call_function"}
        rebuilt_at: dict[fx.Node, int] = {}
        inlined = ({n for n in sizes if rule_of.get(n) == "pointwise_fusion"}
                   if "inlined_value_links_none" in rules else set())
        for group in fused_recompute_groups(nodes, members, owner, inlined):
            earliest = min(index[n] for n in group)
            kernel = ancestors(group, members, owner)
            kernels.append((group, earliest, kernel, []))
            for node in kernel:
                rebuilt_at[node] = min(rebuilt_at.get(node, earliest), earliest)
        for _, earliest, kernel, parts in kernels if "rebuild_fusion" in rules else ():
            parts += fused_into_rebuild(
                nodes, kernel, earliest, index, owner, lambda n: sizes.get(n, 0) > 0,
                lambda n: -1 if n.op == "placeholder" else moved.get(n, rebuilt_at.get(n, made_at.get(n, index[n]))))
            for part in parts:
                for node in part:
                    moved[node] = earliest
    # a fused node runs inside the kernels of its readers: what it reads lives until they run
    runs_until = fused_runs_until(nodes, {**index, **runs_at, **moved},
                                  {n: list(n.users) for n, size in sizes.items()
                                   if size == 0 and rule_of.get(n) != "host_copies"})
    last: dict[fx.Node, int] = {}
    for node in nodes:
        if node.op == "output":
            continue
        at = moved.get(node, runs_at.get(node, runs_until.get(node, index[node])))
        for arg in node.all_input_nodes:
            last[owner[arg]] = max(last.get(owner[arg], -1), at)
    kept = {owner[n] for n in nodes if n.name in keep}
    handed_over: dict[fx.Node, tuple[int, fx.Node]] = {}  # inputs a fused kernel's output writes over: when, which
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
                    if earliest < made_at[node]:
                        made_at[node] = earliest
                        rule_of[node] = "rebuild_fusion" if node not in kernel else "recompute_chain_kernel"
                    if (node in kernel and node not in outputs and "random_drawn_in_chain" in rules
                            and drawn_in_kernel(node, group, node.users)):
                        sizes[node] = 0
                        rule_of[node] = "random_drawn_in_chain"
            # an output takes over an input that only its own part of the kernel reads
            same_step = kernel.union(*parts)
            for part in (kernel, *parts):
                _hand_over_dying_inputs(nodes, part, earliest, owner, readers_of, kept, static_storage,
                                        placeholder_storage or {}, sizes, made_at, last, handed_over, adopting,
                                        same_step, hand_over="dying_input_reuse" in rules)
    if "inplace_pointwise" in rules:
        inplace_pointwise(nodes, sizes, rule_of, owner, made_at, last, kept, handed_over, adopting,
                          _takeable_storage(nodes, placeholder_storage or {}, static_storage, donated_storage),
                          padded_layout="padded_layout" in rules)
    accumulators: dict[fx.Node, tuple[int, int]] = {}  # (step allocated, bytes)
    for node in sizes:
        early, accumulator = embedding_accumulator(node, device, rules)
        if accumulator:
            accumulators[node] = (0 if early else made_at[node], accumulator)
        elif early:
            made_at[node] = 0  # the output is the accumulator, filled as the graph starts
            rule_of[node] = "embedding_grad_early"

    lifetimes: list[Lifetime] = []
    takers: list[int] = []  # for buffer_reuse: the allocations that may take a freed buffer ...
    givers: list[int] = []  # ... and the frees that may hand one over, in the order the steps make them
    # placeholders (saved activations in the backward) freed after the last use of their allocation
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
    remainder = dict(start)
    input_frees: list[int] = []
    for key, members in groups.items():
        if key in static_storage or any(m in kept for m in members):
            continue
        handed = next((handed_over[m] for m in members if m in handed_over), None)
        uses = [last[m] for m in members if m in last]
        if handed is None and not uses:
            continue
        category = input_category(key)
        remainder[category] = remainder.get(category, 0) - group_bytes[key]
        if handed is not None:
            lifetimes.append(Lifetime(key, group_bytes[key], -1, handed[0] - 1, category, "dying_input_reuse",
                                      Freed.HANDED_OVER, taken_by=handed[1].name))
        else:
            input_frees.append(len(lifetimes))
            lifetimes.append(Lifetime(key, group_bytes[key], -1, max(uses), category))
    by_name = {n.name: n for n in nodes if n.op == "placeholder"}
    for name, nbytes in (carried_copies or {}).items():
        if by_name.get(name) in last:  # the copy saved in its stead, freed after its last use
            remainder[MemoryCategory.ACTIVATION] = remainder.get(MemoryCategory.ACTIVATION, 0) - nbytes
            lifetimes.append(Lifetime(f"{name} (channels-last copy)", nbytes, -1, last[by_name[name]],
                                      MemoryCategory.ACTIVATION, "channels_last_copies"))
    for name, nbytes in (layout_copies or {}).items():
        copy_kept = name in saved
        lifetimes.append(Lifetime(f"{name} (channels-last copy)", nbytes, 0,
                                  None if copy_kept else last.get(by_name[name], 0),
                                  MemoryCategory.ACTIVATION if copy_kept else MemoryCategory.TEMPORARY,
                                  "channels_last_copies"))
    for category, nbytes in remainder.items():
        if nbytes:
            lifetimes.append(Lifetime(f"live at start: {category.value}", nbytes, -1, None, category))
    saved_owners = {owner[n] for n in nodes if n.name in saved}
    for node, (step, accumulator) in accumulators.items():
        takers.append(len(lifetimes))
        lifetimes.append(Lifetime(node.name, accumulator, step, index[node], MemoryCategory.TEMPORARY,
                                  "fp32_accumulator"))
    for node, size in sizes.items():
        category = (MemoryCategory.ACTIVATION if node in saved_owners else kept_category if node in kept
                    else MemoryCategory.TEMPORARY)
        rule, taker = rule_of.get(node, LIVENESS), ""
        if node in kept:
            free, freed = None, Freed.AFTER
        elif node in handed_over:
            free, freed, rule, taker = (handed_over[node][0] - 1, Freed.HANDED_OVER, "dying_input_reuse",
                                        handed_over[node][1].name)
        else:
            free, freed = last.get(node, index[node]), Freed.AFTER
        if node in adopting:
            rule = "dying_input_reuse"
        else:
            takers.append(len(lifetimes))
        if freed is Freed.AFTER and free is not None:
            givers.append(len(lifetimes))
        lifetimes.append(Lifetime(node.name, size, made_at[node], free, category, rule, freed, taken_by=taker))
    if "inputs_deleted" not in rules:
        givers += input_frees
    givers += [i for i in takers if lifetimes[i].rule == "fp32_accumulator"]
    for node, step, nbytes, rule in transients:
        lifetimes.append(Lifetime(node.name, nbytes, step, step, MemoryCategory.TEMPORARY, rule))
    if loss_memory:  # the caller's loss as the graph starts (loss_memory), gone once it runs
        lifetimes.append(Lifetime(LOSS_MEMORY, loss_memory, -1, -1, MemoryCategory.TEMPORARY, freed=Freed.RELEASED))
    if "buffer_reuse" in rules:
        reuse_freed_buffers(lifetimes, takers, givers, len(nodes))
    sweep = peak_sweep(lifetimes, len(nodes))
    peak_node = nodes[sweep.peak_step].name if sweep.peak_step >= 0 else "start"
    end_bytes = sweep.timeline[-1][2] if sweep.timeline else sweep.start_bytes
    return _GraphRun(sweep.peak_bytes, peak_node, end_bytes, {n.name: s for n, s in sizes.items()},
                     {n.name: owner[n].name for n in nodes}, tuple(lifetimes), tuple(n.name for n in nodes),
                     sweep.timeline)


def _takeable_storage(nodes: list[fx.Node], storage: dict[str, tuple[str, int]], static_storage: frozenset[str],
                      donated: frozenset[str]) -> dict[fx.Node, tuple[list[fx.Node], int]]:
    """The placeholders whose allocation a kernel may write over, each with every placeholder
    living in that allocation and its bytes: only donated ones, never static ones."""
    groups: dict[str, list[fx.Node]] = {}
    for node in nodes:
        if node.op == "placeholder" and node.name in storage:
            groups.setdefault(storage[node.name][0], []).append(node)
    return {m: (members, storage[m.name][1]) for key, members in groups.items()
            if key in donated and key not in static_storage and storage[members[0].name][1] > 0 for m in members}


def _hand_over_dying_inputs(
    nodes: list[fx.Node], kernel: set[fx.Node], step: int, owner: dict[fx.Node, fx.Node],
    readers_of: dict[fx.Node, set[fx.Node]], kept: set[fx.Node], static_storage: frozenset[str],
    storage: dict[str, tuple[str, int]], sizes: dict[fx.Node, int], made_at: dict[fx.Node, int],
    last: dict[fx.Node, int], handed_over: dict[fx.Node, tuple[int, fx.Node]], adopting: set[fx.Node],
    same_step: set[fx.Node],
    hand_over: bool = True,
) -> None:
    """A fused recompute kernel (``kernel``: the nodes it computes, run at ``step``) is the last
    reader of the inputs only it reads: they die in it (their last use moves to ``step``), and with
    ``hand_over`` (the ``dying_input_reuse`` rule) Inductor writes an output of the same size into a
    dying input's buffer (``in_out_ptr``; ``# reuse`` of the input in the generated code; seen in
    Inductor's generated backward of the seed Transformer). Marks the inputs whose buffer is taken
    over (``handed_over``, with ``step`` and the output) and the outputs taking one (``adopting``, no allocation
    of their own).

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
    if not hand_over:
        return
    stored = [n for n in sorted(kernel, key=position.__getitem__)
              if n.op == "call_function" and sizes.get(n, 0) > 0 and made_at.get(n) == step and n not in adopting]
    for out in stored:
        match = next((d for d in dying if d[1] == sizes[out]), None)
        if match is None:
            continue
        dying.remove(match)
        handed_over[match[0]] = (step, out)
        adopting.add(out)


def _on_host(target: torch.device | str | None) -> Callable[[fx.Node], bool]:
    """Whether a node copies device tensors to the host while the graph's device is CUDA
    (``host_copies``): its tensors are all on the CPU, some of its inputs' on the device."""
    if target is None or torch.device(target).type != "cuda":
        return lambda node: False

    def on_host(node: fx.Node) -> bool:
        values = tensor_values(node)
        return (bool(values) and all(v.device.type == "cpu" for v in values)
                and any(v.device.type != "cpu" for arg in node.all_input_nodes for v in tensor_values(arg)))

    return on_host


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
    input_categories: Mapping[str, MemoryCategory] | None = None,
    disabled_rules: Iterable[str] = (),
    hold_outputs: bool = False,
    loss_memory: int = 0,
    gradients_held: int = 0,
) -> PartitionedPeak:
    """Peak memory of the partitioned graphs: forward, then backward reading what forward saved.

    ``static_names``: forward placeholders that stay allocated throughout (parameters, buffers, user
    inputs); ``extra_static_bytes``: memory outside the graphs (optimizer state, counted as such by
    category); ``forward_names``: the joint graph's forward nodes (the backward's nodes so named are
    recomputed); ``timelines`` receives each graph's live bytes per node, under ``"forward"`` and
    ``"backward"``; ``input_categories``: the category of each forward placeholder (default: input);
    ``disabled_rules``: rules the simulation leaves out (:data:`RULES`); ``hold_outputs``: the
    caller keeps forward's outputs through backward (as without the ``outputs_dropped`` rule);
    ``loss_memory``: bytes the caller's own code holds between the graphs (a loss computed
    outside), counted as backward starts. It is measured up to the high-water mark as backward
    reaches the graph, so it includes the gradient the loss hands to the backward: at that moment
    the tangents are part of it, not beside it. ``gradients_held``: gradients the step's backward
    made before this graph's backward (see ``annotate_memory``), live as backward starts.
    """
    rules = enabled_rules(PARTITIONED, fused_pointwise, disabled_rules)
    device = rounding_device(target_device, rules)
    fw_placeholders = [n for n in fw.graph.nodes if n.op == "placeholder"]
    start: dict[MemoryCategory, int] = {}
    if extra_static_bytes:
        start[MemoryCategory.OPTIMIZER_STATE] = extra_static_bytes
    for n in fw_placeholders:
        category = (input_categories or {}).get(n.name, MemoryCategory.INPUT)
        start[category] = start.get(category, 0) + round_allocation(
            sum(tensor_nbytes(v) for v in tensor_values(n)), device)
    out = next(iter(fw.graph.find_nodes(op="output")))
    outs = [a for a in out.args[0] if isinstance(a, fx.Node)]
    saved = outs[num_fwd_outputs:]
    keep_fw = {n.name for n in outs} | {n.name for n in fw_placeholders}
    fw_nodes = list(fw.graph.nodes)
    channels_last = runs_channels_last(fw_nodes, target_device, rules)
    copies = ({n.name: round_allocation(b, device)
               for n, b in channels_last_copies(fw_nodes, target_device, channels_last).items()}
              if "channels_last_copies" in rules else {})
    forward = _run_graph(fw, start, keep_fw, target_device, rules, saved=frozenset(n.name for n in saved),
                         kept_category=MemoryCategory.TEMPORARY, layout_copies=copies, channels_last=channels_last)
    fw_sizes, fw_owner = forward.sizes, forward.owner
    if timelines is not None:
        timelines.setdefault("forward", []).extend(
            (name, during) for name, (_, during, _) in zip(forward.steps, forward.timeline))
    saved_owners = {fw_owner[n.name] for n in saved}
    user_outputs = sum(fw_sizes.get(fw_owner[n.name], 0) for n in outs[:num_fwd_outputs]
                       if fw_owner[n.name] not in saved_owners)
    saved_bytes = sum(fw_sizes.get(name, 0) for name in saved_owners)
    # what forward leaves, by category: between the graphs the caller drops the outputs
    # (model(x).sum().backward(): outputs_dropped)
    carried = live_by(forward.lifetimes, 3 * len(forward.steps) - 1, lambda life: life.category)
    if "outputs_dropped" in rules and not hold_outputs:
        carried[MemoryCategory.TEMPORARY] = carried.get(MemoryCategory.TEMPORARY, 0) - user_outputs
    bw_placeholders = [n for n in bw.graph.nodes if n.op == "placeholder"]
    tangents = sum(round_allocation(sum(tensor_nbytes(v) for v in tensor_values(n)), device)
                   for n in bw_placeholders if n.name.startswith("tangents"))
    carried[MemoryCategory.TEMPORARY] = carried.get(MemoryCategory.TEMPORARY, 0) + tangents
    if gradients_held:
        carried[MemoryCategory.GRADIENT] = carried.get(MemoryCategory.GRADIENT, 0) + gradients_held
    # the backward's placeholders are counted in what forward left (saved) and tangents; static ones stay
    keep_bw = {n.name for n in bw_placeholders if n.name in static_names}
    bw_out = next(iter(bw.graph.find_nodes(op="output")))
    keep_bw |= {a.name for a in bw_out.all_input_nodes}
    # a saved value lives in its forward allocation: a view of a parameter is never freed, and
    # views of one activation free it once
    storage = {n.name: (fw_owner[n.name], fw_sizes.get(fw_owner[n.name], -1)) for n in saved}
    # AOTAutograd donates to the backward the saved values that alias no input or output of forward
    donated = frozenset(saved_owners - {fw_owner[n.name] for n in outs[:num_fwd_outputs]}
                        - {n.name for n in fw_placeholders})
    backward = _run_graph(bw, carried, keep_bw, target_device, rules, storage,
                          frozenset(n.name for n in fw_placeholders), forward_names,
                          input_category=lambda key: (MemoryCategory.TEMPORARY if key.startswith("tangents")
                                                      else MemoryCategory.ACTIVATION),
                          donated_storage=donated, loss_memory=max(0, loss_memory - tangents),
                          carried_copies={name: b for name, b in copies.items() if name in {n.name for n in saved}},
                          channels_last=channels_last)
    if timelines is not None:
        timelines.setdefault("backward", []).extend(
            (name, during) for name, (_, during, _) in zip(backward.steps, backward.timeline))
    records: dict[str, Any] = {"lifetimes": (forward.lifetimes, backward.lifetimes),
                               "steps": (forward.steps, backward.steps)}
    if backward.peak_bytes >= forward.peak_bytes:
        return PartitionedPeak(backward.peak_bytes, "backward", backward.peak_node, saved_bytes, forward.end_bytes,
                               **records)
    return PartitionedPeak(forward.peak_bytes, "forward", forward.peak_node, saved_bytes, forward.end_bytes,
                           **records)
