"""What each ATen op allocates on the GPU beyond what it returns: library workspaces (cuDNN's for
a convolution, cuBLAS's), temporaries freed before the op returns.

One eager training step (forward, the model's criterion, backward) of a zoo model runs on CUDA
under a dispatch mode that, around every ATen op, reads the caching allocator: the bytes in use
before the op, its high-water mark during the op (the peak statistic reset before it) and the
bytes in use after. What the op held beyond the larger of before and after is its transient. The
table lists the ops by their largest transient, with the shapes of their tensor arguments; JSON
to ``--out``::

    python benchmarks/op_transients.py --models resnet unet_block --out bench-out/transients.json

The memory model counts an op's outputs and, through its rules, some workspaces; a transient
this shows that no rule counts is memory the plan does not see.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class Transients(TorchDispatchMode):
    """Each op's transient bytes on the current CUDA device (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[str, str, int]] = []  # (op, argument shapes, transient bytes)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = func(*args, **(kwargs or {}))
        peak = torch.cuda.max_memory_allocated()
        after = torch.cuda.memory_allocated()
        shapes = ",".join(str(tuple(t.shape)) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))
        self.rows.append((str(func), shapes, peak - max(before, after)))
        return out


def measure(name: str, size: str = "full", channels_last: bool = False) -> list[tuple[str, str, int]]:
    """Each op's (name, argument shapes, transient bytes) in one eager step of zoo model ``name``;
    ``channels_last``: its parameters and 4-d inputs in channels-last order, as Inductor lays out
    a convolution network's activations."""
    from benchmarks.zoo import ZOO

    entry = ZOO[name]
    model = entry.model(size, device="cuda")
    batch = entry.batch(size, device="cuda")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        batch.inputs = tuple(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
                             for x in batch.inputs)
    loss = entry.loss_fn(model(*batch.inputs), batch)  # warm-up: the libraries' handles and workspaces
    loss.backward()
    model.zero_grad(set_to_none=True)
    del loss
    torch.cuda.synchronize()
    mode = Transients()
    with mode:
        loss = entry.loss_fn(model(*batch.inputs), batch)
        loss.backward()
    torch.cuda.synchronize()
    return mode.rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet", "unet_block"], help="zoo models")
    parser.add_argument("--size", choices=("small", "full"), default="full")
    parser.add_argument("--min-mib", type=float, default=1.0, help="list transients of at least this many MiB")
    parser.add_argument("--channels-last", action="store_true",
                        help="parameters and 4-d inputs in channels-last order (as Inductor lays out convolutions)")
    parser.add_argument("--out", help="write every row as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    found: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                             "cudnn": torch.backends.cudnn.version(), "channels_last": args.channels_last, "models": {}}
    for name in args.models:
        rows = measure(name, args.size, args.channels_last)
        found["models"][name] = rows
        by_op: dict[str, list[tuple[int, str]]] = collections.defaultdict(list)
        for op, shapes, nbytes in rows:
            by_op[op].append((nbytes, shapes))
        print(f"{name} ({found['device']}, torch {found['torch']}, cuDNN {found['cudnn']}): "
              f"{len(rows)} ops, the largest transient {max(r[2] for r in rows) / 2**20:.1f} MiB")
        for op, seen in sorted(by_op.items(), key=lambda kv: -max(kv[1])[0]):
            big = [s for s in seen if s[0] >= args.min_mib * 2**20]
            if big:
                top = max(big)
                print(f"  {op}: {len(big)} of {len(seen)} calls >= {args.min_mib:g} MiB, largest "
                      f"{top[0] / 2**20:.1f} MiB ({top[1][:120]})")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(found) + "\n")


if __name__ == "__main__":
    main()
