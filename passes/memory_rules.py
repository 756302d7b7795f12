"""What the memory model's rules (:data:`sac_compiler.passes.memory_model.RULES`) read off a graph:
which values Inductor folds or stores, which kernels it fuses and how it schedules them, what ops
hold while they run, and which freed buffers it hands to later ones. Both memory simulations apply
them; each function names its rule.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

import torch
from sac_compiler.passes.annotate_ops import (
    is_alias_op,
    is_pointwise_op,
    is_view_op,
    op_name,
)
from sac_compiler.passes.memory_model import Freed, Lifetime, round_allocation
from sac_compiler.passes.record import size_hint
from torch import fx

# Inductor's lowering stores a pointwise value it would otherwise fold into its readers once
# folding would have it read too many buffers (torch._inductor.config: realize_reads_threshold
# with more than one reader, the accumulated-reads default always; their GPU values).
_REALIZE_READS = 4
_REALIZE_ACC_READS = 8


def storage_owners(nodes: Iterable[fx.Node]) -> dict[fx.Node, fx.Node]:
    """The allocation each node lives in (liveness, not a rule): a view lives in its base's; an
    output of a multi-output view op (``split``, ``split_with_sizes``, ``unbind``, ``chunk``: a
    ``getitem`` of it) in that op's base's; an output of any other multi-output op in its own."""
    owner: dict[fx.Node, fx.Node] = {}
    for node in nodes:
        if node.op == "call_function" and node.target is operator.getitem:
            source = node.args[0]
            viewed = isinstance(source, fx.Node) and owner.get(source, source) is not source
            owner[node] = owner[source] if viewed else node
        elif node.op == "call_function" and is_alias_op(node) and node.all_input_nodes:
            base = next((a for a in node.args if isinstance(a, fx.Node)), node.all_input_nodes[0])
            owner[node] = owner.get(base, base)
        else:
            owner[node] = node
    return owner


class _Ancestry:
    """Whether a node is an ancestor of ``out`` (``out`` reads its result, through any path), found
    by walking back from ``out`` no further than the earliest node asked about (graph order is
    topological: no ancestor comes later than ``out``)."""

    def __init__(self, out: fx.Node, position: Mapping[fx.Node, int]) -> None:
        self.out, self.position = out, position
        self.found: set[fx.Node] = set()
        self.floor = position[out]  # every ancestor at or after it is in found

    def has(self, node: fx.Node) -> bool:
        at = self.position.get(node, -1)
        if at < 0 or at >= self.position[self.out]:
            return False
        if at < self.floor:
            self.found, self.floor = set(), at
            stack = [self.out]
            while stack:
                for arg in stack.pop().all_input_nodes:
                    if self.position.get(arg, -1) >= at and arg not in self.found:
                        self.found.add(arg)
                        stack.append(arg)
        return node in self.found


def inplace_pointwise(
    nodes: list[fx.Node], sizes: dict[fx.Node, int], rule_of: dict[fx.Node, str], owner: dict[fx.Node, fx.Node],
    made_at: dict[fx.Node, int], last: dict[fx.Node, int], kept: set[fx.Node],
    handed_over: dict[fx.Node, tuple[int, fx.Node]], adopting: set[fx.Node],
    takeable: dict[fx.Node, tuple[list[fx.Node], int]], exclusive: bool = True,
    side_of: Callable[[fx.Node], Any] | None = None, padded_layout: bool = False,
) -> None:
    """``inplace_pointwise``: a pointwise kernel writes its output into the buffer of an input it
    is the last reader of, read at the index it writes (same shape and strides, no broadcast) and of
    the same dtype and size (Inductor's ``decide_inplace_update``: ``in_out_ptr``). The input is a
    buffer of the graph or, in the backward, a donated saved value (``takeable``: each donated
    placeholder with the placeholders sharing its allocation, and its bytes); never a parameter,
    a user input or a tangent. Marks the inputs taken over (``handed_over``: the step and the
    output) and the outputs taking one (``adopting``: no allocation of their own). ``exclusive``:
    besides dying there (``last``), the input is read by nothing outside the kernel but the
    kernel's ancestors (Inductor discounts a node's ancestors from the buffer's remaining uses: a
    kernel whose result this kernel reads has run, as the reductions over the logits have when the
    log-softmax is written); a view of it is no reader of its own, its readers are, and so are the
    readers of a value folded into other kernels. ``side_of`` (the joint simulation, where a
    backward kernel's input was read in forward as well): the same, on the kernel's own side
    (forward or backward). ``sizes``: bytes per allocation, 0 for a value folded into its readers'
    kernels. ``padded_layout``: an input in the layout Inductor pads the output to on a GPU
    (:func:`inductor_padded_strides`) is read where the kernel writes too."""
    taken: set[fx.Node] = set()
    aliases: dict[fx.Node, list[fx.Node]] = {}
    for node in nodes:
        aliases.setdefault(owner.get(node, node), []).append(node)
    position = {node: i for i, node in enumerate(nodes)}
    for out in nodes:
        size = sizes.get(out, 0)
        if (out.op != "call_function" or size <= 0 or out in adopting or not is_pointwise_op(out)
                or not isinstance(out.meta.get("val"), torch.Tensor)):
            continue
        value = out.meta["val"]
        layouts = {tuple(value.stride())}
        if padded_layout:  # the output's layout as Inductor chooses it on a GPU
            layouts.add(inductor_padded_strides(value))
        step = made_at[out]
        # the kernel: out and the values folded into it (through pointwise ops only)
        chain, stack = {out}, [out]
        while stack:
            node = stack.pop()
            for arg in node.all_input_nodes:
                if arg not in chain and sizes.get(arg, -1) == 0 and is_pointwise_op(arg):
                    chain.add(arg)
                    stack.append(arg)
        inside: dict[fx.Node, bool] = {}
        ancestry = _Ancestry(out, position)

        def only_here(node: fx.Node) -> bool:  # every use of node is inside this kernel or has run before it
            if node is out:
                return True
            if node not in inside:
                view = node.op == "call_function" and owner.get(node, node) is not node  # its readers read
                folded = node.op == "call_function" and sizes.get(node, -1) == 0 and is_pointwise_op(node)
                if node in chain or view or folded:  # read where its readers are
                    inside[node] = node.op != "output" and all(only_here(u) for u in node.users)
                else:  # a kernel of its own: one this kernel's inputs come from has run
                    inside[node] = node.op == "call_function" and ancestry.has(node)
            return inside[node]

        for reader in sorted(chain, key=position.__getitem__) if len(chain) > 1 else [out]:
            match = None
            for arg in reader.all_input_nodes:
                read = arg.meta.get("val")
                if (not isinstance(read, torch.Tensor) or read.dtype != value.dtype or read.shape != value.shape
                        or tuple(read.stride()) not in layouts):
                    continue
                base = owner.get(arg, arg)
                if base in kept or base in handed_over or base in taken or base in chain:
                    continue
                if base.op == "placeholder":
                    if base not in takeable:
                        continue
                    members, nbytes = takeable[base]
                else:
                    members, nbytes = [base], sizes.get(base, 0)
                if not (0.95 * nbytes <= size <= nbytes) or any(last.get(m, -1) != step for m in members):
                    continue
                check = exclusive or side_of is not None
                # the allocation's readers through any alias of it (its views are not readers: their
                # readers are, through the same list), on the kernel's side where side_of says
                readers = [u for m in members for v in aliases.get(m, [m]) for u in v.users
                           if (u.op != "call_function" or owner.get(u, u) is not m)
                           and (side_of is None or u.op == "output" or side_of(u) == side_of(out))] if check else []
                if check and (not readers or not all(only_here(u) for u in readers)):
                    continue
                match = (base, members)
                break
            if match is not None:
                base, members = match
                for m in members:
                    handed_over[m] = (step, out)
                taken.add(base)
                adopting.add(out)
                rule_of[out] = "inplace_pointwise"
                break


def inductor_padded_strides(val: torch.Tensor) -> tuple[int, ...]:
    """The strides Inductor gives a buffer of ``val``'s shape and stride order whose layout it
    chooses, on a GPU: Inductor's own ``ir.Layout._pad_strides``, which it applies under
    ``config.comprehensive_padding`` (turned off on CPU): from the innermost dimension out, a
    stride over ``padding_stride_threshold`` elements that is no multiple of
    ``padding_alignment_bytes`` is rounded up to one (a (tokens, 30522) fp32 logits buffer is laid
    out in rows of 30528); a channels-last layout is left as it is. Symbolic shapes are left
    unpadded, as Inductor leaves them by default.

    A value the compiled forward saves reaches the backward in that layout (AOTAutograd gives the
    backward the strides of the forward's outputs), and a pointwise kernel's output over it is
    laid out the same: the kernel can write where it reads (the ``padded_layout`` rule)."""
    from torch._inductor import config
    from torch._inductor.ir import Layout

    strides = tuple(val.stride())
    if (not strides or not getattr(config, "comprehensive_padding", False)
            or not all(isinstance(d, int) for d in (*val.shape, *strides))):
        return strides
    return tuple(int(s) for s in Layout._pad_strides(list(strides), list(val.shape), val.dtype))


def inductor_inlined(candidates: list[fx.Node], readers: Any, owner: dict[fx.Node, fx.Node],
                     realize: bool = True) -> set[fx.Node]:
    """The fusable ``candidates`` (in graph order) Inductor keeps folded into their readers.

    A folded value reads what its inputs read (the buffers; what folded inputs read in turn);
    it is stored instead when that is more than ``_REALIZE_ACC_READS`` buffers, or more than
    ``_REALIZE_READS`` with more than one reader (``readers(node)``). A 0-d input counts (a saved
    scalar, a loss's tangent); a value computed from no tensor does not (``_loaded``).
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
            elif _loaded(base):
                read.add(base)
        if realize and (len(read) > _REALIZE_ACC_READS or (len(readers(node)) > 1 and len(read) > _REALIZE_READS)):
            continue
        inlined.add(node)
        reads[node] = read
    return inlined


def column_reductions_scheduled(nodes: list[fx.Node], owner: dict[fx.Node, fx.Node],
                                stored: Callable[[fx.Node], bool], start: int = 0) -> list[fx.Node]:
    """The graph's nodes in the order Inductor runs them once it has fused column reductions.

    A column reduction (a sum over every dimension but the last: a layer norm's weight gradient,
    a bias gradient; or over every dimension but the channels of an (N, C, ...) input: a batch
    norm's) over a pointwise expression reads the buffers that expression reads. Inductor
    fuses column reductions of one size that read a common buffer of that size into one kernel,
    and its scheduler, visiting nodes depth first in graph order, pulls everything that kernel
    needs ahead of the nodes that stood between its first and its last member: those run after
    it (seen in Inductor's generated backward of a Llama: docs/design.md). The members keep their
    own steps. ``stored``: the nodes that are buffers (what an inlined pointwise value reads
    through). ``start``: only reductions from this position on (a joint graph's backward, which
    Inductor compiles apart from its forward) are fused. The ``column_reduction_order`` rule."""
    columns: list[tuple[fx.Node, int, set[fx.Node]]] = []
    for node in nodes[start:]:
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
    """The input's element count of a column reduction (a sum over every dimension but the last,
    or but dimension 1 of an input of three or more), else None."""
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
    kept = set(range(val.dim())) - dims
    # a column of the last dimension (a layer norm's, a bias's), or of the channels (dimension 1)
    # of a batch norm's input laid out (N, C, ...)
    if len(kept) != 1 or not (kept == {val.dim() - 1} or (val.dim() >= 3 and kept == {1})):
        return None
    return size_hint(val.numel())


def computed_in_each_reader(node: fx.Node) -> bool:
    """A pointwise value read from no tensor (a constant fill, ``full``): Inductor computes it
    inside each kernel that reads it, so it is no buffer two kernels share and links no two
    readers into one kernel (T5's masked attention scores read one score-sized ``full`` in every
    layer: linked by it, every layer's scores were rebuilt at once at the first layer's backward;
    Inductor's scheduler keeps each layer's kernel apart, ``tests/test_memory_rules.py``)."""
    return node.op == "call_function" and not node.all_input_nodes and is_pointwise_op(node)


def fused_recompute_groups(order: list[fx.Node], members: set[fx.Node], owner: dict[fx.Node, fx.Node],
                           inlined: Collection[fx.Node] = ()) -> list[list[fx.Node]]:
    """Recomputed pointwise values Inductor rebuilds in one fused kernel.

    Recomputed values depend on nothing backward makes, so Inductor fuses a connected set of
    recomputed pointwise values (the residual stream of every layer) into one kernel, which runs
    before the first of them is needed, after the recomputed values it reads (matmuls included):
    each value stored there exists from then on. Returns the connected sets (in graph order);
    ``ancestors`` gives what else they pull forward.

    A value Inductor folds into each of its readers (``inlined``: no buffer) is computed in each
    reader's kernel: it links none of its readers if it has two or more (the
    ``inlined_value_links_none`` rule, given ``inlined``), as a constant fill links none
    (``computed_in_each_reader``). A T5 decoder's position bias, which every layer's attention
    scores read, so links no two layers, as Inductor's CUDA schedule has them: each layer's
    softmax in a kernel of its own. (Inductor may still fuse two readers that share what the value
    reads when they stand near each other, as it does two kernels of a few nodes on CPU; readers
    in different layers of a model did not fuse in the schedules read: docs/results.md.)
    """
    eligible = [n for n in order if n in members and is_pointwise_op(n)]
    ok = {n for n in eligible if not computed_in_each_reader(n)}
    links = [(owner.get(a, a), node) for node in eligible for a in node.all_input_nodes if owner.get(a, a) in ok]
    readers: dict[fx.Node, set[fx.Node]] = {}
    for base, node in links:
        readers.setdefault(base, set()).add(node)
    return _linked_groups(eligible, [(base, node) for base, node in links
                                     if base not in inlined or len(readers[base]) == 1])


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


def fused_into_rebuild(
    nodes: list[fx.Node], kernel: set[fx.Node], step: int, index: dict[fx.Node, int],
    owner: dict[fx.Node, fx.Node], stored: Callable[[fx.Node], bool], made: Callable[[fx.Node], int],
) -> list[set[fx.Node]]:
    """Later pointwise kernels Inductor fuses into a rebuild kernel (``kernel``, run at ``step``).

    Its scheduler fuses kernels that read the same buffers when nothing between them is needed:
    a backward pointwise kernel whose every input exists at ``step`` (or is made in the kernel),
    that reads a buffer the kernel reads or makes, over as many elements as one of its outputs,
    runs inside it (seen in Inductor's generated backward of the seed Transformer: the GELU
    backward ran in the kernel rebuilding the GELU forward for the FC2 weight gradient, before
    that matmul). The ``rebuild_fusion`` rule. Returns each fused kernel's nodes: the stored value
    (``stored``) and the unstored pointwise values it computes inline. ``made``: the step each
    stored value exists from (-1: an input of the graph)."""
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
        if ok and any(not computed_in_each_reader(b) for b in buffers & reads):
            part = {node} | {n for n in inline if all(u is node or u in inline for u in n.users)}
            parts.append(part)
            joined |= part
    return parts


def _numel(node: fx.Node) -> int | None:
    val = node.meta.get("val")
    return size_hint(val.numel()) if isinstance(val, torch.Tensor) else None


def ancestors(group: list[fx.Node], members: set[fx.Node], owner: dict[fx.Node, fx.Node]) -> set[fx.Node]:
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


def drawn_in_kernel(node: fx.Node, group: list[fx.Node], readers: Iterable[fx.Node]) -> bool:
    """A recomputed ``inductor_random`` that only the fused chain ``group`` reads: Inductor draws it
    inside the chain's kernel and never stores it (seen in its generated backward of the seed
    Transformer), though its lowering stores the forward's. The ``random_drawn_in_chain`` rule."""
    # by name: Inductor registers its prims only once it is imported
    return op_name(node.target) == "prims.inductor_random" and set(readers) <= set(group)


def embedding_accumulator(node: fx.Node, device: torch.device | str | None,
                          rules: frozenset[str]) -> tuple[bool, int]:
    """How the rules place an embedding gradient: (filled as backward starts, by
    ``embedding_grad_early``; the bytes of a separate accumulator, by ``fp32_accumulator``, or 0:
    the output itself is it). (False, 0) for other ops."""
    early, accumulate = "embedding_grad_early" in rules, "fp32_accumulator" in rules
    accumulator = inductor_accumulator(node, device) if early or accumulate else None
    if accumulator is None:
        return False, 0
    return early, accumulator if accumulate else 0


def inductor_accumulator(node: fx.Node, device: torch.device | str | None) -> int | None:
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


def broadcast_copies(node: fx.Node, device: torch.device | str | None) -> int:
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


def attention_backward_workspace(node: fx.Node, device: torch.device | str | None) -> int:
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

_CONVOLUTIONS = (torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default)
# cuDNN's workspace of each convolution call measured on this process's GPU, by conv_signature and
# layout (True: channels-last)
_MEASURED_CONV_WORKSPACES: dict[tuple[tuple[Any, ...], bool], int] = {}


def conv_signature(node: fx.Node) -> tuple[Any, ...] | None:
    """A convolution call (forward or backward) as cuDNN sees it: the op, its tensors' shapes and
    dtypes, its other arguments; None for any other node. Strides are left out: the partitioned
    graphs may hold a value in another order than the joint graph, and the layout Inductor runs
    the call in is the graph's (:func:`layout_optimized`), not the traced values'."""
    if node.op != "call_function" or node.target not in _CONVOLUTIONS:
        return None
    parts: list[Any] = []
    for arg in [*node.args, *node.kwargs.values()]:
        val = arg.meta.get("val") if isinstance(arg, fx.Node) else arg
        if isinstance(val, torch.Tensor):
            parts.append((tuple(size_hint(s) for s in val.shape), str(val.dtype)))
        else:
            parts.append(repr(val))
    return (str(node.target), tuple(parts))


def convolution_workspace(node: fx.Node, device: torch.device | str | None, channels_last: bool = False) -> int:
    """Bytes a convolution or its backward holds inside the op beyond its outputs on a GPU: cuDNN's
    workspace, from 0 to several activations' size depending on the algorithm its heuristics pick
    for the shapes and the layout (``channels_last``: the graph's forward is layout-optimized by
    Inductor) (measured per call on this process's GPU by :func:`measure_convolution_workspaces`;
    0 where none was measured, as on a machine without one). The ``conv_workspace`` rule."""
    if device is None or torch.device(device).type != "cuda":
        return 0
    signature = conv_signature(node)
    return _MEASURED_CONV_WORKSPACES.get((signature, channels_last), 0) if signature is not None else 0


def measure_convolution_workspaces(gm: fx.GraphModule, device: torch.device) -> int:
    """Run each convolution call of ``gm`` (a joint graph) not measured yet once on ``device``, on
    tensors of its shapes laid out as Inductor will run it (channels-last where it optimizes the
    forward's layout, :func:`layout_optimized`; else contiguous), and record what it holds inside
    the op beyond its outputs (:func:`convolution_workspace`), read from the caching allocator's
    trace of that call: the user's peak statistics are not touched.
    Nothing is measured while the allocator already records its history (the user's own
    recording stays as it is) or while a CUDA graph is captured. Returns how many were measured."""
    if (not torch.cuda.is_available() or torch.device(device).type != "cuda"
            or torch.cuda.is_current_stream_capturing() or torch._C._cuda_isHistoryEnabled()):
        return 0
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    nodes = list(gm.graph.nodes)
    channels_last = layout_optimized(forward_part(nodes), device)
    measured = 0
    for node in nodes:
        signature = conv_signature(node)
        if signature is None or (signature, channels_last) in _MEASURED_CONV_WORKSPACES:
            continue
        with unset_fake_temporarily(), torch.no_grad():
            _MEASURED_CONV_WORKSPACES[(signature, channels_last)] = _held_inside(node, torch.device(device),
                                                                                 channels_last)
        measured += 1
    return measured


def forward_part(nodes: Sequence[fx.Node]) -> list[fx.Node]:
    """The nodes of a joint graph that its forward graph will hold: the inputs but the tangents, and
    the ops that read no tangent."""
    backward: set[fx.Node] = set()
    out = []
    for node in nodes:
        if node.op == "placeholder":
            if "tangents" in node.name:
                backward.add(node)
            else:
                out.append(node)
        elif node.op == "call_function":
            if any(a in backward for a in node.all_input_nodes):
                backward.add(node)
            else:
                out.append(node)
    return out


def channels_last_copies(forward: Sequence[fx.Node], device: torch.device | str | None,
                         optimized: bool | None = None) -> dict[fx.Node, int]:
    """The graph inputs Inductor copies to channels-last for the forward's 2-d convolutions, each
    with its copy's bytes (unrounded); empty where Inductor leaves the layout alone.

    Where Inductor optimizes a forward graph's layout for its convolutions (its own heuristics,
    ``GraphLowering.decide_layout_opt``, asked here: on by default for a convolution network on a
    GPU, off for a graph with few convolutions among many nodes such as a ViT's), it feeds each
    convolution channels-last operands. Its activations it writes so; an input (a parameter, the
    batch) has its layout fixed and is copied: a 3x3 kernel's weight, the image (a 1x1 kernel's
    weight is channels-last already). The copy is made as the forward starts, and where the
    backward reads the input it is the copy that the forward saves for it, held to its last reader
    there, beside the input itself (seen in Inductor's generated forward, which returns the copies
    among the saved values, and in the allocator's trace of a ResNet's step on a GPU:
    docs/results.md). ``forward``: the forward graph's nodes (placeholders included);
    ``optimized``: :func:`layout_optimized` of them, where known. The ``channels_last_copies`` rule."""
    convolutions = [n for n in forward if n.op == "call_function" and n.target is _CONVOLUTION
                    and isinstance(_val(n.args[1]), torch.Tensor) and _val(n.args[1]).dim() == 4]
    if not convolutions or not (optimized if optimized is not None else layout_optimized(forward, device)):
        return {}
    copies: dict[fx.Node, int] = {}
    for conv in convolutions:
        for arg in conv.args[:2]:
            val = _val(arg)
            if (not isinstance(arg, fx.Node) or arg.op != "placeholder" or not isinstance(val, torch.Tensor)
                    or val.dim() != 4 or size_hint(val.numel()) <= 1
                    or val.is_contiguous(memory_format=torch.channels_last)):
                continue
            copies[arg] = size_hint(val.numel()) * val.element_size()
    return copies


_CONVOLUTION = torch.ops.aten.convolution.default


def _val(arg: Any) -> Any:
    return arg.meta.get("val") if isinstance(arg, fx.Node) else None


def runs_channels_last(forward: Sequence[fx.Node], device: torch.device | str | None, rules: frozenset[str]) -> bool:
    """Whether a simulation following ``rules`` runs the graph's convolutions channels-last: one of
    the rules that depend on it is on and Inductor optimizes the forward's layout."""
    return ("channels_last_copies" in rules or "conv_workspace" in rules) and layout_optimized(forward, device)


def layout_optimized(forward: Sequence[fx.Node], device: torch.device | str | None) -> bool:
    """Whether Inductor optimizes the layout of a training forward graph of these nodes for
    ``device`` (``GraphLowering.decide_layout_opt``). For a GPU target the CPU's rule (always, with
    oneDNN) is kept out: a graph traced on the CPU for a GPU has its values on the CPU."""
    from types import SimpleNamespace

    from torch._inductor.graph import GraphLowering

    graph = SimpleNamespace(graph=SimpleNamespace(nodes=list(forward)))
    gpu = device is not None and torch.device(device).type == "cuda"
    enabled = torch._C._get_mkldnn_enabled()
    if gpu:
        torch._C._set_mkldnn_enabled(False)
    try:
        return bool(GraphLowering.decide_layout_opt(graph, is_inference=False))  # type: ignore[arg-type]
    finally:
        torch._C._set_mkldnn_enabled(enabled)


def convolution_inputs(node: fx.Node, device: torch.device, channels_last: bool = True
                       ) -> tuple[list[Any], dict[str, Any]]:
    """Real arguments for ``node``'s op on ``device``: each tensor zeros of its fake value's shape
    and dtype, 4-d ones channels-last where ``channels_last`` (Inductor's layout optimization), else
    contiguous; sizes and other symbolic integers at their hints."""

    def real(arg: Any) -> Any:
        val = arg.meta.get("val") if isinstance(arg, fx.Node) else arg
        if isinstance(val, (list, tuple)):  # sizes, strides, paddings: symbolic ones at their hints
            return type(val)(size_hint(v) if isinstance(v, torch.SymInt) else v for v in val)
        if not isinstance(val, torch.Tensor):
            return size_hint(val) if isinstance(val, torch.SymInt) else val
        shape = [size_hint(s) for s in val.shape]
        order = torch.channels_last if channels_last and len(shape) == 4 else torch.contiguous_format
        return torch.empty(shape, dtype=val.dtype, device=device, memory_format=order).zero_()

    return [real(a) for a in node.args], {k: real(v) for k, v in node.kwargs.items()}


def _held_inside(node: fx.Node, device: torch.device, channels_last: bool) -> int:
    """Bytes ``node``'s op, run once on real tensors of its shapes, held beyond what it returned."""
    args, kwargs = convolution_inputs(node, device, channels_last)
    torch.cuda.synchronize(device)
    torch.cuda.memory._record_memory_history(enabled="all", context=None, stacks="python", device=device)
    try:
        start = len(_trace(device))
        out = node.target(*args, **kwargs)
        torch.cuda.synchronize(device)
        events = _trace(device)[start:]
    finally:
        torch.cuda.memory._record_memory_history(enabled=None, device=device)
    del out
    live = peak = 0
    for event in events:
        if event["action"] == "alloc":
            live += event["size"]
            peak = max(peak, live)
        elif event["action"] == "free_completed":
            live -= event["size"]
    return max(0, peak - max(live, 0))


def _trace(device: torch.device) -> list[dict[str, Any]]:
    """The caching allocator's recorded events on ``device``."""
    traces = torch.cuda.memory._snapshot(device)["device_traces"]
    return list(traces[device.index if device.index is not None else torch.cuda.current_device()])

# the SDPA kernels' alignment of the mask's strides, in elements (Inductor's sdpa_constraint)
_MASK_ALIGNMENT = 8


def attention_bias_copy(node: fx.Node, device: torch.device | str | None) -> int:
    """Bytes of the dense copy Inductor makes of the memory-efficient attention backward's additive
    mask, for the duration of the op.

    Inductor's ``sdpa_constraint`` keeps a broadcast mask broadcast for the attention forward only:
    for the backward, a mask that is no stored, aligned buffer (an ``expand`` of a pointwise value
    the graph computes, such as a padding mask turned additive, which Inductor folds and never
    stores) is required in a contiguous layout, so the whole ``(B, H, L, S)`` is written out before
    the kernel and freed after it (seen at BERT's measured peak: docs/results.md). The
    ``attention_bias_copy`` rule."""
    if node.op != "call_function" or node.target is not _EFFICIENT_ATTENTION_BACKWARD or len(node.args) < 5:
        return 0
    bias = node.args[4]
    val = bias.meta.get("val") if isinstance(bias, fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dim() not in (3, 4):
        return 0
    base = bias
    while base.op == "call_function" and is_view_op(base) and base.args and isinstance(base.args[0], fx.Node):
        base = base.args[0]
    strides = [size_hint(s) for s in val.stride()]
    aligned = size_hint(val.stride(-1)) == 1 and all(s % _MASK_ALIGNMENT == 0 for s in strides[:-1])
    folded = base is not bias and base.op == "call_function" and is_pointwise_op(base)
    if aligned and not folded:
        return 0
    return round_allocation(size_hint(val.numel()) * val.element_size(), device)


def inductor_addmm(nodes: list[fx.Node], device: torch.device | str | None,
                   keep_far_apart: bool = True) -> dict[fx.Node, fx.Node]:
    """Matmuls Inductor folds into a later add: ``add(mm(a, b), c)`` becomes ``addmm(c, a, b)``
    (its post-grad ``addmm`` pattern: the mm's only reader, ``c`` a tensor of the operands' dtype
    that broadcasts to the product, and, on a GPU, not when every reader of the sum is pointwise).
    The matmul then runs where the add is: on the seed Transformer's tied embedding, the output
    layer's weight gradient moves from the start of backward to its end, and its operands live
    until then. Returns each such mm and its add (the ``addmm_fold`` rule), less, with
    ``keep_far_apart``, the folds the backend keeps apart (:func:`far_addmm_folds`, the
    ``far_addmm_apart`` rule)."""
    folded, far = _addmm_folds(nodes, device)
    return folded if keep_far_apart else {**folded, **far}


def far_addmm_folds(nodes: list[fx.Node], device: torch.device | str | None) -> dict[fx.Node, fx.Node]:
    """The folds of :func:`inductor_addmm` that would keep the matmul's operands alive past their
    other readers, up to the add, for more bytes than the product holds there unfolded: a tied
    embedding's output-layer gradient, read at the start of backward and added to the embedding's
    at its end, would keep the logits' gradient (tokens x vocabulary, computed in the graph or, with
    the loss outside, its tangent) through the whole backward.
    The backend keeps these apart (``backend.unfold_far_addmm``): the matmul runs where the graph
    has it, and its operands are freed there."""
    return _addmm_folds(nodes, device)[1]


def _addmm_folds(nodes: list[fx.Node], device: torch.device | str | None
                 ) -> tuple[dict[fx.Node, fx.Node], dict[fx.Node, fx.Node]]:
    """Inductor's addmm folds in ``nodes``, split into (those left to it, the far ones)."""
    candidates = _addmm_candidates(nodes, device)
    far = _far(candidates, nodes)
    return ({mm: add for mm, add in candidates.items() if mm not in far},
            {mm: add for mm, add in candidates.items() if mm in far})


def _far(candidates: Mapping[fx.Node, fx.Node], nodes: list[fx.Node]) -> set[fx.Node]:
    if not candidates:
        return set()
    index = {n: i for i, n in enumerate(nodes)}
    owner = storage_owners(nodes)
    readers: dict[fx.Node, list[int]] = {}
    for node in nodes:
        for arg in node.all_input_nodes:
            readers.setdefault(owner.get(arg, arg), []).append(index[node])
    far = set()
    for mm, add in candidates.items():
        held = 0
        for arg in mm.args[:2]:
            base = owner.get(arg, arg) if isinstance(arg, fx.Node) else None
            # what the graph computes, and the tangents (deleted at their last use: inputs_deleted);
            # other inputs (parameters, the batch, values saved for backward) are not its to free
            if base is None or not (base.op == "call_function"
                                    or (base.op == "placeholder" and base.name.startswith("tangents"))):
                continue
            other = max((i for i in readers.get(base, []) if i != index[mm]), default=index[mm])
            val = base.meta.get("val")
            if other < index[add] and isinstance(val, torch.Tensor):
                held += size_hint(val.numel()) * val.element_size()
        out = mm.meta.get("val")
        product = size_hint(out.numel()) * out.element_size() if isinstance(out, torch.Tensor) else 0
        if held > product:
            far.add(mm)
    return far


_SUMS = (torch.ops.aten.sum.dim_IntList, torch.ops.aten.sum.default)


def accumulated_reductions(nodes: list[fx.Node], keep_apart: bool = True) -> dict[fx.Node, fx.Node]:
    """Reductions Inductor fuses into one kernel with the adds that sum their results: where a
    chain of adds sums the results of two or more sums of one size (each sum's only reader,
    through views and dtype conversions, an add of the chain: the gradient of a parameter several
    layers use, such as a T5's relative position bias, summed over the layers), Inductor fuses
    every sum with the adds, and that kernel runs after the last of them. Each sum's input lives
    until then, and the sums are no buffers of their own. Returns each such sum and the chain's
    last add, where it runs (the ``accumulation_fusion`` rule), less, with ``keep_apart``, the
    sums the backend keeps apart (:func:`far_accumulated_reductions`, the ``accumulation_apart``
    rule)."""
    fused, far = _accumulations(nodes)
    return fused if keep_apart else {**fused, **far}


def far_accumulated_reductions(nodes: list[fx.Node]) -> dict[fx.Node, fx.Node]:
    """The sums of :func:`accumulated_reductions` whose input the fused kernel would keep alive
    past its other readers (a T5's score gradient of each layer, through the rest of backward).
    The backend keeps these apart (``backend.keep_reductions_apart``): each runs in its own kernel
    where the graph has it, and its input is freed there."""
    return _accumulations(nodes)[1]


def _accumulations(nodes: list[fx.Node]) -> tuple[dict[fx.Node, fx.Node], dict[fx.Node, fx.Node]]:
    """Inductor's fused accumulations in ``nodes``, split into (those left to it, the far ones)."""
    def is_add(node: Any) -> bool:
        return (isinstance(node, fx.Node) and node.op == "call_function" and node.target is torch.ops.aten.add.Tensor
                and len(node.args) == 2 and node.kwargs.get("alpha", 1) == 1)

    chain: set[fx.Node] = set()  # the adds of the chains, and the views and conversions into them

    def chain_user(node: fx.Node, path: set[fx.Node] | None = None) -> fx.Node | None:
        """The add that alone reads ``node`` (through views and dtype conversions, which Inductor
        fuses into the same kernel: a bias's summed gradient reshaped, or converted as autocast's
        backward does); ``path`` receives the views and conversions on the way."""
        users = list(node.users)
        through = []
        while len(users) == 1 and users[0].op == "call_function" and (
                is_view_op(users[0]) or _is_dtype_conversion(users[0])):
            through.append(users[0])
            users = list(users[0].users)
        if len(users) == 1 and is_add(users[0]):
            if path is not None:
                path.update(through)
            return users[0]
        return None

    index = {n: i for i, n in enumerate(nodes)}
    sums: dict[fx.Node, list[fx.Node]] = {}  # the chain's last add: the sums it adds up
    for node in nodes:
        if node.op != "call_function" or node.target not in _SUMS:
            continue
        end = chain_user(node, chain)
        if end is None:
            continue
        while (after := chain_user(end, chain)) is not None:
            chain.add(end)
            end = after
        chain.add(end)
        sums.setdefault(end, []).append(node)
    fused: dict[fx.Node, fx.Node] = {}
    far: dict[fx.Node, fx.Node] = {}
    owner = storage_owners(nodes)
    readers: dict[fx.Node, list[int]] = {}
    for node in nodes:
        for arg in node.all_input_nodes:
            readers.setdefault(owner.get(arg, arg), []).append(index[node])
    for end, members in sums.items():
        by_size: dict[tuple[int, int], list[fx.Node]] = {}
        for node in members:  # one kernel: reductions of one size (input and output element counts)
            src, out = node.args[0], node.meta.get("val")
            val = src.meta.get("val") if isinstance(src, fx.Node) else None
            if isinstance(val, torch.Tensor) and isinstance(out, torch.Tensor):
                by_size.setdefault((size_hint(val.numel()), size_hint(out.numel())), []).append(node)
        for group in by_size.values():
            if len(group) < 2:
                continue
            kernel = set(group)
            for node in group:
                src = node.args[0]
                base = owner.get(src, src)
                # what the graph computes, and the tangents; other inputs are not its to free
                freeable = base.op == "call_function" or (base.op == "placeholder" and base.name.startswith("tangents"))
                other = max((i for i in readers.get(base, []) if i != index[node]), default=index[node])
                # other work runs between the sum and the chain's end, while the fusion would hold its input
                between = any(n.op == "call_function" and n not in chain and n not in kernel and not is_view_op(n)
                              for n in nodes[max(index[node], other) + 1:index[end]])
                (far if freeable and between else fused)[node] = end
    return fused, far


def _is_dtype_conversion(node: fx.Node) -> bool:
    """A pointwise change of dtype alone (``prims.convert_element_type``, or ``aten._to_copy``
    with no other change), which Inductor fuses into the kernel that makes its input."""
    if node.target is torch.ops.prims.convert_element_type.default:
        return True
    return node.target is torch.ops.aten._to_copy.default and set(node.kwargs) <= {"dtype"}


def _addmm_candidates(nodes: list[fx.Node], device: torch.device | str | None) -> dict[fx.Node, fx.Node]:
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


def transient_buffers(nodes: list[fx.Node], index: dict[fx.Node, int], runs_at: dict[fx.Node, int],
                      device: torch.device | str | None, rules: frozenset[str],
                      channels_last: bool = False) -> list[tuple[fx.Node, int, int, str]]:
    """(op, step, bytes, rule) of what ops hold only while they run: the copies of broadcast matmul
    operands (``broadcast_copy``), the attention backward's workspace (``attention_workspace``),
    the dense copy of its mask (``attention_bias_copy``) and cuDNN's convolution workspaces
    (``conv_workspace``, in the layout ``channels_last`` says the graph's convolutions run in).
    ``runs_at``: the step of each matmul folded into a later add (``addmm_fold``)."""
    out = []

    def conv_workspace(node: fx.Node, device: torch.device | str | None) -> int:
        return convolution_workspace(node, device, channels_last)

    for node in nodes:
        for rule, nbytes in (("broadcast_copy", broadcast_copies),
                             ("attention_workspace", attention_backward_workspace),
                             ("attention_bias_copy", attention_bias_copy),
                             ("conv_workspace", conv_workspace)):
            size = nbytes(node, device) if rule in rules else 0
            if size:
                out.append((node, runs_at.get(node, index[node]), size, rule))
    return out


def allocated_by(node: fx.Node) -> fx.Node:
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


def _loaded(node: fx.Node) -> bool:
    """Whether a kernel reading ``node`` loads it from a buffer (Inductor counts it among the
    kernel's reads): any tensor, a scalar one too (a saved 0-d value, a loss's tangent), but not a
    value computed from no tensor (``full``, ``scalar_tensor``, ``iota``: Inductor computes it in
    the kernel)."""
    if not isinstance(node.meta.get("val"), torch.Tensor):
        return False
    return node.op != "call_function" or bool(node.all_input_nodes)


def fused_runs_until(nodes: list[fx.Node], index: dict[fx.Node, int],
                     readers: dict[fx.Node, list[fx.Node]]) -> dict[fx.Node, int]:
    """For each fused node (``readers``: the nodes whose kernels it runs in), the last step at which
    it runs: its last reader's, or that reader's own if the reader is fused too."""
    until: dict[fx.Node, int] = {}
    for node in reversed(nodes):
        if readers.get(node):
            until[node] = max(until.get(u, index[u]) for u in readers[node])
    return until


def reuse_freed_buffers(lifetimes: list[Lifetime], takers: Sequence[int], givers: Sequence[int], steps: int,
                        graph_starts: Iterable[int] = ()) -> None:
    """Apply ``buffer_reuse`` to ``lifetimes`` in place: each freed record another allocation takes
    over (see :func:`reused_frees`) is held until that allocation, and handed over to it."""
    for giver, taker in reused_frees(lifetimes, takers, givers, steps, graph_starts).items():
        life, by = lifetimes[giver], lifetimes[taker]
        lifetimes[giver] = Lifetime(life.name, life.nbytes, life.alloc_step, by.alloc_step - 1, life.category,
                                    "buffer_reuse", Freed.HANDED_OVER, life.phase, by.name)


def reused_frees(lifetimes: Sequence[Lifetime], takers: Sequence[int], givers: Sequence[int], steps: int,
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
