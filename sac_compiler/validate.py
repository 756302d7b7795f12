"""Predicted vs measured peak memory of a training step (the check behind the memory pass's claim)."""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class PeakComparison:
    name: str
    compiler: str
    predicted_bytes: int
    measured_bytes: int

    @property
    def ratio(self) -> float:
        return self.predicted_bytes / self.measured_bytes


def predict_training_peak(
    model: torch.nn.Module, inputs: tuple[Any, ...], optimizer: torch.optim.Optimizer, compiler: str = "inductor",
    device: str = "auto",
) -> int:
    """Peak bytes of forward + backward + optimizer.step() predicted from the joint graph alone."""
    from sac_compiler.analysis import analyze
    from sac_compiler.capture import capture_joint

    graph = capture_joint(model, *inputs)
    analysis = analyze(graph, device=device, optimizer=optimizer, fused_pointwise=compiler == "inductor")
    return analysis.memory.peak_bytes


def _warm_up_cublas(device: torch.device) -> None:
    lin = torch.nn.Linear(768, 768, device=device)
    lin(torch.randn(1, 768, device=device)).sum().backward()


def measure_training_peak(
    build: Callable[[], tuple[torch.nn.Module, tuple[Any, ...], torch.optim.Optimizer]],
    compiler: str = "inductor",
    steps: int = 2,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
) -> tuple[int, int]:
    """(predicted, measured) peak bytes of a compiled training step on the current GPU.

    As PyTorch's MemTracker test does: the cuBLAS workspace is created first, the caches emptied,
    and the peak counts everything allocated from building the model on (parameters, inputs,
    gradients, optimizer state, activations, temporaries), measured over the steps after the
    first (which compiles), ``steps >= 2``.
    """
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (the first step compiles), got {steps}")
    if not torch.cuda.is_available():
        raise ValueError("measure_training_peak runs a real training step and needs CUDA")
    device = torch.device("cuda", torch.cuda.current_device())
    loss_fn = loss_fn or (lambda out: out.float().sum())
    _warm_up_cublas(device)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    torch._dynamo.reset()
    before = torch.cuda.memory_allocated(device)
    model, inputs, optimizer = build()
    predicted = predict_training_peak(model, inputs, optimizer, compiler)
    torch.cuda.synchronize()
    compiled = torch.compile(model, backend="sac", options={"compiler": compiler})
    for step in range(steps):
        loss_fn(compiled(*inputs)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0:
            # The first step compiles (Inductor benchmarks candidate kernels on real buffers) and
            # creates the optimizer state: measure the steady state of the later steps.
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated(device) - before
    del model, inputs, optimizer, compiled
    gc.collect()
    torch.cuda.empty_cache()
    return predicted, measured
