"""Every ``backend="sac"`` option, given a wrong value, fails at configuration time with a ValueError
that names the option, repeats the value and says what is allowed; every right value still works.

The tables are per field of :class:`SACConfig`, and a test checks that each field has bad-input
cases, so a new option cannot be added without its checks.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn

from sac_compiler.config import MemoryBudget, SACConfig, parse_bytes
from sac_compiler.device_specs import known_device_names

_FIELDS = [f.name for f in dataclasses.fields(SACConfig)]

# Wrong values of every kind, tried on every field; per field, the kinds that are *valid* there.
_WRONG_KINDS: dict[str, Any] = {"None": None, "bool": True, "float": 2.5, "str": "bogus", "list": ["x"]}
_VALID_KINDS: dict[str, set[str]] = {
    "memory_budget": {"None"},  # None: no budget
    "device": set(),
    "estimate_mode": set(),
    "solver": set(),
    "time_limit_s": {"None", "float"},  # None: no limit; 2.5 seconds
    "mip_gap": {"None"},
    "compiler": set(),
    "world_size": {"None"},  # None: the process group's world size, else 1
    "optimizer_state_bytes": {"None"},
    "optimizer": {"None"},
    "report": {"bool", "str"},  # True prints it; a str is a relative file path in a writable directory
    "enforce_budget": {"bool"},
    "conv_workspaces": {"bool"},
    "hold_outputs": {"bool"},
    "loss_memory": set(),
    "gradients_held": set(),
    "runs_per_step": set(),
    "partition_order": set(),
    "reorder_for_peak_memory": {"bool"},
    "offload": {"bool"},
    "host_memory_budget": {"None"},  # None: unlimited pinned host memory
}

_BUDGET_FORM = "a float in [0, 1]"
_SECONDS = "a number of seconds > 0 or None"
_GAP = "mip_gap must be in [0, 1)"
_BYTES = "an int of bytes or a string like '6GiB'"
_REPORT = "True/False or a file path"

# (options, fragments the message must hold besides the option name and the value's repr)
_BAD: list[Any] = [
    # memory_budget
    pytest.param({"memory_budget": "0.5"}, ["a float (0.5)", "not a string", "unit"], id="budget-str-fraction"),
    pytest.param({"memory_budget": "0"}, ["not a string", "unit"], id="budget-str-zero"),
    pytest.param({"memory_budget": "1"}, ["not a string", "unit"], id="budget-str-one"),
    pytest.param({"memory_budget": "1.5"}, ["not a string", "unit"], id="budget-str-bare-fractional"),
    pytest.param({"memory_budget": 0}, ["0.0", "bytes"], id="budget-int-zero"),
    pytest.param({"memory_budget": 1}, ["1.0", "bytes"], id="budget-int-one"),
    pytest.param({"memory_budget": -4096}, ["positive"], id="budget-int-negative"),
    pytest.param({"memory_budget": 1.5}, [_BUDGET_FORM], id="budget-float-above-one"),
    pytest.param({"memory_budget": -0.1}, [_BUDGET_FORM], id="budget-float-negative"),
    pytest.param({"memory_budget": float("nan")}, [_BUDGET_FORM], id="budget-nan"),
    pytest.param({"memory_budget": float("inf")}, [_BUDGET_FORM], id="budget-inf"),
    pytest.param({"memory_budget": False}, [_BUDGET_FORM, "'6GiB'"], id="budget-bool"),
    pytest.param({"memory_budget": [1, 2]}, [_BUDGET_FORM, "'6GiB'"], id="budget-list"),
    pytest.param({"memory_budget": {"bytes": 1}}, [_BUDGET_FORM, "'6GiB'"], id="budget-dict"),
    pytest.param({"memory_budget": "6 parsecs"}, ["cannot read", "GiB"], id="budget-bad-unit"),
    pytest.param({"memory_budget": "-6GiB"}, ["positive"], id="budget-str-negative"),
    pytest.param({"memory_budget": "0GiB"}, ["positive"], id="budget-str-zero-unit"),
    pytest.param({"memory_budget": "1e400GiB"}, ["too large"], id="budget-str-overflow"),
    pytest.param({"memory_budget": "nan"}, ["cannot read"], id="budget-str-nan"),
    # device
    pytest.param({"device": "H300"}, ["'auto'", *known_device_names(), "h100"], id="device-unknown"),
    pytest.param({"device": "cuda"}, ["not a torch device"], id="device-torch-name"),
    pytest.param({"device": "cpu"}, ["not a torch device"], id="device-cpu"),
    pytest.param({"device": ""}, ["'auto'"], id="device-empty"),
    pytest.param({"device": torch.device("cuda")}, ["'auto'"], id="device-torch-device"),
    # estimate_mode, solver, compiler
    pytest.param({"estimate_mode": "guess"}, ["one of ['cost-model', 'benchmark']"], id="estimate-unknown"),
    pytest.param({"solver": "gurobi"}, ["one of ['cbc', 'highs']"], id="solver-unknown"),
    pytest.param({"solver": "HiGHS"}, ["one of ['cbc', 'highs']"], id="solver-case"),
    pytest.param({"compiler": "tvm"}, ["one of ['inductor', 'eager']"], id="compiler-unknown"),
    pytest.param({"compiler": {"inductor"}}, ["one of ['inductor', 'eager']"], id="compiler-set"),
    # time_limit_s
    pytest.param({"time_limit_s": "10"}, [_SECONDS], id="time-str"),
    pytest.param({"time_limit_s": 0}, [_SECONDS], id="time-zero"),
    pytest.param({"time_limit_s": -1.0}, [_SECONDS], id="time-negative"),
    pytest.param({"time_limit_s": float("nan")}, [_SECONDS], id="time-nan"),
    pytest.param({"time_limit_s": float("inf")}, [_SECONDS, "None"], id="time-inf"),
    pytest.param({"time_limit_s": False}, [_SECONDS], id="time-bool"),
    # mip_gap
    pytest.param({"mip_gap": "0.1"}, [_GAP], id="gap-str"),
    pytest.param({"mip_gap": 1}, [_GAP], id="gap-one"),
    pytest.param({"mip_gap": -0.01}, [_GAP], id="gap-negative"),
    pytest.param({"mip_gap": float("nan")}, [_GAP], id="gap-nan"),
    pytest.param({"mip_gap": False}, [_GAP], id="gap-bool"),
    # world_size
    pytest.param({"world_size": 0}, ["an int >= 1"], id="world-zero"),
    pytest.param({"world_size": 1.0}, ["an int >= 1"], id="world-float"),
    pytest.param({"world_size": "1"}, ["an int >= 1"], id="world-str"),
    # optimizer_state_bytes
    pytest.param({"optimizer_state_bytes": -1}, [">= 0"], id="optstate-negative"),
    pytest.param({"optimizer_state_bytes": "lots"}, ["cannot read"], id="optstate-unreadable"),
    pytest.param({"optimizer_state_bytes": "0.5"}, ["whole number of bytes"], id="optstate-fractional-str"),
    pytest.param({"optimizer_state_bytes": float("nan")}, [_BYTES], id="optstate-nan"),
    pytest.param({"optimizer_state_bytes": False}, [_BYTES], id="optstate-bool"),
    pytest.param({"optimizer_state_bytes": [1024]}, [_BYTES], id="optstate-list"),
    # optimizer
    pytest.param({"optimizer": "adam"}, ["torch.optim.Optimizer"], id="optimizer-str"),
    pytest.param({"optimizer": torch.optim.Adam}, ["torch.optim.Optimizer", "an instance"], id="optimizer-class"),
    # enforce_budget
    pytest.param({"enforce_budget": "yes"}, ["True or False"], id="enforce-str"),
    pytest.param({"conv_workspaces": 1}, ["conv_workspaces", "True or False"], id="conv-workspaces-int"),
    pytest.param({"enforce_budget": 1}, ["True or False"], id="enforce-int"),
    pytest.param({"hold_outputs": "no"}, ["hold_outputs", "True or False"], id="hold-outputs-str"),
    pytest.param({"reorder_for_peak_memory": 1}, ["True or False", "peak estimate"], id="reorder-int"),
    pytest.param({"loss_memory": "a lot"}, ["cannot read", "GiB"], id="loss-unreadable"),
    pytest.param({"loss_memory": -1}, [_BYTES], id="loss-negative"),
    pytest.param({"loss_memory": 0.5}, [_BYTES], id="loss-fractional"),
    pytest.param({"gradients_held": "a lot"}, ["cannot read", "GiB"], id="gradients-held-unreadable"),
    pytest.param({"gradients_held": -1}, [_BYTES], id="gradients-held-negative"),
    pytest.param({"runs_per_step": 0}, ["runs_per_step must be an int >= 1"], id="runs-zero"),
    pytest.param({"runs_per_step": 2.0}, ["runs_per_step must be an int >= 1"], id="runs-float"),
    pytest.param({"runs_per_step": True}, ["runs_per_step must be an int >= 1"], id="runs-bool"),
    pytest.param({"partition_order": "schedule"}, ["graph", "inductor"], id="partition-order-unknown"),
    pytest.param({"partition_order": "inductor", "compiler": "eager"}, ["compiler='eager'", "partition_order='graph'"],
                 id="partition-order-eager"),
    # offload, host_memory_budget
    pytest.param({"offload": "yes"}, ["True or False"], id="offload-str"),
    pytest.param({"offload": 1}, ["True or False"], id="offload-int"),
    pytest.param({"host_memory_budget": "lots"}, ["cannot read", "GiB"], id="host-unreadable"),
    pytest.param({"host_memory_budget": 0}, ["positive", _BYTES], id="host-zero"),
    pytest.param({"host_memory_budget": -2**30}, ["positive", _BYTES], id="host-negative"),
    pytest.param({"host_memory_budget": "0.5"}, ["whole number of bytes"], id="host-fractional-str"),
    pytest.param({"host_memory_budget": 2.5}, [_BYTES], id="host-fractional"),
    pytest.param({"host_memory_budget": False}, [_BYTES], id="host-bool"),
    # report
    pytest.param({"report": None}, [_REPORT], id="report-none"),
    pytest.param({"report": 1}, [_REPORT], id="report-int"),
    pytest.param({"report": ""}, ["report=False"], id="report-empty"),
    pytest.param({"report": b"plan.txt"}, [_REPORT], id="report-bytes"),
    pytest.param({"report": "no-such-dir/deeper/plan.txt"}, ["does not exist"], id="report-missing-dir"),
    pytest.param({"report": "~no-such-user-dir/plan.txt"}, ["does not exist", "'~' is not expanded"],
                 id="report-tilde"),
]


def _match(options: dict[str, Any], fragments: list[str]) -> str:
    """A regex that finds, in any order, each option's name, each value's repr and the fragments."""
    needles = [*options, *(repr(v) for v in options.values()), *fragments]
    return "(?s)" + "".join(f"(?=.*{re.escape(n)})" for n in needles)


@pytest.fixture
def _in_tmp(tmp_path, monkeypatch):
    """Relative report paths resolve in an empty, writable directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("options, fragments", _BAD)
def test_bad_value_names_option_value_and_form(options, fragments, _in_tmp):
    with pytest.raises(ValueError, match=_match(options, fragments)):
        SACConfig.from_options(options)


@pytest.mark.parametrize("field, kind", [(f, k) for f in _FIELDS for k in _WRONG_KINDS if k not in _VALID_KINDS.get(f, ())])
def test_every_field_rejects_every_wrong_type(field, kind, _in_tmp):
    options = {field: _WRONG_KINDS[kind]}
    with pytest.raises(ValueError, match=_match(options, [])):
        SACConfig.from_options(options)


def test_every_field_has_bad_input_cases():
    """A new SACConfig field must be added to both tables, with its checks."""
    assert set(_VALID_KINDS) == set(_FIELDS)
    covered = {name for case in _BAD for name in case.values[0]}
    assert set(_FIELDS) <= covered, f"fields without a bad-input case: {sorted(set(_FIELDS) - covered)}"


def test_options_must_be_a_dict():
    expected = "options must be a dict of backend='sac' options such as {'memory_budget': '6GiB'}, got str '6GiB'"
    with pytest.raises(ValueError, match=re.escape(expected)):
        SACConfig.from_options("6GiB")
    with pytest.raises(ValueError, match=re.escape("got list [('memory_budget', 0.5)]")):
        SACConfig.from_options([("memory_budget", 0.5)])


def test_unknown_option_keys_of_any_type():
    with pytest.raises(ValueError, match=r"unknown backend='sac' option\(s\) \[1, 'budget'\]"):
        SACConfig.from_options({1: 2, "budget": "1GiB"})


def test_optimizer_and_its_state_bytes_not_both():
    sgd = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="either optimizer_state_bytes or optimizer, not both"):
        SACConfig.from_options({"optimizer": sgd, "optimizer_state_bytes": 1024})


def test_long_values_are_shortened_in_messages():
    value = ["x" * 40] * 10
    with pytest.raises(ValueError, match=r"device must be .*, got list \['xxx.*\.\.\.$") as info:
        SACConfig.from_options({"device": value})
    assert len(str(info.value)) < 600


# --- report paths ---------------------------------------------------------------------------------


def test_report_directory_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=_match({"report": str(tmp_path)}, ["is a directory"])):
        SACConfig.from_options({"report": str(tmp_path)})


def test_report_parent_that_is_a_file_is_rejected(tmp_path):
    (tmp_path / "notes.txt").write_text("")
    path = str(tmp_path / "notes.txt" / "plan.txt")
    with pytest.raises(ValueError, match=_match({"report": path}, ["is not a directory"])):
        SACConfig.from_options({"report": path})


def test_report_unwritable_directory_is_rejected(tmp_path, monkeypatch):
    # running as root makes any directory writable: stand in for a read-only one
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == tmp_path else real_access(p, mode, **kw))
    path = str(tmp_path / "plan.txt")
    with pytest.raises(ValueError, match=_match({"report": path}, ["not writable"])):
        SACConfig.from_options({"report": path})


def test_report_unwritable_file_is_rejected(tmp_path, monkeypatch):
    target = tmp_path / "plan.txt"
    target.write_text("old")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == target else real_access(p, mode, **kw))
    with pytest.raises(ValueError, match=_match({"report": str(target)}, ["not writable"])):
        SACConfig.from_options({"report": str(target)})


def test_unwritable_report_fails_the_compile_before_planning(tmp_path):
    path = str(tmp_path / "missing" / "plan.txt")
    compiled = torch.compile(nn.Linear(2, 2), backend="sac", options={"memory_budget": 0.5, "report": path})
    with pytest.raises(Exception, match=_match({"report": path}, ["does not exist"])):
        compiled(torch.randn(1, 2, requires_grad=True))


# --- valid values ---------------------------------------------------------------------------------

_GOOD: list[Any] = [
    pytest.param({}, {}, id="defaults"),
    pytest.param(None, {}, id="no-options"),
    pytest.param({"memory_budget": None}, {"memory_budget": None}, id="budget-none"),
    pytest.param({"memory_budget": 0.0}, {"memory_budget": MemoryBudget(fraction=0.0)}, id="budget-zero-fraction"),
    pytest.param({"memory_budget": 0.5}, {"memory_budget": MemoryBudget(fraction=0.5)}, id="budget-half"),
    pytest.param({"memory_budget": 1.0}, {"memory_budget": MemoryBudget(fraction=1.0)}, id="budget-one-fraction"),
    pytest.param({"memory_budget": "6GiB"}, {"memory_budget": MemoryBudget(bytes=6 * 2**30)}, id="budget-gib"),
    pytest.param({"memory_budget": " 1.5 kib"}, {"memory_budget": MemoryBudget(bytes=1536)}, id="budget-kib"),
    pytest.param({"memory_budget": "1024"}, {"memory_budget": MemoryBudget(bytes=1024)}, id="budget-str-bytes"),
    pytest.param({"memory_budget": "1e9"}, {"memory_budget": MemoryBudget(bytes=10**9)}, id="budget-str-exp"),
    pytest.param({"memory_budget": 4096}, {"memory_budget": MemoryBudget(bytes=4096)}, id="budget-int"),
    pytest.param({"memory_budget": MemoryBudget(fraction=0.25)}, {"memory_budget": MemoryBudget(fraction=0.25)},
                 id="budget-parsed"),
    pytest.param({"device": "auto"}, {"device": "auto"}, id="device-auto"),
    pytest.param({"device": "H100-SXM"}, {"device": "H100-SXM"}, id="device-name"),
    pytest.param({"device": "a100-80gb"}, {"device": "a100-80gb"}, id="device-lower"),
    pytest.param({"device": "h200"}, {"device": "h200"}, id="device-alias"),
    pytest.param({"estimate_mode": "benchmark"}, {"estimate_mode": "benchmark"}, id="estimate"),
    pytest.param({"solver": "cbc"}, {"solver": "cbc"}, id="solver"),
    pytest.param({"time_limit_s": None}, {"time_limit_s": None}, id="time-none"),
    pytest.param({"time_limit_s": 5}, {"time_limit_s": 5}, id="time-int"),
    pytest.param({"time_limit_s": 0.5}, {"time_limit_s": 0.5}, id="time-float"),
    pytest.param({"mip_gap": None}, {"mip_gap": None}, id="gap-none"),
    pytest.param({"mip_gap": 0}, {"mip_gap": 0}, id="gap-zero"),
    pytest.param({"mip_gap": 0.5}, {"mip_gap": 0.5}, id="gap-half"),
    pytest.param({"compiler": "eager"}, {"compiler": "eager"}, id="compiler"),
    pytest.param({"world_size": 1}, {"world_size": 1}, id="world"),
    pytest.param({"world_size": 8}, {"world_size": 8}, id="world-eight"),  # offline, no process group
    pytest.param({"world_size": None}, {"world_size": 1}, id="world-none"),
    pytest.param({"optimizer_state_bytes": 0}, {"optimizer_state_bytes": 0}, id="optstate-zero"),
    pytest.param({"optimizer_state_bytes": "1GiB"}, {"optimizer_state_bytes": 2**30}, id="optstate-gib"),
    pytest.param({"optimizer_state_bytes": 1024}, {"optimizer_state_bytes": 1024}, id="optstate-int"),
    pytest.param({"offload": True}, {"offload": True, "host_memory_budget": None}, id="offload"),
    pytest.param({"offload": True, "host_memory_budget": "32GiB"}, {"host_memory_budget": 32 * 2**30},
                 id="host-gib"),
    pytest.param({"host_memory_budget": 10**9}, {"host_memory_budget": 10**9}, id="host-int"),
    pytest.param({"report": True}, {"report": True}, id="report-true"),
    pytest.param({"report": False}, {"report": False}, id="report-false"),
    pytest.param({"report": "plan.txt"}, {"report": "plan.txt"}, id="report-relative"),
]


@pytest.mark.parametrize("options, expected", _GOOD)
def test_valid_values_still_work(options, expected, _in_tmp):
    config = SACConfig.from_options(options)
    for name, value in expected.items():
        assert getattr(config, name) == value


def test_valid_optimizer_and_path_reports(tmp_path):
    sgd = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    assert SACConfig.from_options({"optimizer": sgd}).optimizer is sgd
    target = tmp_path / "plan.txt"
    assert SACConfig.from_options({"report": str(target)}).report == str(target)
    assert SACConfig.from_options({"report": target}).report == str(target)  # os.PathLike, kept as str
    target.write_text("old")  # an existing file is overwritten
    assert SACConfig.from_options({"report": str(target)}).report == str(target)


def test_direct_construction_is_validated_too():
    assert SACConfig(memory_budget="2GiB").memory_budget == MemoryBudget(bytes=2 * 2**30)
    with pytest.raises(ValueError, match=_match({"time_limit_s": "10"}, [_SECONDS])):
        SACConfig(time_limit_s="10")


def test_parse_bytes_without_an_option_name():
    assert parse_bytes("6GiB") == 6 * 2**30
    with pytest.raises(ValueError, match=r"a byte size must be positive, got int 0"):
        parse_bytes(0)
    with pytest.raises(ValueError, match=r"optimizer_state_bytes must be an int of bytes .*got bool True"):
        parse_bytes(True, option="optimizer_state_bytes")
