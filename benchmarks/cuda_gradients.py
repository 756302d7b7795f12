"""Gradients of the backend's plan against plain ``torch.compile``'s on one GPU, dropout on.

For each zoo model in one loop (``benchmarks/zoo.py``), at full size, from the same seed: plain
``torch.compile`` runs ``--steps`` steps (default 2; twice, each from a fresh compile, so that
its own run-to-run difference is the floor), then ``torch.compile(model, backend="sac")`` with
the budget ``memory allocated before the step + FRACTION x plain compile's extra peak`` as many
(at least two: the second is the step runtime enforcement measures). Every step starts from the
same seed, so every step of a run should give the same loss. Printed per model: each step's loss,
the peaks, and the worst relative L2 norm over the parameters of the difference between the
gradients of the last step and plain compile's (and of plain compile against itself). Plain
compile's masks are not a fixed reference: under Inductor's seeded RNG which masks a forward
draws depends on its partition (PyTorch's own ``activation_memory_budget`` moves them too), so
``--also sac-saved`` adds one that is: sac from the same graph at a budget above plain
compile's peak, whose plan is the fastest (check offline that it keeps the draws the plan under
test draws again; ``docs/results.md`` does so for the MoE);
``--also amb0.5`` adds plain compile under ``activation_memory_budget=0.5``; ``--fallback-random``
draws random ops as eager does (never recomputed); ``--sac-rules-off`` adds sac without the named
memory-model rules (those that rewrite the partitioned graphs leave them as partitioned).
Attention dropout goes further: an attention the plan recomputes runs, in forward and again in
backward, from a generator state of its own (graph-safe RNG, as PyTorch's checkpointing under
``torch.compile`` does), so its masks are not plain compile's and neither are the loss and the
gradients. ``--dropout no-attention`` sets every zoo attention's
dropout to 0 (the other dropouts stay on), for an exact comparison whatever the plan recomputes;
``--dropout off`` sets every dropout to 0. ``--deterministic`` runs both with PyTorch's
deterministic algorithms (``torch.use_deterministic_algorithms``; an op without a deterministic
implementation raises), to tell a difference the plan makes from the run-to-run one that plain
compile against itself shows (atomic adds, such as those of the MoE's ``index_add_`` on CUDA, may
sum in another order from run to run). ``--eager`` adds the uncompiled model as a third
reference: how far the gradients move when only the kernels change. ``--worst N`` says where a
difference lies: the median over the parameters, how many differ by more than 1e-4, and the N
that differ most::

    python benchmarks/cuda_gradients.py --models bert --loop loss_outside_criterion --fraction 0.5
    python benchmarks/cuda_gradients.py --models gpt2 moe --loop loss_inside --dropout no-attention
    python benchmarks/cuda_gradients.py --models moe --loop loss_inside --dropout off --deterministic --eager
    python benchmarks/cuda_gradients.py --models moe --loop loss_inside --dropout no-attention --worst 8
    python benchmarks/cuda_gradients.py --models moe --loop loss_inside --dropout no-attention --also sac-saved amb0.5
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


DROPOUT = ("on", "no-attention", "off")


def without_dropout(model: torch.nn.Module, dropout: str) -> int:
    """``dropout="no-attention"``: set the dropout of every zoo attention in ``model`` to 0
    (``nn.Dropout`` modules keep theirs); ``"off"``: every dropout; ``"on"``: none. Returns how
    many modules had a dropout set to 0."""
    from benchmarks.zoo import Attention

    if dropout not in DROPOUT:
        raise ValueError(f"dropout={dropout!r}: give one of {', '.join(DROPOUT)}")
    changed = 0
    for module in model.modules() if dropout != "on" else ():
        if isinstance(module, Attention) and module.dropout:
            module.dropout = 0.0
            changed += 1
        elif dropout == "off" and isinstance(module, torch.nn.Dropout) and module.p:
            module.p = 0.0
            changed += 1
    return changed


def step_gradients(name: str, loop: str, compile_fn: Callable[[torch.nn.Module], torch.nn.Module],
                   steps: int, seed: int = 0, dropout: str = "on") -> dict[str, Any]:
    """``steps`` steps of zoo model ``name`` (full size, on the GPU) in ``loop`` under ``compile_fn``,
    each from ``seed`` (``dropout``: see ``without_dropout``): the last step's gradients and loss,
    the memory allocated before it and its peak, and the first step's seconds."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.zoo import ZOO, TrainStep

    torch._dynamo.reset()
    entry = ZOO[name]
    device = torch.device("cuda")
    model = entry.model("full", device=device)
    without_dropout(model, dropout)
    batch = entry.batch("full", device=device)
    step = TrainStep(entry, model, loop, compile_fn)
    first_s = before = peak = 0.0
    loss: Any = None
    losses = []
    for i in range(steps):
        torch.manual_seed(seed)
        torch.cuda.manual_seed(seed)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        _, loss = step(batch)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        losses.append(loss.item())
        if i == 0:
            first_s = time.perf_counter() - start
    # off the device: gradients kept for the comparison must not count against the next run's budget
    grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}
    del step, model
    torch.cuda.empty_cache()
    return {"grads": grads, "loss": loss.item(), "losses": losses, "before": before, "peak": peak, "first_s": first_s}


def differences(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, float]:
    """``||g - r|| / ||r||`` per parameter; the two must hold the same ones."""
    if grads.keys() != reference.keys():
        raise ValueError(f"gradients of different parameters: {sorted(grads.keys() ^ reference.keys())[:5]}")
    return {k: (g.float() - reference[k].float()).norm().item() / max(reference[k].float().norm().item(), 1e-30)
            for k, g in grads.items()}


def worst_difference(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """The largest ``||g - r|| / ||r||`` over the parameters; the two must hold the same ones."""
    return max(differences(grads, reference).values())


def spread(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], worst: int) -> str:
    """Where a difference lies: the median over the parameters, how many are over 1e-4, and the
    ``worst`` parameters with theirs (a difference in a few parameters, such as one expert's, is
    not one spread over every parameter a dropout mask reaches)."""
    diff = differences(grads, reference)
    ranked = sorted(diff.items(), key=lambda kv: -kv[1])
    median = sorted(diff.values())[len(diff) // 2]
    over = sum(v > 1e-4 for v in diff.values())
    return (f"median {median:.2e}, {over} of {len(diff)} over 1e-4, worst: "
            + ", ".join(f"{k} {v:.2e}" for k, v in ranked[:worst]))


ALSO = ("amb0.5", "sac-saved")


def main(argv: list[str] | None = None) -> None:
    from benchmarks.zoo import LOOPS, ZOO

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(ZOO), default=["bert", "t5"], help="zoo models")
    parser.add_argument("--loop", choices=LOOPS, default="loss_outside_criterion", help="the training loop")
    parser.add_argument("--fraction", type=float, default=0.5,
                        help="the budget as a fraction of plain compile's extra peak (default: 0.5)")
    parser.add_argument("--dropout", choices=DROPOUT, default="on",
                        help="'no-attention' sets every attention's dropout to 0, the other dropouts stay on "
                             "(a recomputed attention's masks are drawn from a generator state of its own); "
                             "'off' every dropout (default: on)")
    parser.add_argument("--deterministic", action="store_true",
                        help="PyTorch's deterministic algorithms in both runs (default: off)")
    parser.add_argument("--steps", type=int, default=2,
                        help="steps of each compiled run, each from the same seed; the last one's gradients are "
                             "compared, every step's loss is printed (default: 2: the first step compiles)")
    parser.add_argument("--worst", type=int, default=0, metavar="N",
                        help="also print the median difference over the parameters, how many are over 1e-4, "
                             "and the N parameters that differ most (default: 0, none)")
    parser.add_argument("--eager", action="store_true",
                        help="also run the model uncompiled and compare both compiles with it: how far the "
                             "model's gradients move when only the kernels change (default: off)")
    parser.add_argument("--also", nargs="+", choices=ALSO, default=[],
                        help="more compiled runs, each compared with plain compile and with sac: 'amb0.5' plain "
                             "compile under activation_memory_budget=0.5 (PyTorch's own recomputation), "
                             "'sac-saved' sac at a budget above plain compile's peak (the fastest plan of the "
                             "same graph: check that it keeps the draws the plan under test draws again)")
    parser.add_argument("--fallback-random", action="store_true",
                        help="torch._inductor.config.fallback_random in every run: random ops run as eager "
                             "runs them, from the generator, instead of Inductor's seeded draws (default: off)")
    parser.add_argument("--sac-rules-off", nargs="+", default=[], metavar="RULE",
                        help="one more run: sac at the same budget with these rules of the memory model left out "
                             "(passes.memory_model.RULES; those that rewrite the partitioned graphs, such as "
                             "draws_repeated, then leave them as the partitioner made them)")
    args = parser.parse_args(argv)
    if args.sac_rules_off:  # an unknown rule is refused before any GPU work, by the memory model's own check
        from sac_compiler.passes.memory_model import rules_disabled

        try:
            with rules_disabled(*args.sac_rules_off):
                pass
        except ValueError as error:
            parser.error(f"--sac-rules-off: {error}")
    if not torch.cuda.is_available():
        parser.error("needs a GPU: the gradients are compared as the CUDA build of Inductor computes them")
    if not 0.0 < args.fraction <= 1.0:
        parser.error(f"--fraction {args.fraction:g}: give a fraction in (0, 1]")
    if args.steps < 1:
        parser.error(f"--steps {args.steps}: give at least 1")
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts
        torch.use_deterministic_algorithms(True)
    if args.fallback_random:
        torch._inductor.config.fallback_random = True
    gib = 2**30

    def sac_compile(budget: int) -> Callable[[torch.nn.Module], torch.nn.Module]:
        return lambda m: torch.compile(m, backend="sac", options={"memory_budget": budget})

    def losses(run: dict[str, Any]) -> str:
        return "/".join(f"{x:.9g}" for x in run["losses"])

    for name in args.models:
        runs: dict[str, dict[str, Any]] = {}
        runs["plain"] = step_gradients(name, args.loop, torch.compile, args.steps, dropout=args.dropout)
        runs["plain again"] = step_gradients(name, args.loop, torch.compile, args.steps, dropout=args.dropout)
        plain = runs["plain"]
        budget = int(plain["before"] + args.fraction * (plain["peak"] - plain["before"]))
        runs["sac"] = step_gradients(name, args.loop, sac_compile(budget), max(args.steps, 2), dropout=args.dropout)
        if "sac-saved" in args.also:
            runs["sac-saved"] = step_gradients(name, args.loop, sac_compile(int(plain["peak"] * 1.25)),
                                               max(args.steps, 2), dropout=args.dropout)
        if args.sac_rules_off:
            from sac_compiler.passes.memory_model import rules_disabled

            with rules_disabled(*args.sac_rules_off):
                runs[f"sac without {'+'.join(args.sac_rules_off)}"] = step_gradients(
                    name, args.loop, sac_compile(budget), max(args.steps, 2), dropout=args.dropout)
        if "amb0.5" in args.also:
            import torch._functorch.config as functorch_config

            with functorch_config.patch(activation_memory_budget=0.5):
                runs["amb0.5"] = step_gradients(name, args.loop, torch.compile, args.steps, dropout=args.dropout)
        if args.eager:
            runs["eager"] = step_gradients(name, args.loop, lambda m: m, 1, dropout=args.dropout)
        sac = runs["sac"]
        line = (f"{name} {args.loop}, dropout {args.dropout}{', deterministic' if args.deterministic else ''}"
                f"{', fallback_random' if args.fallback_random else ''} ({torch.cuda.get_device_name()}, torch "
                f"{torch.__version__}): budget {budget / gib:.3f} GiB; plain compile: loss {losses(plain)}, peak "
                f"{plain['peak'] / gib:.3f} GiB, against itself {worst_difference(runs['plain again']['grads'], plain['grads']):.2e} "
                f"(loss {losses(runs['plain again'])}); sac {args.fraction:g}: loss {losses(sac)}, peak "
                f"{sac['peak'] / gib:.3f} GiB, first step {sac['first_s']:.1f} s, gradients against plain compile "
                f"{worst_difference(sac['grads'], plain['grads']):.2e}")
        if args.worst:
            line += f" ({spread(sac['grads'], plain['grads'], args.worst)})"
        for other in [k for k in runs if k not in ("plain", "plain again", "sac")]:
            run = runs[other]
            line += (f"; {other}: loss {losses(run)}, peak {run['peak'] / gib:.3f} GiB, against plain compile "
                     f"{worst_difference(run['grads'], plain['grads']):.2e}, sac against it "
                     f"{worst_difference(sac['grads'], run['grads']):.2e}")
            if args.worst:
                line += f" (sac against it: {spread(sac['grads'], run['grads'], args.worst)})"
        print(line, flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
