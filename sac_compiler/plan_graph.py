"""The backend's work on one joint graph: annotate it, plan it under a budget, tag it, check it.

The plan decides, for every forward allocation the backward needs, whether it is kept or
recomputed (``sac_compiler.solvers.savings_plan``); the decision reaches PyTorch through its own
contract, ``node.meta["recompute"] = CheckpointPolicy.MUST_SAVE / MUST_RECOMPUTE`` (see
``tag_graph``), and PyTorch's partitioner splits the
graph. After partitioning, the forward graph's saved values are compared with the plan and the
partitioned graphs' peak is simulated.

A recomputed dropout must reproduce its forward mask. Under Inductor the joint-graph passes turn
every random op into one ``inductor_seeds`` draw per graph and, per op, seeded RNG
(``inductor_lookup_seed`` + ``inductor_random``) that is a pure function of its seed: the seeds
stay saved (``inductor_seeds`` cannot carry a tag), the seeded RNG is planned like any other op
(Inductor stores its random values) and recomputes the same values. A random op that stays an
ATen op (attention with dropout under Inductor, any random op on the eager route) is planned like
any other too: tagged MUST_RECOMPUTE, PyTorch's partitioner saves the generator's state before it
and replays it in backward (``replays_rng_state``). The report lists what stayed saved.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
import math
import operator
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.utils.checkpoint import CheckpointPolicy

from sac_compiler.capture import JointGraph, attach_capture_info, describe_inputs
from sac_compiler.config import SACConfig, format_bytes
from sac_compiler.passes.annotate_memory import accumulated_reductions, inductor_addmm
from sac_compiler.passes.annotate_ops import (
    fuses_pointwise_inputs,
    is_collective_op,
    is_pointwise_op,
    op_name,
)
from sac_compiler.passes.annotate_runtime import achieved_seconds
from sac_compiler.passes.memory_model import live_by, rule_on
from sac_compiler.passes.record import Side, get_record, graph_results, size_hint

log = logging.getLogger(__name__)


class BudgetError(ValueError):
    """The memory budget cannot be met by any plan. ``least_budget``: the least absolute budget
    that plans, where the planner found one (None: not known); ``finding``: what the message says
    was found, without its advice (the message where it has none)."""

    def __init__(self, message: str, least_budget: int | None = None, finding: str | None = None) -> None:
        super().__init__(message)
        self.least_budget = least_budget
        self.finding = finding if finding is not None else message


@dataclass(frozen=True)
class OffloadedValues:
    """What a plan offloads to pinned host memory, and the link it expects."""

    starts: dict[str, int]  # value -> the backward step its reload starts at
    values: dict[str, tuple[str, int]]  # value -> (module, bytes)
    reload_before: dict[str, str]  # value -> the backward op its reload is issued before
    bandwidth: float  # bytes/s per direction the plan assumed
    stall_ms: float  # transfer time the plan expects compute not to hide
    recompute_only_ms: float | None = None  # the recompute-only plan's time (None: it had none)
    # value -> the forward op after which its copy has finished and the forward waits for it
    wait_after: dict[str, str] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return sum(nbytes for _, nbytes in self.values.values())

    @property
    def link_ms(self) -> float:
        """Time the copies take on the link, each way."""
        return 1e3 * self.bytes / self.bandwidth


@dataclass
class GraphPlanResult:
    """What the backend decided for one graph, and what the partitioner then did."""

    analysis: Any
    budget_bytes: int | None = None
    plan: Any = None  # solvers.savings_plan.SavingsPlan
    baseline_peak: int | None = None
    predicted_peak: int | None = None
    kept_random: list[str] = field(default_factory=list)
    # forward ops never recomputed, whatever the budget, and why (see never_recomputed)
    kept_ops: dict[str, str] = field(default_factory=dict)
    saved_by_partition: list[str] = field(default_factory=list)
    unplanned_saves: list[str] = field(default_factory=list)
    partitioned: Any = None  # sac_compiler.passes.annotate_memory.PartitionedPeak of the graphs that will run
    partition_order: str = "graph"  # SACConfig.partition_order: how ``simulate`` orders the partitioned graphs
    reorder_for_peak_memory: bool = True  # SACConfig.reorder_for_peak_memory: Inductor reorders the graphs it compiles
    fused_pointwise: bool = False
    # the caller keeps the graph's outputs until backward (SACConfig.hold_outputs)
    hold_outputs: bool = False
    # what the caller's loss holds between forward and backward (SACConfig.loss_memory)
    loss_memory: int = 0
    # gradients the step's backward makes before this graph's (SACConfig.gradients_held)
    gradients_held: int = 0
    # device memory the process held outside this graph when it was compiled (other tensors,
    # library workspaces): it is there during the step too, so it counts against the budget and
    # is included in predicted_peak and partitioned.peak_bytes
    outside_bytes: int = 0
    fastest: Any = None  # under Inductor: the plan without memory pressure (solvers.savings_plan.SavingsPlan)
    slack_taken: bool = False  # planned again for the room the partitioned graphs left under the budget
    # the peak the plan was made for: the budget, or the lower target the backend planned again for
    target_bytes: int | None = None
    planning_s: float = 0.0  # the backend's own time on this graph: analysis, plans, simulations
    solve_times_s: list[float] = field(default_factory=list)  # every solver call in planning_s
    # every plan the backend partitioned for this graph, in order: (the joint graph's predicted
    # peak, the partitioned graphs' simulated step peak); the first is the first plan's check
    partition_checks: list[tuple[int | None, int]] = field(default_factory=list)
    # a fractional budget: (lowest peak found, fastest plan's peak) in bytes, the range it resolved in
    # (at 1.0 the lowest peak is not searched: both are the fastest plan's)
    fraction_range: tuple[int, int] | None = None
    # on CUDA with an enforced budget: the measured peak of a step run with this plan (None: not
    # measured, or the step did not raise the allocator's high-water mark; see sac_compiler.enforce)
    measured_peak: int | None = None
    # of that step: bytes of the graph's outputs the caller still held when backward began (the
    # simulation holds them through backward unless hold_outputs=False)
    caller_held_bytes: int | None = None
    # of that step: bytes the caller's own code (its loss) held between forward and backward, as
    # the allocator measured them (None: not measured; see SACConfig.loss_memory)
    measured_loss_memory: int | None = None
    # the allocator's high-water mark between the measured step's backward and the graph's next
    # forward (the optimizer step, the caller's own code), where it rose above the step's peak and
    # over the budget: no plan of the graph changes it (None: not so, or not measured)
    measured_outside_peak: int | None = None
    # with the offload option: why offload is not offered for this graph (sac_compiler.offload.offload_note)
    offload_note: str | None = None
    # the values the plan offloads to host memory (None: none)
    offload: OffloadedValues | None = None
    # a graph that runs several times forward before its backwards in a step (one graph serving
    # every block): how many, and what each other run holds through it; set by the partitioner
    runs_per_step: int = 1
    held_per_run_bytes: int = 0
    # each value the plan recomputes: (its module, or "Global", and the bytes it allocates), read off
    # the joint graph when the plan is made; PyTorch's partitioner then replaces that graph in place
    # (its CSE pass merges duplicate nodes), so the report must not look the plan's values up in it
    recomputed_values: dict[str, tuple[str, int]] = field(default_factory=dict)

    @property
    def step_peak_bytes(self) -> int:
        """The step's predicted peak: the partitioned graphs' peak, and every other run of the graph
        in the step holding what it saves. AttributeError before the partition is simulated."""
        if self.partitioned is None:
            raise AttributeError("step_peak_bytes: the partitioned graphs are not simulated yet")
        return int(self.partitioned.peak_bytes) + (self.runs_per_step - 1) * self.held_per_run_bytes

    def resolved_order(self, bw: fx.GraphModule, order: str | None = None) -> str:
        """``order`` (``partition_order`` where None) as ``simulate`` follows it for ``bw``:
        "graph" or "inductor"; "auto" is "inductor" where Inductor compiles the graphs for a CUDA
        GPU this process sees, else "graph"."""
        from sac_compiler.inductor_order import lowers_for_cuda

        order = order or self.partition_order
        if order == "auto":
            return "inductor" if self.fused_pointwise and lowers_for_cuda(bw) else "graph"
        return order

    def simulate(self, fw: fx.GraphModule, bw: fx.GraphModule, order: str | None = None,
                 scheduled: list[list[str]] | None = None) -> Any:
        """Peak of the partitioned graphs as they will run (forward, then backward), in their own
        order or with the backward in the order Inductor schedules it, as ``order`` says
        (``resolved_order``; ``partition_order`` where None). ``scheduled``: that order as
        Inductor's compile of ``bw`` read it (``inductor_order.ScheduleRecorder``), else ``bw`` is
        lowered to read it."""
        from sac_compiler.inductor_order import simulate_in_inductor_order

        if scheduled is not None or self.resolved_order(bw, order) == "inductor":
            return simulate_in_inductor_order(fw, bw, reorder_for_peak_memory=self.reorder_for_peak_memory,
                                              scheduled=scheduled, **self.simulation_args())
        from sac_compiler.passes.annotate_memory import simulate_partitioned

        return simulate_partitioned(fw, bw, **self.simulation_args())

    def simulation_args(self) -> dict[str, Any]:
        """The arguments besides the graphs that ``simulate`` passes to ``simulate_partitioned``."""
        from sac_compiler.capture import InputKind
        from sac_compiler.passes.record import MemoryCategory

        graph = self.analysis.graph
        categories = {InputKind.PARAMETER: MemoryCategory.PARAMETER, InputKind.BUFFER: MemoryCategory.BUFFER}
        return {
            "num_fwd_outputs": graph.num_fwd_outputs,
            "static_names": {i.name for i in graph.inputs if i.kind != InputKind.TANGENT},
            "target_device": graph.target_device,
            "fused_pointwise": self.fused_pointwise,
            # FSDP's parameter shards and the prefetched block (through backward; counted from the
            # start here) are outside the partitioned graphs too
            "extra_static_bytes": (self.analysis.memory.optimizer_state_bytes + self.outside_bytes
                                   + self.analysis.memory.sharded_param_bytes + _prefetch_bytes(graph)),
            "hold_outputs": self.hold_outputs,
            "loss_memory": self.loss_memory,
            "gradients_held": self.gradients_held,
            "forward_names": frozenset(n.name for n in graph.gm.graph.nodes
                                       if n.op == "call_function" and get_record(n).side == Side.FORWARD),
            "input_categories": {i.name: categories.get(i.kind, MemoryCategory.INPUT) for i in graph.inputs
                                 if i.kind != InputKind.TANGENT},
        }

    def check_partition(self, fw: fx.GraphModule, bw: fx.GraphModule, order: str | None = None) -> None:
        """Record what the partitioned forward saves for backward and their peak (``simulate`` in
        ``order``); flag saves the plan did not intend."""
        out = next(iter(fw.graph.find_nodes(op="output")))
        num_fwd = self.analysis.graph.num_fwd_outputs
        saved = [n for n in out.args[0][num_fwd:] if isinstance(n, fx.Node)]
        self.saved_by_partition = [n.name for n in saved]
        self.partitioned = self.simulate(fw, bw, order)
        if self.plan is None:
            return
        owner = {n.name: get_record(n).storage_owner for n in self.analysis.graph.gm.graph.nodes if n.op != "output"}
        recomputed = set(self.plan.recompute)
        self.unplanned_saves = [name for name in self.saved_by_partition if owner.get(name, name) in recomputed]
        if self.unplanned_saves:
            log.warning("the partitioner saved %d value(s) the plan recomputes: %s",
                        len(self.unplanned_saves), self.unplanned_saves[:8])


def _prefetch_bytes(graph: JointGraph) -> int:
    sharding = graph.sharding()
    return sharding.prefetch_bytes if sharding is not None and sharding.shard_bytes else 0


def _owner_map(gm: fx.GraphModule) -> dict[fx.Node, fx.Node]:
    by_name = {n.name: n for n in gm.graph.nodes}
    return {n: by_name.get(get_record(n).storage_owner or n.name, n) for n in gm.graph.nodes if n.op != "output"}


def _producer(node: fx.Node) -> fx.Node:
    """The op that computes a value: a getitem's multi-output op, else the node itself."""
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        return node.args[0]
    return node


def replays_rng_state(node: fx.Node) -> bool:
    """A random op the partitioner recomputes with the forward's RNG state: an ATen op tagged
    ``nondeterministic_seeded`` that the plan marks MUST_RECOMPUTE is wrapped by PyTorch's
    partitioner (``functionalize_rng_ops``) so that its forward saves the generator's state
    (``graphsafe_run_with_rng_state`` on CUDA, ``run_and_save_rng_state`` elsewhere) and its
    recompute in backward runs from that state: the same dropout mask, the same attention
    dropout, as full checkpointing restores it. Not ``inductor_seeds``: the one draw of seeds
    every seeded op of an Inductor graph reads stays saved (a few bytes)."""
    target = node.target
    return (isinstance(target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in target.tags
            and target is not torch.ops.prims.inductor_seeds.default)


def build_plan_problem(
    analysis: Any, tie_blocks: int | None = None, fused_pointwise: bool = False
) -> tuple[Any, list[str], dict[str, str]]:
    """The torch-free planning problem of an annotated joint graph (everything-kept baseline).

    Returns the problem (budget 0: the caller sets it), the random ops kept, and the other ops
    kept whatever the budget, with the reason (``never_recomputed``).

    ``tie_blocks``: repeated layers (``layers.0``, ``layers.1``, ... with the same ops) are split
    into this many contiguous blocks, and the same value in every layer of a block shares one
    decision. Off by default: measured on a 16-layer Llama graph, HiGHS solves the untied program
    in under a second and the tied ones no faster, with a worse optimum.

    ``fused_pointwise`` costs values as a fusing compiler (Inductor) runs them: recomputing a
    pointwise value folds into the backward kernel that reads it and costs the reads of its
    materialised inputs;
    keeping it costs writing it out in forward (unless a non-fusible op reads it there anyway) and
    reading it back.
    """
    from sac_compiler.solvers.savings_plan import Candidate, SavingsProblem

    gm = analysis.graph.gm
    sim = analysis.memory
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    fb = sim.first_backward
    owner = _owner_map(gm)

    # Non-alias reads of every allocation, through its aliases, where the reading op runs (a
    # matmul Inductor folds into a later add runs there).
    runs_at = {mm: index[add] for mm, add in inductor_addmm(nodes, analysis.graph.target_device,
                                                           rule_on("far_addmm_apart")).items()} \
        if fused_pointwise else {}
    if fused_pointwise and rule_on("accumulation_fusion"):  # sums Inductor fuses into a later kernel run there
        runs_at.update({red: index[end] for red, end in
                        accumulated_reductions(nodes, rule_on("accumulation_apart")).items()})
    reads: dict[fx.Node, list[int]] = {}
    for node in nodes:
        if node.op == "output" or (node.op == "call_function" and owner[node] is not node):
            continue
        for arg in node.all_input_nodes:
            reads.setdefault(owner[arg], []).append(runs_at.get(node, index[node]))

    candidates = [n for n in nodes if n.op == "call_function" and owner.get(n) is n
                  and get_record(n).side == Side.FORWARD
                  and (n.target is operator.getitem or not any(u.target is operator.getitem for u in n.users))]
    candidate_set = set(candidates)
    kept_ops = never_recomputed(gm, _mutated_inputs(analysis.graph))
    kept_random: list[str] = []
    charged: set[fx.Node] = set()
    out = next(iter(gm.graph.find_nodes(op="output")))
    fwd_outputs = {owner.get(a, a) for a in out.args[0][: analysis.graph.num_fwd_outputs] if isinstance(a, fx.Node)}
    values = []
    for node in candidates:
        producer = _producer(node)
        prec = get_record(producer)
        bw = [i - fb + 1 for i in reads.get(node, []) if i >= fb]  # step 0 is the end of forward
        nbytes = get_record(node).alloc_bytes or 0
        inputs = [owner.get(a, a).name for a in producer.all_input_nodes if owner.get(a, a) in candidate_set]
        cost = 0.0 if producer in charged else (prec.runtime_ms or 0.0)
        charged.add(producer)
        keep_cost = 0.0
        inline = False
        if fused_pointwise and producer is node and is_pointwise_op(node):
            inline = node not in fwd_outputs and all(u.op == "call_function" and fuses_pointwise_inputs(u) for u in node.users)
            # Recomputed, a pointwise value folds into the backward kernel that reads it, which then
            # reads its inputs instead of it: free next to keeping it, which writes it out in
            # forward where no non-fusible op there makes Inductor write it anyway.
            cost = 0.0
            if _fused_in_forward(node, fwd_outputs):
                keep_cost = 1e3 * achieved_seconds(analysis.device_spec, 0, nbytes, torch.float32)
        group = f"op:{producer.name}" if producer is not node else None
        keep_random = bool(prec.is_random) and not replays_rng_state(producer)
        if keep_random:
            kept_random.append(producer.name)
        elif prec.is_inplace and prec.inplace_parent:
            group = f"inplace:{prec.inplace_parent}"
        values.append(Candidate(
            name=node.name,
            nbytes=nbytes,
            cost_ms=cost,
            inputs=tuple(dict.fromkeys(inputs)),
            first_use=min(bw) if bw else None,
            must_save=keep_random or producer.name in kept_ops,
            group=group,
            keep_cost_ms=keep_cost,
            last_use=max(bw) if bw else None,
            inline=inline,
        ))
    # an in-place chain's parent shares the chain's decision
    chains = {v.group for v in values if v.group and v.group.startswith("inplace:")}
    values = [dataclasses.replace(v, group=f"inplace:{v.name}") if f"inplace:{v.name}" in chains and v.group is None
              else v for v in values]
    values = _tie_repeated_layers(values, candidates, tie_blocks)
    baseline = _step_profile(sim)
    problem = SavingsProblem(candidates=tuple(values), baseline=tuple(baseline), budget=0)
    return problem, sorted(set(kept_random)), kept_ops


# ATen ops PyTorch has no FLOP formula for whose cost is compute, not the bytes they move (the
# roofline would price their recompute near zero): factorisations, FFTs, sorts and selections.
_UNCOSTED = re.compile(r"^(_?fft_|_?linalg_|cholesky|_cholesky|svd|_svd|qr|geqrf|ormqr|_?lu_|lu_|triangular_solve|"
                       r"_?eig|symeig|sort|topk|kthvalue|median|nanmedian|mode|_?unique|_?cdist|matrix_exp|"
                       r"histc|histogram|searchsorted|bucketize)")
_CORE_NAMESPACES = frozenset({"aten", "prims", "rngprims"})


def never_recomputed(gm: fx.GraphModule, mutated: set[fx.Node]) -> dict[str, str]:
    """Forward ops the plan keeps whatever the budget, by node name, with the reason the report gives:

    * ops that read an input the forward mutates (see ``_mutated_inputs``): in backward the input
      holds its new value;
    * higher-order ops, custom ops (outside ATen and prims) and ops with side effects: recomputing
      them would repeat their effects, and their cost is unknown;
    * ATen ops without a FLOP formula whose cost is compute (``_UNCOSTED``): the cost model would
      price their recompute at the bytes they move;
    * collectives and their waits (``is_collective_op``): every rank must run the same collectives
      in the same order, and a recompute is a collective the plan adds to backward; a rank whose
      plan differs (or a partitioner that recomputes one) leaves the others waiting.

    Random ops are kept by their own rule (``kept_random``)."""
    from torch.utils.flop_counter import flop_registry

    owner = _owner_map(gm)
    reasons: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or get_record(node).side != Side.FORWARD:
            continue
        target = node.target
        if is_collective_op(node):
            reasons[node.name] = f"collective {target._schema.name}: all ranks must run it alike"
        elif any(owner.get(a, a) in mutated for a in node.all_input_nodes):
            reasons[node.name] = "reads an input the forward mutates in place"
        elif isinstance(target, torch._ops.HigherOrderOperator):
            reasons[node.name] = f"higher-order op {target.name()}"
        elif isinstance(target, torch._ops.OpOverload):
            schema = target._schema
            if target.namespace not in _CORE_NAMESPACES:
                reasons[node.name] = f"custom op {schema.name}"
            elif schema.is_mutable or (not get_record(node).is_random and node.is_impure()):
                reasons[node.name] = f"op with side effects {schema.name}"
            elif target.overloadpacket not in flop_registry and _UNCOSTED.match(schema.name.split("::")[-1]):
                reasons[node.name] = f"no FLOP formula for {schema.name}"
        elif target is not operator.getitem:
            reasons[node.name] = f"not an ATen op: {getattr(target, '__name__', target)}"
    return reasons


def _mutated_inputs(graph: JointGraph) -> set[fx.Node]:
    """Graph inputs that the forward mutates in place, whatever the op and whatever the input's kind
    (BatchNorm's running statistics, spectral norm's power-iteration vectors, a parameter clamped
    under ``no_grad``). AOTAutograd returns each mutated input's new value among the forward outputs
    and copies it into the input once the forward has run, so in backward the input holds its new
    value: recomputing anything from it would read the mutation (autograd refuses on the eager route,
    "modified by an inplace operation"; under Inductor the gradient is silently wrong).

    AOTAutograd's descriptors name these outputs (``InputMutationAOTOutput``) and the input each
    mutates; a joint graph without descriptors falls back to ``_mutated_inputs_by_layout``. An input
    mutated inside the graph (``aten.copy_`` into a placeholder) counts too."""
    placeholders = list(graph.gm.graph.find_nodes(op="placeholder"))
    mutated = {n.args[0] for n in graph.gm.graph.nodes
               if n.op == "call_function" and n.target in _COPY_INTO and n.args and n.args[0] in placeholders}
    out = next(iter(graph.gm.graph.find_nodes(op="output")))
    descs = out.meta.get("desc")
    if not descs or not all("desc" in n.meta for n in placeholders):
        return mutated | _mutated_inputs_by_layout(graph)
    try:
        from torch._functorch._aot_autograd.descriptors import InputMutationAOTOutput
    except ImportError:  # a torch without descriptors (older than the versions supported)
        return mutated | _mutated_inputs_by_layout(graph)
    by_desc = {n.meta["desc"]: n for n in placeholders}
    for desc in descs:
        if isinstance(desc, InputMutationAOTOutput):
            node = by_desc.get(desc.mutated_input)
            if node is None:  # an input AOTAutograd rewrote (a synthetic base): be safe, guess by layout
                return mutated | _mutated_inputs_by_layout(graph)
            mutated.add(node)
    return mutated


_COPY_INTO = (torch.ops.aten.copy_.default,)


def _mutated_inputs_by_layout(graph: JointGraph) -> set[fx.Node]:
    """Without AOTAutograd's descriptors: the mutated inputs' new values come first among the
    forward outputs, before the user's outputs; a value in that leading part of the outputs made
    from an input of its very size, dtype and strides marks the input."""
    from torch.utils._pytree import tree_leaves

    from sac_compiler.capture import InputKind

    gm = graph.gm
    leading = graph.num_fwd_outputs  # without the Dynamo graph, every forward output is suspect
    if graph.source_gm is not None:
        returned = next(iter(graph.source_gm.graph.find_nodes(op="output")))
        leading -= len(tree_leaves(returned.args[0]))  # the user's outputs (then intermediate bases, if any)
    kinds = {i.name: i.kind for i in graph.inputs}
    inputs = {n for n in gm.graph.find_nodes(op="placeholder")
              if kinds.get(n.name) in (InputKind.BUFFER, InputKind.USER_INPUT)}

    def layout(node: fx.Node) -> Any:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            return None
        # size hints, not the sizes: comparing symbolic sizes would specialise the graph
        return (tuple(size_hint(d) for d in val.shape), tuple(size_hint(d) for d in val.stride()), val.dtype)

    out = next(iter(gm.graph.find_nodes(op="output")))
    mutated: set[fx.Node] = set()
    for value in out.args[0][: max(leading, 0)]:
        if not isinstance(value, fx.Node) or value.op != "call_function" or layout(value) is None:
            continue
        # back through the ops of the same layout (``buf.mul_(a).add_(b)`` is mul, then add)
        frontier, seen = [value], {value}
        for _ in range(_MUTATION_DEPTH):
            step = []
            for node in frontier:
                for arg in _producer(node).all_input_nodes:
                    if arg in seen or layout(arg) != layout(value):
                        continue
                    seen.add(arg)
                    if arg in inputs:
                        mutated.add(arg)
                    elif arg.op == "call_function":
                        step.append(arg)
            frontier = step
    return mutated


_MUTATION_DEPTH = 4


def _fused_in_forward(node: fx.Node, fwd_outputs: set[fx.Node]) -> bool:
    """A pointwise value that only pointwise forward ops read: Inductor writes it out only if saved."""
    if node in fwd_outputs:
        return False
    users = [u for u in node.users if get_record(u).side == Side.FORWARD]
    return all(u.op == "call_function" and fuses_pointwise_inputs(u) for u in users)


_LAYER = re.compile(r"^(.*)\.(\d+)$")


def _tie_repeated_layers(values: list[Any], nodes: list[fx.Node], blocks: int | None) -> list[Any]:
    """Give the same value of structurally identical repeated layers one shared group per block."""
    if not blocks:
        return values
    # layer of each candidate: the outermost module ending in an index (``Model.layers.3``)
    layer_of: dict[str, tuple[str, int]] = {}
    is_layer = layer_modules(nodes[0].graph.owning_module) if nodes else None
    for node in nodes:
        here = _layer_of(_producer(node), is_layer) if is_layer is not None else None
        if here is not None:
            layer_of[node.name] = here
    per_layer: dict[tuple[str, int], list[Any]] = {}
    for v in values:
        if v.name in layer_of:
            per_layer.setdefault(layer_of[v.name], []).append(v)
    containers: dict[str, list[int]] = {}
    for prefix, idx in per_layer:
        containers.setdefault(prefix, []).append(idx)
    op_of = {n.name: get_record(_producer(n)).op_name for n in nodes}
    tie: dict[str, str] = {}
    for prefix, indices in containers.items():
        indices.sort()
        shapes = {tuple((op_of[v.name], v.nbytes) for v in per_layer[(prefix, i)]) for i in indices}
        if len(indices) < 2 or len(shapes) != 1:
            continue  # not repeated, or the layers differ: plan them one by one
        size = -(-len(indices) // blocks)
        for rank, i in enumerate(indices):
            for pos, v in enumerate(per_layer[(prefix, i)]):
                tie[v.name] = f"tie:{prefix}:{rank // size}:{pos}"
    if not tie:
        return values
    # merge with the existing groups: union-find over names
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for v in values:
        for key in (v.group, tie.get(v.name)):
            if key is not None:
                parent[find(f"name:{v.name}")] = find(key)
    return [dataclasses.replace(v, group=find(f"name:{v.name}")) if (v.group or v.name in tie) else v for v in values]


def fraction_budget(fraction: float, lowest: int, fastest: int) -> int:
    """The bytes a fractional budget resolves to: 0 is the lowest peak the planner finds, 1 the
    fastest plan's peak, linear in bytes between (as ``activation_memory_budget`` runs from
    recomputing everything it can to the default partition). Every fraction in [0, 1] plans."""
    fastest = max(fastest, lowest)
    return lowest + int(fraction * (fastest - lowest))


# ops that fill a tensor with constants computed from no tensor (deterministic: no random op)
_FILLS = frozenset({"aten.full", "aten.scalar_tensor", "aten.zeros", "aten.ones", "aten.arange", "prims.iota"})


def constant_fills(gm: fx.GraphModule) -> frozenset[str]:
    """The forward's values computed from no tensor (a ``full``, a ``scalar_tensor``), which every
    plan recomputes.

    Recomputing one costs nothing (Inductor computes it inside each kernel that reads it), and
    saving one makes the backward load it: a saved 0-d fill counts among a kernel's reads, which
    can make Inductor store a value it would otherwise fold (a cross-entropy's one-hot gradient,
    stored beside a saved log-softmax where the plan saved the ignore index's fills:
    ``realize_thresholds``, docs/results.md)."""
    return frozenset(n.name for n in gm.graph.nodes if n.op == "call_function" and not n.all_input_nodes
                     and op_name(n.target) in _FILLS and get_record(n).side == Side.FORWARD)


def tag_graph(gm: fx.GraphModule, recompute: Iterable[str]) -> dict[str, int]:
    """Write the plan as ``meta["recompute"]`` on the forward nodes; return how many of each.

    Every forward node but the random ones is tagged: MUST_RECOMPUTE as planned, MUST_SAVE
    otherwise, so PyTorch's partitioner saves exactly what the plan keeps (a MUST_SAVE value that
    neither backward nor a recomputed value reads is not saved). A collective and its wait are
    MUST_SAVE whatever ``recompute`` says (a wait is an alias of the collective's output, which
    would otherwise count as free to recompute): the partitioner must not add a collective to
    backward that the plan did not (see ``never_recomputed``). Under Inductor the plan itself
    recomputes the pointwise values Inductor would fuse (see ``build_plan_problem``). The constant
    fills are MUST_RECOMPUTE whatever ``recompute`` says (``constant_fills``).
    """
    recompute = set(recompute) | constant_fills(gm)
    owner = _owner_map(gm)
    counts = {"must_save": 0, "must_recompute": 0}
    for node in gm.graph.nodes:
        if node.op != "call_function" or get_record(node).side != Side.FORWARD:
            continue
        rec = get_record(node)
        if rec.is_random and not replays_rng_state(node):
            node.meta.pop("recompute", None)  # untagged random ops are always saved
            node.meta.pop("ac_graph_id", None)
            continue
        base = owner.get(node, node)
        if node is not base:  # an alias: recomputing it from its base is free
            decided = True
        elif any(u.target is operator.getitem for u in node.users):  # a multi-output op
            decided = any(u.name in recompute for u in node.users)
        else:
            decided = node.name in recompute
        producer = _producer(node)
        if (get_record(producer).is_random and not replays_rng_state(producer)) or is_collective_op(node):
            decided = False
        node.meta.pop("ac_graph_id", None)
        node.meta.pop("should_offload", None)  # an earlier plan's offload (tag_offload writes it again)
        node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE if decided else CheckpointPolicy.MUST_SAVE
        counts["must_recompute" if decided else "must_save"] += 1
    return counts


def plan_and_tag(
    gm: fx.GraphModule,
    num_fwd_outputs: int,
    source_gm: fx.GraphModule,
    root_name: str,
    config: SACConfig,
    target: int | None = None,
    budget: int | None = None,
    outside_bytes: int = 0,
    previous: GraphPlanResult | None = None,
    fsdp: Any = None,
    freed_before_optimizer: int = 0,
    target_device: torch.device | None = None,
) -> GraphPlanResult | None:
    """The backend's entry: annotate the joint graph when a budget or a report asks for it, plan, tag.

    ``fsdp``: the FSDP2 parameters among the graph's inputs (``sac_compiler.distributed.FSDPInputs``).
    ``freed_before_optimizer``: of ``outside_bytes``, what is freed before the optimizer step (what
    the step's earlier graphs hold for their backwards, for a graph after a graph break).
    ``target_device``: the device the plan is for (default: the device of the graph's inputs; a
    graph traced on CPU or meta for a GPU names the GPU)."""
    if config.memory_budget is None and not config.report:
        return None
    freed_before_optimizer = min(freed_before_optimizer, outside_bytes)
    if (previous is not None and previous.analysis.freed_before_optimizer == freed_before_optimizer
            and previous.gradients_held == config.gradients_held
            and [n.name for n in gm.graph.nodes] == [n for n, _ in previous.analysis.memory.timeline]):
        # the same graph planned again (for a lower target), unchanged by the partitioner: reuse its analysis
        result = GraphPlanResult(previous.analysis, baseline_peak=previous.baseline_peak,
                                 fused_pointwise=previous.fused_pointwise, outside_bytes=outside_bytes,
                                 fastest=previous.fastest, hold_outputs=previous.hold_outputs,
                                 loss_memory=previous.loss_memory, gradients_held=previous.gradients_held,
                                 partition_order=config.partition_order,
                                 reorder_for_peak_memory=config.reorder_for_peak_memory)
        _plan(result, config, target, budget)
        return result
    if target_device is None:
        devices = [n.meta["val"].device for n in gm.graph.find_nodes(op="placeholder")
                   if isinstance(n.meta.get("val"), torch.Tensor)]
        target_device = devices[0] if devices else torch.device("cpu")
    graph = JointGraph(
        gm=gm,
        num_fwd_outputs=num_fwd_outputs,
        inputs=describe_inputs(source_gm, gm, root_name),
        root_name=root_name,
        target_device=target_device,
        has_backward=True,
        source_gm=source_gm,
        fsdp=fsdp,
    )
    attach_capture_info(graph)
    try:
        result = plan_joint(graph, config, target, budget, outside_bytes, freed_before_optimizer)
    finally:
        # Inductor pickles the graph for its cache: keep only the per-node records (plain data) on
        # it, whether or not a plan was made (the capture record refers back to the graph)
        gm.meta.pop("sac_capture", None)
        gm.meta.pop("sac", None)
    if config.memory_budget is None and config.report:  # with a plan, the backend reports after partitioning
        from sac_compiler.report import write_report

        write_report(result, config.report)
    return result


def plan_joint(
    graph: JointGraph, config: SACConfig, target: int | None = None, budget: int | None = None,
    outside_bytes: int = 0, freed_before_optimizer: int = 0,
) -> GraphPlanResult:
    """Annotate a captured joint graph and, with ``config.memory_budget``, plan and tag it.

    ``budget`` fixes the budget in bytes (else it comes from ``config``); ``target`` plans for a
    lower peak than the budget (the backend's correction when the partitioned graphs peak higher).
    ``outside_bytes``: memory held outside the graph through the step, of which
    ``freed_before_optimizer`` is freed before the optimizer step.
    """
    from sac_compiler.analysis import analyze

    analysis = analyze(
        graph,
        device=config.device,
        estimate_mode=config.estimate_mode,
        optimizer=config.optimizer,
        optimizer_state_bytes=config.optimizer_state_bytes,
        fused_pointwise=config.compiler == "inductor",
        recomputed=set(),  # the plan replaces any checkpoint the user wrote
        saved_for_backward=False,
        hold_outputs=config.hold_outputs,
        loss_memory=config.loss_memory,
        freed_before_optimizer=min(freed_before_optimizer, outside_bytes),
        gradients_held=config.gradients_held,
    )
    result = GraphPlanResult(analysis, baseline_peak=with_other_runs(analysis.memory, config.runs_per_step - 1).peak_bytes
                             + outside_bytes,
                             fused_pointwise=config.compiler == "inductor", outside_bytes=outside_bytes,
                             hold_outputs=config.hold_outputs, loss_memory=config.loss_memory,
                             gradients_held=config.gradients_held, partition_order=config.partition_order,
                             reorder_for_peak_memory=config.reorder_for_peak_memory)
    if config.memory_budget is not None:
        _plan(result, config, target, budget)
    if config.offload:
        from sac_compiler.offload import offload_note

        result.offload_note = offload_note(config, analysis)
    return result


def _after_graph_peak(analysis: Any) -> int:
    """What no recomputation changes: the optimizer step's peak, and under FSDP the
    reduce-scatter's after the graph (what the graph leaves and the reduce-scatter's input)."""
    return _after_graph(analysis.memory)


def _after_graph(sim: Any) -> int:
    """A simulation's peak after its graph: the optimizer step's, and under FSDP the
    reduce-scatter's. The optimizer step's is below 0 when memory counted outside the graph is
    freed before it (``freed_before_optimizer``): it is not raised to the 0 of a reduce-scatter
    that does not happen."""
    if sim.reduce_scatter_peak_bytes:
        return max(sim.optimizer_step_peak_bytes, sim.reduce_scatter_peak_bytes)
    return sim.optimizer_step_peak_bytes


def lowest_peak_found(analysis: Any) -> int | None:
    """The lowest peak (without memory held outside) of a plan the lowest-peak searches of this
    annotated graph found so far, by the exact simulation; None where none has run."""
    memo = analysis.searches.get("lowest")
    peaks = [outcome[0] for outcome in memo.outcomes.values()] if memo is not None else []
    return min(peaks, default=None)


def smallest_feasible_peak(analysis: Any, config: SACConfig) -> int:
    """The lowest peak found on this annotated graph, by a plan the exact memory
    simulation confirms; never below the optimizer step's own peak."""
    fused = config.compiler == "inductor"
    problem, _, _ = build_plan_problem(analysis, fused_pointwise=fused)
    problem = _with_runs(problem, analysis, config)
    options = _solver_options(config, analysis)
    fastest = _solve(dataclasses.replace(problem, budget=max(problem.baseline) + problem.held_by_other_runs),
                     options) if fused else None
    peak, _, _, _ = _lowest_plan(problem, analysis, config, options, fastest=fastest, refine=False)
    return max(peak, _after_graph_peak(analysis))


@dataclass
class _LowestMemo:
    """What one graph's lowest-peak searches (:func:`_lowest_plan`) share, whatever the budget: the
    program's lowest-peak search's outcome (its 2 s search gives another plan another time), the
    exact simulation of each candidate by its recomputed set, and each search's outcome by what it
    was asked (the backend's replans for lower targets ask the same again) and its steps."""

    searched: bool = False
    found: tuple[int, Any] | None = None  # (the program's lowest peak, its plan); None: none found
    simulations: dict[frozenset[str], Any] = field(default_factory=dict)
    outcomes: dict[Any, tuple[int, str, Any, Any]] = field(default_factory=dict)
    # a candidate lowered at its peak, and the program's search below a plan, by the plan
    lowered: dict[Any, tuple[Any, Any]] = field(default_factory=dict)
    descents: dict[Any, tuple[Any, Any] | None] = field(default_factory=dict)
    # every candidate ranked: (how, plan, simulation) by (how, recomputed set)
    ranked: dict[tuple[str, frozenset[str]], tuple[str, Any, Any]] = field(default_factory=dict)

    def simulate(self, analysis: Any, config: SACConfig, recompute: Iterable[str]) -> Any:
        key = frozenset(recompute)
        if key not in self.simulations:
            self.simulations[key] = _simulate(analysis, config, key)
        return self.simulations[key]

    def fastest_fitting(self, problem: Any, goal: int) -> tuple[str, Any, Any] | None:
        """(how, plan, simulation) of the fastest candidate ranked so far whose simulation fits ``goal``."""
        fitting = [entry for entry in self.ranked.values() if entry[2].peak_bytes <= goal]
        return min(fitting, key=lambda entry: _plan_ms(problem, entry[1]), default=None)


def _lowest_plan(problem: Any, analysis: Any, config: SACConfig, options: Any, structure: Any = None,
                 fastest: Any = None, refine: bool = True, lower: bool = True,
                 memo: _LowestMemo | None = None) -> tuple[int, str, Any, Any]:
    """(peak, how, plan, simulation) of the lowest-peak plan among those the planner knows to aim
    low: the program's own lowest-peak plan, everything recomputable recomputed, and every layer
    checkpointed (the rest kept, or as the ``fastest`` plan has it: a head that recomputes its
    log-softmax from the kept logits, as full checkpointing leaves it), each run through the exact
    simulation (the program's peak is a model: long recompute chains hold more than it counts).
    ``refine``: also search the fastest plan at the program's lowest peak (up to ``_REFINE_S``);
    off where only the peak is wanted (a fraction's range, the smallest feasible peak).
    ``lower``: then recompute values the best candidate keeps at its peak where that lowers it
    (:func:`_lowered_at_peak`; a few simulations), where the lowest peak decides whether a budget
    plans and what a refusal names; off for a fraction's range, which every fractional plan
    resolves. ``memo``: what an earlier search of the same graph found, reused (a fraction's range
    searched first, the plan at its lowest peak then)."""
    from sac_compiler.solvers import InfeasibleError, NoSolutionError, SolverError
    from sac_compiler.solvers.savings_plan import min_peak_plan

    memo = memo if memo is not None else _LowestMemo()
    plans = [("everything recomputable recomputed", _fixed_plan(
        problem, {c.name for c in problem.candidates if not c.must_save}, "RECOMPUTE_ALL"))]
    structure = structure if structure is not None else _layer_structure(problem, analysis)
    layers = layer_checkpoint_plan(problem, analysis, structure=structure)
    if layers is not None:
        plans.append(("every layer checkpointed", layers))
        if fastest is not None and fastest.recompute:
            plans.append(("every layer checkpointed, the rest as the fastest plan",
                          layer_checkpoint_plan(problem, analysis, base=fastest.recompute, structure=structure)))
    # Beside a layer plan, the program's lowest-peak plan gets a short search: its peak is a model
    # that long recompute chains outgrow, and the exact simulation picks among the candidates
    # anyway (on the zoo it came lowest once, by the luck of a tie: docs/results.md); without a
    # layer plan it is the planner's only structured way down and may take its time.
    short = layers is not None and (options.time_limit_s is None or options.time_limit_s > _LOWEST_PEAK_S)
    if not memo.searched:
        try:
            with _torch_threads_kept():
                memo.found = min_peak_plan(problem, dataclasses.replace(options, time_limit_s=_LOWEST_PEAK_S)
                                           if short else options, limit_expected=short)
        except NoSolutionError:
            if not short:
                raise
            log.info("sac plan: the program found no lowest-peak plan within %.0f s; the other candidates stand",
                     _LOWEST_PEAK_S)
        memo.searched = True
    found = memo.found
    if found is not None:
        low, lowest = found
        plans.append(("the program's lowest-peak plan", lowest))
        if layers is not None:
            plans.append(("every layer checkpointed, the rest as the program's lowest-peak plan",
                          layer_checkpoint_plan(problem, analysis, base=lowest.recompute, structure=structure)))
    ranked = []

    def rank(how: str, plan: Any) -> int:
        sim = memo.simulate(analysis, config, plan.recompute)
        # a candidate an earlier search of the graph ranked was logged then
        seen = (how, frozenset(plan.recompute)) in memo.ranked
        memo.ranked[how, frozenset(plan.recompute)] = (how, plan, sim)
        log.log(logging.DEBUG if seen else logging.INFO, "sac plan: lowest-peak candidate %s simulates at %s (%.3f ms)",
                how, format_bytes(sim.peak_bytes), _plan_ms(problem, plan))
        ranked.append(((sim.peak_bytes, _plan_ms(problem, plan)), (sim.peak_bytes, how, plan, sim)))
        ranked.sort(key=lambda entry: entry[0])
        return sim.peak_bytes

    program_peak = None
    for how, plan in plans:
        peak = rank(how, plan)
        if plan is (found[1] if found is not None else None):
            program_peak = peak
    # The fastest plan at the program's lowest peak, if the solver finds one soon (at the lowest
    # peak few plans are feasible, and the search for one can run to the time limit with none
    # found: docs/design.md), where the program's plan simulates among the lowest candidates: a
    # faster plan at the same modelled peak simulates about as high, and the search is wasted
    # where the program's model lies far under its plans' simulation (long recompute chains, as on
    # the ResNet: docs/results.md)
    refine = refine and program_peak is not None and program_peak <= ranked[0][0][0] * (1 + _REFINE_WITHIN)
    # everything the rest reads but the budget (the options and the program follow the config)
    asked = (refine, lower, fastest.recompute if fastest is not None else None,
             dataclasses.replace(config, memory_budget=None))
    if asked in memo.outcomes:
        return memo.outcomes[asked]
    if refine:
        assert found is not None
        low = found[0]
        limit = _REFINE_S if options.time_limit_s is None else min(options.time_limit_s, _REFINE_S)
        quick = dataclasses.replace(options, time_limit_s=limit)
        for slack in (0, 4096):  # the solver's peak is a float of MiB: a rounding may cut it short
            try:
                # a search for a faster plan than one in hand: a failed solve ends it (no greedy plan)
                rank("the program's lowest-peak plan",
                     _solve(dataclasses.replace(problem, budget=low + slack), quick, greedy=False))
                break
            except InfeasibleError:
                continue
            except SolverError as error:
                log.info("sac plan: no faster plan at the lowest peak %s: %s", format_bytes(low), error)
                break
    best = ranked[0]
    if lower and layers is not None:
        # the lowest candidate need not lower furthest: the next one may keep at its peak what
        # can be rebuilt after it (the T5's did: docs/results.md)
        outside_layers = {name for name, layer in structure[0].items() if layer is None}
        for _, (peak, how, plan, sim) in ranked[:_LOWERED_CANDIDATES]:
            key = (plan.recompute, plan.kept_for_recompute, asked[1:])
            if key not in memo.lowered:
                memo.lowered[key] = _lowered_at_peak(problem, analysis, config, plan, sim, outside_layers)
            lowered, lowered_sim = memo.lowered[key]
            if lowered_sim.peak_bytes < peak:
                log.info("sac plan: the lowest-peak candidate (%s) recomputing %d more value(s) live at its peak "
                         "simulates at %s", how, len(lowered.recompute - plan.recompute),
                         format_bytes(lowered_sim.peak_bytes))
                entry = ((lowered_sim.peak_bytes, _plan_ms(problem, lowered)),
                         (lowered_sim.peak_bytes, f"{how}, then lowered at its peak", lowered, lowered_sim))
                best = min(best, entry, key=lambda e: e[0])
        key = (best[1][2].recompute, best[1][2].kept_for_recompute, asked[1:])
        if key not in memo.descents:
            memo.descents[key] = _descended(problem, analysis, config, options, best[1][2], best[1][3])
        descended = memo.descents[key]
        if descended is not None:
            plan, sim = descended
            log.info("sac plan: the program, shifted onto the simulation of the lowest-peak candidate (%s), "
                     "finds a plan that simulates at %s", best[1][1], format_bytes(sim.peak_bytes))
            best = ((sim.peak_bytes, _plan_ms(problem, plan)),
                    (sim.peak_bytes, f"{best[1][1]}, then the program below it", plan, sim))
    memo.outcomes[asked] = best[1]
    return best[1]


def _descended(problem: Any, analysis: Any, config: SACConfig, options: Any, plan: Any, sim: Any
               ) -> tuple[Any, Any] | None:
    """A plan under ``plan``'s exact simulated peak from the program (the fastest at a lower
    goal), or None. The lowest-peak candidates are built whole or found by a program stopped at a
    short time limit; where the graph has little layer structure (a UNet block) the program given
    a goal below them finds lower peaks soon. As in :func:`_calibrated`, the program's model is
    shifted onto the exact simulation of the lowest plan so far; each plan is checked on the
    simulation: one under the lowest peak becomes the lowest and the goal moves ``_DESCENT_STEP``
    of its peak lower; one over the goal raises the shift where it went over, by what the shifted
    model missed there. At most ``_DESCENT_TRIES`` solves of at most ``_DESCENT_S`` each; a solve
    that finds nothing, or ``_DESCENT_MISSES`` plans in a row over the lowest peak, end the search."""
    quick = dataclasses.replace(options, time_limit_s=_DESCENT_S if options.time_limit_s is None
                                else min(options.time_limit_s, _DESCENT_S))
    found = None
    shift = _model_error(problem, plan, sim)
    goal = sim.peak_bytes - int(_DESCENT_STEP * sim.peak_bytes)
    seen = {plan.recompute}
    misses = 0
    for _ in range(_DESCENT_TRIES):
        solved = _solve_shifted(problem, analysis, config, shift, goal, quick, seen,
                                "the search below the lowest-peak candidate")
        if solved is None:
            break
        shifted, candidate, candidate_sim = solved
        log.info("sac plan: below the lowest-peak candidate, aiming at %s: a plan of %.3f ms simulates at %s",
                 format_bytes(goal), _plan_ms(problem, candidate), format_bytes(candidate_sim.peak_bytes))
        if candidate_sim.peak_bytes < sim.peak_bytes:
            misses = 0
            plan, sim = candidate, candidate_sim
            found = (plan, sim)
            shift = _model_error(problem, plan, sim)
            goal = sim.peak_bytes - int(_DESCENT_STEP * sim.peak_bytes)
        else:
            misses += 1
            if misses >= _DESCENT_MISSES:
                break
            shift = _raised_shift(shift, shifted, candidate, candidate_sim, goal)
    return found


def _solve_shifted(problem: Any, analysis: Any, config: SACConfig, shift: Sequence[int], goal: int, options: Any,
                   seen: set[frozenset[str]], search: str) -> tuple[Any, Any, Any] | None:
    """(the program with its model shifted by ``shift`` per step and ``goal`` as its budget, its
    plan, the plan's exact simulation), the plan added to ``seen``; or None where the program has
    none, finds none within its limit, fails (``search``, the search asking, then ends: the plan it
    has stands) or gives a plan in ``seen``."""
    from sac_compiler.solvers import InfeasibleError, NoSolutionError, SolverError

    shifted = dataclasses.replace(problem, baseline=tuple(b + e for b, e in zip(problem.baseline, shift)),
                                  budget=goal)
    try:
        plan = _solve(shifted, options, greedy=False)
    except (InfeasibleError, NoSolutionError):
        return None
    except SolverError as error:
        log.info("sac plan: %s ends: %s", search, error)
        return None
    if plan.recompute in seen:
        return None
    seen.add(plan.recompute)
    return shifted, plan, _simulate(analysis, config, plan.recompute)


def _raised_shift(shift: Sequence[int], shifted: Any, plan: Any, sim: Any, goal: int) -> list[int]:
    """``shift`` raised at the steps where ``plan``'s exact simulation went over ``goal``, by what
    the shifted model missed there, so that the search does not return to that plan."""
    missed = _model_error(shifted, plan, sim)
    simulated = _step_profile(sim)
    return [e + m if simulated[t] > goal and m > 0 else e for t, (e, m) in enumerate(zip(shift, missed))]


def _lowered_at_peak(problem: Any, analysis: Any, config: SACConfig, plan: Any, sim: Any,
                     among: set[str]) -> tuple[Any, Any]:
    """``plan`` recomputing, one at a time, values of ``among`` it keeps that are live at its
    simulated peak (largest first; each with its group and with the values up to
    ``_LOWERING_DEPTH`` back that only its rebuild reads), as long as that lowers the exact
    simulated peak: the candidates above are built whole (a layer plan keeps, outside the layers,
    what another plan keeps: a final norm's output read by the head's backward after the head's
    own peak), and a value they keep at the peak may be rebuilt after it. At most
    ``_LOWERING_TRIES`` simulations. The caller passes the values outside the repeated layers: a
    layer's values rebuilt from further back make longer recompute chains, which the simulation
    counts less exactly (docs/guide.md, "Known limits")."""
    by_name = {c.name: c for c in problem.candidates}
    groups: dict[str, set[str]] = {}
    for c in problem.candidates:
        if c.group is not None:
            groups.setdefault(c.group, set()).add(c.name)
    tries = 0
    while tries < _LOWERING_TRIES:
        step = max(range(len(sim.step_peaks)), key=sim.step_peaks.__getitem__, default=-1)
        if step < 0 or sim.step_peaks[step] < sim.peak_bytes:
            break  # the peak is after the graph (the optimizer step): nothing the graph keeps lowers it
        live = live_by(sim.lifetimes, 3 * step + 1, lambda life: life.name)
        kept = sorted(((nbytes, name) for name, nbytes in live.items()
                       if name in by_name and not by_name[name].must_save and name not in plan.recompute
                       and name in among and nbytes >= _LOWERING_MIN_BYTES), reverse=True)
        lowered = None
        for _, name in kept:
            if tries >= _LOWERING_TRIES:
                break
            # with what it is made from that the backward does not read otherwise (a norm's output
            # under a ReLU): rebuilt with it rather than kept for it
            rebuilt, frontier = {name}, [name]
            for _ in range(_LOWERING_DEPTH):
                frontier = [u for v in frontier for u in by_name[v].inputs
                            if u in by_name and u not in rebuilt and u not in plan.recompute
                            and by_name[u].first_use is None and not by_name[u].must_save]
                rebuilt.update(frontier)
            for member in list(rebuilt):
                group = by_name[member].group
                if group is not None:
                    rebuilt |= groups[group]
            try:
                candidate = _fixed_plan(problem, set(plan.recompute) | rebuilt, plan.status)
            except ValueError:  # its inputs are neither kept nor recomputed
                continue
            if candidate.recompute == plan.recompute:
                continue
            tries += 1
            candidate_sim = _simulate(analysis, config, candidate.recompute)
            if candidate_sim.peak_bytes < sim.peak_bytes:
                lowered = (candidate, candidate_sim)
                break
        if lowered is None:
            break
        plan, sim = lowered
    return plan, sim


# The lowest-peak plan's lowering at its peak (_lowered_at_peak): at most this many simulations,
# of values kept there of at least this many bytes
_LOWERING_TRIES = 4
# how many of the lowest-peak candidates, lowest first, are lowered at their peak
_LOWERED_CANDIDATES = 2
# The program below the lowest-peak candidate (_descended): at most this many solves, each aiming
# this share of the peak lower, each given at most this many seconds
_DESCENT_TRIES = 6
_DESCENT_STEP = 0.03
_DESCENT_S = 2.0
_DESCENT_MISSES = 2  # plans in a row over the lowest peak so far that end the search
_LOWERING_MIN_BYTES = 2**20
# how far back a value lowered at the peak is rebuilt from what only its rebuild would read
_LOWERING_DEPTH = 2
# How long the search for the fastest plan at the lowest peak may take (the lowest-peak plan
# itself is found first and kept if this finds nothing).
_REFINE_S = 5.0
# ... and only where the program's own lowest-peak plan simulates within this fraction of the
# lowest candidate's peak
_REFINE_WITHIN = 0.02
# How long the program's own lowest-peak search may take where a layer plan is also tried.
_LOWEST_PEAK_S = 2.0
# Seconds the keep / recompute / offload program gets per solve where a recompute-only plan is
# already found (it keeps the configured limit where none is): there it only tries to beat that
# plan, and a solve run to the full limit costs planning time the step may never win back
# (measured in docs/results.md).
_OFFLOAD_BESIDE_S = 5.0
# Seconds each solve of the program's rounds gets where a plan that fits is already in hand (a
# lowest-peak candidate or every layer checkpointed): there it only tries to beat that plan, and
# near the lowest peak one solve can take most of its limit for a plan whose simulation misses the goal
# (measured in docs/results.md).
_IN_HAND_S = 5.0
# How long each solve of the calibration search may take: it only looks for a plan faster than
# one that already fits, and a solve run to the full limit there costs planning time that a plan
# it finds may never win back (measured in docs/results.md).
_CALIBRATION_S = 5.0


# The program's objective (recompute time less the keep costs avoided) leaves constants out, so
# its relative gap means little; the search also stops once the plan is proven within this
# fraction of the estimated step time of the optimum. The step time is an estimate less exact than
# that; a smaller share made solves run to their time limit proving plans already found, across
# the zoo (docs/results.md).
_STEP_GAP = 5e-3


def step_tolerance_ms(analysis: Any) -> float:
    """The solver's absolute gap: plans within it are not told apart (``_STEP_GAP`` of the
    analysis's estimated step time)."""
    return _STEP_GAP * analysis.runtime_ms


def _solver_options(config: SACConfig, analysis: Any) -> Any:
    from sac_compiler.solvers import SolverOptions

    # over several ranks, one solver thread: a multi-threaded search may end at another of several
    # equal plans on each rank (a time limit can still differ: rank 0's plan is broadcast, _agreed)
    return SolverOptions(solver=config.solver, time_limit_s=config.time_limit_s, mip_gap=config.mip_gap,
                         mip_gap_abs=step_tolerance_ms(analysis),
                         threads=1 if config.world_size > 1 else None)


_SOLVE_TIMES: contextvars.ContextVar[list[float] | None] = contextvars.ContextVar("sac_solve_times", default=None)


@contextlib.contextmanager
def recording_solves() -> Iterator[list[float]]:
    """Within the block, the wall time of every solver call (model building included) is
    appended to the list it yields."""
    times: list[float] = []
    token = _SOLVE_TIMES.set(times)
    try:
        yield times
    finally:
        _SOLVE_TIMES.reset(token)


def _solve(problem: Any, options: Any, greedy: bool = True) -> Any:
    """``solve_savings_plan``, timed for ``recording_solves``. If the solver fails (any status but a
    proven infeasibility) the plan is the checked greedy one, and the log says so; ``greedy=False``
    raises the failure instead (a search for a better plan than one it has, which a greedy plan
    does not serve)."""
    from sac_compiler.solvers import InfeasibleError, SolverError
    from sac_compiler.solvers.savings_plan import (
        greedy_savings_plan,
        solve_savings_plan,
    )

    start = time.perf_counter()
    try:
        with _torch_threads_kept():
            try:
                return solve_savings_plan(problem, options)
            except InfeasibleError:
                raise
            except SolverError as error:
                if not greedy:
                    raise
                log.warning("sac plan: the %s solver failed (%s); planning greedily instead (cheapest "
                            "recompute per byte first, checked against the same model)", options.solver, error)
                return greedy_savings_plan(problem)
    finally:
        times = _SOLVE_TIMES.get()
        if times is not None:
            times.append(time.perf_counter() - start)


@contextlib.contextmanager
def _torch_threads_kept() -> Iterator[None]:
    """The MILP solver's OpenMP runtime may reset the process's thread count; Dynamo checks it."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _plan(result: GraphPlanResult, config: SACConfig, target: int | None = None, budget: int | None = None) -> None:
    """Solve, tag, and re-check on the exact memory simulation; tighten and re-solve if it is over.

    ``target``: plan for this peak instead of the budget (the backend lowers it when the
    partitioned graphs turn out higher than the joint-graph simulation).
    """
    analysis = result.analysis
    outside = result.outside_bytes
    fused = config.compiler == "inductor"
    problem, kept_random, kept_ops = build_plan_problem(analysis, fused_pointwise=fused)
    problem = _with_runs(problem, analysis, config)
    options = _solver_options(config, analysis)
    fastest = result.fastest
    if fused and fastest is None:
        # Under Inductor the fastest plan already recomputes the pointwise values that are cheaper
        # to recompute than to write out: a fraction is of its activations.
        fastest = _solve(dataclasses.replace(problem, budget=max(problem.baseline) + problem.held_by_other_runs), options)
        result.fastest = fastest
    step_peak = _after_graph_peak(analysis) + outside
    fastest_sim = _simulate(analysis, config, fastest.recompute) if fastest is not None else None
    lowest = None  # (peak, how, plan, simulation) of the lowest-peak plan, once known
    # what this graph's lowest-peak searches found, for its plans for other targets too
    memo = analysis.searches.setdefault("lowest", _LowestMemo())
    fraction = config.memory_budget.fraction
    if budget is None and fraction is None:
        budget = config.memory_budget.bytes
    elif budget is None:
        high = (fastest_sim.peak_bytes if fastest_sim is not None else analysis.memory.peak_bytes) + outside
        low = high
        if fraction < 1.0:  # its peak only: the plan itself is searched below where it is needed
            lowest = _lowest_plan(problem, analysis, config, options, fastest=fastest, refine=False, lower=False,
                                  memo=memo)
            low = min(high, lowest[0] + outside)
        low, high = max(low, step_peak), max(high, step_peak)
        budget = fraction_budget(fraction, low, high)
        result.fraction_range = (low, high)
        log.info("sac plan: memory_budget %g resolves to %s (lowest peak found %s, fastest plan %s)",
                 fraction, format_bytes(budget), format_bytes(low), format_bytes(high))
    elif fraction is not None and fraction < 1.0 and target is not None:
        # a fraction's plan made again for a lower target (the partitioned graphs peaked over it):
        # the lowest peak its range found (searched on this analysis, so known) tells whether the
        # target asks for less, where the program's rounds would search to their time limits
        lowest = _lowest_plan(problem, analysis, config, options, fastest=fastest, refine=False, lower=False,
                              memo=memo)
    result.budget_bytes = budget
    result.target_bytes = target if target is not None else budget
    margin = planning_margin(result, config)
    goal = (target if target is not None else budget) - outside - margin
    result.kept_random = kept_random
    result.kept_ops = kept_ops
    if step_peak > budget:
        raise BudgetError(
            f"memory budget {format_bytes(budget)} is below the optimizer step's own peak or FSDP's "
            f"reduce-scatter's after the graph, {format_bytes(step_peak)} (parameters, gradients, optimizer "
            "state; the reduce-scatter's input buffer), which no recomputation changes"
        )

    def recompute_only() -> tuple[Any, Any]:
        nonlocal lowest
        if fastest_sim is not None and fastest_sim.peak_bytes <= goal:
            return fastest, fastest_sim  # nothing to trade: the fastest plan fits
        structure = _layer_structure(problem, analysis)
        if fraction is not None and lowest is not None and (target if target is not None else budget) <= lowest[0] + outside:
            # the fraction resolved to the lowest peak found (memory_budget 0), or the partitioned
            # graphs' check asks for less: the lowest-peak plan is the plan, with the fastest plan at
            # its peak where one is found soon; the program's rounds would search under it, where
            # it found nothing, each to the solver's time limit
            lowest = _lowest_plan(problem, analysis, config, options, structure, fastest, memo=memo)
            log.info("sac plan: memory_budget %g: the lowest peak found is the plan: %s simulates at %s", fraction,
                     lowest[1], format_bytes(lowest[0] + outside))
            return lowest[2], lowest[3]
        # A plan that fits already (a lowest-peak candidate a fraction's range ranked, or every
        # layer checkpointed): the program's solves then only try to beat it, each for a short time
        in_hand = _plan_in_hand(problem, analysis, config, goal, fastest, structure, memo)
        round_options = options
        if in_hand is not None:
            log.info("sac plan: %s fits (%s, %.3f ms); the program's solves try to beat it", in_hand[0],
                     format_bytes(in_hand[2].peak_bytes + outside), _plan_ms(problem, in_hand[1]))
            if options.time_limit_s is None or options.time_limit_s > _IN_HAND_S:
                round_options = dataclasses.replace(options, time_limit_s=_IN_HAND_S)
        held = [_Strategy(in_hand[0], lambda: (in_hand[1], in_hand[2]))] if in_hand is not None else []
        rounds = _solve_rounds(problem, analysis, config, goal, budget, round_options, fastest, outside, fastest_sim,
                               in_hand=in_hand is not None)
        if rounds.plan is not None:
            # a faster plan may checkpoint a few layers whole; it cannot be faster than one such layer
            one = layer_checkpoint_plan(problem, analysis, structure[2][:1],
                                        fastest.recompute if fastest is not None else (), structure)
            promising = one is not None and _plan_ms(problem, one) < _plan_ms(problem, rounds.plan)
            found = _fastest_fitting([
                _Strategy("leading layers checkpointed, the rest as the fastest plan",
                          lambda: _layer_hybrid(problem, analysis, config, goal, fastest, structure) if promising else None),
                *held,
            ], problem, goal, incumbent=(rounds.plan, rounds.sim))
            assert found is not None
            return found
        # The program's chain terms are conservative for plans that rebuild whole layers: try
        # checkpointing the fewest leading layers whole, the rest as the fastest plan has them, or
        # as the plan of the rounds that came nearest the budget has them, or that plan repaired.
        strategies = [*held, _Strategy("leading layers checkpointed, the rest as the fastest plan",
                                       lambda: _layer_hybrid(problem, analysis, config, goal, fastest, structure))]
        near = rounds.nearest
        if near is not None:
            strategies += [
                _Strategy("the nearest round's plan, repaired",
                          lambda: _repaired(problem, analysis, config, goal, *near)),
                _Strategy("leading layers checkpointed, the rest as the nearest round's plan",
                          lambda: _layer_hybrid(problem, analysis, config, goal, near[0], structure)),
            ]
        hybrid = _fastest_fitting(strategies, problem, goal)
        if hybrid is None:
            assert rounds.error is not None
            if not rounds.infeasible and fraction is None:
                raise rounds.error
            if lowest is None:
                lowest = _lowest_plan(problem, analysis, config, options, structure, fastest, refine=False,
                                      memo=memo)
            if lowest[0] > goal:
                if fraction is not None and target is None:
                    # a fraction resolved at or above this very plan's peak: the margin-free goal
                    # can only miss it by the outside memory's rounding; plan it regardless
                    log.info("sac plan: memory_budget %g: the lowest-peak plan simulates at %s, the budget is %s",
                             fraction, format_bytes(lowest[0] + outside), format_bytes(budget))
                else:
                    raise _budget_error(analysis, config, budget, outside, rounds.best_simulated, fastest_sim,
                                        lowest) from rounds.error
            # the lowest-peak plan is the plan: with the fastest plan at its peak, where one is found
            lowest = _lowest_plan(problem, analysis, config, options, structure, fastest, memo=memo)
            hybrid = lowest[2], lowest[3]
        plan, sim = hybrid
        log.info("sac plan: the program has no plan under %s; %s simulates at %s",
                 format_bytes(goal + outside), plan.status, format_bytes(sim.peak_bytes + outside))
        if rounds.solve_failed:
            # the program returned nothing at this goal (within its limit): the calibration's
            # solves, the same program shifted, would each run to their own limit
            log.info("sac plan: no calibration search: the program returned no plan under %s",
                     format_bytes(goal + outside))
            return plan, sim
        # the program, shifted onto the exact simulation of the fastest plan (as after solved rounds),
        # then of the best plan so far, may find a faster plan near either
        if fastest is not None:
            plan, sim = _calibrated(problem, analysis, config, goal, options, fastest, plan, sim, fastest_sim)
        return _calibrated(problem, analysis, config, goal, options, plan, plan, sim, sim,
                           floor_ms=_plan_ms(problem, fastest) if fastest is not None else 0.0)

    offload = None
    offload_reason = None
    if config.offload:
        from sac_compiler.offload import offload_note

        offload_reason = offload_note(config, analysis)
    try:
        plan, sim = recompute_only()
    except BudgetError:
        if not config.offload or offload_reason is not None:
            raise
        offload = _offload_choice(problem, analysis, config, goal, options, None)
        if offload is None:
            raise
        log.info("sac plan: recomputation alone has no plan under %s; with offload one simulates at %s",
                 format_bytes(goal + outside), format_bytes(offload.simulation.peak_bytes + outside))
    else:
        if config.offload and offload_reason is None and plan is not fastest:
            offload = _offload_choice(problem, analysis, config, goal, options, _plan_ms(problem, plan))
    if offload is not None:
        plan, sim = offload.plan, offload.simulation
    if config.world_size > 1:
        plan, sim = _agreed(problem, analysis, config, plan, sim)
    result.plan = plan
    result.predicted_peak = sim.peak_bytes + outside
    by_name = {n.name: n for n in analysis.graph.gm.graph.nodes}
    result.recomputed_values = {name: (get_record(by_name[name]).module_fqn or "Global",
                                       get_record(by_name[name]).alloc_bytes or 0) for name in sorted(plan.recompute)}
    tag_graph(analysis.graph.gm, plan.recompute)
    result.offload = None
    if offload is not None:
        from sac_compiler.offload import reload_anchors, tag_offload, wait_anchors, waits_mid_forward

        tag_offload(analysis.graph.gm, offload.plan.offload, analysis.graph.num_fwd_outputs)
        result.offload = OffloadedValues(
            starts=dict(offload.plan.offload),
            values={name: (get_record(by_name[name]).module_fqn or "Global", get_record(by_name[name]).alloc_bytes or 0)
                    for name in sorted(offload.plan.offload)},
            reload_before=reload_anchors(analysis, offload.plan.offload),
            bandwidth=offload.problem.bandwidth, stall_ms=offload.plan.stall_ms,
            recompute_only_ms=offload.recompute_only_ms,
            wait_after=(wait_anchors(analysis, offload.problem, offload.plan.offload)
                        if waits_mid_forward() else {}))
    log.info("sac plan: budget %s, baseline peak %s, simulated %s, %d values recomputed (%.3f ms), %d offloaded "
             "(%s), %s in %.2f s", format_bytes(budget), format_bytes(result.baseline_peak or 0),
             format_bytes(result.predicted_peak), len(plan.recompute), plan.recompute_ms,
             len(result.offload.starts) if result.offload else 0,
             format_bytes(result.offload.bytes if result.offload else 0), plan.status, plan.solve_s)


def _plan_in_hand(problem: Any, analysis: Any, config: SACConfig, goal: int, fastest: Any, structure: Any,
                  memo: _LowestMemo) -> tuple[str, Any, Any] | None:
    """(how, plan, simulation) of a plan known to fit ``goal`` before the program solves: the fastest
    lowest-peak candidate an earlier search of the graph ranked that fits, else every layer
    checkpointed with the rest as the ``fastest`` plan has it (one simulation, which the
    lowest-peak search reuses), where it fits; else None."""
    found = memo.fastest_fitting(problem, goal)
    if found is not None or not structure[2]:
        return found
    base = fastest.recompute if fastest is not None else frozenset()
    how = "every layer checkpointed, the rest as the fastest plan" if base else "every layer checkpointed"
    plan = layer_checkpoint_plan(problem, analysis, base=base, structure=structure)
    sim = memo.simulate(analysis, config, plan.recompute)
    return (how, plan, sim) if sim.peak_bytes <= goal else None


def _offload_choice(problem: Any, analysis: Any, config: SACConfig, goal: int, options: Any,
                    recompute_only_ms: float | None) -> Any:
    """A keep / recompute / offload plan (``offload.plan_with_offload``) where it is faster than the
    recompute-only plan's ``recompute_only_ms`` (None: recomputation alone has no plan), else None."""
    from sac_compiler.offload import plan_with_offload

    if recompute_only_ms is not None and (options.time_limit_s is None or options.time_limit_s > _OFFLOAD_BESIDE_S):
        # a plan exists: the search only tries to beat it (the best it finds in the time is kept)
        options = dataclasses.replace(options, time_limit_s=_OFFLOAD_BESIDE_S)
    choice = plan_with_offload(analysis, config, problem, goal, options,
                               functools.partial(_simulate, analysis, config))
    if choice is None or not choice.plan.offload:
        return None
    if recompute_only_ms is not None and choice.time_ms >= recompute_only_ms:
        log.info("sac plan: with offload %.3f ms, recomputation alone %.3f ms: not offloading",
                 choice.time_ms, recompute_only_ms)
        return None
    return dataclasses.replace(choice, recompute_only_ms=recompute_only_ms)


def _agreed(problem: Any, analysis: Any, config: SACConfig, plan: Any, sim: Any) -> tuple[Any, Any]:
    """Rank 0's plan on every rank of a real process group (``distributed.agree_on_recompute``):
    ranks that plan differently run different graphs, whose collectives then never match."""
    from sac_compiler.distributed import agree_on_recompute

    agreed = agree_on_recompute(plan.recompute)
    if agreed == plan.recompute:
        return plan, sim
    plan = _fixed_plan(problem, set(agreed), f"RANK0({plan.status})")
    return plan, _simulate(analysis, config, plan.recompute)


def planning_margin(result: GraphPlanResult, config: SACConfig) -> int:
    """Bytes of the budget a plan leaves free: under Inductor, an absolute budget keeps a margin for
    the simulation's error against what Inductor allocates (a fraction is of the simulation itself).
    The margin is a share of what the simulation accounts for: the budget less the memory held
    outside the graph and the graph's static bytes (parameters, buffers, inputs, optimizer state),
    which are counted exactly."""
    if (config.compiler != "inductor" or config.memory_budget is None or config.memory_budget.bytes is None
            or result.budget_bytes is None):
        return 0
    return int(_MODEL_MARGIN * max(0, result.budget_bytes - _exact_bytes(result.analysis, result.outside_bytes)))


def _exact_bytes(analysis: Any, outside: int) -> int:
    """What the planner counts without simulating it: memory outside the graph and static bytes."""
    return outside + analysis.memory.static_bytes


@dataclass(frozen=True)
class _Rounds:
    """What the program's rounds (:func:`_solve_rounds`) came to: the plan and its exact simulation
    where one fits the goal; else why not (``error``; ``infeasible``: the program itself has no
    plan there, so the caller words the error once it has tried the other plans it knows), the
    round that came nearest the goal (``nearest``: plan, simulation) and the lowest peak a round
    simulated (``best_simulated``, with the memory held outside). ``solve_failed``: a solve
    returned no plan (its time limit reached without one, or a solver error; with a plan in hand),
    which ended the rounds."""

    plan: Any = None
    sim: Any = None
    error: BudgetError | None = None
    infeasible: bool = False
    solve_failed: bool = False
    nearest: tuple[Any, Any] | None = None
    best_simulated: int | None = None


@dataclass(frozen=True)
class _Strategy:
    """One way to a plan under the goal: ``run`` gives (plan, exact simulation), or None."""

    name: str
    run: Callable[[], tuple[Any, Any] | None]


def _fastest_fitting(strategies: Iterable[_Strategy], problem: Any, goal: int,
                     incumbent: tuple[Any, Any] | None = None) -> tuple[Any, Any] | None:
    """The one evaluator of plan strategies: runs each in turn and returns the fastest plan (the
    program's estimate of its recompute time; the earlier on a tie, ``incumbent`` first) among
    ``incumbent`` and the strategies' plans whose exact simulation fits ``goal``."""
    best = incumbent
    for strategy in strategies:
        found = strategy.run()
        if found is None or found[1].peak_bytes > goal:
            continue
        log.debug("sac plan: %s simulates at %s (%.3f ms)", strategy.name, format_bytes(found[1].peak_bytes),
                  _plan_ms(problem, found[0]))
        if best is None or _plan_ms(problem, found[0]) < _plan_ms(problem, best[0]):
            best = found
    return best


def _outside_note(outside: int) -> str:
    return f"; with {format_bytes(outside)} held outside the graph" if outside else ""


def _budget_error(analysis: Any, config: SACConfig, budget: int, outside: int, best_simulated: int | None,
                  fastest_sim: Any, lowest: tuple[int, str, Any, Any]) -> BudgetError:
    """The error for an absolute budget no plan meets, naming the smallest peak a plan was found to
    reach (every candidate's peak is from the exact simulation) and the least budget that plans."""
    smallest, how = lowest[0] + outside, lowest[1]
    if fastest_sim is not None and fastest_sim.peak_bytes + outside < smallest:
        smallest, how = fastest_sim.peak_bytes + outside, "the fastest plan"
    if best_simulated is not None and best_simulated < smallest:
        smallest, how = best_simulated, "the program's plan nearest the budget"
    smallest = max(smallest, _after_graph_peak(analysis) + outside)
    need, margin_note = least_budget(analysis, config, smallest, outside), ""
    if need > smallest:
        margin_note = f", and the {_MODEL_MARGIN:.0%} margin the planner keeps for its simulation's error under Inductor"
    finding = (f"memory budget {format_bytes(budget)} is below the smallest feasible peak found, "
               f"{format_bytes(smallest)} ({how}{_outside_note(outside)}){margin_note}")
    return BudgetError(least_budget_advice(finding, need), least_budget=need, finding=finding)


def least_budget_advice(finding: str, need: int) -> str:
    """A refusal's message: what was found, and the least budget to give instead."""
    return f"{finding}; raise memory_budget to at least {need} bytes, or give a fraction (0.0 plans the lowest peak found)"


def least_budget(analysis: Any, config: SACConfig, peak: int, outside: int = 0) -> int:
    """The least absolute budget under which a plan peaking at ``peak`` is accepted: the peak
    itself, plus under Inductor the margin the planner keeps for its simulation's error."""
    if config.compiler != "inductor":
        return peak
    exact = _exact_bytes(analysis, outside)
    return exact + math.ceil((peak - exact) / (1 - _MODEL_MARGIN))


def _solve_rounds(problem: Any, analysis: Any, config: SACConfig, goal: int, budget: int, options: Any,
                  fastest: Any, outside: int = 0, fastest_sim: Any = None, in_hand: bool = False) -> _Rounds:
    """Solve and re-check on the exact simulation (see ``_plan``): the plan and its simulation, or
    why there is none and the round that came nearest (:class:`_Rounds`). ``in_hand``: the caller
    has a plan that fits, so a solve that fails (its time limit without a plan) ends the rounds
    instead of planning greedily."""
    from sac_compiler.solvers import InfeasibleError, SolverError
    from sac_compiler.solvers.savings_plan import savings_profile

    original = problem
    sim: Any = None  # the exact simulation of the previous round's plan
    nearest: Any = None  # (plan, simulation) of the round that came nearest the goal
    solve_goal = goal
    for attempt in range(_MAX_ROUNDS):
        try:
            plan = _solve(dataclasses.replace(problem, budget=solve_goal), options, greedy=not in_hand)
        except InfeasibleError as e:
            error = BudgetError(f"the program has no plan under {format_bytes(solve_goal + outside)}")
            error.__cause__ = e
            return _Rounds(error=error, infeasible=True, nearest=nearest,
                           best_simulated=None if sim is None else sim.peak_bytes + outside)
        except SolverError as e:  # only with a plan in hand (else _solve plans greedily)
            log.info("sac plan round %d: %s; the plan in hand stands", attempt + 1, e)
            error = BudgetError(f"the program found no plan under {format_bytes(solve_goal + outside)} in time")
            error.__cause__ = e
            return _Rounds(error=error, nearest=nearest, solve_failed=True,
                           best_simulated=None if sim is None else sim.peak_bytes + outside)
        sim = _simulate(analysis, config, plan.recompute)
        if sim.peak_bytes <= goal:
            break
        if nearest is None or sim.peak_bytes < nearest[1].peak_bytes:
            nearest = (plan, sim)
        # The planner's lifetimes are a model: where the exact simulation is over the budget,
        # raise that step's baseline by the excess and solve again.
        simulated = _step_profile(sim)
        saved = savings_profile(problem, plan.recompute, plan.kept_for_recompute)
        modelled = [b - v for b, v in zip(problem.baseline, saved)]
        under = {t: simulated[t] - modelled[t] for t in range(len(modelled))
                 if simulated[t] > goal and simulated[t] > modelled[t]}
        log.info("sac plan round %d: simulated peak %s over the budget %s; the model was low at %d step(s)",
                 attempt + 1, format_bytes(sim.peak_bytes + outside), format_bytes(budget), len(under))
        if not under:  # over in forward, where no recomputation helps
            return _Rounds(error=BudgetError(
                f"memory budget {format_bytes(budget)} is below the forward pass's own peak "
                f"{format_bytes(sim.peak_bytes + outside)}{_outside_note(outside)}, which recomputation does not lower; "
                "raise memory_budget"
            ), nearest=nearest)
        problem = dataclasses.replace(
            problem, baseline=tuple(b + under.get(t, 0) for t, b in enumerate(problem.baseline)))
        if attempt + 1 >= _PLAIN_ROUNDS:
            # Once the model is near (the first rounds correct most of it), what is left may be a
            # plan that moves its peak to another step each round by a few MiB: plan lower by the excess.
            solve_goal -= sim.peak_bytes - goal
    else:
        return _Rounds(error=BudgetError(
            f"memory budget {format_bytes(budget)}: after {_MAX_ROUNDS} rounds the best plan still peaks at "
            f"{format_bytes(sim.peak_bytes + outside)} in simulation; raise memory_budget"
        ), nearest=nearest)
    if fastest is not None:
        plan, sim = _calibrated(original, analysis, config, goal, options, fastest, plan, sim, fastest_sim)
    return _Rounds(plan=plan, sim=sim)


_MAX_ROUNDS = 5
_PLAIN_ROUNDS = 3  # rounds that only correct the model; those after also plan lower
_MODEL_MARGIN = 0.02
_CALIBRATION_ROUNDS = 4
# the calibration search runs only where the plan found could be faster, than the fastest plan
# without memory pressure, by more than this share of the estimated step: below it the search
# (up to _CALIBRATION_ROUNDS solves and simulations) costs more planning time than it can save
_CALIBRATION_MIN_GAIN = 0.01


def layer_modules(gm: fx.GraphModule) -> Callable[[str], bool]:
    """Which modules of ``gm`` (after ``annotate_modules``) are repeated layers: the indexed
    children of a container (``layers.3``), unless they are all leaf modules and not all of one
    type. Those are the steps of one module written as an ``nn.Sequential`` (a CNN's stem: conv,
    norm, ReLU, pool; an MLP: Linear, SiLU, Linear), not layers: checkpointing one of them alone
    keeps every step's output, where full per-layer checkpointing leaves them to the partitioner
    (docs/results.md). Without the module types every indexed module counts."""
    orders = graph_results(gm).get("annotate_modules")
    if orders is None or not orders.module_types:
        return lambda fqn: _LAYER.match(fqn) is not None
    types = orders.module_types
    parents = {fqn.rsplit(".", 1)[0] for fqn in types if "." in fqn}
    children: dict[str, list[str]] = {}
    for fqn in types:
        match = _LAYER.match(fqn)
        if match:
            children.setdefault(match.group(1), []).append(fqn)
    layers = {fqn for kids in children.values()
              if any(k in parents for k in kids) or len({types[k] for k in kids}) == 1 for fqn in kids}
    return layers.__contains__


def _layer_of(node: fx.Node, is_layer: Callable[[str], bool]) -> tuple[str, int] | None:
    """The repeated layer (``layers.3``: the outermost layer module, see :func:`layer_modules`) a
    node runs in."""
    for fqn in get_record(node).module_stack or ():
        if is_layer(fqn):
            match = _LAYER.match(fqn)
            assert match is not None
            return match.group(1), int(match.group(2))
    return None


def _layer_structure(problem: Any, analysis: Any) -> tuple[dict[str, Any], set[str], list[Any]]:
    """Each candidate's repeated layer (or None), the values that cross a layer boundary (a layer's
    output, a value another layer or the rest of the model reads), and the layers in forward order."""
    gm = analysis.graph.gm
    owner = _owner_map(gm)
    is_layer = layer_modules(gm)
    layer: dict[str, Any] = {}
    crossing: set[str] = set()
    order: list[Any] = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or get_record(node).side != Side.FORWARD:
            continue
        here = _layer_of(_producer(node), is_layer)
        layer[node.name] = here
        if here is not None and here not in order:
            order.append(here)
        for arg in node.all_input_nodes:
            base = owner.get(arg, arg)
            if base.op == "call_function" and layer.get(base.name, here) != here:
                crossing.add(base.name)
    out = next(iter(gm.graph.find_nodes(op="output")))
    crossing |= {owner.get(a, a).name for a in out.args[0][: analysis.graph.num_fwd_outputs] if isinstance(a, fx.Node)}
    names = {c.name for c in problem.candidates}
    return {n: layer.get(n) for n in names}, crossing, [k for k in order if any(layer.get(n) == k for n in names)]


def layer_checkpoint_plan(problem: Any, analysis: Any, layers: Iterable[Any] | None = None,
                          base: Iterable[str] = (), structure: Any = None) -> Any:
    """Per-layer checkpointing in the program's terms, or None without repeated layers.

    In the checkpointed ``layers`` (default: all), what crosses a layer boundary is kept and every
    other value the layer makes is recomputed (random ops and their groups stay kept); elsewhere
    the values in ``base`` (another plan's recomputed set) are recomputed. The program's chain terms
    are conservative for plans that rebuild whole layers, so the planner checks these plans on the
    exact simulation.
    """
    layer, crossing, order = structure if structure is not None else _layer_structure(problem, analysis)
    if not order:
        return None
    chosen = set(order if layers is None else layers)
    base = set(base)
    recompute = {c.name for c in problem.candidates if not c.must_save and (
        (layer[c.name] in chosen and c.name not in crossing) or (layer[c.name] not in chosen and c.name in base))}
    return _fixed_plan(problem, recompute, f"LAYER_CHECKPOINT({len(chosen)}/{len(order)})")


def _fixed_plan(problem: Any, recompute: set[str], status: str) -> Any:
    """A plan that recomputes ``recompute`` (less the groups it does not hold whole), keeping what
    a recomputed value is made from where backward does not read it anyway."""
    from sac_compiler.solvers.savings_plan import SavingsPlan, check_plan

    by_name = {c.name: c for c in problem.candidates}
    recompute = set(recompute)
    groups: dict[str, set[str]] = {}
    for c in problem.candidates:
        if c.group is not None:
            groups.setdefault(c.group, set()).add(c.name)
    for members in groups.values():  # a group is recomputed whole or kept whole
        if not members <= recompute:
            recompute -= members
    # what a recomputed value is made from: recomputed with it where the base plan says so, else kept
    kept = {u for name in recompute for u in by_name[name].inputs
            if u not in recompute and by_name[u].first_use is None}
    check_plan(problem, recompute, kept)
    return SavingsPlan(
        recompute=frozenset(recompute), kept_for_recompute=frozenset(kept),
        recompute_ms=sum(by_name[n].cost_ms for n in recompute), status=status,
        gap=0.0, solve_s=0.0, n_vars=0, n_constraints=0)


def _layer_hybrid(problem: Any, analysis: Any, config: SACConfig, goal: int, base: Any,
                  structure: Any = None) -> tuple[Any, Any] | None:
    """The fewest leading layers to checkpoint whole (the rest as ``base`` plans them) for the
    exact simulation to fit ``goal``: (plan, simulation), or None if even every layer is not enough."""
    structure = structure if structure is not None else _layer_structure(problem, analysis)
    order = structure[2]
    if not order:
        return None
    recomputed = base.recompute if base is not None else frozenset()

    def attempt(k: int) -> tuple[Any, Any]:
        plan = layer_checkpoint_plan(problem, analysis, order[:k], recomputed, structure)
        return plan, _simulate(analysis, config, plan.recompute)

    best = attempt(len(order))
    if best[1].peak_bytes > goal:
        return None
    lo, hi = 0, len(order)  # hi fits; find the smallest k that does (the peak falls as k grows)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        trial = attempt(mid)
        if trial[1].peak_bytes <= goal:
            hi, best = mid, trial
        else:
            lo = mid
    return best


def _repaired(problem: Any, analysis: Any, config: SACConfig, goal: int, plan: Any, sim: Any,
              slower_than_ms: float | None = None) -> tuple[Any, Any] | None:
    """``plan`` (over ``goal`` in the exact simulation) with more values recomputed until it fits,
    or None if ``_REPAIR_ROUNDS`` rounds do not get there (or it would take ``slower_than_ms`` or more).

    Each round takes the step where the simulation peaks and recomputes, cheapest per byte first,
    values kept through that step whose inputs are there anyway (kept for backward, or recomputed
    already), until they cover the excess with a quarter to spare, then simulates again. Near the
    budget the program's plans often miss by a few MiB at one step, and each re-solve moves the
    peak to another step; a repair keeps the plan and adds only what the excess needs.
    """
    from sac_compiler.solvers.savings_plan import SavingsPlan, check_plan, plan_time_ms

    by_name = {c.name: c for c in problem.candidates}
    recompute, kept = set(plan.recompute), set(plan.kept_for_recompute)

    def there(u: str) -> bool:
        c = by_name.get(u)
        return c is None or u in recompute or u in kept or c.first_use is not None

    for _ in range(_REPAIR_ROUNDS):
        over = sim.peak_bytes - goal
        if over <= 0:
            return plan, sim
        profile = _step_profile(sim)
        step = max(range(len(profile)), key=profile.__getitem__)
        options = sorted(
            (c for c in problem.candidates
             if c.name not in recompute and not c.must_save and c.group is None and c.nbytes > 0
             and c.first_use is not None and c.first_use > step and all(there(u) for u in c.inputs)),
            key=lambda c: (c.cost_ms - c.keep_cost_ms) / c.nbytes)
        added, covered = [], 0
        for c in options:
            if covered >= over * 1.25:
                break
            added.append(c.name)
            covered += c.nbytes
        if not added or covered < over:
            return None
        recompute.update(added)
        check_plan(problem, recompute, kept)
        if slower_than_ms is not None and plan_time_ms(problem, recompute, kept) >= slower_than_ms:
            return None  # no faster than a plan the caller has
        plan = SavingsPlan(recompute=frozenset(recompute), kept_for_recompute=frozenset(kept),
                           recompute_ms=sum(by_name[n].cost_ms for n in recompute),
                           status=plan.status if plan.status.endswith("+REPAIR") else f"{plan.status}+REPAIR",
                           gap=plan.gap, solve_s=plan.solve_s, n_vars=plan.n_vars, n_constraints=plan.n_constraints)
        sim = _simulate(analysis, config, recompute)
    return (plan, sim) if sim.peak_bytes <= goal else None


_REPAIR_ROUNDS = 3


def _model_error(problem: Any, plan: Any, sim: Any) -> list[int]:
    """Per step, the exact simulation of ``plan`` less the planner's model of it."""
    from sac_compiler.solvers.savings_plan import savings_profile

    simulated = _step_profile(sim)
    saved = savings_profile(problem, plan.recompute, plan.kept_for_recompute)
    return [s - (b - v) for s, b, v in zip(simulated, problem.baseline, saved)]


def _calibrated(problem: Any, analysis: Any, config: SACConfig, goal: int, options: Any,
                reference: Any, best: Any, best_sim: Any, reference_sim: Any = None,
                floor_ms: float | None = None) -> tuple[Any, Any]:
    """A faster plan than ``best`` from a model shifted onto the exact simulation, if one fits.

    The savings model counts a recomputed value as a buffer again from its first backward read;
    Inductor folds a recomputed pointwise value into the kernels that read it, so the model
    over-counts and the plan recomputes more than the budget needs. Shifting the model by its error
    on a reference plan (at first the fastest one) corrects that near the reference. Each plan the
    shifted model gives is checked on the exact simulation: one that fits and is faster is kept and
    becomes the reference (one that fits and is no faster ends the search); one that does not fit
    raises the shift where it went over, by what the shifted model missed there, so the search
    does not return to it. ``reference_sim``: the reference's exact simulation, if the caller has it.
    ``floor_ms``: the fastest plan's time, where the reference is not that plan: the search runs
    only where ``best`` could be faster than it by more than ``_CALIBRATION_MIN_GAIN`` of the
    estimated step (default: the reference's time).
    """

    time_of = functools.partial(_plan_ms, problem)
    if options.time_limit_s is None or options.time_limit_s > _CALIBRATION_S:
        options = dataclasses.replace(options, time_limit_s=_CALIBRATION_S)

    if reference_sim is None:
        reference_sim = _simulate(analysis, config, reference.recompute)
    faster = reference.recompute != best.recompute and time_of(reference) < time_of(best)
    if faster and reference_sim.peak_bytes <= goal:
        return reference, reference_sim  # the fastest plan fits
    best_ms = time_of(best)
    # no plan is faster than the fastest plan: the search gains at most the difference
    floor = time_of(reference) if floor_ms is None else floor_ms
    if best_ms - floor <= _CALIBRATION_MIN_GAIN * analysis.runtime_ms:
        log.info("sac calibration: not searched; the plan's %.4f ms is within %.4f ms of the fastest plan's "
                 "(%g of the estimated step)", best_ms, best_ms - floor, _CALIBRATION_MIN_GAIN)
        return best, best_sim
    seen = {best.recompute}
    shift = _model_error(problem, reference, reference_sim)
    for _ in range(_CALIBRATION_ROUNDS):
        solved = _solve_shifted(problem, analysis, config, shift, goal, options, seen, "the calibration search")
        if solved is None:  # none, none found within the limit, or one seen before
            break
        shifted, plan, sim = solved
        log.info("sac calibration: plan of %.4f ms simulates at %s (budget %s; best so far %.4f ms)",
                 time_of(plan), format_bytes(sim.peak_bytes), format_bytes(goal), best_ms)
        if sim.peak_bytes <= goal:
            if time_of(plan) >= best_ms:
                break  # the search has settled: a plan that fits and is no faster
            best, best_sim, best_ms = plan, sim, time_of(plan)
            shift = _model_error(problem, plan, sim)
        else:
            repaired = _repaired(problem, analysis, config, goal, plan, sim, slower_than_ms=best_ms) \
                if time_of(plan) < best_ms else None
            if repaired is not None:
                best, best_sim = repaired
                best_ms = time_of(best)
            shift = _raised_shift(shift, shifted, plan, sim, goal)
    return best, best_sim


def _plan_ms(problem: Any, plan: Any) -> float:
    """The program's time of a plan (recompute costs and the keep costs of what stays kept)."""
    from sac_compiler.solvers.savings_plan import plan_time_ms

    return plan_time_ms(problem, plan.recompute, plan.kept_for_recompute)


def _step_profile(sim: Any) -> tuple[int, ...]:
    """The planner's steps: the forward (its peak: recomputed values are freed after their last
    forward use, which lowers it), then every backward step."""
    fb = sim.first_backward
    return (max(sim.end_of_forward_bytes, *sim.step_peaks[:fb]), *sim.step_peaks[fb:])


def simulate_plan(result: GraphPlanResult, config: SACConfig) -> Any:
    """The joint graph's memory simulation with ``result``'s plan recomputed: the one its
    ``predicted_peak`` comes from (less the memory held outside the graph, ``outside_bytes``), with
    its ``category_timeline()``. ``result.analysis.memory`` is the same graph without recomputation.
    ``config`` is the one the plan was made with. Run it before the graph is planned again: a later
    plan re-annotates the same nodes."""
    if result.plan is None:
        raise ValueError("simulate_plan needs a planned result: plan with a memory_budget")
    return _simulate(result.analysis, config, result.plan.recompute)


def _simulate(analysis: Any, config: SACConfig, recompute: Iterable[str]) -> Any:
    """The exact memory simulation of the joint graph with ``recompute`` recomputed (with the
    other runs of ``config.runs_per_step``, see ``with_other_runs``), and the constant fills, as
    ``tag_graph`` tags them."""
    from sac_compiler.passes.annotate_memory import annotate_memory

    return with_other_runs(annotate_memory(
        analysis.graph.gm,
        target_device=analysis.graph.target_device,
        num_fwd_outputs=analysis.graph.num_fwd_outputs,
        optimizer=config.optimizer,
        optimizer_state_bytes=config.optimizer_state_bytes,
        fused_pointwise=config.compiler == "inductor",
        recomputed=set(recompute) | constant_fills(analysis.graph.gm),
        annotate=False,
        hold_outputs=config.hold_outputs,
        loss_memory=config.loss_memory,
        sharding=analysis.graph.sharding(),
        freed_before_optimizer=analysis.freed_before_optimizer,
        gradients_held=config.gradients_held,
    ), config.runs_per_step - 1)


def _with_runs(problem: Any, analysis: Any, config: SACConfig) -> Any:
    """The program for ``config.runs_per_step`` runs of the graph in a step: each other run holds
    what the simulation holds once its forward is done (as ``with_other_runs`` counts it)."""
    if config.runs_per_step <= 1:
        return problem
    return dataclasses.replace(problem, other_runs=config.runs_per_step - 1, held_per_run=_held_per_run(analysis.memory))


def _held_per_run(sim: Any) -> int:
    """What one run of the graph holds once its forward is done, for its backward (its saved
    values, its outputs): live after its last forward op, not while that op runs (the values only
    it reads are freed with it), and not the caller's loss counted there, which the step holds
    once."""
    done = (sim.timeline[sim.first_backward - 1][1] if 0 < sim.first_backward <= len(sim.timeline)
            else sim.end_of_forward_bytes)
    return max(0, done - sim.static_bytes - sim.loss_bytes)


def with_other_runs(sim: Any, other_runs: int) -> Any:
    """A joint-graph simulation of one run, with ``other_runs`` more runs of the graph in the step
    (``SACConfig.runs_per_step`` less one): each holds what this run holds once its forward is
    done (its saved values, its outputs; not the caller's loss, held once, see ``_held_per_run``)
    through every step of this one. Its peak, end of forward, step peaks and timeline include them;
    its lifetimes and category timeline stay those of one run.
    The optimizer step (and FSDP's reduce-scatter after the graph) comes after every backward: the
    other runs hold nothing there."""
    if other_runs <= 0:
        return sim
    extra = other_runs * _held_per_run(sim)
    after = _after_graph(sim)
    graph_peak = sim.peak_bytes if sim.peak_bytes > after else max([sim.end_of_forward_bytes, *sim.step_peaks])
    return dataclasses.replace(sim, peak_bytes=max(graph_peak + extra, after),
                               end_of_forward_bytes=sim.end_of_forward_bytes + extra,
                               step_peaks=[p + extra for p in sim.step_peaks],
                               timeline=[(node, live + extra) for node, live in sim.timeline])
