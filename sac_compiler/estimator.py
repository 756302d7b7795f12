"""Seed-compatible SAC statistics from the annotated joint graph.

``estimate(model, *inputs)`` gives what PyTorch's eager ``SACEstimator`` gives (``sac_mod_stats``,
``sac_mod_greedy_order_meta``, ``sac_mod_tradeoff_stats`` and the display methods), computed from the
joint graph on fake tensors instead of a dispatch mode, plus ``module_info()``: the ``ModuleInfo``
that ``parse_module_info`` and ``sac_milp`` take (what ``aggregate_stats`` builds from MemTracker,
RuntimeEstimator and SACEstimator).

Op lists follow the eager tools: a non-leaf module's forward ATen ops in execution order, without
``getitem`` and the ops the tools skip (``detach``, ``lift_fresh``, ``clone``). In-place ops keep
their in-place names (``relu_``), and what the functional graph adds around an in-place op on a view
is counted as eager dispatch sees it (see ``_EagerOps``). Indices in ``view_like_ops``,
``rand_ops``, ``saved_autograd_ops`` and ``inplace_ops`` are positions in that list.
"""

from __future__ import annotations

import logging
import operator
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from sac_compiler.analysis import Analysis, analyze
from sac_compiler.capture import InputKind, capture_joint
from sac_compiler.module_info import ModStats, ModuleInfo
from sac_compiler.passes.annotate_modules import nodes_of_module
from sac_compiler.passes.annotate_ops import (
    IGNORED_OPS,
    VIEW_SCATTER_OPS,
    forward_ops,
    is_alias_op,
    op_name,
)
from sac_compiler.passes.record import MemoryCategory, Side, get_record
from sac_compiler.sac_stats import (
    SACGreedyOrderMeta,
    SACStats,
    SACTradeOffStats,
    format_sac_stats,
    format_sac_tradeoff_stats,
    get_greedy_order_meta,
    get_sac_tradeoff_pwlf_stats,
)

log = logging.getLogger(__name__)

# The eager tools' mode names are accepted too.
_MODES = {
    "cost-model": "cost-model",
    "benchmark": "benchmark",
    "operator-level-cost-model": "cost-model",
    "operator-level-benchmark": "benchmark",
}


@dataclass
class SACEstimate:
    """Per-module SAC statistics of one model and example input."""

    analysis: Analysis
    sac_mod_stats: dict[str, SACStats]
    sac_mod_greedy_order_meta: dict[str, SACGreedyOrderMeta]
    sac_mod_tradeoff_stats: dict[str, SACTradeOffStats] = field(default_factory=dict)
    leaf_modules: set[str] = field(default_factory=set)

    def pwlf_sac_tradeoff_curve(
        self, n_segments: int = 2, save_tradeoff_graphs: bool = False, out_dir: str | Path = "."
    ) -> dict[str, SACTradeOffStats]:
        """Fit each module's trade-off curve (and write ``<out_dir>/<module>.png`` when asked)."""
        for fqn, stats in self.sac_mod_stats.items():
            self.sac_mod_tradeoff_stats[fqn] = get_sac_tradeoff_pwlf_stats(
                stats,
                self.sac_mod_greedy_order_meta[fqn],
                n_segments=n_segments,
                save_tradeoff_graph=save_tradeoff_graphs,
                filename=str(Path(out_dir) / fqn),
                mod_name=fqn,
            )
        return self.sac_mod_tradeoff_stats

    def display_sac_stats(self, sac_stats: SACStats, print_tabular: bool = False) -> str:
        greedy = get_greedy_order_meta(sac_stats)
        return _emit(format_sac_stats(sac_stats, greedy), print_tabular)

    def display_sac_tradeoff_stats(
        self, greedy_order_meta: SACGreedyOrderMeta, sac_stats: SACStats, print_tabular: bool = False
    ) -> str:
        return _emit(format_sac_tradeoff_stats(sac_stats, greedy_order_meta), print_tabular)

    def display_modulewise_sac_stats(self, depth: int = 2, print_tabular: bool = False) -> str:
        """Both tables for every non-leaf module at most ``depth`` levels deep (``Root`` is 1, ``Root.a`` 2)."""
        parts = []
        for fqn, stats in self.sac_mod_stats.items():
            if fqn.count(".") + 1 > depth:
                continue
            greedy = self.sac_mod_greedy_order_meta[fqn]
            parts.append(f"Module: {fqn}\n{format_sac_stats(stats, greedy)}\n"
                         f"{format_sac_tradeoff_stats(stats, greedy)}")
        return _emit("\n".join(parts), print_tabular)

    def module_info(self, n_segments: int = 2) -> ModuleInfo:
        """The seed's ModuleInfo: module orders and per-module memory, runtime and trade-off stats."""
        if not self.sac_mod_tradeoff_stats:
            self.pwlf_sac_tradeoff_curve(n_segments=n_segments)
        return _module_info(self)


def _emit(text: str, print_tabular: bool) -> str:
    if print_tabular:
        sys.stdout.write(text + "\n")
    return text


def estimate(
    model: torch.nn.Module,
    *example_inputs: Any,
    mode: str = "cost-model",
    device: str = "auto",
    optimizer: torch.optim.Optimizer | None = None,
    target_device: str | torch.device | None = "cuda",
) -> SACEstimate:
    """SACEstimator's statistics for ``model(*example_inputs)``, from its joint graph.

    ``mode``: ``"cost-model"`` (roofline on the ``device`` spec) or ``"benchmark"`` (ops timed on
    the GPU); the eager tools' names ``"operator-level-cost-model"`` / ``"operator-level-benchmark"``
    are accepted. A model whose backward cannot be traced (eager autograd would fail too, e.g. an
    in-place op overwriting a value saved for backward) is estimated from its forward graph, with a
    warning: saved-for-backward information is then empty.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {sorted(_MODES)}, got {mode!r}")
    try:
        graph = capture_joint(model, *example_inputs, target_device=target_device)
    except Exception as e:  # noqa: BLE001 - only autograd's in-place error falls back; others re-raise
        if "modified by an inplace operation" not in _messages(e):
            raise
        log.warning("the backward of %s cannot be traced (%s); estimating from the forward graph",
                    type(model).__name__, "an in-place op overwrites a value saved for backward")
        graph = capture_joint(model, *example_inputs, target_device=target_device, backward=False)
    analysis = analyze(graph, device=device, estimate_mode=_MODES[mode], optimizer=optimizer)
    return _estimate_from(analysis)


def _messages(e: BaseException) -> str:
    out, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        out.append(str(e))
        e = e.__cause__ or e.__context__
    return "\n".join(out)


def _leaf_modules(orders: Any) -> set[str]:
    mods = orders.fw_pre_order
    return {m for m in mods if not any(o.startswith(m + ".") for o in mods)}


def _estimate_from(analysis: Analysis) -> SACEstimate:
    gm = analysis.graph.gm
    leaves = _leaf_modules(analysis.orders)
    eager = _eager_ops(gm)
    saved_storages = {eager.storage(n) for n in gm.graph.nodes
                      if n.op != "output" and get_record(n).saved_for_backward}
    stats: dict[str, SACStats] = {}
    greedy: dict[str, SACGreedyOrderMeta] = {}
    for fqn in analysis.orders.fw_pre_order:
        if fqn in leaves:
            continue
        ops = [n for n in forward_ops(nodes_of_module(gm, fqn)) if n not in eager.regenerated]
        if not ops:
            continue
        stats[fqn] = _sac_stats(gm, fqn, ops, eager, saved_storages)
        greedy[fqn] = get_greedy_order_meta(stats[fqn])
    return SACEstimate(analysis, stats, greedy, leaf_modules=leaves)


@dataclass
class _EagerOps:
    """How the functional joint graph's ops around in-place ops map onto the ops eager dispatch sees.

    The joint graph is functional: ``v.mul_(3)`` on a view ``v = y.t()`` becomes ``mul`` (the new
    values of ``v``), then ``t`` (the same values as the new ``y``: functionalization's write-back
    into the base; a ``slice_scatter`` for ``y[:, :4]``), and, where ``v`` is used again, ``t`` once
    more (``v`` regenerated from the new ``y``). Eager runs one ``mul_`` on ``v``'s storage, after
    which autograd replays the view chain ``y -> v`` on ``y`` to rebuild ``v``'s ``grad_fn`` (one
    ``t``, a view) and has nothing to do on the later use. So a write-back stands for eager's replay
    of the matching view op of the chain, and a regenerated view for no op at all.

    ``storage(node)`` is the op whose output storage a value lives in as eager sees it: views share
    their base's, and an in-place op (and its write-backs) the storage it writes into. Eager's
    in-place parent and saved-for-backward records are per storage.

    Not covered: views taken of an already mutated view are built by functionalization where a later
    non-view op first reads them, so they can come after that op's own views, or in its module,
    where eager lists them where the user took them; and in-place ops that a composite op runs
    inside (``F.dropout(inplace=True)``: ``bernoulli_``, ``div_``, ``mul_``) keep functional names.
    """

    replays: dict[fx.Node, str] = field(default_factory=dict)  # write-back -> the view op eager replays
    regenerated: set[fx.Node] = field(default_factory=set)
    _storages: dict[fx.Node, fx.Node] = field(default_factory=dict)

    def storage(self, node: fx.Node) -> fx.Node:
        """The node that allocated the storage ``node``'s output lives in, as eager sees it."""
        chain = []
        current = node
        while current not in self._storages:
            base = self._base(current)
            if base is None:
                self._storages[current] = current
                break
            chain.append(current)
            current = base
        found = self._storages[current]
        for n in chain:
            self._storages[n] = found
        return found

    def _base(self, node: fx.Node) -> fx.Node | None:
        """The value whose storage ``node``'s output lives in, or None when it has its own."""
        if node.op != "call_function":
            return None
        if node.target is operator.getitem:
            producer = node.args[0]
            return producer if isinstance(producer, fx.Node) and is_alias_op(producer) else None
        if get_record(node).is_inplace or node in self.replays or is_alias_op(node):
            return _first_tensor_arg(node)
        return None


def _first_tensor_arg(node: fx.Node) -> fx.Node | None:
    return next((a for a in node.args if isinstance(a, fx.Node)), None)


def _eager_ops(gm: fx.GraphModule) -> _EagerOps:
    """Write-backs and regenerated views of every forward in-place op of ``gm`` (see ``_EagerOps``)."""
    eager = _EagerOps()
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in gm.graph.nodes:
        record = get_record(node)
        if node.op != "call_function" or not record.is_inplace or record.side != Side.FORWARD:
            continue
        chain = _view_chain(node, eager.replays)
        write_backs = _write_backs(node, len(chain), order)
        if len(write_backs) == len(chain):
            # Eager replays the chain base first; the write-backs undo it innermost view first, so
            # the names go by position, not by the view each write-back undoes.
            names = [_packet_name(v) for v in chain]
        else:  # not a plain view chain: name each write-back after the view it undoes
            names = [_packet_name(w).removesuffix("_scatter") for w in write_backs]
        eager.replays.update(zip(write_backs, names, strict=True))
        eager.regenerated |= _rederived_views(write_backs, record.source_op, chain)
        if write_backs and len(write_backs) == len(chain):
            eager.regenerated |= _regenerated_view(write_backs[-1], chain, record.source_op, order)
    return eager


def _write_backs(node: fx.Node, depth: int, order: dict[fx.Node, int]) -> list[fx.Node]:
    """What carries an in-place op's result on a ``depth``-deep view back into the view's base.

    One op per view level, innermost first, each traced from the same source op as the in-place
    op and reading the previous one: an inverse view (``t`` of the new values) or a ``*_scatter``
    of the new values into the old value of the level above. None when the op mutated no view.
    """
    source = get_record(node).source_op
    if source is None:
        return []
    out: list[fx.Node] = []
    current = node
    for _ in range(depth):
        found = sorted((u for u in current.users if _writes_back(u, current, source)), key=order.__getitem__)
        if not found:
            break
        current = found[0]
        out.append(current)
    return out


def _writes_back(node: fx.Node, value: fx.Node, source: str) -> bool:
    """Whether ``node`` puts ``value`` (new values of a view) into the view's base, for ``source``."""
    record = get_record(node)
    if node.op != "call_function" or record.source_op != source or record.side != Side.FORWARD:
        return False
    if op_name(node.target) in IGNORED_OPS:
        return False
    if op_name(node.target) in VIEW_SCATTER_OPS:
        return len(node.args) > 1 and node.args[1] is value
    return is_alias_op(node) and _first_tensor_arg(node) is value


def _view_chain(node: fx.Node, write_backs: dict[fx.Node, str]) -> list[fx.Node]:
    """The views from the base to the tensor an in-place op mutates, base first (empty: no view).

    A write-back is a new value of a base, not a view the user took: the chain stops there.
    """
    chain = []
    current = _first_tensor_arg(node)
    while (current is not None and current.op == "call_function" and current not in write_backs
           and is_alias_op(current)):
        chain.append(current)
        current = _first_tensor_arg(current)
    return chain[::-1]


def _rederived_views(write_backs: list[fx.Node], source: str | None, chain: list[fx.Node]) -> set[fx.Node]:
    """The views a ``*_scatter`` write-back re-derives from the old base to get the old value of the
    level it scatters into (``t(y)`` for ``y.t()[0].mul_(2)``): eager has no such op."""
    out: set[fx.Node] = set()
    for write_back in write_backs:
        if op_name(write_back.target) not in VIEW_SCATTER_OPS:
            continue
        current = _first_tensor_arg(write_back)
        while (current is not None and current.op == "call_function" and current not in chain
               and get_record(current).source_op == source and is_alias_op(current)):
            out.add(current)
            current = _first_tensor_arg(current)
    return out


def _regenerated_view(
    new_base: fx.Node, chain: list[fx.Node], source: str | None, order: dict[fx.Node, int]
) -> set[fx.Node]:
    """The views functionalization re-creates from ``new_base`` to bring the mutated view up to date
    for a later use: the same view ops with the same arguments as ``chain``, applied in turn.

    Functionalization regenerates a mutated view once, right after the in-place op (traced from its
    source op) or where it is next used; an identical view taken afresh of the new base (as
    ``y[:, :4] = ...`` after ``y[:, :4] += 1`` does) is the user's own, so at most one is dropped:
    the one traced from the in-place op, else the first.
    """

    def same_view(node: fx.Node, view: fx.Node, base: fx.Node) -> bool:
        return (node.op == "call_function" and node.target == view.target and _first_tensor_arg(node) is base
                and tuple(node.args[1:]) == tuple(view.args[1:]) and node.kwargs == view.kwargs
                and get_record(node).side == Side.FORWARD)

    def paths(base: fx.Node, level: int) -> list[list[fx.Node]]:
        if level == len(chain):
            return [[]]
        return [[user, *rest] for user in base.users if same_view(user, chain[level], base)
                for rest in paths(user, level + 1)]

    found = sorted(paths(new_base, 0), key=lambda path: (get_record(path[0]).source_op != source,
                                                          order[path[0]]))
    return set(found[0]) if found else set()


def _packet_name(node: fx.Node) -> str:
    return node.target.overloadpacket.__name__


def _eager_name(node: fx.Node, eager: _EagerOps) -> str:
    """The op's name as eager dispatch sees it: the in-place overload (``relu_``) of an op the user
    wrote in place, and the view op replayed in place of a write-back."""
    if node in eager.replays:
        return eager.replays[node]
    name = _packet_name(node)
    if get_record(node).is_inplace and node.target.namespace == "aten" and hasattr(torch.ops.aten, name + "_"):
        return name + "_"
    return name


def _outputs(node: fx.Node) -> list[fx.Node]:
    """The allocations an op makes: its getitem users for multi-output ops, else itself."""
    items = [u for u in node.users if u.target is operator.getitem]
    return items or [node]


def _sac_stats(
    gm: fx.GraphModule, fqn: str, ops: list[fx.Node], eager: _EagerOps, saved_storages: set[fx.Node]
) -> SACStats:
    """One module's SACStats over its op list ``ops`` (in eager's terms, see ``_EagerOps``).

    As in eager, an op is saved for backward when every storage it outputs is, and an in-place op's
    parent is the module's first op that outputs the storage it writes (itself when that storage
    comes from outside the module and the module took no view of it first).
    """
    records = [get_record(n) for n in ops]
    view_like = [i for i, (n, r) in enumerate(zip(ops, records, strict=True)) if r.is_view or n in eager.replays]
    views = set(view_like)
    memory = []
    saved = []
    first_output_of: dict[fx.Node, int] = {}
    for i, node in enumerate(ops):
        outs = _outputs(node)
        memory.append(0 if i in views else sum(get_record(o).alloc_bytes or 0 for o in outs))
        storages = {eager.storage(o) for o in outs}
        if storages <= saved_storages:
            saved.append(i)
        for st in storages:
            first_output_of.setdefault(st, i)
    inplace = [(i, first_output_of.get(eager.storage(n), i))
               for i, (n, r) in enumerate(zip(ops, records, strict=True)) if r.is_inplace]
    # The eager tools' rule: the last non-view, non-in-place op is the block's output, always kept.
    skip = views | {i for i, _ in inplace}
    last = len(ops) - 1
    while last in skip and last > 0:
        last -= 1
    memory[last] = 0
    return SACStats(
        func_names=[_eager_name(n, eager) for n in ops],
        runtimes=[r.runtime_ms or 0.0 for r in records],
        memory=memory,
        view_like_ops=view_like,
        rand_ops=[i for i, r in enumerate(records) if r.is_random],
        saved_autograd_ops=saved,
        inplace_ops=inplace,
        force_store_random=not _has_tensor_inputs(gm, fqn),
    )


def _has_tensor_inputs(gm: fx.GraphModule, fqn: str) -> bool:
    """Whether a tensor other than a parameter or buffer flows into the module's forward."""
    from sac_compiler.capture import capture_info

    info = capture_info(gm)
    static = {i.name for i in info.inputs if i.kind in (InputKind.PARAMETER, InputKind.BUFFER)} if info else set()
    inside = set(nodes_of_module(gm, fqn))
    for node in inside:
        for arg in node.all_input_nodes:
            if arg in inside or arg.name in static:
                continue
            if isinstance(arg.meta.get("val"), torch.Tensor):
                return True
    return False


def _module_info(est: SACEstimate) -> ModuleInfo:
    analysis = est.analysis
    gm = analysis.graph.gm
    info = analysis.graph
    orders = analysis.orders
    param_bytes = {
        i.fqn: get_record(n).alloc_bytes or 0
        for i in info.inputs if i.kind == InputKind.PARAMETER
        for n in gm.graph.find_nodes(op="placeholder") if n.name == i.name
    }
    mod_stats: list[ModStats] = []
    for fqn in orders.fw_pre_order:
        mem = analysis.memory.module_memory.get(fqn)
        views = mem.views if mem is not None else {}
        zero = {"total": 0, "act": 0, "temp": 0, "grad": 0}
        pre_fw, post_fw = views.get("pre_fw", zero), views.get("post_fw", zero)
        pre_bw, peak_bw = views.get("pre_bw", post_fw), views.get("peak_bw", post_fw)
        inputs, outputs = _boundary_bytes(gm, fqn)
        params = sum(b for name, b in param_bytes.items() if name and (name.startswith(fqn + ".")))
        fw_ms = sum(get_record(n).runtime_ms or 0.0 for n in nodes_of_module(gm, fqn, Side.FORWARD))
        bw_ms = sum(get_record(n).runtime_ms or 0.0 for n in nodes_of_module(gm, fqn, Side.BACKWARD))
        tradeoff = est.sac_mod_tradeoff_stats.get(fqn)
        stat: ModStats = {
            "fqn": fqn,
            "param_per_module": params,
            "grad_per_module": params,
            "grad_total": pre_bw["grad"],
            "act_fw_per_module": max(0, post_fw["act"] - pre_fw["act"] - outputs),
            "act_bw_per_module": max(0, peak_bw["act"]),
            "act_grad_per_module": peak_bw["temp"] - pre_bw["temp"],
            "act_total": post_fw["act"],
            "input_per_module": inputs,
            "output_per_module": outputs,
            "fw_runtime_per_module": fw_ms,
            "bw_runtime_per_module": bw_ms,
            "is_leaf": tradeoff is None,
            "sac_runtime": tradeoff.sac_runtime if tradeoff else 0,
            "sac_memory": tradeoff.sac_memory if tradeoff else 0,
            "n_segments": tradeoff.n_segments if tradeoff else 0,
            "slopes": list(tradeoff.slopes) if tradeoff else [],
            "intercepts": list(tradeoff.intercepts) if tradeoff else [],
            "breakpoints": list(tradeoff.fit_breaks) if tradeoff else [],
            "tradeoff_curve": tradeoff.tradeoff_curve if tradeoff else OrderedDict(),
        }
        mod_stats.append(stat)
    return {
        "mod_order": {
            "fw_pre_order": list(orders.fw_pre_order),
            "bw_pre_order": list(orders.bw_pre_order),
            "fw_post_order": list(orders.fw_post_order),
            "bw_post_order": list(orders.bw_post_order),
        },
        "mod_stats": mod_stats,
    }


def _boundary_bytes(gm: fx.GraphModule, fqn: str) -> tuple[int, int]:
    """Bytes of the tensors entering (non-static) and leaving a module's forward."""
    inside = nodes_of_module(gm, fqn, Side.FORWARD)
    inside_set = set(inside)
    owners_in: dict[str, int] = {}
    owners_out: dict[str, int] = {}
    for node in inside:
        for arg in node.all_input_nodes:
            rec = get_record(arg)
            if arg in inside_set or rec.category in (MemoryCategory.PARAMETER, MemoryCategory.BUFFER):
                continue
            owner = rec.storage_owner
            if owner is not None:
                owners_in[owner] = _owner_bytes(gm, owner)
        if any(u not in inside_set and (u.op == "output" or get_record(u).side == Side.FORWARD) for u in node.users):
            owner = get_record(node).storage_owner
            if owner is not None:
                owners_out[owner] = _owner_bytes(gm, owner)
    return sum(owners_in.values()), sum(owners_out.values())


def _owner_bytes(gm: fx.GraphModule, owner: str) -> int:
    node = next((n for n in gm.graph.nodes if n.name == owner), None)
    return (get_record(node).alloc_bytes or 0) if node is not None else 0
