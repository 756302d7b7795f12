"""The partitioned memory simulation against peaks measured on a GPU: partitions the backend made on
an H200 (torch 2.11), replayed here on CPU (``benchmarks/replay_measured.py``)."""

import pytest

from benchmarks.replay_measured import measured, replay

NO_RECOMPUTE = sorted(name for name in measured()["cells"] if "sacnone" in name)


@pytest.mark.parametrize("name", NO_RECOMPUTE)
def test_a_partition_without_recompute_simulates_to_the_measured_peak(name):
    """GPT-2 (dropout, tied embeddings, cross-entropy), BERT and a Llama: forward and backward as
    Inductor ran them, within 2% of the measured extra peak."""
    row = replay(name)
    assert row["recompute"] == 0
    assert row["ratio"] == pytest.approx(1.0, abs=0.02), row
