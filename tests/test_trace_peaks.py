"""Planning without a GPU matches planning on one: every zoo model's no-recompute peak, planned for
an H200 from a CPU and a meta trace, against the same model traced on CUDA fake tensors on an H200
(the figures recorded by ``benchmarks/trace_peaks.py --trace cuda`` in ``benchmarks/recorded/``).

A recorded figure is the memory model's figure for the CUDA trace: it is compared only with the
same memory model (``MODEL_VERSION``) and the same capture (``decompose``). Recordings under an
earlier model are reported as skipped, with the reason, until they are recorded again on a GPU;
the CPU trace is then checked against the meta trace, which takes the GPU's branches wherever a
lowering or a decomposition depends on the device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sac_compiler.passes.memory_model import MODEL_VERSION

from benchmarks.trace_peaks import trace_peak

RECORDED = Path(__file__).resolve().parents[1] / "benchmarks" / "recorded" / "trace_peaks_h200.json"
TOLERANCE = 0.05  # the target: within 5% of the CUDA trace
ROWS = [r for r in json.loads(RECORDED.read_text()) if "error" not in r]
# CI traces every small model and two full-size ones (a full-size trace takes seconds each)
CHECKED = [r for r in ROWS if r["size"] == "small"
           or (r["model"] in ("gpt2", "llama") and r["dtype"] == "bfloat16" and r["graph"] == "model")]


def _id(row: dict) -> str:
    return f"{row['model']}-{row['size']}-{row['dtype']}-{row['graph']}"


def test_the_recording_covers_every_zoo_model_in_both_dtypes() -> None:
    from benchmarks.zoo import ZOO

    recorded = {(r["model"], r["size"], r["dtype"]) for r in ROWS}
    for name in ZOO:
        for size in ("small", "full"):
            for dtype in ("float32", "bfloat16"):
                assert (name, size, dtype) in recorded, (name, size, dtype)
    assert all(r["trace"] == "cuda" and r["torch"].startswith("2.") and r["commit"] for r in ROWS)


@pytest.mark.parametrize("trace", ["cpu", "meta"])
@pytest.mark.parametrize("row", CHECKED, ids=_id)
def test_a_trace_without_a_gpu_plans_the_cuda_peak(row: dict, trace: str) -> None:
    if row.get("memory_model", 1) != MODEL_VERSION or not row.get("decompose", False):
        pytest.skip(f"recorded at commit {row['commit']} under memory model {row.get('memory_model', 1)} "
                    f"(now {MODEL_VERSION}): record it again with benchmarks/trace_peaks.py --trace cuda on a GPU")
    mine = trace_peak(row["model"], row["size"], row["dtype"], row["graph"], trace, row["spec"])
    assert mine["no_recompute_peak"] == pytest.approx(row["no_recompute_peak"], rel=TOLERANCE)


@pytest.mark.parametrize("row", CHECKED, ids=_id)
def test_a_cpu_trace_plans_the_peak_of_a_meta_trace(row: dict) -> None:
    """The CPU trace against the meta trace: meta takes the GPU's branches of device-dependent
    decompositions, and attention and RMSNorm are lowered as on the GPU in both."""
    cpu = trace_peak(row["model"], row["size"], row["dtype"], row["graph"], "cpu", row["spec"])
    meta = trace_peak(row["model"], row["size"], row["dtype"], row["graph"], "meta", row["spec"])
    assert cpu["no_recompute_peak"] == pytest.approx(meta["no_recompute_peak"], rel=TOLERANCE)
