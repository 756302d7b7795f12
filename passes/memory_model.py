"""The memory model's record, its sweep and its rules, shared by both memory simulations.

An allocation is a :class:`Lifetime`: the value that owns it, its bytes, the step it is allocated
at, the step after which it is freed (and where, before the next step), its category and the rule
that produced or last changed it. :func:`peak_sweep` measures a list of them, the one measurement
both simulations make (after ``torch._inductor.memory``: ``BufferInfo``,
``estimate_peak_memory_allocfree``): the peak, its step, and the live bytes before, while and after
every step. The plain model (``LIVENESS``) allocates a value as its node runs and frees it after
its last use.

Everything else the simulations imitate is a named :class:`Rule` in :data:`RULES` (what it
imitates, the simulations it applies to, whether it is Inductor's); the simulations take
``disabled_rules``, and :func:`rules_disabled` switches rules off within a block. What each rule
reads off the graph is in :mod:`sac_compiler.passes.memory_rules`.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from sac_compiler.passes.record import MemoryCategory, size_hint

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
        if not life.nbytes:
            continue
        k = key(life) if key is not None else None
        free = None if life.free_step is None else 3 * life.free_step + _FREE_OFFSET[life.freed]
        for point, size in ((3 * life.alloc_step + 1, life.nbytes), (free, -life.nbytes)):
            if point is None or point >= points:
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
        if 3 * life.alloc_step + 1 <= point:  # alloc_point, inlined: this runs once per record
            size += life.nbytes
        if life.free_step is not None and 3 * life.free_step + _FREE_OFFSET[life.freed] <= point:
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


# --- the rules ------------------------------------------------------------------------------------

# The memory model's version: raised whenever a change moves the no-recompute peaks it gives (a
# rule added or changed, a liveness fix; benchmarks/trace_peaks.py records them with it), so that
# figures recorded under another version are not compared with this one's. 1: the model until the
# in-place writes and the shared split outputs; 2: until the channels-last copies of convolution
# inputs and the convolution workspaces by layout; 3: until the joint graph's backward followed
# column_reduction_order; 4: since.
MODEL_VERSION = 4

# the lifetime of the memory the caller's own code holds between forward and backward (loss_memory)
LOSS_MEMORY = "loss memory held by the caller between forward and backward"
# the lifetime of the gradients the step's backward makes before the graph's own (gradients_held)
GRADIENTS_HELD = "gradients the step's backward made before this graph's"

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
    Rule("attention_bias_copy", "Inductor gives the memory-efficient attention backward a broadcast mask it "
         "computes in the graph (a padding mask made additive) as a dense (B, H, L, S) copy, written before the "
         "op and freed after it; the forward keeps it broadcast.", _BOTH, True),
    Rule("conv_workspace", "A convolution or its backward on a GPU holds cuDNN's workspace inside the op, from 0 "
         "to several activations' size by the algorithm picked for its shapes and layout: measured per call on the "
         "process's GPU in the layout Inductor runs the graph in (channels-last where it optimizes the forward's "
         "layout), 0 where not measured.", _BOTH, True),
    Rule("channels_last_copies", "Where Inductor optimizes a forward graph's layout for its 2-d convolutions, it "
         "copies each graph input a convolution reads that is not channels-last (a 3x3 weight, the image) as the "
         "forward starts; the copy, not the input, is what the forward saves where the backward reads the input, "
         "held to its last reader there.", _BOTH, True),
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
    Rule("far_addmm_apart", "The backend keeps a matmul apart from a later add Inductor would fold it into "
         "(addmm_fold) where the fold would keep the matmul's operands alive past their other readers for more "
         "bytes than the product (a tied embedding's logits gradient through the whole backward): the matmul "
         "runs where the graph has it (backend.unfold_far_addmm).", _BOTH, True),
    Rule("accumulation_fusion", "Inductor fuses sums of one size whose results a chain of adds sums, through "
         "views and dtype conversions (a parameter several layers use: its gradient summed over them; under "
         "autocast each converted before the add) into one kernel with the adds, after the "
         "last of them: each sum's input lives until then, and the sums are no buffers.", _BOTH, True),
    Rule("accumulation_apart", "The backend keeps such a sum in its own kernel where the fused one would keep "
         "its input alive past its other readers (a T5's relative position bias: each layer's score gradient "
         "through the rest of backward): an op Inductor does not fuse reads it (backend.keep_reductions_apart).",
         _BOTH, True),
    Rule("recompute_chain_kernel", "Inductor rebuilds a connected chain of recomputed pointwise values in one "
         "kernel, before the first of them is needed, after the recomputed values it reads.", _BOTH, True),
    Rule("inlined_value_links_none", "A recomputed pointwise value Inductor folds into each of its readers (no "
         "buffer) links none of them into one rebuild kernel: each reader computes it (a T5's position bias, read "
         "by every layer's attention scores, each layer's softmax its own kernel).", _BOTH, True),
    Rule("draws_repeated", "The backend gives each backward kernel that reads a recomputed random draw through "
         "a value made from it (dropout's mask made again for its gradient) a draw of its own from the same seed, "
         "the same numbers (backend.repeat_recomputed_draws): the rebuild chain's draw is then read by its kernel "
         "alone, as random_drawn_in_chain has it. Without it Inductor stores the draw from the rebuild until that "
         "backward kernel runs, which no simulation counts. An emission: it changes no simulation.",
         frozenset(), True),
    Rule("random_drawn_in_chain", "A recomputed random draw only a rebuild chain reads is drawn inside the "
         "chain's kernel and never stored.", _BOTH, True),
    Rule("dying_input_reuse", "A rebuild kernel is the last reader of the inputs only it reads: Inductor "
         "writes an output of the same size into a dying input's buffer (in_out_ptr).", _BOTH, True),
    Rule("inplace_pointwise", "A pointwise kernel that is the last reader of an input of its own dtype and size, "
         "read where it writes, writes its output into that input's buffer (in_out_ptr): a buffer of the graph, "
         "or a saved value the backward was donated, that no other kernel reads but the kernel's ancestors "
         "(the reductions over the logits before the log-softmax).", _BOTH, True),
    Rule("padded_layout", "On a GPU Inductor pads the rows of a buffer whose layout it chooses to 128 bytes "
         "(a stride over 1024 elements): a value the forward saves reaches the backward so, and a pointwise "
         "kernel's output over it is laid out the same, so inplace_pointwise writes into it too.", _BOTH, True),
    Rule("rebuild_fusion", "Inductor's scheduler fuses a later backward pointwise kernel into a rebuild "
         "kernel when its inputs exist by then and it reads a buffer the rebuild reads or makes.",
         frozenset({PARTITIONED}), True),
    Rule("column_reduction_order", "Inductor fuses column reductions of one size reading a common buffer "
         "(sums over every dimension but the last, a layer norm's or a bias's gradient, or but the channels, a "
         "batch norm's) into one kernel; its depth-first scheduler runs what that kernel needs ahead of the "
         "nodes between its members.", _BOTH, True),
    Rule("embedding_grad_early", "Inductor lowers embedding_dense_backward to a zero-filled accumulator that "
         "reads nothing, so its scheduler fills it as backward starts: it lives from there.", _BOTH, True),
    Rule("fp32_accumulator", "Inductor accumulates a 16-bit embedding gradient in an fp32 buffer and casts "
         "it at the end.", _BOTH, True),
    Rule("buffer_reuse", "Inductor's generated code hands a freed buffer to a later one of the same size "
         "(# reuse: last in, first out, within one graph); it stays allocated until then.", _BOTH, True),
    Rule("fsdp_sharding", "Under FSDP2 (a graph given an FSDPSharding) a rank holds 1/world_size of each "
         "parameter throughout and the graph's all-gathered parameters while it runs, the next block's in "
         "backward (prefetched), the reduce-scatter's input after the graph and the gradients' shards after "
         "it; the optimizer step sees shards only.", frozenset({JOINT}), False),
    Rule("host_copies", "A value on the host (an offloaded activation's pinned copy: PyTorch's ao.offload "
         "returns it, ao.reload reads it) takes no memory of a CUDA target: the device value it copies is freed "
         "at its last use (the forward's wait for the copy), the reload allocates on the device again.",
         frozenset({PARTITIONED}), False),
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


def disabled_rules() -> frozenset[str]:
    """The rules :func:`rules_disabled` leaves out here (a partition made without them differs, so
    the backend's cache key holds them)."""
    return _DISABLED.get()


def rule_on(name: str) -> bool:
    """Whether rule ``name`` is on here (not left out by :func:`rules_disabled`): for the code that
    emits what a rule imitates, so that the two stay one."""
    _checked([name])  # an unknown name is an error
    return name not in _DISABLED.get()


def enabled_rules(simulation: str, fused_pointwise: bool, disabled: Iterable[str] = ()) -> frozenset[str]:
    """The rules ``simulation`` (``"joint"`` or ``"partitioned"``) follows: those that apply to it
    (Inductor's only with ``fused_pointwise``), less ``disabled`` and those :func:`rules_disabled` left out."""
    off = _checked(disabled) | _DISABLED.get()
    return frozenset(name for name, rule in RULES.items()
                     if simulation in rule.applies_to and (fused_pointwise or not rule.inductor) and name not in off)


def rounding_device(device: torch.device | str | None, rules: frozenset[str]) -> torch.device | str | None:
    """The device allocations are rounded for (None: none, without ``cuda_rounding``)."""
    return device if "cuda_rounding" in rules else None


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
