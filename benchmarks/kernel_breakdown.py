"""Where a planned step's extra time goes: GPU kernel time per kernel, plain torch.compile against
``backend="sac"`` at memory budgets that are fractions of compile's measured extra peak.

For the models of ``compare_strategies.py`` (the loss ``model(tokens).float().sum()`` compiled with
the model): plain ``torch.compile`` is run first and its extra peak measured; then, for each
fraction F, ``backend="sac"`` with ``memory_budget`` = what is allocated before it + F x that extra
peak. After ``--warmup`` steps, ``--steps`` steps run under ``torch.profiler`` (CUDA activity only);
each kernel's time and launch count are averaged per step. The table lists the kernels whose time
grew most against compile (and those that shrank), and for every sac plan its estimated recompute
time and what it recomputes (per op of a repeated layer). Writes ``OUT/kernels.json``::

    python benchmarks/kernel_breakdown.py --model llama --fractions 0.75 0.5 --out bench-out/kernels
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_strategies as cs  # noqa: E402  (the models and the step of the strategy benchmark)

KernelTimes = dict[str, tuple[float, float]]  # kernel name -> (launches per step, ms per step)


def per_step(events: Iterable[Any], steps: int) -> KernelTimes:
    """Launches and device milliseconds per step of each kernel, from profiler ``key_averages()``."""
    out: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for e in events:
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = getattr(e, "self_cuda_time_total", 0)
        if us <= 0:
            continue
        out[e.key][0] += e.count / steps
        out[e.key][1] += us / 1e3 / steps
    return {k: (n, ms) for k, (n, ms) in out.items()}


def largest_changes(runs: dict[str, KernelTimes], base: str, against: str, top: int) -> list[tuple[str, float]]:
    """The ``top`` kernels whose time per step grew most from ``base`` to ``against``, then the
    ``top`` that shrank most: (name, change in ms)."""
    names = set(runs[base]) | set(runs[against])
    change = {k: runs[against].get(k, (0, 0.0))[1] - runs[base].get(k, (0, 0.0))[1] for k in names}
    grew = sorted((k for k in names if change[k] > 0), key=lambda k: -change[k])[:top]
    shrank = sorted((k for k in names if change[k] < 0), key=lambda k: change[k])[:top]
    return [(k, change[k]) for k in grew + shrank]


def recompute_summary(result: Any) -> list[tuple[str, str, int, float, float]]:
    """(module, op, values, MiB, estimated ms) of what a plan recomputes; modules of repeated
    layers are folded (``layers.3.attention`` -> ``attention``)."""
    from sac_compiler.passes.record import get_record

    by_name = {n.name: n for n in result.analysis.graph.gm.graph.nodes}
    rows: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0, 0.0, 0.0])
    for name in result.plan.recompute:
        rec = get_record(by_name[name])
        fqn = rec.module_fqn or "Global"
        module = fqn.split("layers.", 1)[1].split(".", 1)[-1] if "layers." in fqn else fqn
        row = rows[(module, rec.op_name or "")]
        row[0] += 1
        row[1] += (rec.alloc_bytes or 0) / 2**20
        row[2] += rec.runtime_ms or 0.0
    return sorted(((m, op, int(n), mib, ms) for (m, op), (n, mib, ms) in rows.items()), key=lambda r: -r[4])


def _profile(fn: Any, model: torch.nn.Module, tokens: torch.Tensor, warmup: int, steps: int) -> KernelTimes:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn(tokens).backward()
        model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn(tokens).backward()
            model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    return per_step(prof.key_averages(), steps)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["llama", "seed"], default="llama")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.75, 0.5])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=15, help="kernels listed each way (default 15)")
    parser.add_argument("--out", type=Path, default=Path("bench-out/kernels"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("this benchmark profiles GPU kernels and needs a CUDA GPU")
    if args.warmup < 1 or args.steps < 1 or not all(0 < f <= 1 for f in args.fractions):
        parser.error("--warmup and --steps must be >= 1 and every fraction in (0, 1]")
    device = torch.device("cuda", torch.cuda.current_device())
    workload = cs.llama_workload(cs.LlamaArgs()) if args.model == "llama" else cs.seed_workload(8)
    cs._warm_up_cublas(device)

    runs: dict[str, KernelTimes] = {}
    plans: dict[str, Any] = {}
    compile_extra = None
    for name, fraction in (("compile", None), *((f"sac {f:.0%}", f) for f in args.fractions)):
        torch.manual_seed(0)
        model, tokens = workload.build(device), workload.tokens(device)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(device)
        strategy = (cs.Strategy(name, backend="inductor") if fraction is None
                    else cs.Strategy(name, backend="sac", sac_fraction=fraction))
        results: list[Any] = []
        budget = None if fraction is None else int(before + fraction * compile_extra)
        fn = cs.compile_for(model, strategy, budget, results if fraction is not None else None)
        if fraction is None:  # compile's extra peak, on the step after the compiling one
            for _ in range(2):
                torch.cuda.reset_peak_memory_stats(device)
                fn(tokens).backward()
                model.zero_grad(set_to_none=True)
            compile_extra = torch.cuda.max_memory_allocated(device) - before
        runs[name] = _profile(fn, model, tokens, args.warmup, args.steps)
        total = sum(ms for _, ms in runs[name].values())
        print(f"== {name}: {total:.2f} ms of kernels per step", flush=True)
        for result in results:
            if result is not None and result.plan is not None:
                plans[name] = {"estimated_recompute_ms": result.plan.recompute_ms, "status": result.plan.status,
                               "predicted_peak_bytes": result.partitioned.peak_bytes,
                               "recomputed": recompute_summary(result)}
                print(f"   plan {result.plan.status}: estimated recompute {result.plan.recompute_ms:.3f} ms")
                for module, op, n, mib, ms in plans[name]["recomputed"][:args.top]:
                    print(f"   {module:32s} {op:28s} {n:4d} values {mib:9.0f} MiB {ms:7.3f} ms")
        del fn, model, tokens, results
        gc.collect()
        torch._dynamo.reset()
        torch.cuda.empty_cache()

    for name in runs:
        if name == "compile":
            continue
        print(f"\n{name} against compile (ms per step; launches per step):")
        for kernel, change in largest_changes(runs, "compile", name, args.top):
            n0, ms0 = runs["compile"].get(kernel, (0, 0.0))
            n1, ms1 = runs[name].get(kernel, (0, 0.0))
            print(f"  {change:+8.3f}  {ms0:8.3f} ({n0:5.0f}) -> {ms1:8.3f} ({n1:5.0f})  {kernel[:100]}")
    report = {"device": torch.cuda.get_device_name(device), "torch_version": torch.__version__,
              "model": args.model, "steps": args.steps, "compile_extra_peak_bytes": compile_extra,
              "kernels": {k: {n: list(v) for n, v in r.items()} for k, r in runs.items()}, "plans": plans}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernels.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out / 'kernels.json'}")
    return report


if __name__ == "__main__":
    main()
