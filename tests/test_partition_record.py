"""A partition recorded as plain data replays to the same simulated peak."""

import json
import operator

import pytest
import torch

from sac_compiler import capture_joint
from sac_compiler.config import SACConfig
from sac_compiler.partition_record import record_partition, replay_partition
from sac_compiler.plan_graph import plan_joint
from tests.models import tiny_transformer


def _planned_partition(compiler, dropout_p):
    """The tiny transformer planned at 0.8 and partitioned by PyTorch's partitioner."""
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._guards import TracingContext, detect_fake_mode, tracing

    torch.manual_seed(0)
    model = tiny_transformer(n_layers=2, dropout_p=dropout_p)
    graph = capture_joint(model, torch.randint(0, 64, (32, 16)), target_device="cpu")
    result = plan_joint(graph, SACConfig.from_options({"memory_budget": 0.8, "compiler": compiler}))
    assert result.plan.recompute
    # in the graph's fake mode, as AOTAutograd partitions: a recomputed random op's generator state
    # is made there
    fake_mode = detect_fake_mode([n.meta.get("val") for n in graph.gm.graph.find_nodes(op="placeholder")])
    with tracing(TracingContext(fake_mode)):
        fw, bw = min_cut_rematerialization_partition(graph.gm, [], num_fwd_outputs=graph.num_fwd_outputs)
    return result, fw, bw


# Inductor draws dropout by seed (recordable ops); without Inductor a recomputed dropout saves the
# generator's state with an op a record cannot hold (the next test), so the eager plan has none
@pytest.mark.parametrize(("compiler", "dropout_p"), [("inductor", 0.1), ("eager", 0.0)])
def test_a_recorded_partition_replays_to_its_simulated_peak(compiler, dropout_p):
    result, fw, bw = _planned_partition(compiler, dropout_p)
    result.check_partition(fw, bw)
    record = json.loads(json.dumps(record_partition(result, fw, bw)))  # through JSON, as written to disk
    assert record["partitioned"]["peak_bytes"] == result.partitioned.peak_bytes
    timelines = {}
    replayed = replay_partition(record, timelines)
    assert replayed == result.partitioned
    assert [n for n, _ in timelines["backward"]] == [n.name for n in bw.graph.nodes]
    assert max(t for _, t in timelines["forward"] + timelines["backward"]) == replayed.peak_bytes


def test_a_partition_that_saves_a_generator_state_is_refused_by_name():
    result, fw, bw = _planned_partition("eager", 0.1)
    assert "run_and_save_rng_state" in fw.code  # the plan recomputes a dropout
    with pytest.raises(ValueError, match="cannot record call target .*RunAndSaveRngState"):
        record_partition(result, fw, bw)


def test_a_record_of_another_format_is_refused():
    with pytest.raises(ValueError, match="record it again"):
        replay_partition({"format": 0})


def test_a_random_op_run_from_a_saved_rng_state_is_recorded_as_the_op():
    """The partitioner runs a recomputed random op from a graph-safe RNG state (a generator
    placeholder, ``graphsafe_run_with_rng_state``) on CUDA: the record holds the op itself, and
    the generator as a value nothing reads; the replayed graph allocates what the op allocates."""
    from torch._prims.rng_prims import graphsafe_run_with_rng_state
    from torch._subclasses.fake_tensor import FakeTensorMode

    from sac_compiler.partition_record import _graph, _module

    graph = torch.fx.Graph()
    x, state = graph.placeholder("x"), graph.placeholder("fwd_rng_state_0")
    x.meta["val"] = torch.empty(8, 16)
    state.meta["val"] = torch.Generator()
    dropped = graph.call_function(graphsafe_run_with_rng_state, (torch.ops.aten.native_dropout.default, x, 0.5, True),
                                  {"rng_state": state})
    graph.output((graph.call_function(operator.getitem, (dropped, 0)),))
    data = json.loads(json.dumps(_graph(torch.fx.GraphModule(torch.nn.Module(), graph))))
    call = next(e for e in data["nodes"] if e["op"] == "call_function" and e["name"] == dropped.name)
    assert call["target"] == "aten.native_dropout.default" and call["kwargs"] == {"dict": {}}
    replayed = _module(data, FakeTensorMode(allow_non_fake_inputs=True))
    out = next(n for n in replayed.graph.nodes if n.name == dropped.name)
    assert [tuple(v.shape) for v in out.meta["val"]] == [(8, 16), (8, 16)]


def test_a_record_naming_an_inductor_prim_resolves_in_a_fresh_process():
    """Inductor's decompositions write ``prims.fma`` (a LayerNorm backward under Inductor's
    decompositions), which only importing Inductor's prims registers: a replay in a fresh
    process must resolve it."""
    import subprocess
    import sys

    code = ("import torch; from sac_compiler.partition_record import _resolve; "
            "print(_resolve('prims.fma.default') is torch.ops.prims.fma.default)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
