"""The backend's plans for the zoo's models, made offline, and what making them took.

Each model (full size unless ``--size small``) is traced on ``meta`` fake tensors for a CUDA device spec (nothing runs, no GPU needed)
and planned as the backend plans at compile time (``sac_compiler.planner.plan_partitioned``):
planned on the joint graph, partitioned by PyTorch's partitioner, and planned again while the
partitioned graphs peak over the budget. For each model and ``memory_budget`` fraction it prints
the budget, the first plan's joint-graph prediction against its partitioned graphs' simulated
peak, how many plans were partitioned, the final plan's partitioned peak and recompute time, and
the planning time (what ``GraphPlanResult.planning_s`` counts: all but the one partition plain
``torch.compile`` makes too) with its solver calls::

    python benchmarks/plan_offline.py --models t5 gpt2 --fractions 0.5 0.75 --out plans.json

With a CUDA build of torch (no GPU needed), ``--order auto`` checks the plans as
``partition_order="auto"`` does on a GPU (in graph order, then the plan those checks end on with
the backward in the order Inductor schedules it for CUDA), ``--order inductor`` checks every plan
in that order, and ``--replay-cuda`` gives the final plan's peak in that order (what the default
check, in graph order, accepted)::

    python benchmarks/plan_offline.py --models t5 --fractions 0.5 --replay-cuda

``--full-ac`` also simulates each model with every repeated block checkpointed (the matrix's
``full_ac`` anchor), partitioned as ``torch.compile`` partitions it: where the planner's lowest
plan (``--fractions 0``) stands against full checkpointing, without a GPU::

    python benchmarks/plan_offline.py --models gpt2 --fractions 0 --full-ac

The memory figures are simulations, not measurements; the times are this machine's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
GiB = 2**30
log = logging.getLogger(__name__)


def plan_model(name: str, fraction: float, spec: str, loss_inside: bool = True, size: str = "full",
               order: str = "graph", replay_cuda: bool = False) -> dict[str, Any]:
    """One zoo model at ``size``, planned offline at ``fraction`` for the device ``spec``.

    ``order``: the backend's ``partition_order``; "auto" and "inductor" check plans with the
    backward in the order Inductor schedules it for CUDA as they do on a GPU (each such partition
    recorded and replayed on fake CUDA tensors). ``replay_cuda``: the final plan's
    partitioned graphs are also replayed in that order (``partitioned_cuda``). Both lower graphs
    for CUDA here (``benchmarks/cuda_lowering.py``): they need a CUDA build of torch, no GPU."""
    from benchmarks.zoo import ZOO
    from sac_compiler.config import SACConfig
    from sac_compiler.plan_graph import BudgetError
    from sac_compiler.planner import plan_partitioned

    entry = ZOO[name]
    inside = loss_inside and entry.loss_inside
    start = time.perf_counter()
    graph = _capture(name, loss_inside, size)
    capture_s = time.perf_counter() - start
    row: dict[str, Any] = dict(model=name, size=size, graph="loss_inside" if inside else "model", fraction=fraction,
                               spec=spec, nodes=len(graph.gm.graph.nodes), capture_s=round(capture_s, 2),
                               torch=torch.__version__)
    lowering_s: list[float] = []
    cuda_checks = order != "graph"
    if cuda_checks or replay_cuda:
        from benchmarks.cuda_lowering import answer_as_h200

        answer_as_h200()  # after the capture: Dynamo's tracing does not run under it
        row["partition_order"] = order
    start = time.perf_counter()
    partitions: list[Any] = []
    try:
        with _checks_in_cuda_order(lowering_s) if cuda_checks else contextlib.nullcontext(), _kept(partitions):
            result = plan_partitioned(graph, SACConfig.from_options({"memory_budget": fraction, "device": spec,
                                                                     "partition_order": order}))
    except BudgetError as error:
        return {**row, "error": str(error), "wall_s": round(time.perf_counter() - start, 2)}
    wall_s = round(time.perf_counter() - start, 2)
    if replay_cuda:
        try:
            row["partitioned_cuda"] = _in_cuda_order(result, *partitions[-1]).peak_bytes
        except ValueError as error:  # a partition a record cannot hold (a saved RNG state's op)
            row["partitioned_cuda_error"] = str(error)
    checks = result.partition_checks
    return {
        **row,
        "budget_bytes": result.budget_bytes,
        "first_predicted": checks[0][0] if checks else result.predicted_peak,
        "first_partitioned": checks[0][1] if checks else result.step_peak_bytes,
        "plans_partitioned": len(checks),
        "checks": [list(check) for check in checks],  # each plan partitioned: (joint prediction, checked peak)
        "predicted": result.predicted_peak,
        "partitioned": result.step_peak_bytes,
        "recompute_ms": round(result.plan.recompute_ms, 4),
        "recomputed_values": len(result.plan.recompute),
        "status": result.plan.status,
        "slack_taken": result.slack_taken,
        "planning_s": round(result.planning_s, 2),
        "solves": len(result.solve_times_s),
        "solve_s": round(sum(result.solve_times_s), 2),
        "lowering_s": [round(t, 1) for t in lowering_s],
        "wall_s": wall_s,
    }


def _capture(name: str, loss_inside: bool, size: str, checkpointed: bool = False) -> Any:
    """The zoo model's joint graph, traced on meta for CUDA: with its loss inside where it has one
    and ``loss_inside``; ``checkpointed``: every repeated block under ``torch.utils.checkpoint``."""
    from benchmarks.zoo import ZOO
    from sac_compiler.capture import capture_joint

    entry = ZOO[name]
    torch._dynamo.reset()
    model = entry.model(size, device="meta")
    batch = entry.batch(size, device="meta")
    if checkpointed:
        entry.checkpoint_blocks(model)
    if loss_inside and entry.loss_inside:
        return capture_joint(lambda *xs: model(*xs, targets=batch.target), *batch.inputs, target_device="cuda",
                             decompose=True)
    return capture_joint(model, *batch.inputs, target_device="cuda", decompose=True)


def full_ac_peak(name: str, loss_inside: bool = True, size: str = "full") -> dict[str, Any]:
    """The zoo model with every repeated block checkpointed (``full_ac``, as the matrix's anchor),
    traced on meta for CUDA, partitioned as ``torch.compile`` partitions it (PyTorch's min-cut
    partitioner, which recomputes what ``torch.utils.checkpoint`` tagged), and simulated by the
    same partitioned simulation the plans are checked with: its peak beside the planner's lowest.
    A simulation, not a measurement."""
    from sac_compiler.passes import annotate_modules, annotate_ops
    from sac_compiler.passes.annotate_memory import simulate_partitioned
    from sac_compiler.passes.record import Side, get_record
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._guards import TracingContext, detect_fake_mode, tracing

    from sac_compiler.capture import InputKind

    graph = _capture(name, loss_inside, size, checkpointed=True)
    tagged = sum(1 for n in graph.gm.graph.nodes if n.meta.get("recompute") is not None)
    mode = detect_fake_mode([n.meta.get("val") for n in graph.gm.graph.find_nodes(op="placeholder")])
    with tracing(TracingContext(mode)):  # the partitioner saves the RNG state of recomputed random ops
        annotate_modules(graph.gm, graph.root_name)
        annotate_ops(graph.gm)
        forward = frozenset(n.name for n in graph.gm.graph.nodes
                            if n.op == "call_function" and get_record(n).side == Side.FORWARD)
        fw, bw = min_cut_rematerialization_partition(graph.gm, [], num_fwd_outputs=graph.num_fwd_outputs)
    static = {i.name for i in graph.inputs if i.kind != InputKind.TANGENT}
    peak = simulate_partitioned(fw, bw, graph.num_fwd_outputs, static, target_device=graph.target_device,
                                fused_pointwise=True, forward_names=forward)
    return {"full_ac_partitioned": peak.peak_bytes, "full_ac_peak_at": f"{peak.peak_graph}: {peak.peak_node}",
            "full_ac_tagged": tagged}


def _in_cuda_order(result: Any, fw: Any, bw: Any) -> Any:
    """The partitioned simulation of ``fw`` and ``bw`` with the backward in Inductor's CUDA order:
    the partition recorded and replayed on fake CUDA tensors (the graphs' own are meta)."""
    from torch._guards import tracing
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from sac_compiler.partition_record import record_partition, replay_partition

    record = record_partition(result, fw, bw)
    with tracing(None), unset_fake_temporarily():  # outside the compile's fake mode and tracing context
        return replay_partition(record, inductor_order=True, on_target=True)


@contextlib.contextmanager
def _kept(partitions: list[Any]) -> Iterator[None]:
    """Within the block, the partitioned graphs (forward, backward) the backend returns are kept."""
    from sac_compiler.backend import SACPartitioner

    own = SACPartitioner.__call__

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        partitions.append(own(self, *args, **kwargs))
        return partitions[-1]

    SACPartitioner.__call__ = call  # type: ignore[method-assign]
    try:
        yield
    finally:
        SACPartitioner.__call__ = own  # type: ignore[method-assign]


@contextlib.contextmanager
def _checks_in_cuda_order(lowering_s: list[float]) -> Iterator[None]:
    """Within the block, the backend checks plans in Inductor's CUDA order where its
    ``partition_order`` says so on a GPU ("inductor" every plan, "auto" the plan its graph-order
    checks end on): the graphs here are on meta tensors, which no GPU lowers, so the check records
    each partition and replays it on fake CUDA tensors. ``lowering_s``: each such check's time."""
    from sac_compiler.plan_graph import GraphPlanResult

    own_simulate, own_resolved = GraphPlanResult.simulate, GraphPlanResult.resolved_order

    def resolved(self: Any, bw: Any, order: str | None = None) -> str:
        order = order or self.partition_order
        return "inductor" if order in ("auto", "inductor") and self.fused_pointwise else "graph"

    def simulate(self: Any, fw: Any, bw: Any, order: str | None = None, scheduled: Any = None) -> Any:
        if scheduled is not None:  # a schedule a compile read: no compile here reads one
            return own_simulate(self, fw, bw, order, scheduled)
        if resolved(self, bw, order) != "inductor":
            return own_simulate(self, fw, bw, "graph")
        start = time.perf_counter()
        try:
            peak = _in_cuda_order(self, fw, bw)
        except ValueError as error:  # a partition a record cannot hold: checked in graph order
            log.warning("plan_offline: a partition checked in graph order: %s", error)
            return own_simulate(self, fw, bw, "graph")
        lowering_s.append(time.perf_counter() - start)
        return peak

    GraphPlanResult.simulate = simulate  # type: ignore[method-assign]
    GraphPlanResult.resolved_order = resolved  # type: ignore[method-assign]
    try:
        yield
    finally:
        GraphPlanResult.simulate = own_simulate  # type: ignore[method-assign]
        GraphPlanResult.resolved_order = own_resolved  # type: ignore[method-assign]


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


def main(argv: list[str] | None = None) -> None:
    sys.path.insert(0, str(ROOT))
    from tabulate import tabulate

    from benchmarks.zoo import ZOO

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(ZOO), choices=list(ZOO), help="zoo models (default: all)")
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.75, 0.5],
                        help="memory_budget fractions (default: 0.75 0.5)")
    parser.add_argument("--size", default="full", choices=("small", "full"), help="zoo size (default: full)")
    parser.add_argument("--spec", default="H200", help="device spec the plans are for (default: H200)")
    parser.add_argument("--model-only", action="store_true",
                        help="plan the model's own graph even where its loss can be computed inside (default: off)")
    parser.add_argument("--order", default="graph", choices=("graph", "auto", "inductor"),
                        help="the backend's partition_order, its checks in Inductor's CUDA order made as on a GPU "
                             "(needs a CUDA build of torch, no GPU; default: graph)")
    parser.add_argument("--checks-in-cuda-order", action="store_const", dest="order", const="inductor",
                        help="--order inductor: every plan checked in Inductor's CUDA order")
    parser.add_argument("--replay-cuda", action="store_true",
                        help="also replay the final plan's partitioned graphs in Inductor's CUDA order "
                             "(needs a CUDA build of torch, no GPU; default: off)")
    parser.add_argument("--full-ac", action="store_true",
                        help="also simulate each model with every block checkpointed (the matrix's full_ac anchor), "
                             "partitioned as torch.compile does, beside the plans (default: off)")
    parser.add_argument("--out", help="write the rows as JSON here (default: none)")
    args = parser.parse_args(argv)
    for fraction in args.fractions:
        if not 0.0 <= fraction <= 1.0:
            parser.error(f"--fractions {fraction:g}: give fractions in [0, 1]")

    rows = []
    for name in args.models:
        full_ac = full_ac_peak(name, loss_inside=not args.model_only, size=args.size) if args.full_ac else {}
        for fraction in args.fractions:
            row = plan_model(name, fraction, args.spec, loss_inside=not args.model_only, size=args.size,
                             order=args.order, replay_cuda=args.replay_cuda)
            row.update(full_ac)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    table = [(r["model"], f"{r['fraction']:g}", _gib(r.get("budget_bytes")),
              f"{_gib(r.get('first_predicted'))} / {_gib(r.get('first_partitioned'))}", r.get("plans_partitioned", "-"),
              _gib(r.get("partitioned")), _gib(r.get("partitioned_cuda")), _gib(r.get("full_ac_partitioned")),
              r.get("recompute_ms", "-"), r.get("planning_s", "-"), r.get("solves", "-"),
              r.get("error", "")[:60]) for r in rows]
    print(tabulate(table, headers=["model", "fraction", "budget GiB", "first plan: joint / partitioned GiB",
                                   "plans", "final partitioned GiB", "in CUDA order GiB", "full_ac GiB", "recompute ms",
                                   "planning s", "solves", "error"],
                   disable_numparse=True))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
