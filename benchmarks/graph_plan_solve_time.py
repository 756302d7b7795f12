"""Wall-clock time of the graph-level plan (``solve_graph_plan``) on transformer-shaped problems.

The synthetic problem is shaped like the joint graph of a GPT-style decoder (batch 8,
sequence 2048, hidden 4096, 32 heads, vocabulary 32000, bf16, dropout): per layer about 40
forward values (layer norms as one three-output group, Q/K/V/O and MLP matmuls with their
views, flash attention's output and logsumexp as one group, dropout masks that must be
kept, residual adds), a backward of about 90 steps per layer that reads them in reverse
order, and base memory made of parameters, optimizer state, parameter gradients as they
accumulate and the activation gradients of each step. Recompute costs follow the FLOPs
(matmuls at 790 TFLOP/s) and bytes (element-wise ops at 3 TB/s).

For 16 and 32 layers it prints the smallest feasible peak and the peak without
recomputation, then solves at budgets 75/50/25% of the way from the former to the
latter: the median solve time of 3 calls (model building included), the status, the
recompute time and the model size. Run from the repository root:
``python benchmarks/graph_plan_solve_time.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sac_compiler.solvers._mip import SolverOptions  # noqa: E402
from sac_compiler.solvers.graph_plan import (  # noqa: E402
    PlanProblem,
    PlanValue,
    evaluate_plan,
    min_feasible_peak,
    solve_graph_plan,
)

TOKENS, SEQ, BATCH, HIDDEN, HEADS, VOCAB = 8 * 2048, 2048, 8, 4096, 32, 32000
ACT = TOKENS * HIDDEN * 2  # one bf16 hidden state: 128 MiB
STAT = TOKENS * 4  # a layer norm's fp32 mean or rstd
LSE = BATCH * HEADS * SEQ * 4
MASK = TOKENS * HIDDEN  # a bool dropout mask
MM_MS = 2 * TOKENS * HIDDEN * HIDDEN / 790e12 * 1e3  # one H x H projection
ATTN_MS = 2 * BATCH * SEQ * SEQ * HIDDEN / 790e12 * 1e3  # causal flash attention forward
EW_MS = 2 * ACT / 3e12 * 1e3  # an element-wise op over one hidden state
LAYER_PARAMS = 12 * HIDDEN * HIDDEN * 2


class _Builder:
    """Appends forward values and backward steps; reads become first/last uses."""

    def __init__(self) -> None:
        self.values: list[dict] = []
        self.reads: dict[str, list[int]] = {}
        self.base: list[int] = []
        self.grads = 0

    def value(self, name: str, nbytes: int, ms: float, inputs: tuple[str, ...] = (),
              **flags: object) -> str:
        self.values.append(dict(name=name, nbytes=nbytes, recompute_ms=ms, inputs=inputs, **flags))
        return name

    def view(self, name: str, of: str) -> str:
        return self.value(name, 0, 0.0, (of,), must_recompute=True)

    def step(self, reads: tuple[str, ...] = (), temp: int = ACT, grad: int = 0,
             filler: int = 0) -> None:
        """One backward op: a step that reads ``reads``, then ``filler`` steps that do not."""
        for name in reads:
            self.reads.setdefault(name, []).append(len(self.base))
        self.grads += grad
        for k in range(1 + filler):
            self.base.append(self.grads + temp + (k % 3) * ACT // 4)

    def problem(self, static: int) -> PlanProblem:
        values = []
        for v in self.values:
            uses = self.reads.get(v["name"], [])
            values.append(PlanValue(**v, bw_first_use=min(uses, default=None),
                                    bw_last_use=max(uses, default=None)))
        return PlanProblem(
            values=tuple(values),
            n_steps=len(self.base),
            base_bytes=tuple(static + b for b in self.base),
            end_of_forward_base=static,
            budget_bytes=0,
        )


def _forward_layer(b: _Builder, i: int, x: str) -> str:
    p = f"l{i}."
    ln1 = b.value(p + "ln1", ACT, 2 * EW_MS, (x,), group=p + "ln1")
    b.value(p + "ln1_mean", STAT, 0.0, (x,), group=p + "ln1")
    b.value(p + "ln1_rstd", STAT, 0.0, (x,), group=p + "ln1")
    ln1_2d = b.view(p + "ln1_2d", ln1)
    heads = []
    for proj in "qkv":
        mm = b.value(p + proj, ACT, MM_MS, (ln1_2d,))
        heads.append(b.view(p + proj + "_t", b.view(p + proj + "_4d", mm)))
    for k, proj in enumerate("qk"):  # rotary embeddings
        heads[k] = b.value(p + proj + "_rot", ACT, 2 * EW_MS, (heads[k], "rope_cache"))
    attn = b.value(p + "attn", ACT, ATTN_MS, tuple(heads), group=p + "sdpa")
    b.value(p + "attn_lse", LSE, 0.0, tuple(heads), group=p + "sdpa")
    attn_c = b.value(p + "attn_c", ACT, EW_MS, (b.view(p + "attn_t", attn),))  # contiguous
    attn_2d = b.view(p + "attn_2d", attn_c)
    o = b.view(p + "o_3d", b.value(p + "o", ACT, MM_MS, (attn_2d,)))
    mask1 = b.value(p + "mask1", MASK, EW_MS, (), must_save=True, group="rng")
    drop1 = b.value(p + "drop1", ACT, EW_MS, (o, mask1))
    h_mid = b.value(p + "h_mid", ACT, EW_MS, (x, drop1))
    ln2 = b.value(p + "ln2", ACT, 2 * EW_MS, (h_mid,), group=p + "ln2")
    b.value(p + "ln2_mean", STAT, 0.0, (h_mid,), group=p + "ln2")
    b.value(p + "ln2_rstd", STAT, 0.0, (h_mid,), group=p + "ln2")
    ln2_2d = b.view(p + "ln2_2d", ln2)
    fc1 = b.value(p + "fc1", 4 * ACT, 4 * MM_MS, (ln2_2d,))
    b.view(p + "fc1_3d", fc1)
    gelu = b.value(p + "gelu", 4 * ACT, 8 * EW_MS, (fc1,))
    gelu_2d = b.view(p + "gelu_2d", gelu)
    fc2 = b.view(p + "fc2_3d", b.value(p + "fc2", ACT, 4 * MM_MS, (gelu_2d,)))
    mask2 = b.value(p + "mask2", MASK, EW_MS, (), must_save=True, group="rng")
    drop2 = b.value(p + "drop2", ACT, EW_MS, (fc2, mask2))
    b.value(p + "h_scale", STAT, EW_MS / 100, (drop2,))  # a small reduction nobody reads
    return b.value(p + "h_out", ACT, EW_MS, (h_mid, drop2))


def _backward_layer(b: _Builder, i: int, x: str) -> None:
    p = f"l{i}."
    b.step((p + "mask2",), filler=3)
    b.step((), temp=2 * ACT, filler=6)  # d(gelu) = d(fc2) @ W2^T
    b.step((p + "gelu_2d",), temp=2 * ACT, grad=LAYER_PARAMS // 3, filler=6)  # dW2
    b.step((p + "fc1",), temp=8 * ACT, filler=5)  # gelu backward
    b.step((), temp=5 * ACT, filler=6)  # d(ln2) = d(fc1) @ W1^T
    b.step((p + "ln2_2d",), temp=5 * ACT, grad=LAYER_PARAMS // 3, filler=6)  # dW1
    b.step((p + "h_mid", p + "ln2_mean", p + "ln2_rstd"), temp=2 * ACT, filler=5)
    b.step((p + "mask1",), filler=3)
    b.step((), temp=2 * ACT, filler=5)  # d(attn) = d(o) @ Wo^T
    b.step((p + "attn_2d",), temp=2 * ACT, grad=LAYER_PARAMS // 12, filler=5)  # dWo
    b.step(tuple(p + n for n in ("q_rot", "k_rot", "v_t", "attn", "attn_lse")), temp=5 * ACT,
           filler=8)  # flash attention backward
    b.step((), temp=3 * ACT, filler=2)  # rotary embeddings backward
    for proj in "qkv":
        b.step((), temp=4 * ACT, filler=3)
        b.step((p + "ln1_2d",), temp=4 * ACT, grad=LAYER_PARAMS // 12, filler=3)
    b.step((x, p + "ln1_mean", p + "ln1_rstd"), temp=2 * ACT, filler=5)


def transformer_problem(n_layers: int) -> PlanProblem:
    """A transformer-shaped plan problem with ``n_layers`` layers (budget 0: set one)."""
    b = _Builder()
    h = b.value("embed", ACT, EW_MS, ("tokens",))
    inputs = []
    for i in range(n_layers):
        inputs.append(h)
        h = _forward_layer(b, i, h)
    lnf = b.value("lnf", ACT, 2 * EW_MS, (h,), group="lnf")
    b.value("lnf_mean", STAT, 0.0, (h,), group="lnf")
    b.value("lnf_rstd", STAT, 0.0, (h,), group="lnf")
    logits = b.value("logits", TOKENS * VOCAB * 2, 2 * TOKENS * HIDDEN * VOCAB / 790e12 * 1e3,
                     (b.view("lnf_2d", lnf),))
    b.value("lse", STAT, EW_MS, (logits,))
    b.step(("logits", "lse"), temp=TOKENS * VOCAB * 2, filler=3)  # cross-entropy backward
    b.step(("lnf_2d",), temp=2 * ACT, grad=HIDDEN * VOCAB * 2, filler=3)  # lm head dW
    b.step((h, "lnf_mean", "lnf_rstd"), temp=2 * ACT, filler=3)
    for i in reversed(range(n_layers)):
        _backward_layer(b, i, inputs[i])
    params = n_layers * LAYER_PARAMS + HIDDEN * VOCAB * 2
    return b.problem(static=params + 2 * params)  # bf16 weights, sharded fp32 Adam moments


def _no_recompute_peak(problem: PlanProblem) -> int:
    views = {v.name for v in problem.values if v.must_recompute}
    return evaluate_plan(problem, views)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--solver", choices=["cbc", "highs"], default="cbc")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    options = SolverOptions(solver=args.solver)
    rows = []
    for n_layers in args.layers:
        problem = transformer_problem(n_layers)
        start = time.perf_counter()
        lowest = min_feasible_peak(problem, options)
        min_peak_s = time.perf_counter() - start
        highest = _no_recompute_peak(problem)
        print(
            f"{n_layers} layers: {len(problem.values)} values, {problem.n_steps} backward steps; "
            f"smallest feasible peak {lowest / 2**30:.2f} GiB ({min_peak_s:.2f} s), "
            f"without recomputation {highest / 2**30:.2f} GiB"
        )
        for fraction in (0.75, 0.5, 0.25):
            budget = lowest + round(fraction * (highest - lowest))
            budgeted = dataclasses.replace(problem, budget_bytes=budget)
            times, plan = [], None
            for _ in range(args.repeat):
                start = time.perf_counter()
                plan = solve_graph_plan(budgeted, options)
                times.append(time.perf_counter() - start)
            rows.append([
                n_layers, f"{fraction:.0%}", f"{budget / 2**30:.2f}",
                f"{statistics.median(times):.2f}", plan.status,
                f"{plan.recompute_ms:.2f}", len(plan.recompute), f"{plan.peak_bytes / 2**30:.2f}",
                f"{plan.n_vars}/{plan.n_constraints}",
            ])
    print(tabulate(rows, headers=[
        "layers", "budget", "GiB", "solve s", "status", "recompute ms", "recomputed",
        "peak GiB", "vars/rows",
    ]))


if __name__ == "__main__":
    main()
