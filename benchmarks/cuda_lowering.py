"""Run a script that lowers graphs with Inductor for a CUDA GPU, on a machine without one.

Inductor's schedule for a CUDA graph (its Triton fusion, its reordering for peak memory) differs
from its schedule for the same graph on CPU, and ``sac_compiler.inductor_order`` reads the
schedule by lowering the graph on fake tensors of the device. Lowering needs no kernel to run, but
Inductor and fake tensors ask the CUDA runtime a few questions on the way (is a GPU there, which
one, its RNG state); this script answers them as one NVIDIA H200 (sm90) would and runs the given
script, so that recorded partitions can be lowered for CUDA on a CPU-only machine. It needs a torch
build with CUDA and Triton (a CPU-only build has no Triton scheduling). Nothing may run a kernel
under it: a script that does fails at its first CUDA call::

    python benchmarks/cuda_lowering.py benchmarks/replay_measured.py --folder FOLDER --inductor-order --on-target
"""

from __future__ import annotations

import importlib
import runpy
import sys
import types
from typing import Any

import torch

# torch.cuda.get_device_properties for one H200 SXM: its compute capability (9.0) and SM count
# (132) as NVIDIA specifies them; lowering the recorded partitions reads no other property
H200 = types.SimpleNamespace(name="NVIDIA H200", major=9, minor=0, multi_processor_count=132)


class _Device:
    """``torch.cuda.device(i)`` as a context that changes nothing (there is one device)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> _Device:
        return self

    def __exit__(self, *exc: Any) -> bool:
        return False


def answer_as_h200() -> None:
    """Answer the CUDA runtime's questions Inductor's lowering asks as one H200 would."""
    import torch.cuda.random as cuda_random

    if not hasattr(torch.version, "cuda") or torch.version.cuda is None:
        raise SystemExit(f"torch {torch.__version__} is a CPU-only build: Inductor has no CUDA scheduling "
                         "in it; install a CUDA build of torch (no GPU needed) to lower graphs for CUDA")
    torch.cuda.is_available = lambda: True
    torch.cuda.is_initialized = lambda: True
    torch.cuda._lazy_init = lambda: None
    torch.cuda.device_count = lambda: 1
    torch.cuda.current_device = lambda: 0
    torch.cuda.set_device = lambda *args, **kwargs: None
    torch.cuda.device = _Device  # type: ignore[assignment,misc]
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.get_device_properties = lambda *args, **kwargs: H200
    torch.cuda.get_device_capability = lambda *args, **kwargs: (H200.major, H200.minor)
    torch.cuda.get_device_name = lambda *args, **kwargs: H200.name
    # Dynamo's device interface binds torch.cuda's functions when imported (before this, where a
    # graph was captured first in the same process): bind the answers above
    from torch._dynamo.device_interface import CudaInterface

    for name in ("current_device", "set_device", "device_count", "synchronize", "get_device_properties"):
        setattr(CudaInterface, name, staticmethod(getattr(torch.cuda, name)))
    CudaInterface.device = _Device  # type: ignore[assignment,misc]
    # whether Triton can compile for the device is cached from the first question: ask again
    triton_utils = importlib.import_module("torch.utils._triton")
    for function in vars(triton_utils).values():
        if hasattr(function, "cache_clear"):
            function.cache_clear()
    for module in (torch.cuda, cuda_random):
        module.get_rng_state = lambda *args, **kwargs: torch.zeros(16, dtype=torch.uint8)
        module.set_rng_state = lambda *args, **kwargs: None
    # the conv_workspace rule runs each convolution on the GPU it finds: nothing runs here, so none
    # is measured (as on a machine without a GPU)
    memory_rules = importlib.import_module("sac_compiler.passes.memory_rules")
    memory_rules.measure_convolution_workspaces = lambda gm, device: 0
    # imported once torch.cuda answers: some of Inductor's modules bind its functions when imported
    importlib.import_module("torch._inductor.inductor_prims")  # registers the prim patched below
    prims = importlib.import_module("torch._prims")
    fake_tensor = importlib.import_module("torch._subclasses.fake_tensor")

    # a fake CUDA tensor made first initialises the device with a real one: there is none
    fake_tensor.init_gpu_context = lambda device: None
    # the prim's meta kernel indexes a real tensor of seeds on the device; its result is a scalar
    torch.ops.prims.inductor_lookup_seed.default.prim_meta_impl = (
        lambda seeds, index: prims.TensorMeta(shape=(), strides=(), dtype=seeds.dtype, device=seeds.device))
    # Inductor's reinplacing pass gives a scatter it makes the value of a copy into a view of a fake
    # tensor; the copy enters a CUDA device guard, which asks the runtime: leave the value as it is
    # (the copy changes no metadata, the only thing a fake value holds)
    reinplace = importlib.import_module("torch._inductor.fx_passes.reinplace")
    if hasattr(reinplace, "_inplace_generalized_scatter"):
        reinplace._inplace_generalized_scatter = lambda inp, src, view_ops: inp


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: python benchmarks/cuda_lowering.py SCRIPT [ARGS...]")
    answer_as_h200()
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
