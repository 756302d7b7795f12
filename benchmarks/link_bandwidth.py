"""The host link as the offload planner sees it and as larger copies measure it, on one GPU.

The backend measures the link once per GPU with one 64 MiB copy from the device to pinned host
memory (``sac_compiler.offload.link_bandwidth``) and plans every offload copy with that rate.
This script prints that figure beside copies of other sizes in each direction (CUDA events, the
median of ``--repeats`` after one warm-up copy), so that a plan's expected transfer time can be
checked against the link::

    python benchmarks/link_bandwidth.py --sizes 64MiB 1GiB
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> None:
    sys.path.insert(0, str(ROOT))
    from sac_compiler.config import parse_bytes
    from sac_compiler.offload import _measure_link, transfer_ms

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["64MiB", "1GiB"], help="copy sizes (default: 64MiB 1GiB)")
    parser.add_argument("--repeats", type=int, default=5, help="timed copies per size and direction (default: 5)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU: the link measured is the one between this machine and its GPU")
    sizes = [parse_bytes(s) for s in args.sizes]
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    print(f"the backend's measurement (64 MiB, device to host): {_measure_link(device) / 1e9:.1f} GB/s")
    for nbytes in sizes:
        for direction in ("d2h", "h2d"):
            ms = transfer_ms(device, nbytes, direction, args.repeats)
            print(f"{direction} {nbytes / 2**20:8.0f} MiB: {ms:8.3f} ms, {nbytes / ms / 1e6:7.1f} GB/s")


if __name__ == "__main__":
    main()
