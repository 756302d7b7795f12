"""Per-rank peak and step time under FSDP2 with each transformer block compiled (as torchtitan does).

Strategies, each on a fresh Llama-style model (``compare_strategies.Llama``, bf16) sharded with
``fully_shard`` block by block and then as a whole, every block compiled on its own:

* ``fsdp+compile``: plain ``torch.compile`` of each block; its extra peak (peak less what the
  sharded model and inputs hold before the step) sets the sac budgets;
* ``fsdp+compile+full AC``: each block under ``torch.utils.checkpoint``;
* ``fsdp+compile+save-matmuls``: torchtitan-style selective AC (keep matmul and attention outputs);
* ``sac F`` for F in 0.9, 0.75, 0.5: ``backend="sac"`` with ``memory_budget`` = before + F x the
  plain strategy's extra peak, an absolute per-rank budget for the step.

One step is ``model(tokens).float().sum().backward()``, then ``optimizer.step()`` (AdamW on the
shards) and ``zero_grad``. Each strategy takes ``--warmup`` steps (the first compiles), then
``--steps`` timed steps; on CUDA the step time is the median of CUDA-event times and the peak the
allocator's high-water mark over the timed steps, per rank, reduced over ranks with max. Rank 0
prints a table and writes ``OUT/fsdp_results.json``.

Run on 2 GPUs from the repository root::

    torchrun --nproc-per-node 2 benchmarks/fsdp_benchmark.py --out fsdp_out

``--smoke`` runs a tiny model on CPU over gloo (start it with torchrun too, or with ``--spawn N``,
which starts N local processes itself): ``compiler="eager"`` for the sac strategies, plain
``torch.compile`` with Dynamo's ``aot_eager`` backend for the others, times from
``time.perf_counter`` and no peak (the CPU allocator keeps none); it is meant to show that every
strategy starts, not to measure.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from compare_strategies import (  # noqa: E402
    SMOKE_LLAMA,
    Checkpointed,
    Llama,
    LlamaArgs,
    save_matmuls_policy,
)

FRACTIONS = (0.9, 0.75, 0.5)
PLAIN = "fsdp+compile"


def _build(args: LlamaArgs, device: torch.device, mesh: Any, checkpointing: str) -> nn.Module:
    from torch.distributed.fsdp import fully_shard
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    torch.manual_seed(0)
    with torch.device(device):
        model = Llama(args).to(torch.bfloat16)
    if checkpointing != "none":
        context_fn = (functools.partial(create_selective_checkpoint_contexts, save_matmuls_policy)
                      if checkpointing == "selective" else None)
        for i, block in enumerate(model.layers):
            model.layers[i] = Checkpointed(block, context_fn)
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _compile_blocks(model: nn.Module, backend: str, options: dict[str, Any] | None) -> None:
    for block in model.layers:
        if options is None:
            block.compile(backend=backend)
        else:
            block.compile(backend=backend, options=options)


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _run(name: str, args: LlamaArgs, device: torch.device, mesh: Any, checkpointing: str,
         backend: str, options: dict[str, Any] | None, warmup: int, steps: int) -> dict[str, Any]:
    torch._dynamo.reset()
    model = _build(args, device, mesh, checkpointing)
    _compile_blocks(model, backend, options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator(device=device).manual_seed(1 + dist.get_rank())
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), device=device, generator=generator)

    def step() -> None:
        model(tokens).float().sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    step()
    first_s = time.perf_counter() - start
    for _ in range(warmup - 1):
        step()
    before = _allocated(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            step()
            end.record()
            torch.cuda.synchronize(device)
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append(1e3 * (time.perf_counter() - t0))
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    figures = torch.tensor([peak or 0, before, statistics.median(times)], dtype=torch.float64)
    gathered = [torch.zeros_like(figures) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, figures)  # each rank's figures (gloo needs CPU tensors: these are)
    ranks = torch.stack(gathered)
    if dist.get_rank() == 0:  # progress: each strategy as it finishes
        peak_text = f"peak {int(ranks[:, 0].max()) / 2**30:.3f} GiB, " if peak is not None else ""
        print(f"[fsdp] {name}: {peak_text}step {float(ranks[:, 2].max()):.2f} ms, first step {first_s:.1f} s",
              flush=True)
    return {
        "strategy": name,
        "peak_bytes": int(ranks[:, 0].max()) if peak is not None else None,
        "before_bytes": int(ranks[:, 1].max()),
        "step_ms": float(ranks[:, 2].max()),
        "first_step_s": first_s,
        "per_rank": ranks.tolist(),
    }


def _benchmark(opts: argparse.Namespace) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))) if not opts.smoke else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world,))
    args = SMOKE_LLAMA if opts.smoke else LlamaArgs(layers=opts.layers, batch=opts.batch, seq=opts.seq)
    plain_backend = "aot_eager" if opts.smoke else "inductor"
    sac_compiler = "eager" if opts.smoke else "inductor"
    run = functools.partial(_run, args=args, device=device, mesh=mesh, warmup=opts.warmup, steps=opts.steps)
    results = [run(PLAIN, checkpointing="none", backend=plain_backend, options=None)]
    results.append(run("fsdp+compile+full AC", checkpointing="full", backend=plain_backend, options=None))
    results.append(run("fsdp+compile+save-matmuls", checkpointing="selective", backend=plain_backend, options=None))
    plain = results[0]
    for fraction in FRACTIONS:
        if plain["peak_bytes"] is not None:
            extra = plain["peak_bytes"] - plain["before_bytes"]
            budget: Any = plain["before_bytes"] + int(fraction * extra)
        else:
            budget = fraction  # no measured peak (CPU): the fraction of the activation memory
        name = f"sac {fraction:.0%}"
        try:
            results.append(run(name, checkpointing="none", backend="sac",
                               options={"memory_budget": budget, "compiler": sac_compiler}))
        except Exception as error:  # noqa: BLE001 - a strategy that fails is recorded, the run goes on
            results.append({"strategy": name, "error": f"{type(error).__name__}: {error}"})
        results[-1]["budget"] = budget
    if rank == 0:
        out = Path(opts.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "fsdp_results.json").write_text(json.dumps(
            {"world_size": world, "device": str(device), "model": vars(args) if hasattr(args, "__dict__") else
             args.__dict__, "smoke": opts.smoke, "results": results}, indent=2, default=str))
        _print(results, plain)


def _print(results: list[dict[str, Any]], plain: dict[str, Any]) -> None:
    extra0 = (plain["peak_bytes"] - plain["before_bytes"]) if plain.get("peak_bytes") is not None else None
    print(f"{'strategy':28} {'peak GiB':>9} {'extra %':>8} {'step ms':>9} {'first s':>8}")
    for r in results:
        if "error" in r:
            print(f"{r['strategy']:28} error: {r['error'][:80]}")
            continue
        peak = f"{r['peak_bytes'] / 2**30:.3f}" if r["peak_bytes"] is not None else "-"
        share = (f"{100 * (r['peak_bytes'] - r['before_bytes']) / extra0:.0f}"
                 if extra0 and r["peak_bytes"] is not None else "-")
        print(f"{r['strategy']:28} {peak:>9} {share:>8} {r['step_ms']:9.2f} {r['first_step_s']:8.1f}")


def _worker(rank: int, world: int, port: int, opts: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    _main_in_group(opts)


def _main_in_group(opts: argparse.Namespace) -> None:
    dist.init_process_group("gloo" if opts.smoke else "nccl")
    try:
        _benchmark(opts)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="fsdp_out")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="a tiny model on CPU over gloo")
    parser.add_argument("--spawn", type=int, default=0, help="start this many local processes (no torchrun)")
    opts = parser.parse_args(argv)
    if opts.spawn:
        import torch.multiprocessing as mp

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_worker, args=(opts.spawn, port, opts), nprocs=opts.spawn, join=True)
    else:
        _main_in_group(opts)


if __name__ == "__main__":
    main()
