"""Every figure the memory model produces on a fixed set of small models, to check a refactoring of
``passes/annotate_memory.py`` changes none of them.

For each model (the zoo at its small size, the Llama of ``compare_strategies``, the models the
tests share) captured for a CPU and a CUDA target (traced on CPU), it records:

* the joint simulation (``annotate_memory``) without and with Inductor's fusion, with the user's
  checkpoints and with two recompute sets (every forward value backward reads, and every other
  one): peak, its node and categories, end of forward, the per-step live bytes, the per-module
  snapshots, and the per-node records the pass writes;
* what the backend's partitioner (``SACPartitioner``, PyTorch's min-cut partition inside) decides
  for no budget, a budget of 0.5 and one of 0.0, under ``compiler="inductor"`` and ``"eager"``:
  budget, predicted and baseline peaks, the recomputed values, and the partitioned simulation's
  peak with its per-node timelines (or the budget error's message).

``--write FILE`` saves the figures as JSON; ``--check FILE`` computes them again and reports every
figure that differs (exit status 1 if any does). ``--only NAME ...`` restricts the models,
``--joint-only`` leaves out the plans (the slow part). The planner's solver breaks ties by the order
of its variables, which follows string hashing: run both with the same ``PYTHONHASHSEED``.

One figure was counted otherwise before the simulations became lifetime records: the split by
category at the joint simulation's peak after a rebuilt value took over a kept value's buffer
(``dying_input_reuse``); ``--check`` compares that split as it was counted then (see
``_legacy_peak_by_category``) and records the present one as ``peak_by_category_now``.
Run from the repository root: ``python -m benchmarks.memory_figures --write figures.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def _zoo_case(name: str, dtype: torch.dtype | None = None, loss_inside: bool = False) -> Callable[[], tuple]:
    def make() -> tuple:
        from benchmarks.zoo import ZOO

        entry = ZOO[name]
        model = entry.model("small", seed=0, dtype=dtype)
        batch = entry.batch("small", seed=0)
        if loss_inside:
            return (lambda *inputs: model(*inputs, targets=batch.target)), batch.inputs, model
        return model, batch.inputs, model
    return make


def _llama_case() -> tuple:
    from benchmarks.compare_strategies import Llama, LlamaArgs

    args = LlamaArgs(layers=2, dim=64, heads=4, ffn=176, vocab=256, batch=2, seq=32)
    torch.manual_seed(0)
    model = Llama(args).to(torch.bfloat16)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq))
    return (lambda t: model(t).float().sum()), (tokens,), model


def _models_case(build: Callable[[], nn.Module], inputs: Callable[[], tuple]) -> Callable[[], tuple]:
    def make() -> tuple:
        torch.manual_seed(0)
        model = build()
        return model, inputs(), model
    return make


def _cases() -> dict[str, Callable[[], tuple]]:
    from benchmarks.zoo import ZOO
    from tests import models as m

    cases: dict[str, Callable[[], tuple]] = {f"zoo-{name}": _zoo_case(name) for name in sorted(ZOO)}
    cases["zoo-gpt2-loss-inside"] = _zoo_case("gpt2", loss_inside=True)
    cases["zoo-gpt2-bf16"] = _zoo_case("gpt2", dtype=torch.bfloat16)
    cases["llama-bf16-loss"] = _llama_case
    cases.update({
        "checkpointed-linears": _models_case(lambda: m.CheckpointedLinears(3, 64), lambda: (torch.randn(128, 64),)),
        "inplace-mlp": _models_case(lambda: nn.Sequential(*[m.InplaceMLP(32) for _ in range(3)]),
                                    lambda: (torch.randn(2048, 32),)),
        "dropout-mlp": _models_case(lambda: nn.Sequential(*[m.DropoutMLP(32, 0.3) for _ in range(3)]),
                                    lambda: (torch.randn(2048, 32),)),
        "tied-linear": _models_case(lambda: m.TiedLinear(64), lambda: (torch.randn(256, 64),)),
        "nested": _models_case(lambda: m.Nested(32, 3), lambda: (torch.randn(2048, 32),)),
        "tiny-transformer": _models_case(lambda: m.tiny_transformer(2, 0.1), lambda: (torch.randint(0, 64, (64, 16)),)),
        "checkpointed-mlp": _models_case(lambda: m.CheckpointedMLP(4, 128, use_ac=True), lambda: (torch.randn(256, 128),)),
        "linear-relu-stack": _models_case(lambda: m.LinearReLUStack(4, 64), lambda: (torch.randn(512, 64),)),
        "shared-stack": _models_case(lambda: m.SharedStack(32, 4), lambda: (torch.randn(2048, 32),)),
        "batchnorm-net": _models_case(lambda: m.BatchNormNet(16), lambda: (torch.randn(8, 3, 16, 16),)),
    })
    return cases


def _legacy_peak_by_category(sim: Any) -> dict[Any, int] | None:
    """The split by category at the peak as the joint simulation counted it before its lifetime
    records (None where that is the split it gives now): a kept value whose buffer a rebuilt value
    takes over (the ``dying_input_reuse`` rule) was counted in its own category to the end, and the
    rebuilt value's bytes left their category when it was freed, having never entered it. The
    records count the buffer as the kept value's until the hand-over, then as the rebuilt one's."""
    lifetimes = getattr(sim, "lifetimes", ())
    names = [name for name, _ in sim.timeline]
    if not lifetimes or sim.peak_node not in names:
        return None
    point = 3 * names.index(sim.peak_node) + 1
    cats = dict(sim.peak_by_category)
    changed = False
    for life in lifetimes:
        if life.rule != "dying_input_reuse" or life.taken_by == "" or life.free_point > point:
            continue
        taker = next(t for t in lifetimes if t.name == life.taken_by and t.alloc_step == life.free_step + 1)
        cats[life.category] = cats.get(life.category, 0) + life.nbytes
        cats[taker.category] = cats.get(taker.category, 0) - life.nbytes
        changed = True
    return {c: b for c, b in cats.items() if b} if changed else None


def _simulation(sim: Any) -> dict[str, Any]:
    legacy = _legacy_peak_by_category(sim)
    by_category = legacy if legacy is not None else sim.peak_by_category
    extra = {}
    if legacy is not None:
        extra["peak_by_category_now"] = {c.value: b for c, b in sorted(sim.peak_by_category.items(),
                                                                        key=lambda kv: kv[0].value)}
    return {
        **extra,
        "peak_bytes": sim.peak_bytes,
        "peak_node": sim.peak_node,
        "peak_by_category": {c.value: b for c, b in sorted(by_category.items(), key=lambda kv: kv[0].value)},
        "end_of_forward_bytes": sim.end_of_forward_bytes,
        "static_bytes": sim.static_bytes,
        "first_backward": sim.first_backward,
        "timeline": [list(t) for t in sim.timeline],
        "step_peaks": list(sim.step_peaks),
        "module_memory": {fqn: {"pre_fw": mm.pre_fw, "post_fw": mm.post_fw, "peak_fw": mm.peak_fw,
                                "pre_bw": mm.pre_bw, "post_bw": mm.post_bw, "peak_bw": mm.peak_bw,
                                "views": mm.views}
                          for fqn, mm in sorted(sim.module_memory.items())},
        "optimizer_state_bytes": sim.optimizer_state_bytes,
        "optimizer_step_peak_bytes": sim.optimizer_step_peak_bytes,
        "snapshot_current": sim.snapshot("current"),
    }


def _joint_figures(make: Callable[[], tuple], device: str) -> dict[str, Any]:
    from sac_compiler.passes import (
        annotate_memory,
        annotate_modules,
        annotate_ops,
        get_record,
    )
    from sac_compiler.passes.record import Side

    from sac_compiler import capture_joint

    fn, inputs, model = make()
    graph = capture_joint(fn, *inputs, target_device=device)
    gm = graph.gm
    annotate_modules(gm, graph.root_name)
    annotate_ops(gm, graph.source_gm, graph.num_fwd_outputs if graph.has_backward else None)
    out: dict[str, Any] = {}
    out["annotated"] = _simulation(annotate_memory(gm, target_device=device, num_fwd_outputs=graph.num_fwd_outputs))
    out["records"] = {n.name: [get_record(n).nbytes, get_record(n).alloc_bytes, get_record(n).storage_owner,
                               None if get_record(n).category is None else get_record(n).category.value]
                      for n in gm.graph.nodes if n.op != "output"}
    out["annotated_adam"] = _simulation(annotate_memory(
        gm, target_device=device, num_fwd_outputs=graph.num_fwd_outputs,
        optimizer=torch.optim.Adam(model.parameters()), annotate=False))
    nodes = list(gm.graph.nodes)
    forward = [n for n in nodes if n.op == "call_function" and get_record(n).side == Side.FORWARD
               and get_record(n).storage_owner == n.name]
    read_in_backward = [n.name for n in forward if any(get_record(u).side == Side.BACKWARD for u in n.users)]
    sets = {"user": None, "all-saved": set(read_in_backward), "every-other": set(read_in_backward[::2]),
            "all-forward": {n.name for n in forward}}
    for fused in (False, True):
        for label, recomputed in sets.items():
            sim = annotate_memory(gm, target_device=device, num_fwd_outputs=graph.num_fwd_outputs,
                                  fused_pointwise=fused, recomputed=None if recomputed is None else set(recomputed),
                                  annotate=False)
            out[f"fused={fused} recomputed={label}"] = _simulation(sim)
    return out


def _plan_figures(make: Callable[[], tuple], device: str, compiler: str, budget: float | None) -> dict[str, Any]:
    from sac_compiler.passes.annotate_memory import simulate_partitioned

    from sac_compiler import capture_joint
    from sac_compiler import report as sac_report
    from sac_compiler.backend import SACPartitioner
    from sac_compiler.config import SACConfig
    from sac_compiler.plan_graph import BudgetError

    fn, inputs, _ = make()
    torch._dynamo.reset()
    graph = capture_joint(fn, *inputs, target_device=device)
    options: dict[str, Any] = {"compiler": compiler, "report": os.devnull}
    if budget is not None:
        options["memory_budget"] = budget
    partitioner = SACPartitioner(SACConfig.from_options(options), graph.source_gm)
    # the report (which makes the backend plan without a budget) is not a figure: not written
    report, sac_report.write_report = sac_report.write_report, lambda *args: None
    try:
        fw, bw = partitioner(graph.gm, [], num_fwd_outputs=graph.num_fwd_outputs)
    except BudgetError as error:
        return {"error": str(error)}
    finally:
        sac_report.write_report = report
    result = partitioner.last_result
    if result is None:
        return {"result": None}
    timelines: dict[str, list[tuple[str, int]]] = {}
    again = simulate_partitioned(fw, bw, **result.simulation_args(), timelines=timelines)
    p = result.partitioned
    return {
        "budget_bytes": result.budget_bytes,
        "predicted_peak": result.predicted_peak,
        "baseline_peak": result.baseline_peak,
        "fraction_range": None if result.fraction_range is None else list(result.fraction_range),
        "recompute": None if result.plan is None else sorted(result.plan.recompute),
        "saved_by_partition": result.saved_by_partition,
        "slack_taken": result.slack_taken,
        "partitioned": [p.peak_bytes, p.peak_graph, p.peak_node, p.saved_bytes, p.end_of_forward_bytes],
        "resimulated": [again.peak_bytes, again.peak_graph, again.peak_node, again.saved_bytes,
                        again.end_of_forward_bytes],
        "timelines": {k: [list(t) for t in v] for k, v in timelines.items()},
    }


def figures(only: list[str] | None = None, log: Callable[[str], None] = print, plans: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, make in _cases().items():
        if only and name not in only:
            continue
        start = time.perf_counter()
        entry: dict[str, Any] = {}
        for device in ("cpu", "cuda"):
            entry[f"joint {device}"] = _joint_figures(make, device)
            for compiler in (("inductor", "eager") if device == "cpu" else ("inductor",)) if plans else ():
                for budget in (None, 0.5, 0.0):
                    entry[f"plan {device} {compiler} {budget}"] = _plan_figures(make, device, compiler, budget)
        out[name] = entry
        log(f"{name}: {time.perf_counter() - start:.1f} s")
    return out


def _count(value: Any) -> int:
    if isinstance(value, dict):
        return sum(_count(v) for v in value.values())
    if isinstance(value, list):
        return sum(_count(v) for v in value)
    return 1


def _differences(old: Any, new: Any, where: str = "") -> list[str]:
    """Where ``new`` differs from ``old`` (figures ``old`` does not have are not compared)."""
    if isinstance(old, dict) and isinstance(new, dict):
        diffs = [f"{where}/{k}: missing" for k in sorted(set(old) - set(new))]
        for k in old:
            if k in new:
                diffs += _differences(old[k], new[k], f"{where}/{k}")
        return diffs
    if isinstance(old, list) and isinstance(new, list):
        if len(old) != len(new):
            return [f"{where}: length {len(old)} != {len(new)}"]
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in _differences(a, b, f"{where}[{i}]")]
    return [] if old == new else [f"{where}: {old!r} != {new!r}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", help="save the figures to this JSON file")
    group.add_argument("--check", help="compare the figures with this JSON file")
    parser.add_argument("--only", nargs="*", help="only these models")
    parser.add_argument("--joint-only", action="store_true", help="the joint simulations only (no plans: quick)")
    args = parser.parse_args(argv)

    def logging_fn(s: str) -> None:
        print(s, file=sys.stderr, flush=True)

    new = json.loads(json.dumps(figures(args.only, logging_fn, plans=not args.joint_only)))
    if args.write:
        with open(args.write, "w") as f:
            json.dump(new, f, sort_keys=True)
        print(f"{_count(new)} figures of {len(new)} models written to {args.write}")
        return 0
    with open(args.check) as f:
        old = json.load(f)
    if args.only:
        old = {k: v for k, v in old.items() if k in args.only}
    if args.joint_only:
        old = {k: {f: v for f, v in entry.items() if f.startswith("joint")} for k, entry in old.items()}
    diffs = _differences(old, new)
    for d in diffs[:200]:
        print(d)
    reconstructed = sum(1 for entry in new.values() for sims in entry.values() if isinstance(sims, dict)
                        for sim in sims.values() if isinstance(sim, dict) and "peak_by_category_now" in sim)
    print(f"{_count(old)} figures of {len(old)} models compared: {len(diffs)} differ "
          f"({reconstructed} simulations' split by category at the peak compared as counted before the "
          "lifetime records)")
    return 1 if diffs else 0


if __name__ == "__main__":
    raise SystemExit(main())
