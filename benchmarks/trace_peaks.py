"""The no-recompute peak of every zoo model as planned for a CUDA target, traced on CUDA, CPU or meta.

Planning without a GPU must match planning on one: with a CUDA target, a CPU or meta trace lowers
attention and RMSNorm as the GPU runs them (``sac_compiler.gpu_lowering``). This script captures
each zoo model (the model alone, the graph ``torch.compile(model)`` sees; the loss-inside graph
too for the models that compute their loss) on fake tensors of the chosen trace device and prints
the joint simulation's peak without recomputation (``plan_joint(...).baseline_peak``, the model's
parameters, batch and gradients included) for the device spec ``--spec``. On a GPU machine
``--trace cuda`` records the reference figures; ``tests/test_trace_peaks.py`` compares the CPU
and meta traces with the figures recorded in ``benchmarks/recorded/``::

    python benchmarks/trace_peaks.py --trace cuda --sizes small full --out benchmarks/recorded/trace_peaks_h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
GRAPHS = ("model", "loss_inside")


def trace_peak(name: str, size: str, dtype: str, graph: str, trace: str, spec: str) -> dict[str, Any]:
    """One model's no-recompute peak, traced on ``trace`` fake tensors for the CUDA device ``spec``."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from benchmarks.zoo import ZOO
    from sac_compiler.capture import capture_joint
    from sac_compiler.config import SACConfig
    from sac_compiler.plan_graph import plan_joint

    entry = ZOO[name]
    torch_dtype = None if dtype == "float32" else getattr(torch, dtype)
    start = time.perf_counter()
    default = torch.get_default_dtype()
    with FakeTensorMode(allow_non_fake_inputs=True):
        # built in the dtype (as a default) rather than cast: casting fake parameters swaps them,
        # which a parameter with a weak reference refuses
        torch.set_default_dtype(torch_dtype or default)
        try:
            model = entry.model(size, device=trace)
        finally:
            torch.set_default_dtype(default)
        if torch_dtype is not None:  # floating buffers as model.to(dtype) casts them
            for module in model.modules():
                for key, buffer in module._buffers.items():
                    if buffer is not None and buffer.is_floating_point():
                        module._buffers[key] = buffer.to(torch_dtype)
        batch = entry.batch(size, device=trace, dtype=torch_dtype)
        if graph == "loss_inside":
            captured = capture_joint(lambda *xs: model(*xs, targets=batch.target), *batch.inputs, target_device="cuda",
                                     decompose=True)
        else:
            captured = capture_joint(model, *batch.inputs, target_device="cuda", decompose=True)
    result = plan_joint(captured, SACConfig(device=spec))
    from sac_compiler.passes.memory_model import MODEL_VERSION

    return dict(model=name, size=size, dtype=dtype, graph=graph, trace=trace, spec=spec,
                no_recompute_peak=int(result.baseline_peak), lowered=sorted(captured.lowered),
                decompose=True, memory_model=MODEL_VERSION,
                seconds=round(time.perf_counter() - start, 2), torch=torch.__version__)


def main(argv: list[str] | None = None) -> None:
    sys.path.insert(0, str(ROOT))
    from benchmarks.zoo import ZOO

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", nargs="+", default=["cpu", "meta"], choices=("cuda", "cpu", "meta"),
                        help="devices to trace on (default: cpu meta)")
    parser.add_argument("--models", nargs="+", default=list(ZOO), help="zoo models (default: all)")
    parser.add_argument("--sizes", nargs="+", default=["small"], choices=("small", "full"), help="(default: small)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="(default: float32 bfloat16)")
    parser.add_argument("--spec", default="H200", help="device spec the plan is for (default: H200)")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    rows = []
    for size in args.sizes:
        for name in args.models:
            for dtype in args.dtypes:
                for graph in GRAPHS:
                    if graph == "loss_inside" and not ZOO[name].loss_inside:
                        continue
                    for trace in args.trace:
                        try:
                            row = trace_peak(name, size, dtype, graph, trace, args.spec)
                        except Exception as error:  # noqa: BLE001 - recorded with the row; the others go on
                            row = dict(model=name, size=size, dtype=dtype, graph=graph, trace=trace,
                                       error=f"{type(error).__name__}: {str(error)[:300]}")
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
