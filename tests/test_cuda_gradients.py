"""benchmarks/cuda_gradients.py: what runs without a GPU (its comparison, its refusals)."""

import pytest
import torch

from benchmarks.cuda_gradients import main, spread, worst_difference


def test_the_worst_relative_difference_over_the_parameters():
    reference = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([1.0, 0.0])}
    grads = {"a": torch.tensor([3.0, 4.5]), "b": torch.tensor([1.0, 0.0])}
    assert worst_difference(grads, reference) == pytest.approx(0.1)  # |(0, 0.5)| / |(3, 4)|
    assert worst_difference(reference, reference) == 0.0


def test_gradients_of_different_parameters_are_an_error():
    with pytest.raises(ValueError, match="different parameters"):
        worst_difference({"a": torch.ones(2)}, {"b": torch.ones(2)})


def test_the_spread_names_the_median_the_count_over_1e_4_and_the_worst_parameters():
    reference = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([1.0, 0.0]), "c": torch.tensor([1.0])}
    grads = {"a": torch.tensor([3.0, 4.5]), "b": torch.tensor([1.0, 0.0]), "c": torch.tensor([1.0 + 2**-14])}
    # a: 0.1, b: 0, c: 2**-14 (6.1e-5)
    assert spread(grads, reference, 2) == "median 6.10e-05, 1 of 3 over 1e-4, worst: a 1.00e-01, c 6.10e-05"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a machine without a GPU")
def test_without_a_gpu_the_script_says_it_needs_one(capsys):
    with pytest.raises(SystemExit):
        main(["--models", "bert"])
    assert "needs a GPU" in capsys.readouterr().err


def test_an_unknown_rule_to_leave_out_is_refused_by_name_before_any_gpu_work(capsys):
    with pytest.raises(SystemExit):
        main(["--models", "moe", "--sac-rules-off", "draws_repeated", "no_such_rule"])
    err = capsys.readouterr().err
    assert "--sac-rules-off" in err and "no_such_rule" in err and "needs a GPU" not in err


def test_dropout_no_attention_leaves_the_other_dropouts_on_and_off_sets_them_all_to_zero():
    from benchmarks.cuda_gradients import without_dropout
    from benchmarks.zoo import ZOO, Attention

    model = ZOO["gpt2"].model("small")
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert attentions and all(m.dropout > 0 for m in attentions) and all(m.p > 0 for m in dropouts)
    assert without_dropout(model, "on") == 0 and all(m.dropout > 0 for m in attentions)
    assert without_dropout(model, "no-attention") == len(attentions)
    assert all(m.dropout == 0.0 for m in attentions) and all(m.p > 0 for m in dropouts)
    assert without_dropout(model, "off") == len(dropouts)
    assert all(m.p == 0.0 for m in dropouts)
    with pytest.raises(ValueError, match="dropout='none'"):
        without_dropout(model, "none")
