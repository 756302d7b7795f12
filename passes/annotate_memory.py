"""annotate_memory: bytes, storage and category per value, and the memory simulations of the graphs.

Writes into ``node.meta["sac"]`` for every node that produces tensors:

* ``nbytes``: new bytes the node allocates (0 for views and other aliases: storage-aware);
* ``alloc_bytes``: the same, rounded as the target device's allocator rounds (CUDA: 512 bytes);
* ``storage_owner``: the node whose allocation this value lives in (itself, or a view's base);
* ``category``: parameter, buffer, input, gradient, activation (a forward value alive at the end of
  forward) or temporary.

Two simulations share one model:

* the **joint** simulation (:func:`annotate_memory`) runs the joint forward/backward graph in its
  order; ``recomputed`` names forward values that backward rebuilds instead of keeping (default:
  those the user wrapped in ``torch.utils.checkpoint``): they are freed after their last forward
  use and live again in backward. Its :class:`MemorySimulation` (stored in
  ``gm.meta["sac"]["annotate_memory"]``) has the peak, the live bytes at the end of forward, the
  live bytes per step, and per-module snapshots ("current" at the module's exit and "peak" while it
  runs) as PyTorch's MemTracker reports them;
* the **partitioned** simulation (:func:`simulate_partitioned`) runs the forward graph, then the
  backward graph reading what forward saved (:class:`PartitionedPeak`).

Each turns its graph into :class:`Lifetime` records, one per allocation: the value that owns it,
its bytes, the step it is allocated at, the step after which it is freed, its category and the rule
that produced or last changed it. One pure function, :func:`peak_sweep`, measures a list of them:
the peak, its step, and the live bytes before, while and after every step (the style of
``torch._inductor.memory``: ``BufferInfo``, ``estimate_peak_memory_allocfree``). The plain model
(``LIVENESS``) allocates a value as its node runs and frees it after its last use (through its
views); parameters, buffers and inputs live throughout, gradients to the end.

Everything else the simulations imitate is a named :class:`Rule` in :data:`RULES`: what it
imitates, the simulations it applies to, and whether it belongs to Inductor's kernels (those apply
with ``fused_pointwise=True``, which the Inductor route sets). The simulations take
``disabled_rules``; :func:`rules_disabled` switches rules off within a block. Both simulations
expose their per-step live bytes by category (``category_timeline()``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import enum
import logging
import operator
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from sac_compiler.passes.annotate_ops import (
    fuses_pointwise_inputs,
    is_alias_op,
    is_pointwise_op,
    op_name,
)
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
from torch import fx

log = logging.getLogger(__name__)

CUDA_ROUNDING = 512


# --- the record and the sweep ---------------------------------------------------------------------

LIVENESS = "liveness"  # the plain model's records: allocated as the node runs, freed after its last use


class Freed(enum.Enum):
    """Where, between step ``free_step`` and the next, a :class:`Lifetime` is freed."""

    AFTER = "after"  # after step free_step runs, with the other values that died in it
    RELEASED = "released"  # dropped between the steps (the caller's forward outputs as backward starts)
    HANDED_OVER = "handed over"  # taken over by an allocation of the next step (its bytes become that one's)


_FREE_OFFSET = {Freed.AFTER: 2, Freed.RELEASED: 3, Freed.HANDED_OVER: 4}


@dataclass(frozen=True, slots=True)
class Lifetime:
    """One allocation's lifetime, as the simulations count it.

    ``alloc_step`` -1: alive before the graph's first step. ``free_step`` None: never freed. A step
    ``t`` is seen at three moments: before it (its allocations not yet made), while it runs, after
    it (what died in it freed). The allocation counts from the moment step ``alloc_step`` runs;
    ``freed`` says when it stops counting (see :class:`Freed`; ``taken_by``: the allocation that
    takes over its bytes). ``phase`` is MemTracker's split of the joint simulation's live bytes:
    ``act`` (made in forward), ``temp``, ``grad``, or "" (alive before the graph runs). ``rule``:
    the rule that produced it or last changed its bytes, its step or how it is freed (:data:`RULES`;
    ``LIVENESS``: none).
    """

    name: str
    nbytes: int
    alloc_step: int
    free_step: int | None
    category: MemoryCategory
    rule: str = LIVENESS
    freed: Freed = Freed.AFTER
    phase: str = ""
    taken_by: str = ""  # handed over: the allocation that takes its bytes

    @property
    def alloc_point(self) -> int:
        """The moment it starts counting: 3 per step (before, while, after it runs)."""
        return 3 * self.alloc_step + 1

    @property
    def free_point(self) -> int | None:
        """The moment it stops counting, or None."""
        return None if self.free_step is None else 3 * self.free_step + _FREE_OFFSET[self.freed]


@dataclass(frozen=True)
class MemorySweep:
    """What :func:`peak_sweep` measures: ``timeline`` has (before, while, after) live bytes per step;
    ``by_key`` the same three split by the sweep's key (None without one); ``peak_step`` -1: the
    peak is what lives before the first step (``start_bytes``)."""

    peak_bytes: int
    peak_step: int
    start_bytes: int
    timeline: list[tuple[int, int, int]]
    by_key: list[tuple[dict[Any, int], dict[Any, int], dict[Any, int]]] | None = None
    start_by_key: dict[Any, int] | None = None


def peak_sweep(lifetimes: Iterable[Lifetime], steps: int,
               key: Callable[[Lifetime], Hashable] | None = None) -> MemorySweep:
    """The peak of ``lifetimes`` over ``steps`` steps, the first step where it is reached, and the live
    bytes at every moment (split by ``key(lifetime)`` when given). The peak is taken while steps
    run; before the first step it is what lives from the start."""
    points = 3 * steps
    change = [0] * points
    keyed: list[dict[Any, int]] | None = [{} for _ in range(points)] if key is not None else None
    start = 0
    start_by_key: dict[Any, int] = {}
    for life in lifetimes:
        k = key(life) if key is not None else None
        for point, size in ((life.alloc_point, life.nbytes), (life.free_point, -life.nbytes)):
            if point is None or point >= points or not size:
                continue
            if point < 0:
                start += size
                if keyed is not None:
                    start_by_key[k] = start_by_key.get(k, 0) + size
                continue
            change[point] += size
            if keyed is not None:
                keyed[point][k] = keyed[point].get(k, 0) + size
    peak, peak_step, live = start, -1, start
    timeline: list[tuple[int, int, int]] = []
    for t in range(steps):
        before = live + change[3 * t]
        during = before + change[3 * t + 1]
        live = during + change[3 * t + 2]
        timeline.append((before, during, live))
        if during > peak:
            peak, peak_step = during, t
    by_key = None
    if keyed is not None:
        by_key = []
        current = dict(start_by_key)
        moments: list[dict[Any, int]] = []
        for point in range(points):
            for k, size in keyed[point].items():
                current[k] = current.get(k, 0) + size
            moments.append(dict(current))
            if point % 3 == 2:
                by_key.append((moments[0], moments[1], moments[2]))
                moments = []
    return MemorySweep(peak, peak_step, start, timeline, by_key, start_by_key if key is not None else None)


def live_by(lifetimes: Iterable[Lifetime], point: int, key: Callable[[Lifetime], Hashable]) -> dict[Any, int]:
    """Live bytes by ``key`` at one moment (``3 * step + 1``: while the step runs; ``3 * step + 2``:
    after it), counted as :func:`peak_sweep` counts them."""
    out: dict[Any, int] = {}
    for life in lifetimes:
        size = 0
        if life.alloc_point <= point:
            size += life.nbytes
        free = life.free_point
        if free is not None and free <= point:
            size -= life.nbytes
        if size:
            k = key(life)
            out[k] = out.get(k, 0) + size
    return out


def category_timeline(lifetimes: Sequence[Lifetime], step_names: Sequence[str],
                      first_step: int = 0) -> list[tuple[int, str, dict[MemoryCategory, int]]]:
    """(step, node, live bytes by category while it runs) for every step of one simulated graph."""
    sweep = peak_sweep(lifetimes, len(step_names), key=lambda life: life.category)
    assert sweep.by_key is not None
    return [(first_step + t, name, {c: b for c, b in moments[1].items() if b})
            for t, (name, moments) in enumerate(zip(step_names, sweep.by_key))]


# --- the rules --------------------------------------------------------------------------------------

JOINT, PARTITIONED = "joint", "partitioned"
_BOTH = frozenset({JOINT, PARTITIONED})


@dataclass(frozen=True)
class Rule:
    """One behaviour of the allocator, of PyTorch or of Inductor that the simulations imitate.

    ``imitates``: what, and why, in a line (the measurements behind each are in docs/design.md).
    ``applies_to``: the simulations that follow it. ``inductor``: a behaviour of Inductor's
    kernels, followed only with ``fused_pointwise=True``.
    """

    name: str
    imitates: str
    applies_to: frozenset[str]
    inductor: bool


RULES: dict[str, Rule] = {rule.name: rule for rule in (
    Rule("cuda_rounding", "The CUDA caching allocator hands out multiples of 512 bytes: on a CUDA target "
         "every allocation is rounded up so.", _BOTH, False),
    Rule("multi_output_at_op", "A multi-output op (attention, var_mean) writes all its outputs while its inputs "
         "live: they are allocated at the op, not at their getitems.", _BOTH, False),
    Rule("broadcast_copy", "A matmul reads no broadcast (stride-0) operand: eager ATen clones it inside the op, "
         "Inductor fills a dense buffer before its extern kernel; the copy lives while the matmul runs.",
         _BOTH, False),
    Rule("attention_workspace", "The memory-efficient attention backward holds an fp32 workspace for the "
         "query's gradient and its row deltas above its outputs while it runs.", _BOTH, False),
    Rule("outputs_dropped", "The caller drops the forward outputs before backward "
         "(model(x).sum().backward()): those backward does not read are freed as it starts.", _BOTH, False),
    Rule("multi_output_rerun", "Recomputing one output of a multi-output op reruns the op, as PyTorch's "
         "partitioner does: the op's recomputed inputs exist when that output is rebuilt.",
         frozenset({JOINT}), False),
    Rule("pointwise_fusion", "Inductor folds a pointwise value that only pointwise or reduction ops read into "
         "their kernels: no buffer, what it reads lives until they run; rebuilt in backward, it is recomputed "
         "inside every kernel reading it.", _BOTH, True),
    Rule("realize_thresholds", "Inductor stores a foldable value when folding would read more than 8 buffers, "
         "or more than 4 with several readers (its realize thresholds).", _BOTH, True),
    Rule("addmm_fold", "Inductor's post-grad pattern turns add(mm(a, b), c) into one addmm at the add: the "
         "product is no buffer and the matmul runs there.", _BOTH, True),
    Rule("recompute_chain_kernel", "Inductor rebuilds a connected chain of recomputed pointwise values in one "
         "kernel, before the first of them is needed, after the recomputed values it reads.", _BOTH, True),
    Rule("random_drawn_in_chain", "A recomputed random draw only a rebuild chain reads is drawn inside the "
         "chain's kernel and never stored.", _BOTH, True),
    Rule("dying_input_reuse", "A rebuild kernel is the last reader of the inputs only it reads: Inductor "
         "writes an output of the same size into a dying input's buffer (in_out_ptr).", _BOTH, True),
    Rule("rebuild_fusion", "Inductor's scheduler fuses a later backward pointwise kernel into a rebuild "
         "kernel when its inputs exist by then and it reads a buffer the rebuild reads or makes.",
         frozenset({PARTITIONED}), True),
    Rule("column_reduction_order", "Inductor fuses column reductions of one size reading a common buffer "
         "into one kernel; its depth-first scheduler runs what that kernel needs ahead of the nodes between "
         "its members.", frozenset({PARTITIONED}), True),
    Rule("embedding_grad_early", "Inductor lowers embedding_dense_backward to a zero-filled accumulator that "
         "reads nothing, so its scheduler fills it as backward starts: it lives from there.", _BOTH, True),
    Rule("fp32_accumulator", "Inductor accumulates a 16-bit embedding gradient in an fp32 buffer and casts "
         "it at the end.", _BOTH, True),
    Rule("buffer_reuse", "Inductor's generated code hands a freed buffer to a later one of the same size "
         "(# reuse: last in, first out, within one graph); it stays allocated until then.", _BOTH, True),
    Rule("inputs_deleted", "A graph input (a tangent, a value saved for backward) is deleted at its last "
         "use, never reused: Inductor's wrapper keeps input buffers out of its reuse pool.", _BOTH, True),
)}

_DISABLED: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("sac_memory_rules_disabled",
                                                                           default=frozenset())


def _checked(names: Iterable[str]) -> frozenset[str]:
    names = frozenset([names] if isinstance(names, str) else names)
    unknown = sorted(names - RULES.keys())
    if unknown:
        raise ValueError(f"unknown memory rule(s) {unknown}; the rules are {sorted(RULES)}")
    return names


@contextlib.contextmanager
def rules_disabled(*names: str) -> Iterator[None]:
    """Within the block, the simulations leave out the rules named (and those already left out)."""
    token = _DISABLED.set(_DISABLED.get() | _checked(names))
    try:
        yield
    finally:
        _DISABLED.reset(token)


def enabled_rules(simulation: str, fused_pointwise: bool, disabled: Iterable[str] = ()) -> frozenset[str]:
    """The rules ``simulation`` (``"joint"`` or ``"partitioned"``) follows: those that apply to it
    (Inductor's only with ``fused_pointwise``), less ``disabled`` and those :func:`rules_disabled` left out."""
    off = _checked(disabled) | _DISABLED.get()
    return frozenset(name for name, rule in RULES.items()
                     if simulation in rule.applies_to and (fused_pointwise or not rule.inductor) and name not in off)


def _rounding(device: torch.device | str | None, rules: frozenset[str]) -> torch.device | str | None:
    """The device allocations are rounded for (None: none, without ``cuda_rounding``)."""
    return device if "cuda_rounding" in rules else None


# --- results ---------------------------------------------------------------------------------------


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
    optimizer_step_peak_bytes: int = 0
    lifetimes: tuple[Lifetime, ...] = field(default=(), repr=False, compare=False)

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


# --- the joint simulation -------------------------------------------------------------------------


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
) -> MemorySimulation:
    """Annotate bytes and categories; simulate the joint graph in its order; return the result.

    ``annotate=False`` only simulates (a planner trying recompute sets): no node records, no
    per-module memory, nothing stored on the graph. ``hold_outputs``: the caller keeps the forward
    outputs to the end (as without the ``outputs_dropped`` rule). ``disabled_rules``: rules the
    simulation leaves out (:data:`RULES`).
    """
    from sac_compiler.capture import InputKind, capture_info

    rules = enabled_rules(JOINT, fused_pointwise, disabled_rules)
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

    # pointwise_fusion: values Inductor may fold into their consumers' kernels (sized 0 below,
    # once the recomputed values are known)
    fusable: set[fx.Node] = set()
    if "pointwise_fusion" in rules:
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
    # Gradients stay (they become .grad); forward outputs are held only when asked (outputs_dropped)
    hold = hold_outputs or "outputs_dropped" not in rules
    held = {owner[n] for n in grad_outputs | (fwd_outputs if hold else set())}
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

    # 5. Lifetimes.
    device = _rounding(target_device, rules)
    alloc = {n: round_allocation(b, device) for n, b in nbytes.items()}
    remat_alloc = dict(alloc)  # the size of a value's second life, rebuilt in backward
    static = [n for n in nodes if n.op == "placeholder" and "tangents" not in n.name]
    tangents = [n for n in nodes if n.op == "placeholder" and "tangents" in n.name]
    opt_state = _optimizer_state_bytes(optimizer, optimizer_state_bytes, info, gm, alloc,
                                       rounded="cuda_rounding" in rules)
    static_bytes = sum(alloc.get(n, 0) for n in static) + opt_state

    if recomputed is None:
        recomputed = {n.name for n in nodes if get_record(n).user_recompute}
    runs_at = ({mm: index[add] for mm, add in inductor_addmm(nodes, target_device).items()}
               if "addmm_fold" in rules else {})
    transients = _transients(nodes, index, runs_at, device, rules)
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
    rematerialized = _backward_needs(nodes, owner, index, uses_of, recomputed, first_backward,
                                     rerun="multi_output_rerun" in rules)
    realize = "realize_thresholds" in rules

    # pointwise_fusion: rebuilt in backward, a fusable value is a buffer only if a non-fusing op
    # reads it there; otherwise it is recomputed inside each kernel that reads it
    def bw_readers(node: fx.Node) -> list[fx.Node]:
        return [u for u in node.users if _side(u) == Side.BACKWARD or u in rematerialized]

    inline = {node for node in fusable
              if node in rematerialized and all(fuses_pointwise_inputs(u) for u in bw_readers(node))}
    # ... unless Inductor stores it for reading too many buffers (it and the backward's own
    # fused values make up the backward graph Inductor lowers)
    inlined_bw = _inductor_inlined(
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
        for group in _fused_recompute_groups(nodes, needed_now, owner):
            earliest = min(min(rematerialized[n]) for n in group)
            chain_kernels.append((earliest, _ancestors(group, needed_now, owner)))
            for node in chain_kernels[-1][1]:
                if earliest < min(rematerialized[node]):
                    remat_rule[node] = "recompute_chain_kernel"
                rematerialized[node].add(earliest)
                if "random_drawn_in_chain" in rules and _drawn_in_kernel(
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
    # output of the same size takes over such a value's buffer (see ``_hand_over_dying_inputs``)
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
    for node in _inductor_inlined(fused_fw, lambda n: [u for u in n.users if _side(u) == Side.FORWARD], owner,
                                  realize=realize):
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

    # MemTracker's split of the live bytes: made in forward / made in backward / gradients.
    phase_of = {n: ("grad" if categories[n] == MemoryCategory.GRADIENT
                    else "act" if _side(n) == Side.FORWARD and n.op != "placeholder" else "temp")
                for n in nodes if n.op != "output"}
    lifetimes = [Lifetime(n.name, alloc.get(n, 0), -1, None, categories[n]) for n in static]
    if opt_state:
        lifetimes.append(Lifetime("optimizer_state", opt_state, -1, None, MemoryCategory.OPTIMIZER_STATE))
    # for buffer_reuse: the allocations that may take a freed buffer, and the frees that may hand
    # theirs over, each in the order the steps make them (positions in ``lifetimes``)
    takers: list[int] = []
    givers: list[int] = []
    inputs_deleted = "inputs_deleted" in rules

    def add(life: Lifetime, takes: bool = True, gives: bool | None = None) -> None:
        """``gives`` None: a free Inductor may hand over unless it deletes an input of the backward
        graph (a tangent, or a value forward saved for it)."""
        if takes:
            takers.append(len(lifetimes))
        if life.free_step is not None and life.freed is Freed.AFTER:
            if gives is None:
                base = by_name[life.name]
                gives = not inputs_deleted or (base.op != "placeholder" and not (
                    life.free_step >= first_backward and _side(base) == Side.FORWARD))
            if gives:
                givers.append(len(lifetimes))
        lifetimes.append(life)

    by_name = {n.name: n for n in nodes}
    for node in nodes:
        if owner[node] is not node or node.op == "output" or node in static:
            continue
        made = _made_by(node) if "multi_output_at_op" in rules else node
        start_at = first_backward if node in tangents else runs_at.get(made, index[made])
        rule = "addmm_fold" if made in runs_at else "multi_output_at_op" if made is not node else LIVENESS
        cat, phase = categories[node], phase_of[node]
        early, accumulator = _embedding_accumulator(node, device, rules)
        if start_at >= first_backward:
            if accumulator:
                add(Lifetime(node.name, accumulator, first_backward if early else start_at, index[node], cat,
                             "fp32_accumulator", phase=phase))
            elif early:
                start_at, rule = first_backward, "embedding_grad_early"  # the output is the accumulator
        size = alloc.get(node, 0)
        if size == 0 and nbytes.get(node, 0):
            rule = "addmm_fold" if node in runs_at else "pointwise_fusion"
        if node in held:
            add(Lifetime(node.name, size, start_at, None, cat, rule, phase=phase))
            continue
        uses = sorted(uses_of.get(node, ()))
        if released(node):  # the caller drops it (model(x).sum().backward()) before backward
            add(Lifetime(node.name, size, start_at, first_backward - 1, cat, "outputs_dropped", Freed.RELEASED,
                         phase))
            continue
        if node in held_for_recompute:  # kept so that a recomputed value can be rebuilt from it
            uses = sorted(set(uses) | {held_for_recompute[node]})
        if node in rematerialized:
            fw_uses = [i for i in uses if i < first_backward]
            add(Lifetime(node.name, size, start_at, fw_uses[-1] if fw_uses else start_at, cat, rule, phase=phase))
            needed = rematerialized[node]
            if needed:  # rematerialised for its first backward need, kept to its last
                add(Lifetime(node.name, remat_alloc.get(node, 0), min(needed), max(needed), cat,
                             remat_rule.get(node, LIVENESS), phase=phase),
                    takes=node not in adopting, gives=True)
            continue
        if node in handed_over:  # its buffer is written over by the rebuilt value taking it
            step, taker = handed_over[node]
            add(Lifetime(node.name, size, start_at, step - 1, cat, "dying_input_reuse", Freed.HANDED_OVER, phase,
                         taker.name))
        else:
            add(Lifetime(node.name, size, start_at, uses[-1] if uses else start_at, cat, rule, phase=phase))
    for node, step, nbytes_, rule in transients:
        lifetimes.append(Lifetime(node.name, nbytes_, step, step, MemoryCategory.TEMPORARY, rule, phase="temp"))
    if "buffer_reuse" in rules:
        _reuse_freed_buffers(lifetimes, takers, givers, len(nodes), (first_backward,))

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

    step_peak = _optimizer_step_peak(optimizer, static_bytes, opt_state, alloc, grad_owners, info)
    result = MemorySimulation(
        peak_bytes=max(peak, step_peak),
        peak_node=(nodes[peak_step].name if peak_step >= 0 else "start") if peak >= step_peak else "optimizer.step",
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
    )
    if annotate:
        graph_results(gm)["annotate_memory"] = result
    return result


def _reuse_freed_buffers(lifetimes: list[Lifetime], takers: Sequence[int], givers: Sequence[int], steps: int,
                         graph_starts: Iterable[int] = ()) -> None:
    """Apply ``buffer_reuse`` to ``lifetimes`` in place: each freed record another allocation takes
    over (see :func:`_reused_frees`) is held until that allocation, and handed over to it."""
    for giver, taker in _reused_frees(lifetimes, takers, givers, steps, graph_starts).items():
        lifetimes[giver] = dataclasses.replace(lifetimes[giver], free_step=lifetimes[taker].alloc_step - 1,
                                               freed=Freed.HANDED_OVER, rule="buffer_reuse",
                                               taken_by=lifetimes[taker].name)


def _reused_frees(lifetimes: Sequence[Lifetime], takers: Sequence[int], givers: Sequence[int], steps: int,
                  graph_starts: Iterable[int] = ()) -> dict[int, int]:
    """Inductor's buffer reuse: a buffer its generated code frees is not released to the allocator
    when a later buffer of the same size takes it over (``# reuse`` in the generated code; the
    pool is last in, first out, within one graph); it stays allocated until then.

    ``takers``: the positions in ``lifetimes`` of the allocations that may take a freed buffer;
    ``givers``: of the frees that may hand theirs over; each in the order the graph's steps make
    them. Returns, for each free taken over, the allocation taking it (positions in ``lifetimes``).
    ``graph_starts``: steps where a new graph begins (the pool empties).

    Inductor declines a reuse that would raise its own estimate of the graph's peak, but that
    estimate is not the allocator's (a held buffer was seen raising the measured peak): the
    simulation takes every reuse it can. A graph's inputs are freed, never reused (``del`` in
    the generated code: Inductor's wrapper keeps ``InputBuffer``s out of its pool): the callers
    leave them out of ``givers`` (the ``inputs_deleted`` rule).
    """
    starts = set(graph_starts)
    allocations: dict[int, list[int]] = {}
    for i in takers:
        allocations.setdefault(lifetimes[i].alloc_step, []).append(i)
    frees: dict[int, list[int]] = {}
    for i in givers:
        frees.setdefault(lifetimes[i].free_step, []).append(i)  # type: ignore[arg-type]
    pool: dict[int, list[int]] = {}  # size -> frees waiting for a taker
    taken: dict[int, int] = {}
    for step in range(steps):
        if step in starts:
            pool = {}
        for i in allocations.get(step, ()):
            size = lifetimes[i].nbytes
            if size and pool.get(size):
                taken[pool[size].pop()] = i
        for i in frees.get(step, ()):
            size = lifetimes[i].nbytes
            if size:
                pool.setdefault(size, []).append(i)
    return taken


# --- what the rules read off the graph ------------------------------------------------------------

# Inductor's lowering stores a pointwise value it would otherwise fold into its readers once
# folding would have it read too many buffers (torch._inductor.config: realize_reads_threshold
# with more than one reader, the accumulated-reads default always; their GPU values).
_REALIZE_READS = 4
_REALIZE_ACC_READS = 8


def _inductor_inlined(candidates: list[fx.Node], readers: Any, owner: dict[fx.Node, fx.Node],
                      realize: bool = True) -> set[fx.Node]:
    """The fusable ``candidates`` (in graph order) Inductor keeps folded into their readers.

    A folded value reads what its inputs read (the buffers; what folded inputs read in turn);
    it is stored instead when that is more than ``_REALIZE_ACC_READS`` buffers, or more than
    ``_REALIZE_READS`` with more than one reader (``readers(node)``). Scalars do not count.
    ``realize=False`` (without the ``realize_thresholds`` rule): every candidate is folded.
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
        if realize and (len(read) > _REALIZE_ACC_READS or (len(readers(node)) > 1 and len(read) > _REALIZE_READS)):
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
    it (seen in Inductor's generated backward of a Llama: docs/design.md). The members keep their
    own steps. ``stored``: the nodes that are buffers (what an inlined pointwise value reads
    through). The ``column_reduction_order`` rule."""
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
    runs inside it (seen in Inductor's generated backward of the seed Transformer: the GELU
    backward ran in the kernel rebuilding the GELU forward for the FC2 weight gradient, before
    that matmul). The ``rebuild_fusion`` rule. Returns each fused kernel's nodes: the stored value (``stored``) and the unstored pointwise values it computes
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
    Transformer), though its lowering stores the forward's. The ``random_drawn_in_chain`` rule."""
    # by name: Inductor registers its prims only once it is imported
    return op_name(node.target) == "prims.inductor_random" and set(readers) <= set(group)


def _embedding_accumulator(node: fx.Node, device: torch.device | str | None,
                           rules: frozenset[str]) -> tuple[bool, int]:
    """How the rules place an embedding gradient: (filled as backward starts, by
    ``embedding_grad_early``; the bytes of a separate accumulator, by ``fp32_accumulator``, or 0:
    the output itself is it). (False, 0) for other ops."""
    early, accumulate = "embedding_grad_early" in rules, "fp32_accumulator" in rules
    accumulator = _inductor_accumulator(node, device) if early or accumulate else None
    if accumulator is None:
        return False, 0
    return early, accumulator if accumulate else 0


def _inductor_accumulator(node: fx.Node, device: torch.device | str | None) -> int | None:
    """Inductor lowers ``embedding_dense_backward`` to a zero-filled accumulator that reads nothing,
    so its scheduler fills it as backward starts (``embedding_grad_early``), in fp32 for a 16-bit
    gradient (``fp32_accumulator``). None for other ops; else the bytes of a separate fp32
    accumulator for a 16-bit gradient, or 0 when the output itself is it."""
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
    frees it after (seen in its generated backward of the seed Transformer). The
    ``broadcast_copy`` rule."""
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
    two deltas, before the workspace; for 16-bit inputs the kernel computes it (measured on the op
    itself: ``tests/test_gpu.py``). The ``attention_workspace`` rule."""
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
    until then. Returns each such mm and its add (the ``addmm_fold`` rule)."""
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


def _transients(nodes: list[fx.Node], index: dict[fx.Node, int], runs_at: dict[fx.Node, int],
                device: torch.device | str | None, rules: frozenset[str]) -> list[tuple[fx.Node, int, int, str]]:
    """(op, step, bytes, rule) of what ops hold only while they run: the copies of broadcast matmul
    operands (``broadcast_copy``) and the attention backward's workspace (``attention_workspace``).
    ``runs_at``: the step of each matmul folded into a later add (``addmm_fold``)."""
    out = []
    for node in nodes:
        for rule, nbytes in (("broadcast_copy", _broadcast_copies), ("attention_workspace", _attention_backward_workspace)):
            size = nbytes(node, device) if rule in rules else 0
            if size:
                out.append((node, runs_at.get(node, index[node]), size, rule))
    return out


def _made_by(node: fx.Node) -> fx.Node:
    """The node whose step allocates ``node``: for one output of a multi-output op, the op (it
    writes all its outputs while its inputs still live: ``multi_output_at_op``), else the node itself."""
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
    rounded: bool = True,
) -> int:
    """Optimizer state: measured from a stepped optimizer, else estimated from its type (rounded
    for the target device with ``rounded``)."""
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
    per_param = _STATE_PER_PARAM.get(type(optimizer).__name__)
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


_STATE_PER_PARAM: dict[str, Any] = {
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




# --- the partitioned simulation -------------------------------------------------------------------


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
) -> tuple[int, str, int, dict[str, int], dict[str, str]]:
    """Peak, its node, and the live bytes at the end of one graph run op by op (see
    :func:`_run_graph`); ``live_at_start``: the bytes alive as it starts, placeholders included.
    Returns the bytes of every allocation by name, and the allocation each node lives in, as well.
    ``timeline`` receives (node, live bytes while it runs) for every node; ``disabled_rules``: the
    rules left out (:data:`RULES`)."""
    rules = enabled_rules(PARTITIONED, fused_pointwise, disabled_rules)
    run = _run_graph(gm, {MemoryCategory.INPUT: live_at_start}, keep, device, rules,
                     placeholder_storage, static_storage, recomputed)
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
    one ``kept_category``, of anything else temporary.
    """
    target, device = device, _rounding(device, rules)
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
    rule_of: dict[fx.Node, str] = {}  # the rule that last set a node's bytes or its step
    for node in nodes:
        if node.op != "call_function" or owner[node] is not node:
            continue
        if any(u.target is operator.getitem for u in node.users):
            continue
        sizes[node] = round_allocation(sum(tensor_nbytes(v) for v in tensor_values(node)), device)
    if "pointwise_fusion" in rules:
        fused = [n for n in sizes if is_pointwise_op(n) and n not in outputs and n.users
                 and all(fuses_pointwise_inputs(u) for u in n.users)]
        for node in _inductor_inlined(fused, lambda n: list(n.users), owner, realize="realize_thresholds" in rules):
            sizes[node] = 0
            rule_of[node] = "pointwise_fusion"
    if "column_reduction_order" in rules:
        nodes = _column_reductions_scheduled(nodes, owner, lambda n: sizes.get(n, 0) > 0 or n.op == "placeholder")
    index = {n: i for i, n in enumerate(nodes)}
    runs_at = ({mm: index[add] for mm, add in inductor_addmm(nodes, target).items()}
               if "addmm_fold" in rules else {})
    transients = _transients(nodes, index, runs_at, device, rules)
    for mm in runs_at:
        sizes[mm] = 0
        rule_of[mm] = "addmm_fold"
    made_by = _made_by if "multi_output_at_op" in rules else (lambda n: n)
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
        for group in _fused_recompute_groups(nodes, members, owner):
            earliest = min(index[n] for n in group)
            kernel = _ancestors(group, members, owner)
            kernels.append((group, earliest, kernel, []))
            for node in kernel:
                rebuilt_at[node] = min(rebuilt_at.get(node, earliest), earliest)
        for _, earliest, kernel, parts in kernels if "rebuild_fusion" in rules else ():
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
                            and _drawn_in_kernel(node, group, node.users)):
                        sizes[node] = 0
                        rule_of[node] = "random_drawn_in_chain"
            # an output takes over an input that only its own part of the kernel reads
            same_step = kernel.union(*parts)
            for part in (kernel, *parts):
                _hand_over_dying_inputs(nodes, part, earliest, owner, readers_of, kept, static_storage,
                                        placeholder_storage or {}, sizes, made_at, last, handed_over, adopting,
                                        same_step, hand_over="dying_input_reuse" in rules)
    accumulators: dict[fx.Node, tuple[int, int]] = {}  # (step allocated, bytes)
    for node in sizes:
        early, accumulator = _embedding_accumulator(node, device, rules)
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
    if "buffer_reuse" in rules:
        _reuse_freed_buffers(lifetimes, takers, givers, len(nodes))
    sweep = peak_sweep(lifetimes, len(nodes))
    peak_node = nodes[sweep.peak_step].name if sweep.peak_step >= 0 else "start"
    end_bytes = sweep.timeline[-1][2] if sweep.timeline else sweep.start_bytes
    return _GraphRun(sweep.peak_bytes, peak_node, end_bytes, {n.name: s for n, s in sizes.items()},
                     {n.name: owner[n].name for n in nodes}, tuple(lifetimes), tuple(n.name for n in nodes),
                     sweep.timeline)


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
) -> PartitionedPeak:
    """Peak memory of the partitioned graphs: forward, then backward reading what forward saved.

    ``static_names``: forward placeholders that stay allocated throughout (parameters, buffers, user
    inputs); ``extra_static_bytes``: memory outside the graphs (optimizer state, counted as such by
    category); ``forward_names``: the joint graph's forward nodes (the backward's nodes so named are
    recomputed); ``timelines`` receives each graph's live bytes per node, under ``"forward"`` and
    ``"backward"``; ``input_categories``: the category of each forward placeholder (default: input);
    ``disabled_rules``: rules the simulation leaves out (:data:`RULES`).
    """
    rules = enabled_rules(PARTITIONED, fused_pointwise, disabled_rules)
    device = _rounding(target_device, rules)
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
    forward = _run_graph(fw, start, keep_fw, target_device, rules,
                         saved=frozenset(n.name for n in saved), kept_category=MemoryCategory.TEMPORARY)
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
    if "outputs_dropped" in rules:
        carried[MemoryCategory.TEMPORARY] = carried.get(MemoryCategory.TEMPORARY, 0) - user_outputs
    bw_placeholders = [n for n in bw.graph.nodes if n.op == "placeholder"]
    tangents = sum(round_allocation(sum(tensor_nbytes(v) for v in tensor_values(n)), device)
                   for n in bw_placeholders if n.name.startswith("tangents"))
    carried[MemoryCategory.TEMPORARY] = carried.get(MemoryCategory.TEMPORARY, 0) + tangents
    # the backward's placeholders are counted in what forward left (saved) and tangents; static ones stay
    keep_bw = {n.name for n in bw_placeholders if n.name in static_names}
    bw_out = next(iter(bw.graph.find_nodes(op="output")))
    keep_bw |= {a.name for a in bw_out.all_input_nodes}
    # a saved value lives in its forward allocation: a view of a parameter is never freed, and
    # views of one activation free it once
    storage = {n.name: (fw_owner[n.name], fw_sizes.get(fw_owner[n.name], -1)) for n in saved}
    backward = _run_graph(bw, carried, keep_bw, target_device, rules, storage,
                          frozenset(n.name for n in fw_placeholders), forward_names,
                          input_category=lambda key: (MemoryCategory.TEMPORARY if key.startswith("tangents")
                                                      else MemoryCategory.ACTIVATION))
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
