"""The allocator's record of a step beside the partitioned simulation, moment by moment.

``zoo_matrix.py --timeline`` writes, per cell, what the CUDA caching allocator allocated and freed
in one step (each event with the line of Inductor's generated code that made it) and the
simulation's every step and record. With Inductor's generated code kept (run the matrix with
``TORCHINDUCTOR_CACHE_DIR`` set to a folder and keep its ``.py`` files), this script names the
graph node each allocation belongs to (from the ``Topologically Sorted Source Nodes`` comment
Inductor writes beside each kernel), and at the highest moments of the measured step prints the
measured bytes beside the simulated bytes at that node, and, with ``--live``, what each side
holds there::

    python benchmarks/timeline_compare.py OUT/timelines/CELL.json --code CODE_DIR --top 6 --live 1020

A measured moment far above the simulation at the same node is work Inductor runs at another
point than the simulation does (its scheduler's order), or an allocation no rule counts.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sac_compiler import plots

ROOT = Path(__file__).resolve().parent.parent

_SOURCE = re.compile(r"# Topologically Sorted Source Nodes: \[(.*?)\]")
_ASSIGNED = re.compile(r"\s*(buf\d+)\s*=")
_SITE = re.compile(r"(\S+\.py):(\d+)\b")


def source_nodes(lines: Sequence[str], line: int) -> tuple[str | None, list[str]]:
    """(the buffer assigned, the graph nodes Inductor names as its source) for the 1-based ``line``
    of generated code: an extern kernel's comment stands just above it; a buffer allocated empty
    (``empty_strided``) is filled by the kernel whose comment follows it."""
    text = lines[line - 1]
    assigned = _ASSIGNED.match(text)
    buf = assigned.group(1) if assigned else None
    if "empty_strided" not in text:
        for k in range(line - 2, max(line - 5, -1), -1):
            found = _SOURCE.search(lines[k])
            if found:
                return buf, [s.strip() for s in found.group(1).split(",")]
            if _ASSIGNED.match(lines[k]):
                break
    for k in range(line, min(line + 40, len(lines))):
        found = _SOURCE.search(lines[k])
        if found:
            return buf, [s.strip() for s in found.group(1).split(",")]
    return buf, []


class Comparison:
    """One cell's timeline JSON (``zoo_matrix.py --timeline``) and Inductor's generated code."""

    def __init__(self, cell: dict[str, Any], code: dict[str, list[str]], graph: int = 0) -> None:
        from sac_compiler.passes.memory_model import Freed, Lifetime, peak_sweep
        from sac_compiler.passes.record import MemoryCategory

        measured = cell["measured"]
        if "events" not in measured:
            raise ValueError("this timeline has no allocator events: record it again with zoo_matrix.py --timeline")
        simulated = next((s for s in cell["simulated"] if s["graph"] == graph), None)
        if simulated is None or "lifetimes" not in simulated:
            raise ValueError(f"the timeline has no simulation records of graph {graph}")
        self.code = code
        self.base = measured["base"]
        self.forward_events = measured["forward_events"]
        self.events = measured["events"]
        self.steps = simulated["steps"]
        self.lifetimes = [[Lifetime(name, nbytes, alloc, free, MemoryCategory(category), rule, Freed[freed])
                           for name, category, rule, alloc, free, freed, nbytes in records]
                          for records in simulated["lifetimes"]]
        self.index = [{name: t for t, name in enumerate(names)} for names in self.steps]
        self.simulated = [[during for _, during, _ in peak_sweep(records, len(names)).timeline]
                          for records, names in zip(self.lifetimes, self.steps)]
        # the bytes allocated after each event
        self.live = plots.measured_timeline_panel([(action, nbytes) for action, nbytes, _, _ in self.events],
                                                  self.base, "measured").totals

    def nodes_of(self, site: str) -> tuple[str | None, list[str]]:
        found = _SITE.match(site)
        if found is None or found.group(1) not in self.code:
            return None, []
        return source_nodes(self.code[found.group(1)], int(found.group(2)))

    def step_of(self, event: int) -> tuple[int, int] | None:
        """(graph part: 0 forward, 1 backward; its step) of the node the allocation at or last
        before ``event`` belongs to: the latest step among its source nodes the simulation has."""
        for j in range(event, -1, -1):
            action, _, _, site = self.events[j]
            if action != "alloc":
                continue
            part = 0 if j < self.forward_events else 1
            steps = [self.index[part][n] for n in self.nodes_of(site)[1] if n in self.index[part]]
            if steps:
                return part, max(steps)
        return None

    def highest(self, count: int, apart: int = 15) -> list[int]:
        """The events of the ``count`` highest measured moments, each ``apart`` events from the others."""
        chosen: list[int] = []
        for i in sorted(range(len(self.live)), key=lambda i: -self.live[i]):
            if all(abs(i - j) >= apart for j in chosen):
                chosen.append(i)
            if len(chosen) == count:
                break
        return chosen

    def measured_live(self, event: int) -> list[tuple[int, str, str | None, list[str]]]:
        """(bytes, F or B: allocated in forward or backward, buffer, source nodes) of every block
        the step allocated and still holds at ``event``, largest first."""
        return [(nbytes, "F" if j < self.forward_events else "B", *self.nodes_of(site))
                for nbytes, site, j in plots.allocator_live_at([tuple(e) for e in self.events], event)]

    def simulated_live(self, part: int, step: int) -> list[tuple[int, str, str, str]]:
        """(bytes, allocation, category, rule) of what the simulation holds while ``step`` runs."""
        from sac_compiler.passes.memory_model import live_by

        live = live_by(self.lifetimes[part], 3 * step + 1, key=lambda life: (life.name, life.category.value, life.rule))
        return sorted(((size, *key) for key, size in live.items() if size), key=lambda row: -row[0])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("timeline", type=Path, help="a cell's timeline JSON (zoo_matrix.py --timeline)")
    parser.add_argument("--code", type=Path, required=True,
                        help="a folder with Inductor's generated code of the cell (its .py files)")
    parser.add_argument("--graph", type=int, default=0, help="the sac graph of the cell to compare (default: 0)")
    parser.add_argument("--top", type=int, default=6, help="how many of the highest measured moments (default: 6)")
    parser.add_argument("--live", type=int, nargs="*", default=[],
                        help="events at which to list what each side holds (blocks of 4 MB and more)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    code = {p.name: p.read_text().splitlines() for p in sorted(args.code.glob("*.py"))}
    if not code:
        raise SystemExit(f"--code {args.code}: no .py files there; keep Inductor's generated code of the cell")
    comparison = Comparison(json.loads(args.timeline.read_text()), code, args.graph)
    print("event      measured B   simulated B at its node   ratio  node")
    for i in comparison.highest(args.top):
        where = comparison.step_of(i)
        if where is None:
            print(f"{i:5d} {comparison.live[i]:15,}   (no node found)")
            continue
        part, step = where
        simulated = comparison.simulated[part][step]
        print(f"{i:5d} {comparison.live[i]:15,} {simulated:15,}   {comparison.live[i] / simulated:5.3f}  "
              f"{('forward', 'backward')[part]} {comparison.steps[part][step]}")
    for i in args.live:
        where = comparison.step_of(i)
        print(f"\nevent {i}: measured {comparison.live[i]:,} (over what was held before the step: "
              f"{comparison.live[i] - comparison.base:,})")
        for nbytes, part, buf, nodes in comparison.measured_live(i):
            if nbytes >= 4_000_000:
                print(f"  measured  {nbytes:13,} {part} {buf} {','.join(nodes[:4])}")
        if where is not None:
            part, step = where
            print(f"simulated at {comparison.steps[part][step]}: {comparison.simulated[part][step]:,}")
            for nbytes, name, category, rule in comparison.simulated_live(part, step):
                if nbytes >= 4_000_000:
                    print(f"  simulated {nbytes:13,} {name} ({category}, {rule})")


if __name__ == "__main__":
    main()
