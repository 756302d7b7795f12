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


def write_report(analysis: Any, report: bool | str) -> None:
    """``report=True`` prints the table; a string is a file path to write it to."""
    text = format_analysis(analysis)
    if report is True:
        sys.stdout.write(text)
    elif isinstance(report, str):
        Path(report).write_text(text)
        log.info("sac report written to %s", report)
