"""The partitioner's key in Inductor's FX graph and AOTAutograd caches, and what those caches must
neither lose (the report) nor log (a failed pickle of the partitioner) on a planned graph."""

import copy
import dataclasses
import logging
import pickle
import shutil
from typing import ClassVar

import pytest
import torch
from torch import nn

from sac_compiler import backend
from sac_compiler.backend import SACPartitioner, compile_graph, config_key
from sac_compiler.config import MemoryBudget, SACConfig
from tests.models import Nested


def _graph() -> torch.fx.GraphModule:
    return torch.fx.symbolic_trace(nn.Linear(4, 4))


def _adamw(dim: int = 4) -> torch.optim.Optimizer:
    return torch.optim.AdamW(nn.Linear(dim, dim).parameters(), lr=1e-3)


def _step(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.ones_like(p)
    optimizer.step()


# For every SACConfig field, a value other than its default. A new field missing here fails
# test_every_config_field_is_in_the_key: add a value for it (or, with the reason, exclude it from
# the key in sac_compiler.backend._CONFIG_KEY_EXCLUDED).
_OTHER_VALUES = {
    "memory_budget": lambda: MemoryBudget(bytes=2**30),
    "device": lambda: "H200",
    "estimate_mode": lambda: "benchmark",
    "solver": lambda: "cbc",
    "time_limit_s": lambda: 5.0,
    "mip_gap": lambda: 0.05,
    "compiler": lambda: "eager",
    "world_size": lambda: 2,
    "optimizer_state_bytes": lambda: 2**20,
    "optimizer": _adamw,
    "report": lambda: True,
    "enforce_budget": lambda: False,
    "conv_workspaces": lambda: False,
    "hold_outputs": lambda: False,
    "loss_memory": lambda: 2**30,
    "gradients_held": lambda: 2**28,
    "runs_per_step": lambda: 8,
    "partition_order": lambda: "inductor",
    "reorder_for_peak_memory": lambda: False,
    "offload": lambda: True,
    "host_memory_budget": lambda: 32 * 2**30,
}


def _with(name: str, value: object) -> SACConfig:
    """The default config with one field changed. Set past SACConfig's checks: the key only reads
    the fields."""
    config = SACConfig()
    object.__setattr__(config, name, value)
    return config


def test_every_config_field_is_in_the_key():
    keyed = [f.name for f in dataclasses.fields(SACConfig) if f.name not in backend._CONFIG_KEY_EXCLUDED]
    missing = [name for name in keyed if name not in _OTHER_VALUES]
    assert not missing, f"SACConfig field(s) {missing} have no other value in _OTHER_VALUES: add one"
    gm = _graph()
    base = SACPartitioner(SACConfig(), gm).uuid()
    for name in keyed:
        assert SACPartitioner(_with(name, _OTHER_VALUES[name]()), gm).uuid() != base, name
    fraction = SACPartitioner(_with("memory_budget", MemoryBudget(fraction=0.5)), gm).uuid()
    assert fraction not in (base, SACPartitioner(_with("memory_budget", MemoryBudget(fraction=0.6)), gm).uuid())


def test_the_memory_rules_left_out_are_in_the_key():
    from sac_compiler.passes.memory_model import rules_disabled

    gm = _graph()
    partitioner = SACPartitioner(SACConfig(), gm)
    base = partitioner.uuid()
    with rules_disabled("draws_repeated"):  # the partitioned backward differs without it
        without = partitioner.uuid()
        with rules_disabled("buffer_reuse"):
            assert partitioner.uuid() not in (base, without)
    assert without != base
    assert partitioner.uuid() == base


def test_optimizer_is_keyed_by_what_it_holds_not_its_identity():
    def key(optimizer):
        return config_key(SACConfig(optimizer=optimizer))

    torch.manual_seed(0)
    first, second = _adamw(), _adamw()  # other parameters, other values, same shapes
    assert key(first) == key(second)
    assert "0x" not in repr(key(first))  # nothing from id()
    second.param_groups[0]["lr"] = 0.5  # as a learning-rate scheduler does
    assert key(first) == key(second)
    assert key(_adamw(dim=8)) != key(first)
    assert key(torch.optim.Adam(nn.Linear(4, 4).parameters())) != key(first)
    sgd = [torch.optim.SGD(nn.Linear(4, 4).parameters(), lr=0.1, momentum=m) for m in (0.0, 0.9)]
    assert key(sgd[0]) != key(sgd[1])  # momentum buffers
    unstepped = key(first)
    _step(first)
    stepped = key(first)
    assert stepped != unstepped  # measured state, not the estimate
    _step(first)
    assert key(first) == stepped  # the state's sizes, not the step count


def test_every_source_file_of_the_packages_is_in_the_uuid(tmp_path, monkeypatch):
    gm = _graph()
    partitioner = SACPartitioner(SACConfig(), gm)
    in_place = partitioner.uuid()
    roots = []
    for root in backend._package_roots():
        shutil.copytree(root, tmp_path / root.name, ignore=shutil.ignore_patterns("__pycache__"))
        roots.append(tmp_path / root.name)
    monkeypatch.setattr(backend, "_package_roots", lambda: tuple(roots))
    copied = partitioner.uuid()
    assert copied == in_place  # the same sources elsewhere: the same key
    solver = tmp_path / "sac_compiler" / "solvers" / "savings_plan.py"
    solver.write_text(solver.read_text() + "\n# an edit\n")
    edited = partitioner.uuid()
    assert edited != copied
    (tmp_path / "sac_compiler" / "solvers" / "another_solver.py").write_text("ANSWER = 42\n")
    assert partitioner.uuid() not in (copied, edited)


class _Seen(logging.Handler):
    """Every record at WARNING or above of the loggers it is added to."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage() + (f" {record.exc_info[1]}" if record.exc_info else ""))


@pytest.fixture
def torch_warnings():
    """The warnings of torch's compile stack (its loggers do not propagate to the root logger)."""
    seen = _Seen()
    loggers = [logging.getLogger(name) for name in ("torch", "torch._inductor", "torch._functorch", "torch._dynamo")]
    for logger in loggers:
        logger.addHandler(seen)
    yield seen.messages
    for logger in loggers:
        logger.removeHandler(seen)


def test_inductor_config_keeps_the_partitioner_and_pickles_its_uuid(torch_warnings):
    """Inductor deep-copies its config values and pickles them into its cache keys: the partitioner
    must not be copied (its optimizer holds the model's parameters) and must pickle as its key, also
    from a class defined in a function (as tests record partitions)."""
    from torch._inductor import config as inductor_config
    from torch._inductor.codecache import FxGraphCachePickler

    class Recording(SACPartitioner):
        pass

    optimizer = _adamw()
    _step(optimizer)
    gm = _graph()
    partitioner = Recording(SACConfig(optimizer=optimizer), gm)
    assert copy.deepcopy(partitioner) is partitioner
    with inductor_config.patch(custom_partitioner_fn=partitioner):
        saved = inductor_config.save_config_portable(ignore_private_configs=False)
    assert saved["custom_partitioner_fn"] is partitioner
    FxGraphCachePickler(gm).dumps(saved)
    restored = pickle.loads(pickle.dumps(partitioner))
    assert restored.uuid() == partitioner.uuid()
    with pytest.raises(RuntimeError, match="unpickled, which keeps only its cache key"):
        restored(gm, [], num_fwd_outputs=1)
    assert not [m for m in torch_warnings if "pickle" in m], torch_warnings


def _fresh_cache(tmp_path):
    """An empty Inductor cache of this test's own, under ``tmp_path`` (nothing shared with other
    tests or runs)."""
    from torch._inductor import utils

    fresh = getattr(utils, "fresh_cache", None) or utils.fresh_inductor_cache  # the older name
    return fresh(dir=str(tmp_path))


@pytest.mark.inductor
def test_report_is_written_when_the_cache_would_serve_the_graph(tmp_path):
    """A second compile of the same graph with the same options, in a fresh Dynamo state, would be
    served by the AOTAutograd cache without running the partitioner; with a report it is not."""
    report = tmp_path / "plan.txt"
    options = {"memory_budget": 1.0, "report": str(report)}
    torch.manual_seed(0)
    model = Nested()
    x = torch.randn(4, 16)
    with _fresh_cache(tmp_path):
        for attempt in range(2):
            torch._dynamo.reset()
            compiled = torch.compile(model, backend="sac", options=options)
            compiled(x).sum().backward()
            assert report.exists(), f"compile {attempt + 1}: no report"
            assert "predicted peak" in report.read_text()
            report.unlink()


class _SelfRecording(SACPartitioner):
    """Records each partition in ``self.records``, which lists the partitioner itself first, and
    leaves the joint graph's capture record on it after partitioning, as a re-plan that stops with
    a BudgetError does (plan_and_tag removes the record only when it plans; the last plan holds the
    joint graph, which then refers to itself through its ``meta``). Both are reference cycles, one
    from construction on and one after the partition, which Inductor's cache-key pickler (fast
    mode) refuses. Defined here, not in a function, so that its class pickles."""

    made: ClassVar[list["_SelfRecording"]] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records = [self]
        _SelfRecording.made.append(self)

    def __call__(self, gm, joint_inputs, **kwargs):
        from sac_compiler.capture import attach_capture_info

        out = super().__call__(gm, joint_inputs, **kwargs)
        attach_capture_info(self.last_result.analysis.graph)
        self.records.append(out)
        return out


@pytest.mark.inductor
def test_planned_inductor_compiles_log_no_failed_pickle_and_recording_partitioners_run(tmp_path, torch_warnings):
    """Planned graphs compile without Inductor logging a failed pickle of the partitioner; and a
    recording partitioner (a subclass) runs on the second compile too, which the AOTAutograd cache
    would otherwise serve."""
    torch.manual_seed(0)
    model = Nested()
    x = torch.randn(4, 16)
    config = SACConfig.from_options({"memory_budget": 1.0})

    def backend_fn(gm, example_inputs):
        return compile_graph(gm, example_inputs, config, partitioner_cls=_SelfRecording)

    _SelfRecording.made.clear()
    with _fresh_cache(tmp_path):
        for _ in range(2):
            torch._dynamo.reset()
            compiled = torch.compile(model, backend=backend_fn)
            compiled(x).sum().backward()
    assert not [m for m in torch_warnings if "pickle" in m.lower()], torch_warnings
    assert [len(p.records) for p in _SelfRecording.made] == [2, 2]  # each compile partitioned
