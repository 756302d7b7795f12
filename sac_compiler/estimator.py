"""Seed-compatible SAC statistics from the annotated joint graph.

``estimate(model, *inputs)`` gives what PyTorch's eager ``SACEstimator`` gives (``sac_mod_stats``,
``sac_mod_greedy_order_meta``, ``sac_mod_tradeoff_stats`` and the display methods), computed from the
joint graph on fake tensors instead of a dispatch mode, plus ``module_info()``: the ``ModuleInfo``
that ``parse_module_info`` and ``sac_milp`` take (what ``aggregate_stats`` builds from MemTracker,
RuntimeEstimator and SACEstimator).

Op lists follow the eager tools: a non-leaf module's forward ATen ops in execution order, without
``getitem`` and the ops the tools skip (``detach``, ``lift_fresh``). Indices in ``view_like_ops``,
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

from passes.annotate_modules import nodes_of_module
from passes.annotate_ops import forward_ops
from passes.record import MemoryCategory, Side, get_record
from sac_compiler.analysis import Analysis, analyze
from sac_compiler.capture import InputKind, capture_joint
from sac_compiler.module_info import ModStats, ModuleInfo
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
    saved_owners = {get_record(n).storage_owner for n in gm.graph.nodes
                    if n.op != "output" and get_record(n).saved_for_backward}
    stats: dict[str, SACStats] = {}
    greedy: dict[str, SACGreedyOrderMeta] = {}
    for fqn in analysis.orders.fw_pre_order:
        if fqn in leaves:
            continue
        ops = forward_ops(nodes_of_module(gm, fqn))
        if not ops:
            continue
        stats[fqn] = _sac_stats(gm, fqn, ops, saved_owners)
        greedy[fqn] = get_greedy_order_meta(stats[fqn])
    return SACEstimate(analysis, stats, greedy, leaf_modules=leaves)


def _outputs(node: fx.Node) -> list[fx.Node]:
    """The allocations an op makes: its getitem users for multi-output ops, else itself."""
    items = [u for u in node.users if u.target is operator.getitem]
    return items or [node]


def _sac_stats(gm: fx.GraphModule, fqn: str, ops: list[fx.Node], saved_owners: set[str | None]) -> SACStats:
    index = {n.name: i for i, n in enumerate(ops)}
    records = [get_record(n) for n in ops]
    memory = []
    saved = []
    for i, node in enumerate(ops):
        outs = _outputs(node)
        mem = 0 if records[i].is_view else sum(get_record(o).alloc_bytes or 0 for o in outs)
        memory.append(mem)
        owners = {get_record(o).storage_owner for o in outs}
        if owners and owners <= saved_owners:
            saved.append(i)
    inplace = [(i, index.get(r.inplace_parent, i)) for i, r in enumerate(records) if r.is_inplace]
    view_like = [i for i, r in enumerate(records) if r.is_view]
    # The eager tools' rule: the last non-view, non-in-place op is the block's output, always kept.
    skip = set(view_like) | {i for i, _ in inplace}
    last = len(ops) - 1
    while last in skip and last > 0:
        last -= 1
    memory[last] = 0
    return SACStats(
        func_names=[n.target.overloadpacket.__name__ for n in ops],
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
