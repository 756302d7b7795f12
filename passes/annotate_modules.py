"""annotate_modules: which module owns each node, on which side, and the module orders.

Writes ``module_fqn`` (innermost owning module, ``"Global"`` outside every module), ``module_stack``
(outermost to innermost, without ``"Global"``), ``side`` (forward/backward) and ``user_recompute``
(the user wrapped this forward node in ``torch.utils.checkpoint``) into ``node.meta["sac"]``, and the
graph-level :class:`ModuleOrders` into ``gm.meta["sac"]["annotate_modules"]``.

Before::

    %addmm = call_function[target=aten.addmm.default](...)   # nn_module_stack {"L['self'].fc1": ...}

After::

    node.meta["sac"].module_fqn == "Model.fc1", .side == Side.FORWARD

Module names are FQNs prefixed with the root module's class name, as in PyTorch's ModTracker
(``Mod.b.nest``, ``Transformer.layers.0``). Backward nodes take the module of the forward op they
differentiate (``fwd_nn_module_stack``, else the forward node with the same ``seq_nr``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
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

GLOBAL = "Global"
_ROOT = re.compile(r"^(?:[LG]\['[^']*'\]|self)")
_INDEX = re.compile(r"\._modules\['([^']*)'\]|\['([^']*)'\]|\[(\d+)\]")


@dataclass(frozen=True)
class ModuleOrders:
    """Modules in the order their forward/backward starts (pre) and ends (post), as ModTracker sees them."""

    fw_pre_order: list[str] = field(default_factory=list)
    fw_post_order: list[str] = field(default_factory=list)
    bw_pre_order: list[str] = field(default_factory=list)
    bw_post_order: list[str] = field(default_factory=list)
    # modules whose forward is re-run in backward (the user checkpointed them), in backward order
    recomputed_modules: list[str] = field(default_factory=list)
    module_types: dict[str, str] = field(default_factory=dict)


def normalize_fqn(path: str, root_name: str) -> str:
    """``L['self'].layers[0]._modules['attn']`` -> ``<root_name>.layers.0.attn``."""
    rest = _ROOT.sub("", path, count=1)
    rest = _INDEX.sub(lambda m: "." + next(g for g in m.groups() if g is not None), rest)
    rest = rest.strip(".")
    return f"{root_name}.{rest}" if rest else root_name


def _root_name(gm: fx.GraphModule, default: str | None) -> str:
    if default is not None:
        return default
    from sac_compiler.capture import capture_info

    info = capture_info(gm)
    return info.root_name if info is not None else "Model"


def _is_backward(node: fx.Node, backward_nodes: set[fx.Node]) -> bool:
    tag = node.meta.get("partitioner_tag")
    if tag is not None:
        return tag == "is_backward"
    return node in backward_nodes


def _tangent_closure(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes that depend on a tangent: the backward, where the graph carries no partitioner tags."""
    backward: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" and "tangents" in node.name:
            backward.add(node)
        elif node.op == "call_function" and any(a in backward for a in node.all_input_nodes):
            backward.add(node)
    return backward


def _stack(meta_stack: dict[str, Any] | None, root_name: str, types: dict[str, str]) -> tuple[str, ...]:
    if not meta_stack:
        return ()
    fqns: list[str] = []
    for value in meta_stack.values():
        path, mod_type = value[0], value[1]
        fqn = normalize_fqn(path, root_name)
        types.setdefault(fqn, getattr(mod_type, "__name__", str(mod_type)))
        if not fqns or fqns[-1] != fqn:
            fqns.append(fqn)
    if fqns[0] != root_name:
        fqns.insert(0, root_name)
    return tuple(fqns)


def _walk(stacks: list[tuple[str, ...]], pre: list[str], post: list[str]) -> None:
    """Enter/exit modules as the innermost stack changes from one node to the next."""
    current: list[str] = []
    for stack in stacks:
        common = 0
        while common < min(len(current), len(stack)) and current[common] == stack[common]:
            common += 1
        for fqn in reversed(current[common:]):
            if fqn not in post:
                post.append(fqn)
        for fqn in stack[common:]:
            if fqn not in pre:
                pre.append(fqn)
        current = list(stack)
    for fqn in reversed(current):
        if fqn not in post:
            post.append(fqn)


def _tagged_recompute(node: fx.Node) -> bool:
    from torch.utils.checkpoint import CheckpointPolicy

    return node.meta.get("recompute") in (CheckpointPolicy.MUST_RECOMPUTE, CheckpointPolicy.PREFER_RECOMPUTE)


def _user_recomputes(node: fx.Node) -> bool:
    """A forward node the user's ``checkpoint`` recomputes in backward.

    As PyTorch's partitioner does (``cleanup_recompute_tags``), the output of a checkpointed region
    that feeds the next checkpointed region directly is kept, not recomputed.
    """
    if not _tagged_recompute(node) or "ac_graph_id" not in node.meta:
        return False
    region = node.meta["ac_graph_id"]
    pending, seen = list(node.users), set()
    while pending:  # through views: saving a view of the region's output saves the output
        user = pending.pop()
        if user in seen:
            continue
        seen.add(user)
        if _tagged_recompute(user) and user.meta.get("ac_graph_id", -1) > region:
            return False
        if isinstance(user.target, torch._ops.OpOverload) and user.target.is_view:
            pending.extend(user.users)
    return True


def annotate_modules(gm: fx.GraphModule, root_name: str | None = None) -> ModuleOrders:
    """Annotate every call_function node with its module and side; return the module orders."""
    root = _root_name(gm, root_name)
    types: dict[str, str] = {}
    backward_nodes = _tangent_closure(gm)
    forward_by_seq: dict[int, tuple[str, ...]] = {}
    fw_stacks: list[tuple[str, ...]] = []
    bw_stacks: list[tuple[str, ...]] = []
    recomputed: list[str] = []
    recomputed_fw: set[str] = set()

    for node in gm.graph.nodes:
        if node.op not in ("call_function", "placeholder"):
            continue
        backward = _is_backward(node, backward_nodes)
        if node.op == "placeholder":
            update_record(node, "annotate_modules", module_fqn=GLOBAL, module_stack=(),
                          side=Side.BACKWARD if backward else Side.FORWARD, user_recompute=False)
            continue
        if not backward:
            stack = _stack(node.meta.get("nn_module_stack"), root, types) or (root,)
            seq_nr = node.meta.get("seq_nr")
            if seq_nr is not None:
                forward_by_seq.setdefault(seq_nr, stack)
            user_recompute = _user_recomputes(node)
            if user_recompute:
                recomputed_fw.add(stack[-1])
            fw_stacks.append(stack)
        else:
            stack = _stack(node.meta.get("fwd_nn_module_stack"), root, types)
            if not stack:
                stack = forward_by_seq.get(node.meta.get("seq_nr"), (root,))
            user_recompute = False
            bw_stacks.append(stack)
            if stack[-1] in recomputed_fw and stack[-1] not in recomputed:
                recomputed.append(stack[-1])
        update_record(node, "annotate_modules", module_fqn=stack[-1], module_stack=stack,
                      side=Side.BACKWARD if backward else Side.FORWARD, user_recompute=user_recompute)

    orders = ModuleOrders(module_types=types, recomputed_modules=recomputed)
    _walk(fw_stacks, orders.fw_pre_order, orders.fw_post_order)
    _walk(bw_stacks, orders.bw_pre_order, orders.bw_post_order)
    graph_results(gm)["annotate_modules"] = orders
    return orders


def nodes_of_module(gm: fx.GraphModule, fqn: str, side: Side = Side.FORWARD) -> list[fx.Node]:
    """call_function nodes on ``side`` whose module stack contains ``fqn`` (after annotate_modules)."""
    out = []
    for node in call_functions(gm):
        record = get_record(node)
        if record.side == side and record.module_stack and fqn in record.module_stack:
            out.append(node)
    return out
