"""annotate_ops: view-like, random and in-place ops, and what the default partition saves.

Writes into ``node.meta["sac"]`` for every ``call_function`` node:

* ``op_name``: ``"aten.addmm"`` style name (overload dropped), as the eager SAC tools print it;
* ``is_view``: the op's output aliases an input (``OpOverload.is_view``): zero new bytes;
* ``is_random``: the op is ``nondeterministic_seeded`` (scaled-dot-product attention counts only
  with ``dropout_p != 0``; under Inductor only ``inductor_seeds`` is: the ops it seeds are pure
  functions of their seed, recomputed exactly);
* ``is_inplace`` / ``inplace_parent``: the user wrote an in-place op (``relu_``, ``x.add_``,
  ``nn.ReLU(inplace=True)``). The joint graph is functional, so this is recovered from provenance
  (``node.meta["from_node"]`` back to Dynamo's graph); the parent is the op whose output storage
  the in-place op mutates (through views and earlier in-place ops), as in PyTorch's SACEstimator;
* ``is_collective``: a collective of ``torch.distributed`` (all-gather, reduce-scatter, all-reduce
  and the rest, their ``wait_tensor``; the functional ops and their legacy forms): never
  recomputed, as a recompute that not every rank runs leaves the others waiting for it;
* ``source_op``: the name of the Dynamo graph node this ATen node was traced from;
* ``saved_for_backward``: PyTorch's ``default_partition`` (no recomputation) saves this value.

Before: ``%relu = aten.relu.default(%addmm)`` traced from ``torch.relu_(x)``.
After: ``meta["sac"].is_inplace is True, .inplace_parent == "addmm"``.
"""

from __future__ import annotations

import functools
import logging
import operator
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx
from sac_compiler.passes.record import (
    Side,
    call_functions,
    get_record,
    graph_results,
    update_record,
)

log = logging.getLogger(__name__)

# Ops the eager SAC tools leave out of a module's op list (they neither compute nor allocate, or, for
# ``clone``, the eager tool drops every one: autograd clones the input of an in-place op whose
# backward needs the original value, e.g. ``sin_``, and the joint graph traces that clone too).
IGNORED_OPS = frozenset({"aten.detach", "aten.lift_fresh", "aten.lift_fresh_copy", "aten._to_copy_view",
                         "aten.clone"})
# What functionalization writes an in-place op's result on a view back into the view's base with
# (besides inverse views such as ``t``): eager mutates the base directly and has no such op.
VIEW_SCATTER_OPS = frozenset({"aten.slice_scatter", "aten.select_scatter", "aten.diagonal_scatter",
                              "aten.as_strided_scatter"})
_SDPA_DROPOUT_OPS = frozenset(
    {
        "aten.scaled_dot_product_attention",
        "aten._scaled_dot_product_flash_attention",
        "aten._scaled_dot_product_efficient_attention",
        "aten._scaled_dot_product_cudnn_attention",
        "aten._scaled_dot_product_attention_math",
        "aten._scaled_dot_product_flash_attention_for_cpu",
        "aten._flash_attention_forward",
        "aten._efficient_attention_forward",
    }
)
# ``y[i] = v`` (``operator.setitem``) writes into ``y`` as ``fill_``/``copy_`` on the indexed view.
_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ipow,
                      operator.iand, operator.ior, operator.ixor, operator.imatmul, operator.setitem}
_VIEW_SOURCE_METHODS = frozenset({"view", "view_as", "reshape", "transpose", "t", "permute", "expand",
                                  "squeeze", "unsqueeze", "narrow", "select", "unflatten", "flatten",
                                  "as_strided", "diagonal", "unbind", "split", "chunk", "__getitem__"})


def op_name(target: Any) -> str:
    """``aten.addmm.default`` -> ``"aten.addmm"``; other callables by their name."""
    if isinstance(target, torch._ops.OpOverload):
        return _overload_name(target)
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"hop.{target.name()}"
    return getattr(target, "__name__", str(target))


@functools.cache
def _overload_name(target: torch._ops.OpOverload) -> str:
    return f"{target.namespace}.{target._schema.name.split('::')[-1]}"


@functools.cache
def _tagged(target: torch._ops.OpOverload, tag: torch.Tag) -> bool:
    """``tag in target.tags``, asked of every node of every simulation: kept per op."""
    return tag in target.tags


def is_view_op(node: fx.Node) -> bool:
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and bool(target.is_view)


# The namespaces of torch.distributed's collectives as graphs hold them: the functional collectives
# (``all_gather_into_tensor``, ``reduce_scatter_tensor``, ``all_reduce``, ``all_to_all_single``,
# ``broadcast``, their ``_coalesced`` forms and ``wait_tensor``), their autograd forms, the legacy
# ``c10d_functional`` ops and the in-place ``c10d`` ops a process group runs.
COLLECTIVE_NAMESPACES = frozenset({"_c10d_functional", "_c10d_functional_autograd", "c10d_functional", "c10d"})
# ``wait_tensor`` hands back the tensor its collective wrote: no allocation of its own
_WAIT_OPS = frozenset({"_c10d_functional.wait_tensor", "c10d_functional.wait_tensor"})
_ALIAS_OPS = frozenset({"aten._unsafe_view", "aten.alias", *_WAIT_OPS})


def is_collective_op(node: fx.Node) -> bool:
    """A collective of ``torch.distributed`` or the wait on one (:data:`COLLECTIVE_NAMESPACES`)."""
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and target.namespace in COLLECTIVE_NAMESPACES


def is_alias_op(node: fx.Node) -> bool:
    """The op's output shares its input's storage: views, ``_unsafe_view``/``alias``, and a
    collective's ``wait_tensor`` (its output is the tensor the collective wrote)."""
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and (bool(target.is_view) or op_name(target) in _ALIAS_OPS)


def _argument(node: fx.Node, name: str, default: Any = None) -> Any:
    target = node.target
    if name in node.kwargs:
        return node.kwargs[name]
    for i, arg in enumerate(target._schema.arguments):
        if arg.name == name:
            if i < len(node.args):
                return node.args[i]
            return arg.default_value if arg.has_default_value() else default
    return default


# Inductor's seeded RNG: its joint-graph passes turn a random op into ``inductor_seeds`` (one draw
# from the generator per graph) and, per op, ``inductor_lookup_seed`` + ``inductor_random`` /
# ``inductor_randint``, pure functions of the seed: recomputing them in backward reproduces the
# forward's values exactly. Inductor folds the seed lookup into its readers and stores the random
# values it draws in forward (its lowering realizes them: an fp32 buffer per random op); drawn
# again in backward inside a fused chain that alone reads them, they are never stored.
_INDUCTOR_SEEDED = frozenset({"prims.inductor_lookup_seed"})


def is_pointwise_op(node: fx.Node) -> bool:
    """An elementwise op (``torch.Tag.pointwise``, or Inductor's seed lookup): what Inductor fuses
    into its neighbours. So are ``slice_scatter`` and ``select_scatter`` (lowered as pointwise
    kernels, :data:`_POINTWISE_SCATTERS`), a constant fill (``full``: Inductor lowers it to a constant that
    its readers compute) and a scatter of one value per row into one (Inductor's joint-graph
    pass rewrites it to ``where(iota == index, value, fill)``: cross-entropy's backward)."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return False
    return (_tagged(target, torch.Tag.pointwise) or op_name(target) in _INDUCTOR_SEEDED
            or target is torch.ops.aten.full.default or _scatter_upon_constant(node)
            or target in _POINTWISE_SCATTERS)


# ``slice_scatter(x, src, ...)`` and ``select_scatter(x, src, dim, i)`` (what functionalization
# writes ``x[a:b] = src`` as, and the backward of a slice or a select): Inductor lowers both as a
# pointwise kernel (``where(index in the slice, src, x)``), so a chain of them, such as a
# mixture-of-experts backward scattering each expert's rows into zeros and summing, is one fused
# kernel and one buffer, not a buffer per scatter
_POINTWISE_SCATTERS = frozenset({torch.ops.aten.slice_scatter.default, torch.ops.aten.select_scatter.default})


def _scatter_upon_constant(node: fx.Node) -> bool:
    """``scatter(full(shape, c), dim, index, value)`` with one index per row along ``dim``."""
    if node.target is not torch.ops.aten.scatter.value or len(node.args) < 4:
        return False
    base, dim, index = node.args[0], node.args[1], node.args[2]
    if not (isinstance(base, fx.Node) and base.target is torch.ops.aten.full.default and isinstance(index, fx.Node)
            and isinstance(dim, int)):
        return False
    shape, selector = node.meta.get("val"), index.meta.get("val")
    if not isinstance(shape, torch.Tensor) or not isinstance(selector, torch.Tensor) or selector.dim() != shape.dim():
        return False
    dim %= shape.dim()
    return selector.shape[dim] == 1 and all(s == t for i, (s, t) in enumerate(zip(selector.shape, shape.shape))
                                            if i != dim)


# ops Inductor lowers to a pointwise kernel with an indirect load from their input (its
# ``make_loader``): a foldable input is computed at the gathered positions, never stored
_INDIRECT_LOADS = frozenset({"aten.gather", "aten.index", "aten.index_select"})


def fuses_pointwise_inputs(node: fx.Node) -> bool:
    """A pointwise or reduction op, or one Inductor lowers to an indirect load (``gather``,
    ``index``, ``index_select``): Inductor folds a pointwise value that only such ops read into
    their kernels, and never writes it out."""
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and (
        is_pointwise_op(node) or _tagged(target, torch.Tag.reduction) or op_name(target) in _INDIRECT_LOADS)


def is_random_op(node: fx.Node) -> bool:
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return False
    name = op_name(target)
    if name in _SDPA_DROPOUT_OPS:
        dropout_p = _argument(node, "dropout_p", 0.0)
        return bool(dropout_p)
    return torch.Tag.nondeterministic_seeded in target.tags  # prims.inductor_seeds, not the ops it seeds


def _source_chain_root(node: fx.Node, graph_ids: set[int] | None) -> Any:
    """The NodeSource of the Dynamo node this node was traced from (deepest provenance entry)."""
    sources = node.meta.get("from_node") or []
    best = None
    while sources:
        src = sources[0]
        if graph_ids is None or getattr(src, "graph_id", None) in graph_ids:
            best = src
        sources = getattr(src, "from_node", None) or []
    return best


def _is_inplace_source(src_node: fx.Node | None, target_repr: str) -> bool:
    if src_node is not None:
        target = src_node.target
        if src_node.kwargs.get("inplace") is True:
            return True
        if target in _INPLACE_OPERATORS:
            return True
        name = target if isinstance(target, str) else getattr(target, "__name__", "")
        return name.endswith("_") and not name.endswith("__")
    # No Dynamo graph at hand: judge from the recorded target's text alone.
    text = target_repr.split(" of ")[0].replace("<built-in method ", "").replace("<function ", "")
    text = text.split(" at ")[0].strip("<>")
    return text.endswith("_") and not text.endswith("__")


def _mutated_origin(src_node: fx.Node, is_inplace: dict[str, bool], view_getitems: frozenset[str] = frozenset()
                    ) -> fx.Node:
    """Follow a Dynamo node's first tensor argument through views/in-place ops to the op that made it.

    ``view_getitems``: the ``operator.getitem`` nodes (``y[:, :4]``) that traced to views only; an
    indexing that copies (``y[idx]``) makes a new tensor, which is then the origin.
    """
    current = src_node
    while True:
        args = [a for a in current.args if isinstance(a, fx.Node)]
        if not args:
            return current
        first = args[0]
        name = first.target if isinstance(first.target, str) else getattr(first.target, "__name__", "")
        if is_inplace.get(first.name) or (first.op == "call_method" and name in _VIEW_SOURCE_METHODS):
            current = first
            continue
        if first.op == "call_function" and first.target is operator.getitem and first.name in view_getitems:
            current = first
            continue
        if first.op == "call_function" and name in _VIEW_SOURCE_METHODS:
            current = first
            continue
        return first


def default_saved_values(gm: fx.GraphModule, num_fwd_outputs: int) -> set[str]:
    """Names of the joint graph's values PyTorch's default partition saves for backward."""
    from torch._functorch.partitioners import default_partition

    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    fw_module, _ = default_partition(gm, placeholders, num_fwd_outputs=num_fwd_outputs)
    out = next(iter(fw_module.graph.find_nodes(op="output")))
    saved = out.args[0][num_fwd_outputs:]
    return {n.name for n in saved if isinstance(n, fx.Node)}


def annotate_ops(
    gm: fx.GraphModule,
    source_gm: fx.GraphModule | None = None,
    num_fwd_outputs: int | None = None,
    saved_for_backward: bool = True,
) -> dict[str, str]:
    """Annotate op kinds; return ``{in-place node: parent node}`` for the forward in-place ops.

    ``source_gm`` is the Dynamo graph the joint graph was traced from (``capture_joint`` attaches it;
    without it, in-place ops are recognised from the provenance's target names, which misses
    ``inplace=True`` keyword forms). ``num_fwd_outputs`` enables ``saved_for_backward`` on joint graphs;
    ``saved_for_backward=False`` leaves it unset (None) and skips PyTorch's default partition,
    which that record needs (about a second on a 16-layer Llama graph).
    """
    from sac_compiler.capture import capture_info

    info = capture_info(gm)
    if source_gm is None and info is not None:
        source_gm = info.source_gm
    if num_fwd_outputs is None and info is not None and info.has_backward:
        num_fwd_outputs = info.num_fwd_outputs
    has_tangents = any("tangents" in n.name for n in gm.graph.find_nodes(op="placeholder"))

    saved: set[str] = set()
    if num_fwd_outputs is not None and has_tangents and saved_for_backward:
        saved = default_saved_values(gm, num_fwd_outputs)
    known = saved_for_backward or None  # None: not computed

    source_nodes = {n.name: n for n in source_gm.graph.nodes} if source_gm is not None else {}
    graph_ids = {id(source_gm.graph)} if source_gm is not None else None

    # Dynamo-level in-place ops and the ATen nodes traced from each Dynamo node.
    inplace_sources: dict[str, bool] = {}
    by_source: dict[str, list[fx.Node]] = {}
    node_source: dict[fx.Node, str] = {}
    for node in call_functions(gm):
        src = _source_chain_root(node, graph_ids) or _source_chain_root(node, None)
        if src is None:
            continue
        name = src.name
        node_source[node] = name
        by_source.setdefault(name, []).append(node)
        if name not in inplace_sources:
            inplace_sources[name] = _is_inplace_source(source_nodes.get(name), str(src.target))

    def main_node(source_name: str) -> fx.Node | None:
        """The ATen node that computes a Dynamo node's result: its last non-view forward op.

        For an in-place op on a view, that is the op computing the new values, not the
        ``*_scatter`` that functionalization then writes them back into the base with.
        """
        candidates = [n for n in by_source.get(source_name, []) if _forward(n) and n.target is not operator.getitem]
        non_views = [n for n in candidates if not is_view_op(n)]
        computing = [n for n in non_views if op_name(n.target) not in VIEW_SCATTER_OPS]
        pool = computing or non_views or candidates
        return pool[-1] if pool else None

    view_getitems = frozenset(
        name for name, nodes in by_source.items()
        if (src := source_nodes.get(name)) is not None and src.target is operator.getitem
        and (aten := [n for n in nodes if n.target is not operator.getitem])
        and all(is_alias_op(n) for n in aten)
    )

    parents: dict[str, str] = {}
    for src_name, is_inplace in inplace_sources.items():
        if not is_inplace:
            continue
        node = main_node(src_name)
        if node is None:
            continue
        parent_name = node.name
        src_node = source_nodes.get(src_name)
        if src_node is not None:
            origin = _mutated_origin(src_node, inplace_sources, view_getitems)
            parent = main_node(origin.name) if origin.op != "placeholder" else None
            if parent is not None:
                parent_name = parent.name
        parents[node.name] = parent_name

    for node in call_functions(gm):
        update_record(
            node,
            "annotate_ops",
            op_name=op_name(node.target),
            is_view=is_view_op(node),
            is_random=is_random_op(node),
            is_inplace=node.name in parents,
            inplace_parent=parents.get(node.name),
            source_op=node_source.get(node),
            saved_for_backward=known and node.name in saved,
            is_collective=is_collective_op(node),
        )
    for node in gm.graph.find_nodes(op="placeholder"):
        update_record(node, "annotate_ops", saved_for_backward=known and node.name in saved)
    graph_results(gm)["annotate_ops"] = parents
    return parents


def _forward(node: fx.Node) -> bool:
    record = get_record(node)
    if record.side is not None:
        return record.side == Side.FORWARD
    return node.meta.get("partitioner_tag", "is_forward") == "is_forward"


def forward_ops(nodes: Iterable[fx.Node]) -> list[fx.Node]:
    """The op list of the eager SAC tools: forward ATen ops, without getitem and ignored ops."""
    out = []
    for node in nodes:
        if node.op != "call_function" or node.target is operator.getitem:
            continue
        if not isinstance(node.target, torch._ops.OpOverload):
            continue
        if op_name(node.target) in IGNORED_OPS or not _forward(node):
            continue
        out.append(node)
    return out
