"""Planning for several ranks on one CPU process: a fake process group (torch.distributed's ``fake``
backend), FSDP2's ``fully_shard``, functional collectives in the graph, and one plan for all ranks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from sac_compiler.passes import Side, annotate_memory, get_record
from sac_compiler.passes.annotate_ops import is_collective_op
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils.checkpoint import CheckpointPolicy

from sac_compiler.capture import capture_joint
from sac_compiler.config import SACConfig
from sac_compiler.distributed import fake_process_group
from sac_compiler.planner import plan
from tests.fsdp_models import Block, GatheredMLP, Stack
from tests.test_plan import recording_backend

WORLD = 4
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake_group():
    """A fake process group of WORLD ranks, this process rank 0; destroyed after the test."""
    dist.init_process_group("fake", rank=0, world_size=WORLD, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def _gathered_stack():
    """Three self-sharding layers: the first ones' activations wait through the later ones' backward."""
    return torch.nn.Sequential(*[GatheredMLP(WORLD) for _ in range(3)])


def _collectives(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and is_collective_op(n)]


def test_collectives_are_kept_and_tagged_must_save(fake_group):
    torch.manual_seed(0)
    # a batch large next to the weights: activations dominate, so the lowest-peak plan recomputes
    result = plan(_gathered_stack(), torch.randn(4096, 16), target_device="cpu", memory_budget=0.0,
                  compiler="eager")
    gm = result.analysis.graph.gm
    collectives = _collectives(gm)
    names = {n.target._schema.name for n in collectives}
    assert {"_c10d_functional::all_gather_into_tensor", "_c10d_functional::reduce_scatter_tensor",
            "_c10d_functional::all_reduce", "_c10d_functional::wait_tensor"} <= names
    assert result.plan.recompute, "the lowest-peak plan of an activation-heavy graph recomputes something"
    # (planned as the backend plans, the graph was partitioned: PyTorch's partitioner tags the
    # backward's nodes too)
    forward = [n for n in collectives if get_record(n).side == Side.FORWARD]
    assert forward and all(n.meta["recompute"] == CheckpointPolicy.MUST_SAVE for n in forward)
    assert all(n.name in result.kept_ops and "collective" in result.kept_ops[n.name] for n in forward)
    assert not {n.name for n in collectives} & set(result.plan.recompute)


def test_partitioner_recomputes_no_collective(fake_group):
    torch.manual_seed(0)
    model, x = _gathered_stack(), torch.randn(4096, 16)
    backend, records = recording_backend(memory_budget=0.0, compiler="eager")
    torch.compile(model, backend=backend)(x).sum().backward()
    (result, fw, bw), = records
    assert result.plan.recompute
    # the backward runs the collectives of the joint graph's backward, none of its forward's again
    joint_backward = [n for n in _collectives(result.analysis.graph.gm) if get_record(n).side == Side.BACKWARD]
    assert sorted(str(n.target) for n in _collectives(bw)) == sorted(str(n.target) for n in joint_backward)
    assert len(_collectives(fw)) == len(_collectives(result.analysis.graph.gm)) - len(joint_backward)


# A block with a first dimension that 4 does not divide (66 rows): FSDP2 pads every shard to 17 rows.
DIM, HIDDEN, BATCH = 16, 66, 8
F32 = 4
# fc1.weight (66, 16), fc1.bias (66,), fc2.weight (16, 66), fc2.bias (16,)
FULL = [HIDDEN * DIM * F32, HIDDEN * F32, DIM * HIDDEN * F32, DIM * F32]
ROWS = [17, 17, 4, 4]  # ceil(66 / 4), ceil(66 / 4), ceil(16 / 4), ceil(16 / 4)
SHARD = [17 * DIM * F32, 17 * F32, 4 * HIDDEN * F32, 4 * F32]
PADDED = [WORLD * s for s in SHARD]
INPUT = BATCH * DIM * F32


def test_sharded_bytes_match_hand_figures_offline():
    """An unwrapped block planned for 4 ranks, as fully_shard would shard it."""
    assert SHARD == [1088, 68, 1056, 16] and sum(FULL) == 8776
    result = plan(Block(DIM, HIDDEN), torch.randn(BATCH, DIM), target_device="cpu", memory_budget=1.0,
                  compiler="eager", world_size=WORLD, hold_outputs=False)
    mem = result.analysis.memory
    assert mem.sharded_param_bytes == sum(SHARD) == 2228
    assert mem.sharded_grad_bytes == sum(SHARD)
    # the all-gathered parameters and the input while the graph runs, and every shard
    assert mem.static_bytes == sum(FULL) + INPUT + sum(SHARD)
    # after the graph: the static bytes, the prefetched neighbour (taken to be like this block), the
    # unsharded gradients, and the reduce-scatter's padded input
    assert mem.reduce_scatter_peak_bytes == sum(FULL) + INPUT + sum(SHARD) + sum(PADDED) + sum(FULL) + sum(PADDED)
    # one rank of one: none of it
    single = plan(Block(DIM, HIDDEN), torch.randn(BATCH, DIM), target_device="cpu", memory_budget=1.0,
                  compiler="eager", hold_outputs=False).analysis.memory
    assert single.static_bytes == sum(FULL) + INPUT
    assert single.sharded_param_bytes == single.reduce_scatter_peak_bytes == 0


def test_optimizer_step_counts_shards_only():
    """Adam's state and step temporaries on the shards; the all-gathered parameters are freed by then."""
    block = Block(DIM, HIDDEN)
    with fake_process_group(WORLD):
        graph = capture_joint(block, torch.randn(BATCH, DIM), target_device="cpu", world_size=WORLD, shard_all=True)
    mem = annotate_memory(graph.gm, optimizer=torch.optim.Adam(block.parameters()), sharding=graph.sharding())
    state = 2 * sum(SHARD)  # exp_avg and exp_avg_sq of the shards
    assert mem.optimizer_state_bytes == state
    # parameter shards, gradient shards, state, and one shard-sized foreach temporary; the input stays
    assert mem.optimizer_step_peak_bytes == INPUT + sum(SHARD) + sum(SHARD) + state + state // 2


def test_fully_shard_block_under_fake_group(fake_group):
    """What FSDP2 itself reports: the graph's parameters are the all-gathered ones, its shards padded."""
    stack = Stack(depth=2, dim=DIM, hidden=HIDDEN)
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in stack.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(stack, mesh=mesh)
    backends = []
    for layer in stack.layers:
        backend, records = recording_backend(memory_budget=0.5, compiler="eager")
        layer.compile(backend=backend)
        backends.append(records)
    stack(torch.randn(BATCH, DIM)).sum().backward()
    assert [len(r) for r in backends] == [1, 1]
    first, second = (records[0][0].analysis for records in backends)
    for analysis in (first, second):
        sharding = analysis.graph.sharding()
        assert sorted(sharding.shard_bytes.values()) == sorted(SHARD)
        assert sorted(sharding.unsharded_bytes.values()) == sorted(PADDED)
        placeholders = {n.name: n for n in analysis.graph.gm.graph.find_nodes(op="placeholder")}
        assert sorted(placeholders[name].meta["val"].numel() * F32 for name in sharding.shard_bytes) == sorted(FULL)
        assert analysis.memory.sharded_param_bytes == sum(SHARD)
    # in backward the second block's runs first; FSDP2 all-gathers the first block's meanwhile
    assert second.graph.sharding().prefetch_bytes == sum(PADDED)
    assert first.graph.sharding().prefetch_bytes == 0  # the root holds no parameters of its own


def test_world_size_option_against_the_process_group(fake_group):
    assert SACConfig().world_size == WORLD
    assert SACConfig(world_size=WORLD).world_size == WORLD
    with pytest.raises(ValueError, match=r"world_size=2, but the initialised process group has world size 4"):
        SACConfig.from_options({"world_size": 2})
    with pytest.raises(ValueError, match=r"world_size=2, but the initialised process group has world size 4"):
        plan(Block(), torch.randn(BATCH, DIM), target_device="cpu", memory_budget=0.5, compiler="eager", world_size=2)
    with pytest.raises(ValueError, match=r"world_size=2, but a process group of world size 4 is initialised"):
        with fake_process_group(2):
            pass


def test_world_size_without_a_process_group():
    assert not dist.is_initialized()
    assert SACConfig().world_size == 1
    assert SACConfig(world_size=8).world_size == 8
    with pytest.raises(ValueError, match=r"world_size must be an int >= 1 or None"):
        SACConfig(world_size=0)


def test_offline_planning_leaves_no_process_group():
    plan(Block(), torch.randn(BATCH, DIM), target_device="cpu", memory_budget=0.5, compiler="eager", world_size=2)
    assert not dist.is_initialized()


_SOLVE = """
import json, sys, torch
from sac_compiler.planner import plan
from tests.fsdp_models import Stack
torch.manual_seed(0)
model = Stack(depth=4, dim=32, hidden=128)
result = plan(model, torch.randn(2048, 32), target_device="cpu", memory_budget=0.4, compiler="eager",
              world_size=4)
print(json.dumps(sorted(result.plan.recompute)))
"""


def test_plan_is_the_same_in_another_process():
    """Same model and inputs, same recompute set: solved twice here and once in a fresh process
    (another hash seed, so nothing may depend on set order)."""
    def solve():
        torch.manual_seed(0)
        model = Stack(depth=4, dim=32, hidden=128)
        return plan(model, torch.randn(2048, 32), target_device="cpu", memory_budget=0.4, compiler="eager",
                    world_size=4).plan.recompute

    here = solve()
    assert here, "a budget of 0.4 recomputes something"
    assert solve() == here
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", _SOLVE], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=600, check=True)
    import json

    assert frozenset(json.loads(out.stdout.strip().splitlines()[-1])) == here
