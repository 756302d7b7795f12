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


class _Stop(Exception):
    """Raised by the post-fusion hook once the estimate is read: nothing is generated."""


def inductor_peak(gm: Any, backward: bool) -> int:
    """``torch._inductor.memory``'s peak estimate of one graph, in bytes, as Inductor schedules it
    (its placeholders carry fake tensors)."""
    from torch._inductor import config
    from torch._inductor.compile_fx import compile_fx_inner
    from torch._inductor.memory import prepare_planning_info
    from torch._inductor.virtualized import V
    from torch.utils._ordered_set import OrderedSet

    found: dict[str, int] = {}

    def hook(nodes: list[Any]) -> list[Any]:
        scheduler = V.graph.scheduler
        outputs = OrderedSet(V.graph.get_output_names())
        peak, _ = prepare_planning_info(nodes, scheduler.name_to_buf, scheduler.name_to_fused_node,
                                        OrderedSet(V.graph.graph_inputs.keys()), outputs)
        found["peak"] = peak
        raise _Stop

    inputs = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    with config.patch(_post_fusion_custom_pass=hook):
        try:
            compile_fx_inner(gm, inputs, is_backward=backward)
        except Exception as error:  # noqa: BLE001 - only the hook's own stop is expected
            cause: BaseException | None = error
            while cause is not None and not isinstance(cause, _Stop):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
    return found["peak"]


def estimate(name: str) -> dict[str, Any]:
    """Inductor's estimate for one recorded partition, with the simulation's and the measurement."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from benchmarks.replay_measured import load, measured, replay
    from sac_compiler.partition_record import _module

    record = load(name)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        fw = inductor_peak(_module(record["fw"], mode), backward=False)
        bw = inductor_peak(_module(record["bw"], mode), backward=True)
    row = replay(name)
    cell = measured()["cells"][name]
    actual = cell["peak_bytes"] - cell["static_bytes"]
    return {**row, "inductor_forward": fw, "inductor_backward": bw, "inductor_extra": max(fw, bw),
            "inductor_ratio": max(fw, bw) / actual}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the rows as JSON here (default: none)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from benchmarks.replay_measured import measured

    info = measured()
    rows = [estimate(name) for name in sorted(info["cells"])]
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
