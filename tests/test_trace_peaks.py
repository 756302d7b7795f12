"""Planning without a GPU matches planning on one: every zoo model's no-recompute peak, planned for
an H200 from a CPU and a meta trace, against the same model traced on CUDA fake tensors on an H200
(the figures recorded by ``benchmarks/trace_peaks.py --trace cuda`` in ``benchmarks/recorded/``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.trace_peaks import trace_peak

RECORDED = Path(__file__).resolve().parents[1] / "benchmarks" / "recorded" / "trace_peaks_h200.json"
TOLERANCE = 0.05  # the target: within 5% of the CUDA trace
ROWS = [r for r in json.loads(RECORDED.read_text()) if "error" not in r]
# CI traces every small model and two full-size ones (a full-size trace takes seconds each)
CHECKED = [r for r in ROWS if r["size"] == "small"
           or (r["model"] in ("gpt2", "llama") and r["dtype"] == "bfloat16" and r["graph"] == "model")]


def test_the_recording_covers_every_zoo_model_in_both_dtypes() -> None:
    from benchmarks.zoo import ZOO

    recorded = {(r["model"], r["size"], r["dtype"]) for r in ROWS}
    for name in ZOO:
        for size in ("small", "full"):
            for dtype in ("float32", "bfloat16"):
                assert (name, size, dtype) in recorded, (name, size, dtype)
    assert all(r["trace"] == "cuda" and r["torch"].startswith("2.") for r in ROWS)


@pytest.mark.parametrize("trace", ["cpu", "meta"])
@pytest.mark.parametrize("row", CHECKED, ids=lambda r: f"{r['model']}-{r['size']}-{r['dtype']}-{r['graph']}")
def test_a_trace_without_a_gpu_plans_the_cuda_peak(row: dict, trace: str) -> None:
    mine = trace_peak(row["model"], row["size"], row["dtype"], row["graph"], trace, row["spec"])
    assert mine["no_recompute_peak"] == pytest.approx(row["no_recompute_peak"], rel=TOLERANCE)
