"""``python -m sac_compiler``: plan a built-in model (or a seed model) and print the analysis.

The default is a small GPT-style Transformer (4 layers, dim 256, sequence 512, batch 8) captured on
fake tensors and planned for half its saved activations, so it runs on any machine in seconds and
costs nothing but CPU time; ``--train-step`` then runs a few real training steps with
``torch.compile(backend="sac")``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

import torch


def _transformer(layers: int, dim: int, heads: int, seq: int, vocab: int, dropout: float) -> torch.nn.Module:
    from torch.testing._internal.distributed._tensor.common_dtensor import ModelArgs, Transformer

    return Transformer(ModelArgs(n_layers=layers, n_heads=heads, vocab_size=vocab, max_seq_len=seq, dim=dim,
                                 dropout_p=dropout))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sac-compiler", description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="dropout probability (on a CPU trace, attention with dropout lowers to the math kernel)")
    parser.add_argument("--device", default="auto", help="a device spec name (H100-SXM, H200, A100-80GB, ...) or auto")
    parser.add_argument("--budget", default="0.5",
                        help="memory budget to plan for: a fraction of the saved activations (0.5) or bytes ('6GiB')")
    parser.add_argument("--train-step", type=int, default=0, metavar="N",
                        help="also run N real training steps through torch.compile(backend='sac', compiler='eager')")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")

    from sac_compiler.planner import plan
    from sac_compiler.report import format_plan

    budget: float | str = float(args.budget) if _is_number(args.budget) else args.budget
    with torch.device("meta"):
        model = _transformer(args.layers, args.dim, args.heads, args.seq, args.vocab, args.dropout)
        tokens = torch.randint(0, args.vocab, (args.batch, args.seq))
    start = time.perf_counter()
    result = plan(model, tokens, memory_budget=budget, device=args.device)
    elapsed = time.perf_counter() - start
    sys.stdout.write(f"Transformer: {args.layers} layers, dim {args.dim}, batch {args.batch} x {args.seq} tokens, "
                     f"memory_budget={budget!r}: captured, annotated and planned on fake tensors in {elapsed:.1f} s\n\n")
    sys.stdout.write(format_plan(result))

    if args.train_step:
        _train(args)
    return 0


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _train(args: Any) -> None:
    torch.manual_seed(0)
    small = dict(layers=2, dim=64, heads=4, seq=64, vocab=512, dropout=args.dropout)
    model = _transformer(**small)
    opt = torch.optim.Adam(model.parameters())
    compiled = torch.compile(model, backend="sac", options={"compiler": "eager"})
    tokens = torch.randint(0, small["vocab"], (4, small["seq"]))
    for step in range(args.train_step):
        loss = compiled(tokens).float().logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sys.stdout.write(f"step {step}: loss {loss.item():.4f}\n")


if __name__ == "__main__":
    raise SystemExit(main())
