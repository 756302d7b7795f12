"""The kernel-time breakdown's arithmetic (the profiling itself needs a GPU: benchmarks/kernel_breakdown.py)."""

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_breakdown.py"


@pytest.fixture(scope="module")
def breakdown():
    spec = importlib.util.spec_from_file_location("kernel_breakdown", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_kernel_times_per_step(breakdown):
    events = [SimpleNamespace(key="gemm", count=6, self_device_time_total=3000.0),
              SimpleNamespace(key="cpu_op", count=9, self_device_time_total=0.0),  # no device time: dropped
              SimpleNamespace(key="fill", count=3, self_device_time_total=150.0)]
    assert breakdown.per_step(events, steps=3) == {"gemm": (2.0, 1.0), "fill": (1.0, pytest.approx(0.05))}


def test_largest_changes_list_growth_then_shrinkage(breakdown):
    runs = {"compile": {"gemm": (4, 1.0), "norm": (2, 0.5), "gone": (1, 0.2)},
            "sac": {"gemm": (6, 1.6), "norm": (2, 0.5), "new": (1, 0.1)}}
    changes = breakdown.largest_changes(runs, "compile", "sac", top=5)
    assert [k for k, _ in changes] == ["gemm", "new", "gone"]  # unchanged kernels are left out
    assert [round(c, 6) for _, c in changes] == [0.6, 0.1, -0.2]
    assert breakdown.largest_changes(runs, "compile", "sac", top=1) == [changes[0], changes[2]]
