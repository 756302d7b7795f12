"""Wall-clock time of the two SAC MILPs, model building included.

* op level: ``get_optimal_checkpointing_policy_per_module`` on a synthetic 200-op module
  (transformer-block-like ops: matmuls, element-wise ops, views, in-place ops on a
  parent, dropouts) at half its memory;
* module level: ``sac_milp`` on the module graph of a 32-layer GPT-2-like Transformer
  (the synthetic ModuleInfo of ``tests/test_sac_milp.py``) at a budget tight enough to
  checkpoint every layer, world size 4.

Each timing is the median of 5 calls after one warm-up call. Run from the repository
root: ``python benchmarks/solve_time.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sac_compiler.module_info import (
    get_peak_memory_runtime_baseline,
    parse_module_info,
)
from sac_compiler.sac_stats import SACStats
from sac_compiler.solvers import (
    SolverOptions,
    get_optimal_checkpointing_policy_per_module,
    sac_milp,
)
from tests.test_sac_milp import build_module_info, transformer


def synthetic_module(n_ops: int, seed: int = 0) -> SACStats:
    """A module of ``n_ops`` ops with the kinds and proportions of a transformer block."""
    rng = random.Random(seed)
    names, runtimes, memory = [], [], []
    views, rand_ops, inplace = [], [], []
    for i in range(n_ops):
        kind = rng.choices(["mm", "pointwise", "view", "inplace", "dropout"], [3, 4, 2, 1, 1])[0]
        if kind == "inplace" and (i == 0 or i - 1 in views):
            kind = "pointwise"
        names.append(f"aten.{kind}")
        if kind == "mm":
            runtimes.append(rng.uniform(0.2, 1.0))
            memory.append(rng.choice([1, 4]) * 2**24)
        elif kind == "view":
            runtimes.append(0.001)
            memory.append(0)
            views.append(i)
        elif kind == "inplace":
            runtimes.append(rng.uniform(0.01, 0.05))
            memory.append(0)
            inplace.append((i, i - 1))
        else:
            runtimes.append(rng.uniform(0.01, 0.1))
            memory.append(rng.choice([1, 4]) * 2**24)
            if kind == "dropout":
                rand_ops.append(i)
    memory[-1] = 0  # the module's output is always stored
    return SACStats(names, runtimes, memory, views, rand_ops, [], inplace, False)


def median_time(fn: Callable[[], object], repeats: int) -> tuple[float, float, float]:
    fn()  # warm-up: loads the solver library
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), max(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=200)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    solvers = ["cbc"] + (["highs"] if importlib.util.find_spec("highspy") else [])
    module = synthetic_module(args.ops)
    start = time.perf_counter()
    graph = parse_module_info(build_module_info(transformer(args.layers)))
    build_s = time.perf_counter() - start
    peak, _ = get_peak_memory_runtime_baseline(graph)
    budget_gib = 0.62 * peak / 2**30

    rows = []
    for solver in solvers:
        options = SolverOptions(solver=solver)
        med, lo, hi = median_time(
            partial(get_optimal_checkpointing_policy_per_module, module, 0.5, options),
            args.repeats,
        )
        rows.append([f"op policy, {args.ops} ops, budget 0.5", solver, med, lo, hi])
        med, lo, hi = median_time(
            partial(sac_milp, graph, budget_gib, world_size=4, options=options), args.repeats
        )
        ac_decisions, _, _ = sac_milp(graph, budget_gib, world_size=4, options=options)
        rows.append([
            f"sac_milp, {args.layers} layers ({len(graph.nodes)} modules), "
            f"{budget_gib:.2f} GiB: {len(ac_decisions)} AC units",
            solver, med, lo, hi,
        ])
    print(f"(ModuleInfo of the {args.layers}-layer model built in {build_s:.1f} s, not timed)")
    print(tabulate(
        rows,
        headers=["problem", "solver", "median s", "min s", "max s"],
        floatfmt=".4f",
    ))


if __name__ == "__main__":
    main()
