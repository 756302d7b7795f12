"""Inductor's own peak estimate of the recorded GPU partitions, beside the simulation's and the
measured peak.

For each partition in ``benchmarks/recorded/partitions_h200/`` the forward and the backward graph
are lowered by Inductor on CPU fake tensors up to its scheduler (no kernel is generated or
compiled: a post-fusion hook reads the scheduled nodes and stops the compile), and
``torch._inductor.memory``'s estimate of their peak is read: the buffers each graph allocates,
the backward's saved inputs included, in the order Inductor schedules them. Printed in GiB over
the parameters and the optimizer state, as ``benchmarks/replay_measured.py`` prints the
simulation's::

    python benchmarks/inductor_estimates.py

The estimate is made before code generation, so it does not follow the in-place writes Inductor
decides there (a kernel writing into a dying input of its size).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def inductor_peak(gm: Any, backward: bool, steps: list[tuple[list[str], int]] | None = None) -> int:
    """``torch._inductor.memory``'s peak estimate of one graph, in bytes, as Inductor schedules it
    (its placeholders carry fake tensors). ``steps`` receives, per scheduled node, the FX nodes it
    comes from and the estimated live bytes while it runs."""
    from torch._inductor.memory import prepare_planning_info
    from torch._inductor.virtualized import V
    from torch.utils._ordered_set import OrderedSet

    from sac_compiler.inductor_order import lower_to_schedule, node_origins

    found: dict[str, int] = {}

    def read(nodes: list[Any]) -> None:
        scheduler = V.graph.scheduler
        outputs = OrderedSet(V.graph.get_output_names())
        peak, _ = prepare_planning_info(nodes, scheduler.name_to_buf, scheduler.name_to_fused_node,
                                        OrderedSet(V.graph.graph_inputs.keys()), outputs)  # _: the freeable inputs
        found["peak"] = peak
        if steps is not None:
            from torch._inductor.memory import estimate_peak_memory

            _, live = estimate_peak_memory(nodes, _, outputs)
            steps.extend((node_origins(node), nbytes) for node, nbytes in zip(nodes, live))

    lower_to_schedule(gm, backward, read)
    return found["peak"]


def estimate(name: str, folder: Path | None = None) -> dict[str, Any]:
    """Inductor's estimate for one recorded partition, with the simulation's and the measurement."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from benchmarks.replay_measured import RECORDED, load, measured, replay
    from sac_compiler.partition_record import _module

    folder = folder or RECORDED
    record = load(name, folder)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        fw = inductor_peak(_module(record["fw"], mode), backward=False)
        bw = inductor_peak(_module(record["bw"], mode), backward=True)
    row = replay(name, folder)
    cell = measured(folder)["cells"][name]
    actual = cell["peak_bytes"] - cell["static_bytes"]
    return {**row, "inductor_forward": fw, "inductor_backward": bw, "inductor_extra": max(fw, bw),
            "inductor_ratio": max(fw, bw) / actual}


def backward_timelines(name: str, folder: Path | None = None) -> list[tuple[str, float, float]]:
    """For one recorded partition's backward: per node of the simulation's order that ends one of
    Inductor's scheduled nodes, (the node, Inductor's estimated live GiB, the simulation's), both
    over the parameters and the optimizer state, in Inductor's order."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from benchmarks.replay_measured import RECORDED, load
    from sac_compiler.partition_record import _module, replay_partition

    record = load(name, folder or RECORDED)
    timelines: dict[str, list[tuple[str, int]]] = {}
    replay_partition({**record, "extra_static_bytes": 0}, timelines)
    simulated = dict(timelines["backward"])
    position = {node: i for i, (node, _) in enumerate(timelines["backward"])}
    steps: list[tuple[list[str], int]] = []
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        inductor_peak(_module(record["bw"], mode), backward=True, steps=steps)
    gib, static = 2**30, record["static_bytes"]
    rows = []
    for origins, nbytes in steps:
        known = [o for o in origins if o in position]
        if known:
            last = max(known, key=position.__getitem__)
            rows.append((last, nbytes / gib, (simulated[last] - static) / gib))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the rows as JSON here (default: none)")
    parser.add_argument("--timeline", metavar="PARTITION", default=None,
                        help="instead, print one recorded partition's backward step by step (a name in "
                             "measured.json): Inductor's estimated live GiB against the simulation's, at every "
                             "step where their difference moves by more than 0.1 GiB (default: none)")
    parser.add_argument("--folder", type=Path, default=None,
                        help="recorded partitions and their measured.json (default: benchmarks/recorded/partitions_h200)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from benchmarks.replay_measured import RECORDED, measured

    folder = args.folder or RECORDED
    if args.timeline is not None:
        if args.timeline not in measured(folder)["cells"]:
            parser.error(f"--timeline {args.timeline}: not a recorded partition; one of {sorted(measured(folder)['cells'])}")
        shown = None
        for node, inductor, simulated in backward_timelines(args.timeline, folder):
            if shown is None or abs((inductor - simulated) - shown) > 0.1:
                print(f"{node:50s} inductor {inductor:7.3f} simulated {simulated:7.3f} ({inductor - simulated:+.3f})")
                shown = inductor - simulated
        return

    info = measured(folder)
    rows = []
    for name in sorted(info["cells"]):
        rows.append(estimate(name, folder))
        print(f"{name}: {rows[-1]['inductor_ratio']:.3f}", file=sys.stderr, flush=True)  # progress
    gib = 2**30
    print(f"recorded on {info['device']}, torch {info['torch']}, commit {info['commit']}")
    print(f"{'partition':36s} {'measured':>9s} {'simulated':>10s} {'ratio':>6s} {'inductor':>9s} {'ratio':>6s}")
    for r in rows:
        print(f"{r['name']:36s} {r['measured_extra'] / gib:9.3f} {r['simulated_extra'] / gib:10.3f} "
              f"{r['ratio']:6.3f} {r['inductor_extra'] / gib:9.3f} {r['inductor_ratio']:6.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
