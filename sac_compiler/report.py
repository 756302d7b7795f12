"""Human-readable reports (tabulate)."""

from __future__ import annotations

import logging
import operator
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def format_analysis(analysis: Any) -> str:
    from tabulate import tabulate

    from sac_compiler.analysis import summary_rows

    gib = 2**30
    rows = []
    for fqn in analysis.orders.fw_pre_order:
        mm = analysis.memory.module_memory.get(fqn)
        if mm is None:
            continue
        rows.append((fqn, f"{(mm.post_fw - mm.pre_fw) / gib:.4f}", f"{mm.peak_fw / gib:.4f}", f"{mm.peak_bw / gib:.4f}"))
    head = tabulate(summary_rows(analysis), tablefmt="simple")
    table = tabulate(rows, headers=["module", "fw activations GiB", "fw peak GiB", "bw peak GiB"], tablefmt="simple")
    return f"{head}\n\n{table}\n"


def format_plan(result: Any) -> str:
    """The analysis, and with a budget the plan: what is recomputed and kept, per module.

    It reads what the plan recorded when it was made (``recomputed_values``), not the joint graph,
    which PyTorch's partitioner rewrites in place before the backend writes its report."""
    from tabulate import tabulate

    text = format_analysis(result.analysis)
    if getattr(result, "offload_note", None):
        text += f"\noffload: {result.offload_note}\n"
    if result.plan is None:
        return text
    from sac_compiler.config import format_bytes

    plan = result.plan
    rows = [
        ("budget", format_bytes(result.budget_bytes)),
        ("peak without recomputation", format_bytes(result.baseline_peak or 0)),
        ("predicted peak of the plan", format_bytes(result.predicted_peak or 0)),
        ("recompute time", f"{plan.recompute_ms:.3f} ms"),
        ("solve", f"{plan.status}, {plan.solve_s:.2f} s, {plan.n_vars} vars, {plan.n_constraints} constraints"),
        ("random ops kept (never recomputed)", ", ".join(result.kept_random) or "none"),
    ]
    by_reason: dict[str, list[str]] = {}
    for name, reason in getattr(result, "kept_ops", {}).items():
        by_reason.setdefault(reason, []).append(name)
    rows += [(f"kept: {reason}", ", ".join(names)) for reason, names in sorted(by_reason.items())]
    offload = getattr(result, "offload", None)
    if offload is not None:
        alone = ("none under the budget" if offload.recompute_only_ms is None
                 else f"{offload.recompute_only_ms:.3f} ms")
        rows += [
            ("offloaded to host memory", f"{len(offload.starts)} values, {format_bytes(offload.bytes)}"),
            ("link time expected (each way)", f"{offload.link_ms:.3f} ms at {offload.bandwidth / 1e9:.1f} GB/s"),
            ("transfer time compute does not hide", f"{offload.stall_ms:.3f} ms"),
            ("recompute-only plan's time", alone),
        ]
    if result.partitioned is not None:
        over = " (over the budget)" if result.partitioned.peak_bytes > result.budget_bytes else ""
        rows.append(("simulated peak of the partitioned graphs",
                     f"{format_bytes(result.partitioned.peak_bytes)} in {result.partitioned.peak_graph}{over}"))
    if getattr(result, "measured_peak", None) is not None:
        rows.append(("measured peak of a step", format_bytes(result.measured_peak)))
    if getattr(result, "measured_outside_peak", None):
        rows.append(("measured peak after backward, before the next forward (over the budget)",
                     format_bytes(result.measured_outside_peak)))
    if getattr(result, "caller_held_bytes", None):
        rows.append(("outputs the caller held through backward", format_bytes(result.caller_held_bytes)))
    if getattr(result, "gradients_held", 0):
        rows.append(("gradients made before this graph's backward (counted through it)",
                     format_bytes(result.gradients_held)))
    if getattr(result, "measured_loss_memory", None):
        rows.append(("the caller's loss between forward and backward (measured)",
                     format_bytes(result.measured_loss_memory)))
    if result.saved_by_partition:
        rows.append(("values the partitioner saved", str(len(result.saved_by_partition))))
        rows.append(("saved although the plan recomputes them", ", ".join(result.unplanned_saves) or "none"))
    per_module: dict[str, list[int]] = {}
    for column, values in ((0, result.recomputed_values), (2, offload.values if offload is not None else {})):
        for module, nbytes in values.values():
            entry = per_module.setdefault(module, [0, 0, 0, 0])
            entry[column] += 1
            entry[column + 1] += nbytes
    mods = sorted(per_module.items())
    if offload is None:
        table = tabulate([(m, n, f"{b / 2**20:.2f}") for m, (n, b, _, _) in mods],
                         headers=["module", "values recomputed", "MiB freed between forward and use"],
                         tablefmt="simple")
    else:
        table = tabulate([(m, n, f"{b / 2**20:.2f}", k, f"{o / 2**20:.2f}") for m, (n, b, k, o) in mods],
                         headers=["module", "values recomputed", "MiB recomputed", "values offloaded",
                                  "MiB offloaded"], tablefmt="simple")
    return f"{text}\n{tabulate(rows, tablefmt='simple')}\n\n{table}\n"


def write_report(result: Any, report: bool | str) -> None:
    """``report=True`` prints the table; a string is a file path to write it to."""
    text = format_plan(result) if hasattr(result, "plan") else format_analysis(result)
    if report is True:
        sys.stdout.write(text)
    elif isinstance(report, str):
        Path(report).write_text(text)
        log.info("sac report written to %s", report)


@dataclass(frozen=True)
class ModulePlanRow:
    """What one module keeps and recomputes of the forward values its backward needs, under a plan.

    ``kept_*`` counts the values kept from forward into backward (read by the backward, or by a
    recomputed value); ``recomputed_*`` the values the plan recomputes, and ``recomputed_ops`` their
    ops by ATen name. Bytes are the allocations' sizes, as the memory simulation counts them.
    """

    module: str
    kept_values: int
    kept_bytes: int
    recomputed_values: int
    recomputed_bytes: int
    recomputed_ops: dict[str, int]


def module_plan_rows(result: Any) -> list[ModulePlanRow]:
    """Per module (forward order, ``Global`` for values outside any module), the plan's kept and
    recomputed values: the planner's candidates (``build_plan_problem``) split by the plan.

    Read it before the graph is planned again: a later plan re-annotates the same nodes.
    """
    if result.plan is None:
        return []
    from sac_compiler.passes.record import get_record
    from sac_compiler.plan_graph import build_plan_problem

    problem, _, _ = build_plan_problem(result.analysis, fused_pointwise=result.fused_pointwise)
    recompute = set(result.plan.recompute)
    kept_for_recompute = set(result.plan.kept_for_recompute)
    by_name = {n.name: n for n in result.analysis.graph.gm.graph.nodes}
    counts: dict[str, list[Any]] = {}
    for cand in problem.candidates:
        recomputed = cand.name in recompute
        kept = not recomputed and (cand.first_use is not None or cand.name in kept_for_recompute)
        if not (recomputed or kept):
            continue
        rec = get_record(by_name[cand.name])
        entry = counts.setdefault(rec.module_fqn or "Global", [0, 0, 0, 0, {}])
        if recomputed:
            entry[2] += 1
            entry[3] += cand.nbytes
            node = by_name[cand.name]
            source = node.args[0] if node.target is operator.getitem else node  # a multi-output op's value
            op = (get_record(source).op_name or source.name).removeprefix("aten.")
            entry[4][op] = entry[4].get(op, 0) + 1
        else:
            entry[0] += 1
            entry[1] += cand.nbytes
    order = {fqn: i for i, fqn in enumerate(result.analysis.orders.fw_pre_order)}
    return [ModulePlanRow(module, kv, kb, rv, rb, dict(sorted(ops.items())))
            for module, (kv, kb, rv, rb, ops) in sorted(counts.items(), key=lambda kv: (order.get(kv[0], -1), kv[0]))]


def format_module_plan(result: Any) -> str:
    """``module_plan_rows`` as a table: values and MiB kept and recomputed per module, and the ops
    recomputed (``mm x2``: two values of ``mm``)."""
    from tabulate import tabulate

    rows = [(r.module, r.kept_values, f"{r.kept_bytes / 2**20:.2f}", r.recomputed_values,
             f"{r.recomputed_bytes / 2**20:.2f}",
             ", ".join(f"{op} x{n}" if n > 1 else op for op, n in r.recomputed_ops.items()) or "-")
            for r in module_plan_rows(result)]
    headers = ["module", "values kept", "MiB kept", "values recomputed", "MiB recomputed", "ops recomputed"]
    return tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True) + "\n"
