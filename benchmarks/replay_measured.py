"""Partitions recorded on a GPU, simulated again here, against the peaks the GPU measured.

``benchmarks/recorded/partitions_h200/`` holds the forward and backward graphs the backend
partitioned on an H200 (``benchmarks/zoo_matrix.py --dump-partitions``) and, in ``measured.json``,
the peak each step measured there and the memory allocated before it. This script replays each
partition through the memory model of the code at hand (``sac_compiler.partition_record``) on CPU
and prints the simulated extra peak (over parameters and optimizer state) against the measured
one::

    python benchmarks/replay_measured.py
    python benchmarks/replay_measured.py --folder benchmarks/recorded/partitions_h200_d390828
    python benchmarks/replay_measured.py --folder benchmarks/recorded/partitions_h200_7047736 --inductor-order
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECORDED = ROOT / "benchmarks" / "recorded" / "partitions_h200"


def load(name: str, folder: Path = RECORDED) -> dict[str, Any]:
    """One recorded partition by its file name without ``.json.gz``."""
    with gzip.open(folder / f"{name}.json.gz", "rt") as f:
        return json.load(f)


def measured(folder: Path = RECORDED) -> dict[str, Any]:
    """``measured.json``: the device, torch version and commit, and each cell's measured peak."""
    return json.loads((folder / "measured.json").read_text())


def replay(name: str, folder: Path = RECORDED, inductor_order: bool = False, on_target: bool = False,
           reorder: bool | None = None) -> dict[str, Any]:
    """The simulated and measured extra peak of one recorded partition, in bytes
    (``inductor_order``: the graphs simulated in the order Inductor schedules them; ``on_target``:
    lowered for the recorded GPU rather than for the CPU; ``reorder``: Inductor's reordering for
    peak memory on or off, None: as recorded)."""
    from sac_compiler.partition_record import replay_partition

    record = load(name, folder)
    if reorder is not None:
        record["reorder_for_peak_memory"] = reorder
    cell = measured(folder)["cells"][name]
    peak = replay_partition(record, inductor_order=inductor_order, on_target=on_target)
    simulated = peak.peak_bytes - record["static_bytes"] - record["extra_static_bytes"]
    actual = cell["peak_bytes"] - cell["static_bytes"]
    return {"name": name, "simulated_extra": simulated, "measured_extra": actual,
            "ratio": simulated / actual, "peak_graph": peak.peak_graph, "peak_node": peak.peak_node,
            "recompute": len(record["recompute"] or [])}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the rows as JSON here (default: none)")
    parser.add_argument("--folder", type=Path, default=RECORDED,
                        help=f"recorded partitions and their measured.json (default: {RECORDED.relative_to(ROOT)})")
    parser.add_argument("--inductor-order", action="store_true",
                        help="simulate the graphs in the order Inductor's scheduler runs them (lowers each on CPU)")
    parser.add_argument("--reorder", choices=("recorded", "on", "off"), default="recorded",
                        help="with --inductor-order: Inductor's reordering for peak memory as the record says the "
                             "graphs were compiled (records before the option: on), or on, or off (default: recorded)")
    parser.add_argument("--on-target", action="store_true",
                        help="with --inductor-order: lower each graph for the GPU it was recorded on (Inductor's "
                             "fusion and reordering for peak memory differ between CPU and CUDA; needs a GPU)")
    args = parser.parse_args(argv)
    if args.on_target and not args.inductor_order:
        parser.error("--on-target lowers the graphs for Inductor's order: give --inductor-order with it")
    sys.path.insert(0, str(ROOT))
    info = measured(args.folder)
    reorder = None if args.reorder == "recorded" else args.reorder == "on"
    rows = []
    for name in sorted(info["cells"]):
        try:
            rows.append(replay(name, args.folder, args.inductor_order, args.on_target, reorder))
        except Exception as error:  # noqa: BLE001 - printed in its row; the other records go on
            print(f"{name}: not replayed: {type(error).__name__}: {str(error).splitlines()[0][:200]}", file=sys.stderr)
    gib = 2**30
    print(f"recorded on {info['device']}, torch {info['torch']}, commit {info['commit']}")
    print(f"{'partition':40s} {'recomputed':>10s} {'simulated GiB':>14s} {'measured GiB':>13s} {'ratio':>7s}")
    for r in rows:
        print(f"{r['name']:40s} {r['recompute']:10d} {r['simulated_extra'] / gib:14.3f} "
              f"{r['measured_extra'] / gib:13.3f} {r['ratio']:7.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
