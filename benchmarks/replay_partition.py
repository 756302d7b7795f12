"""Re-simulate recorded partitions with the memory model of this checkout.

``benchmarks/compare_strategies.py --dump-partitions`` writes every sac graph's partition
(``OUT/partitions/*.json``) on the machine it measures; this script rebuilds those graphs on CPU
fake tensors, runs the partitioned simulation on them and prints, per file, the peak recorded
then and the peak simulated now, both over the graph's parameters and inputs and the memory held
outside it (the "extra peak" the benchmark measures). ``--timeline`` also prints the backward's
live bytes node by node, where they change by at least ``--step-mib``.

Run from the repository root: ``python benchmarks/replay_partition.py OUT/partitions/*.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sac_compiler.partition_record import replay_partition  # noqa: E402

GIB = 2**30


def replay_files(paths: Sequence[Path], timelines: dict[Path, list[tuple[str, float]]] | None = None,
                 ) -> list[tuple[str, float | None, float, str]]:
    """(file, recorded extra peak GiB, replayed extra peak GiB, where it is) per file; ``timelines``
    receives each file's backward timeline (node, MiB over the same base)."""
    rows = []
    for path in paths:
        record = json.loads(path.read_text())
        base = record["static_bytes"] + record["outside_bytes"]
        recorded = record.get("partitioned")
        graphs: dict[str, list[tuple[str, int]]] = {}
        peak = replay_partition(record, graphs)
        if timelines is not None:
            timelines[path] = [(name, (live - base) / 2**20) for name, live in graphs.get("backward", [])]
        rows.append((path.name, None if recorded is None else (recorded["peak_bytes"] - base) / GIB,
                     (peak.peak_bytes - base) / GIB, f"{peak.peak_graph}: {peak.peak_node}"))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", nargs="+", type=Path, help="partition records (JSON)")
    parser.add_argument("--timeline", action="store_true", help="print each backward's live bytes per node")
    parser.add_argument("--step-mib", type=float, default=1.0,
                        help="with --timeline, print a node where the live bytes change by this much (default 1)")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.records if not p.is_file()]
    if missing:
        parser.error(f"no such record: {', '.join(missing)} (write them with compare_strategies.py --dump-partitions)")
    timelines: dict[Path, list[tuple[str, float]]] | None = {} if args.timeline else None
    rows = replay_files(args.records, timelines)
    print(tabulate(rows, headers=["record", "recorded extra GiB", "replayed extra GiB", "peak at"],
                   floatfmt=".4f", missingval="-"))
    for path, timeline in (timelines or {}).items():
        print(f"\n{path.name}: backward, MiB over parameters, inputs and outside memory")
        previous = None
        for name, mib in timeline:
            if previous is None or abs(mib - previous) >= args.step_mib:
                print(f"  {name:<48} {mib:10.1f}")
                previous = mib
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
