"""The partitioned memory simulation against peaks measured on a GPU: partitions the backend made on
an H200 (torch 2.11), replayed here on CPU (``benchmarks/replay_measured.py``)."""

import pytest

from benchmarks.replay_measured import RECORDED, load, measured, replay

NO_RECOMPUTE = sorted(name for name in measured()["cells"] if "sacnone" in name)


@pytest.mark.parametrize("name", NO_RECOMPUTE)
def test_a_partition_without_recompute_simulates_to_the_measured_peak(name):
    """GPT-2 (dropout, tied embeddings, cross-entropy), BERT and a Llama: forward and backward as
    Inductor ran them, within 2% of the measured extra peak."""
    row = replay(name)
    assert row["recompute"] == 0
    assert row["ratio"] == pytest.approx(1.0, abs=0.02), row


FOLDER_7047736 = RECORDED.parent / "partitions_h200_7047736"
FORWARD_MEASURED = sorted(name for name, cell in measured(FOLDER_7047736)["cells"].items()
                          if "after_forward_bytes" in cell)


@pytest.mark.parametrize("name", FORWARD_MEASURED)
def test_what_a_planned_forward_leaves_for_backward_simulates_to_the_measured_bytes(name):
    """Plans with recomputation (GPT-2, Llama, MoE, T5), as Inductor ran them on the H200: what
    the forward leaves allocated for the backward (measured after forward returned), within 0.5%.
    The backward's peak above it is where these plans' predictions miss (docs/results.md)."""
    from sac_compiler.partition_record import replay_partition

    record = load(name, FOLDER_7047736)
    simulated = replay_partition(record).end_of_forward_bytes - record["static_bytes"] - record["extra_static_bytes"]
    measured_bytes = measured(FOLDER_7047736)["cells"][name]["after_forward_bytes"]
    assert simulated == pytest.approx(measured_bytes, rel=0.005)
