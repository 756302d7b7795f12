"""What recomputing one value of the benchmark Llama costs on this GPU, per MiB of the value.

Times, with CUDA events after warm-up (medians), the matmuls whose outputs a plan may recompute
(``tokens x dim`` by ``dim x out`` for the q/k/v/o projections, out = dim, and the SwiGLU's
``w1``/``w3``, out = ffn) and the causal attention forward, in bf16, and prints each one's time,
its time per MiB of output and its rate. A budget that needs ``B`` MiB of matmul outputs
recomputed costs at least ``B`` times the lowest of these per-MiB times (``docs/design.md``).

Run from the repository root on a CUDA machine::

    python benchmarks/recompute_rates.py [--batch 4 --seq 2048 --dim 2048 --ffn 5632 --heads 16]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def median_ms(fn: Callable[[], object], warmup: int = 10, repeats: int = 50) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(argv: Sequence[str] | None = None) -> list[tuple[str, float, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=16)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("this benchmark times GPU kernels and needs a CUDA GPU")
    dev, dt = torch.device("cuda"), torch.bfloat16
    tokens = args.batch * args.seq
    x = torch.randn(tokens, args.dim, device=dev, dtype=dt)
    rows = []
    print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}")
    for name, out in (("q/k/v/o projection", args.dim), ("w1 / w3 projection", args.ffn)):
        w = torch.randn(args.dim, out, device=dev, dtype=dt)
        ms = median_ms(lambda: x @ w)
        mib = tokens * out * 2 / 2**20
        rows.append((f"{name} ({tokens} x {args.dim} x {out})", ms, ms / mib))
        print(f"{rows[-1][0]}: {ms:.4f} ms, {ms / mib:.5f} ms per MiB, {2 * tokens * args.dim * out / ms / 1e9:.0f} TFLOPS")
    q = torch.randn(args.batch, args.heads, args.seq, args.dim // args.heads, device=dev, dtype=dt)
    ms = median_ms(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True))
    mib = q.numel() * 2 / 2**20
    rows.append((f"causal attention forward ({args.batch} x {args.heads} x {args.seq} x {args.dim // args.heads})", ms, ms / mib))
    print(f"{rows[-1][0]}: {ms:.4f} ms, {ms / mib:.5f} ms per MiB of output")
    return rows


if __name__ == "__main__":
    main()
