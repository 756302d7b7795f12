"""Human-readable reports (tabulate)."""

from __future__ import annotations

import logging
import sys
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
    """The analysis, and with a budget the plan: what is recomputed and kept, per module."""
    from tabulate import tabulate

    text = format_analysis(result.analysis)
    if result.plan is None:
        return text
    from passes.record import get_record

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
    if result.partitioned is not None:
        over = " (over the budget)" if result.partitioned.peak_bytes > result.budget_bytes else ""
        rows.append(("simulated peak of the partitioned graphs",
                     f"{format_bytes(result.partitioned.peak_bytes)} in {result.partitioned.peak_graph}{over}"))
    if getattr(result, "measured_peak", None) is not None:
        rows.append(("measured peak of a step", format_bytes(result.measured_peak)))
    if getattr(result, "caller_held_bytes", None):
        rows.append(("outputs the caller held through backward", format_bytes(result.caller_held_bytes)))
    if result.saved_by_partition:
        rows.append(("values the partitioner saved", str(len(result.saved_by_partition))))
        rows.append(("saved although the plan recomputes them", ", ".join(result.unplanned_saves) or "none"))
    per_module: dict[str, list[int]] = {}
    by_name = {n.name: n for n in result.analysis.graph.gm.graph.nodes}
    for name in plan.recompute:
        rec = get_record(by_name[name])
        entry = per_module.setdefault(rec.module_fqn or "Global", [0, 0])
        entry[0] += 1
        entry[1] += rec.alloc_bytes or 0
    mods = sorted(per_module.items())
    table = tabulate([(m, n, f"{b / 2**20:.2f}") for m, (n, b) in mods],
                     headers=["module", "values recomputed", "MiB freed between forward and use"], tablefmt="simple")
    return f"{text}\n{tabulate(rows, tablefmt='simple')}\n\n{table}\n"


def write_report(result: Any, report: bool | str) -> None:
    """``report=True`` prints the table; a string is a file path to write it to."""
    text = format_plan(result) if hasattr(result, "plan") else format_analysis(result)
    if report is True:
        sys.stdout.write(text)
    elif isinstance(report, str):
        Path(report).write_text(text)
        log.info("sac report written to %s", report)
