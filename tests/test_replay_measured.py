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


FOLDER_42717E9 = RECORDED.parent / "partitions_h200_42717e9"
LOSS_INSIDE_42717E9 = sorted(name for name in measured(FOLDER_42717E9)["cells"] if "loss_inside" in name)
# simulated in graph order, these miss by more than 2%; in Inductor's CUDA order (a CUDA build of
# torch lowers them, not CI's) they come nearer (docs/results.md)
GRAPH_ORDER_MISSES = {"llama-loss_inside-sac0.5-graph0": "3.8% low", "moe-loss_inside-sac0.5-graph0": "7.1% high"}


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=f"graph order: {GRAPH_ORDER_MISSES[name]}"))
    if name in GRAPH_ORDER_MISSES else name for name in LOSS_INSIDE_42717E9])
def test_a_planned_step_with_the_loss_inside_simulates_within_2_percent_of_its_measured_peak(name):
    """The zoo's plans at 0.5 with the loss inside (BERT, GPT-2, Llama, MoE, T5), as Inductor ran
    them on the H200 at 42717e9: the partitioned simulation's extra peak against the measured one."""
    row = replay(name, FOLDER_42717E9)
    assert row["recompute"] > 0
    assert row["ratio"] == pytest.approx(1.0, abs=0.02), row


@pytest.mark.parametrize("name", [name for name in LOSS_INSIDE_42717E9
                                  if "after_forward_bytes" in measured(FOLDER_42717E9)["cells"][name]])
def test_what_a_planned_forward_leaves_simulates_to_the_bytes_measured_at_42717e9(name):
    """The same plans: what the forward leaves for the backward, within 0.5% (the MoE's miss above
    is in its backward: its forward leaves what was measured)."""
    from sac_compiler.partition_record import replay_partition

    record = load(name, FOLDER_42717E9)
    simulated = replay_partition(record).end_of_forward_bytes - record["static_bytes"] - record["extra_static_bytes"]
    measured_bytes = measured(FOLDER_42717E9)["cells"][name]["after_forward_bytes"]
    assert simulated == pytest.approx(measured_bytes, rel=0.005)


BERT_QUARTER = [(RECORDED.parent / "partitions_h100_bert_quarter_4d86b24", "saved fills: one-hot gradient stored"),
                (RECORDED.parent / "partitions_h100_bert_quarter_496c0f4", "fills recomputed: written in place")]


@pytest.mark.parametrize("folder,what", BERT_QUARTER, ids=[w for _, w in BERT_QUARTER])
def test_the_berts_cross_entropy_backward_simulates_as_inductor_stored_it(folder, what):
    """The BERT at 0.25 with the loss inside, measured on an H100: where the plan saved the
    cross-entropy's 0-d fills, Inductor stored the one-hot gradient beside the saved log-softmax
    (a logits-sized buffer more, which the model once had folded into its readers); where
    the fills are recomputed, it wrote the gradient into the donated log-softmax. Both within 2%
    of the measured extra peak."""
    (name,) = measured(folder)["cells"]
    row = replay(name, folder)
    assert row["ratio"] == pytest.approx(1.0, abs=0.02), row


FOLDER_B236D86 = RECORDED.parent / "partitions_h100_auto_b236d86"


def test_the_logits_in_the_compiled_forwards_padded_layout_are_written_over_as_measured():
    """The BERT's plan at 0.5 on an H100 (b236d86): the compiled forward hands its backward the
    saved MLM logits (16384 x 30522 fp32) in rows padded to 30528 elements, as the backward
    Inductor compiles receives them, and the logits' gradient is written into their buffer
    (``padded_layout``): the backward simulates as with the traced strides, at the measured peak.
    Without the rule it is a logits-sized buffer more."""
    import torch
    from sac_compiler.passes.memory_model import rules_disabled
    from sac_compiler.passes.memory_rules import inductor_padded_strides

    from sac_compiler.partition_record import replay_partition

    name = "bert-loss_inside-sac0.5-graph0"
    record = load(name, FOLDER_B236D86)
    traced = replay_partition(record).peak_bytes
    padded = []
    for node in record["bw"]["nodes"]:
        val = node.get("val")
        if node["op"] != "placeholder" or not isinstance(val, dict) or val["dtype"] != "float32":
            continue
        strides = inductor_padded_strides(torch.empty_strided(val["size"], val["stride"], device="meta"))
        if list(strides) != val["stride"]:
            val["stride"] = list(strides)
            padded.append((node["name"], val["size"], val["stride"]))
    assert padded == [("addmm_49", [16384, 30522], [30528, 1])]
    assert replay_partition(record).peak_bytes == traced
    with_rule: dict = {}
    without: dict = {}
    replay_partition(record, with_rule)
    with rules_disabled("padded_layout"):
        replay_partition(record, without)
    at = {name: live for name, live in with_rule["backward"]}
    over = {name: live - at[name] for name, live in without["backward"] if live != at[name]}
    assert over == {"sub_28": 16384 * 30522 * 4}  # the logits' gradient, in a buffer of its own
    row = replay(name, FOLDER_B236D86)
    assert row["ratio"] == pytest.approx(1.0, abs=0.02), row


LOSS_INSIDE_B236D86 = sorted(measured(FOLDER_B236D86)["cells"])
# simulated in graph order, these miss by more than 2% (the plans that ran were checked on the
# schedule Inductor compiled, where they came within 2%: docs/results.md)
GRAPH_ORDER_MISSES_B236D86 = {"moe-loss_inside-sac0.5-graph0": "2.3% high"}


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=f"graph order: {GRAPH_ORDER_MISSES_B236D86[name]}"))
    if name in GRAPH_ORDER_MISSES_B236D86 else name for name in LOSS_INSIDE_B236D86])
def test_the_plans_auto_ran_on_an_h100_simulate_in_graph_order_within_2_percent(name):
    """The zoo's plans at 0.5 with the loss inside that ``partition_order="auto"`` ran on an H100
    (b236d86), replayed in graph order, the order planning without a GPU has: the extra peak
    against the measured one."""
    row = replay(name, FOLDER_B236D86)
    assert row["recompute"] > 0
    assert row["ratio"] == pytest.approx(1.0, abs=0.02), row
