"""Keep, recompute or offload: the program (solvers.offload_plan), its independent check
(solvers.offload_replay), the options, and the emission through PyTorch's partitioner (offload)."""

from __future__ import annotations

import dataclasses
import itertools
import random

import pytest
import torch
import torch.nn as nn

from sac_compiler import offload as offload_mod
from sac_compiler.config import SACConfig
from sac_compiler.solvers import InfeasibleError, SolverOptions
from sac_compiler.solvers.offload_plan import (
    OffloadProblem,
    offloadable,
    reload_starts,
    solve_offload_plan,
    with_budget,
)
from sac_compiler.solvers.offload_replay import replay
from sac_compiler.solvers.savings_plan import (
    Candidate,
    SavingsProblem,
    solve_savings_plan,
)

MiB = 2**20
EXACT = SolverOptions(mip_gap=0.0, mip_gap_abs=0.0)


def _problem(candidates, baseline, step_ms, forward_ms, ready_ms, bandwidth, budget, host_budget=None,
             forward_peak=None, forward_peak_ms=None, synchronous=False):
    savings = SavingsProblem(candidates=tuple(candidates), baseline=tuple(b * MiB for b in baseline), budget=budget * MiB)
    return OffloadProblem(savings=savings, step_ms=tuple(step_ms), forward_ms=forward_ms, ready_ms=ready_ms,
                          bandwidth=bandwidth, host_budget=host_budget,
                          forward_peak=None if forward_peak is None else forward_peak * MiB,
                          forward_peak_ms=forward_peak_ms, forward_copies_synchronous=synchronous)


def _checked(problem):
    """Solve, replay the plan, and check the replay against the program: peak, host, stalls, time."""
    plan = solve_offload_plan(problem, EXACT)
    run = replay(problem, plan.recompute, plan.kept_for_recompute, plan.offload)
    assert run.peak_bytes <= problem.savings.budget
    if problem.forward_copies_synchronous:  # the forward waits for each copy in full
        copies = sum(problem.copy_ms(c.nbytes) for c in problem.savings.candidates if c.name in plan.offload)
        assert run.forward_stall_ms == pytest.approx(copies, abs=1e-9)
    else:
        assert run.forward_stall_ms == 0.0
    assert run.host_peak_bytes == plan.host_bytes
    if problem.host_budget is not None:
        assert run.host_peak_bytes <= problem.host_budget
    assert run.forward_stall_ms + run.backward_stall_ms == pytest.approx(plan.stall_ms, abs=1e-6)
    return plan, run


def _brute_force(problem):
    """The least replayed time over every plan (keep, recompute, or offload with every reload start)
    whose replay fits the budgets without stalling the forward (unless its copies are synchronous),
    and whose reloads are issued in the order of their first reads; None if no plan fits."""
    cands = problem.savings.candidates
    by_name = {c.name: c for c in cands}
    options = []
    for c in cands:
        mine = [("keep",)]
        if not c.must_save:
            mine.append(("recompute",))
        if c.name in problem.ready_ms and c.first_use:
            mine += [("offload", s) for s in range(1, c.first_use + 1)]
        options.append(mine)
    best = None
    for combo in itertools.product(*options):
        recompute = {c.name for c, ch in zip(cands, combo) if ch[0] == "recompute"}
        offload = {c.name: ch[1] for c, ch in zip(cands, combo) if ch[0] == "offload"}
        if any(u in offload for n in recompute for u in by_name[n].inputs):
            continue
        if any(by_name[v].first_use < by_name[w].first_use and offload[v] > offload[w]
               for v in offload for w in offload):
            continue
        kept = {u for n in recompute for u in by_name[n].inputs
                if by_name[u].first_use is None and u not in recompute}
        run = replay(problem, recompute, kept, offload)
        if run.peak_bytes > problem.savings.budget or (run.forward_stall_ms > 0 and not problem.forward_copies_synchronous):
            continue
        if problem.host_budget is not None and run.host_peak_bytes > problem.host_budget:
            continue
        if best is None or run.time_ms < best:
            best = run.time_ms
    return best


# --- one value, three answers ---------------------------------------------------------------------
# x: 100 MiB, made early in forward, read late in backward (step 4), 2 ms to recompute. The baseline
# is over 400 MiB on steps 0-2 only, so a reload that starts at step 3 covers it, with step 3's
# 1 ms of compute to hide the copy in.

def _one_value(budget, bandwidth, host_budget=None, cost_ms=2.0, forward_peak=None, forward_peak_ms=None,
               synchronous=False):
    x = Candidate("x", 100 * MiB, cost_ms, first_use=4, last_use=4)
    return _problem([x], [500, 500, 500, 380, 380, 300], [0, 1, 1, 1, 1, 1], forward_ms=10.0,
                    ready_ms={"x": 2.0}, bandwidth=bandwidth, budget=budget, host_budget=host_budget,
                    forward_peak=forward_peak, forward_peak_ms=forward_peak_ms, synchronous=synchronous)


def test_keep_when_the_budget_allows():
    plan, run = _checked(_one_value(budget=500, bandwidth=64e9))
    assert (plan.recompute, dict(plan.offload)) == (frozenset(), {})
    assert run.time_ms == 0.0


def test_offload_when_the_link_hides_the_copies():
    # 100 MiB at 200 GB/s: 0.52 ms, under step 3's 1 ms
    plan, run = _checked(_one_value(budget=400, bandwidth=200e9))
    assert plan.recompute == frozenset() and dict(plan.offload) == {"x": 3}
    assert run.exposed_ms == 0.0 and run.time_ms == 0.0 and run.host_peak_bytes == 100 * MiB
    assert run.profile[:3] == (400 * MiB,) * 3 and run.profile[3] == 380 * MiB


def test_recompute_when_the_link_is_slow():
    # 100 MiB at 50 GB/s: 2.1 ms, of which step 3 hides 1 ms: 1.1 ms exposed, against 0.5 ms to recompute
    plan, run = _checked(_one_value(budget=400, bandwidth=50e9, cost_ms=0.5))
    assert plan.recompute == {"x"} and not plan.offload
    # and when recomputing costs more than the exposed copy, the copy is worth it
    plan, run = _checked(_one_value(budget=400, bandwidth=50e9, cost_ms=2.0))
    assert dict(plan.offload) == {"x": 3} and not plan.recompute
    assert run.backward_stall_ms == pytest.approx(1e3 * 100 * MiB / 50e9 - 1.0)


def test_recompute_when_the_forward_cannot_hide_the_copy():
    # 100 MiB at 10 GB/s: 10.5 ms, more than the 8 ms of forward after x's last read
    problem = _one_value(budget=400, bandwidth=10e9, cost_ms=50.0)
    assert offloadable(problem) == []
    plan, _ = _checked(problem)
    assert plan.recompute == {"x"}


def test_recompute_when_host_memory_is_short():
    plan, _ = _checked(_one_value(budget=400, bandwidth=200e9, host_budget=64 * MiB))
    assert plan.recompute == {"x"} and not plan.offload
    plan, _ = _checked(_one_value(budget=400, bandwidth=200e9, host_budget=100 * MiB))
    assert dict(plan.offload) == {"x": 3}


def test_offload_does_not_lower_the_forwards_own_peak():
    """The forward waits for its copies at its end: at a forward peak above the budget the value is
    still on the device, and only recomputing it helps."""
    plan, run = _checked(_one_value(budget=400, bandwidth=200e9, forward_peak=480))
    assert plan.recompute == {"x"} and not plan.offload
    assert run.forward_peak_bytes == 380 * MiB
    assert replay(_one_value(budget=400, bandwidth=200e9, forward_peak=480), offload={"x": 3}).peak_bytes == 480 * MiB
    # a forward peak under the budget changes nothing
    plan, _ = _checked(_one_value(budget=400, bandwidth=200e9, forward_peak=390))
    assert dict(plan.offload) == {"x": 3}


def test_waits_mid_forward_let_offload_lower_the_forwards_own_peak():
    """Where the forward waits for each copy once the stream has finished it, a value whose copy
    (ready at 2 ms, 0.52 ms at 200 GB/s) is done before the forward's peak op starts is gone there:
    offloading it lowers that peak, and beats recomputing it (2 ms)."""
    plan, run = _checked(_one_value(budget=400, bandwidth=200e9, forward_peak=480, forward_peak_ms=5.0))
    assert dict(plan.offload) == {"x": 3} and not plan.recompute
    assert run.forward_peak_bytes == 380 * MiB and run.exposed_ms == 0.0
    # the peak's op starts before the copy is done (2.3 ms < 2.52 ms): only recomputation helps
    plan, run = _checked(_one_value(budget=400, bandwidth=200e9, forward_peak=480, forward_peak_ms=2.3))
    assert plan.recompute == {"x"} and not plan.offload
    with pytest.raises(ValueError, match="forward_peak_ms"):
        _one_value(budget=400, bandwidth=200e9, forward_peak=480, forward_peak_ms=11.0)


def test_synchronous_copies_free_the_value_mid_forward_and_cost_their_whole_time():
    """Where the forward waits for each copy as it is issued, the value is gone from the op after
    its last forward read (at 2 ms): offloading it lowers a forward peak whose op starts later, and
    the copy's whole time (0.52 ms at 200 GB/s) is the plan's cost, still under recomputing it (2 ms)."""
    copy = 1e3 * 100 * MiB / 200e9
    plan, run = _checked(_one_value(budget=400, bandwidth=200e9, forward_peak=480, forward_peak_ms=2.3, synchronous=True))
    assert dict(plan.offload) == {"x": 3} and not plan.recompute
    assert run.forward_peak_bytes == 380 * MiB
    assert run.forward_stall_ms == pytest.approx(copy) and run.time_ms == pytest.approx(copy)
    assert plan.stall_ms == pytest.approx(copy)
    # the peak's op starts before x's last forward read has run: only recomputation helps
    plan, _ = _checked(_one_value(budget=400, bandwidth=200e9, forward_peak=480, forward_peak_ms=1.5, synchronous=True))
    assert plan.recompute == {"x"} and not plan.offload
    # a copy longer than the rest of the forward may be offloaded (10.5 ms at 10 GB/s), charged in full:
    # worse than recomputing for 2 ms, better than recomputing for 50 ms
    assert offloadable(_one_value(budget=400, bandwidth=10e9, synchronous=True)) == ["x"]
    plan, _ = _checked(_one_value(budget=400, bandwidth=10e9, synchronous=True))
    assert plan.recompute == {"x"} and not plan.offload
    plan, run = _checked(_one_value(budget=400, bandwidth=10e9, cost_ms=50.0, synchronous=True))
    assert dict(plan.offload) and run.forward_stall_ms == pytest.approx(1e3 * 100 * MiB / 10e9)


def test_no_plan_under_what_neither_choice_reaches():
    with pytest.raises(InfeasibleError):
        solve_offload_plan(_one_value(budget=300, bandwidth=200e9), EXACT)


# --- the link is shared ---------------------------------------------------------------------------

def _two_values(bandwidth, budget=400, host_budget=None):
    """a and b, 100 MiB each, both read at step 4 and over the budget together on steps 0-2. Their
    reloads share step 3's 1 ms: at 200 GB/s each copy takes 0.52 ms, both 1.05 ms."""
    a = Candidate("a", 100 * MiB, 0.2, first_use=4, last_use=4)
    b = Candidate("b", 100 * MiB, 3.0, first_use=4, last_use=5)
    return _problem([a, b], [600, 600, 600, 390, 390, 300], [0, 1, 1, 1, 1, 1], forward_ms=10.0,
                    ready_ms={"a": 2.0, "b": 3.0}, bandwidth=bandwidth, budget=budget, host_budget=host_budget)


def test_the_link_bounds_the_bytes_in_flight():
    # both offloaded: 1.05 ms of copies in step 3's 1 ms leaves 0.05 ms exposed, cheaper than
    # recomputing a (0.2 ms); the replay's stall is the program's
    plan, run = _checked(_two_values(bandwidth=200e9))
    assert set(plan.offload) == {"a", "b"} and not plan.recompute
    assert run.backward_stall_ms == pytest.approx(2e3 * 100 * MiB / 200e9 - 1.0)
    # a slower link: the two copies would expose 3.2 ms; recompute the cheap one, offload the other
    plan, run = _checked(_two_values(bandwidth=100e9))
    assert plan.recompute == {"a"} and set(plan.offload) == {"b"}


def test_a_program_blind_to_the_link_would_be_caught_by_the_replay():
    """Without the window rows both copies would look free; the replay shows what they expose."""
    problem = _two_values(bandwidth=200e9)
    run = replay(problem, offload={"a": 3, "b": 3})
    assert run.backward_stall_ms > 0
    assert run.time_ms > 0.0


@pytest.mark.parametrize("budget, bandwidth, host_budget", [
    (600, 64e9, None), (400, 200e9, None), (400, 100e9, None), (400, 40e9, None), (400, 200e9, 150 * MiB),
    (300, 200e9, None), (300, 20e9, None),
])
def test_two_values_match_brute_force(budget, bandwidth, host_budget):
    problem = _two_values(bandwidth, budget, host_budget)
    best = _brute_force(problem)
    if best is None:
        with pytest.raises(InfeasibleError):
            solve_offload_plan(problem, EXACT)
        return
    plan, run = _checked(problem)
    assert run.time_ms == pytest.approx(best, abs=1e-6)


def _random_problem(rng):
    steps = rng.randint(5, 8)
    n = 3
    cands = []
    for i in range(n):
        first = rng.randint(1, steps - 1)
        inputs = (f"v{i - 1}",) if i and rng.random() < 0.4 else ()
        cands.append(Candidate(f"v{i}", rng.choice([32, 64, 96, 128]) * MiB, round(rng.uniform(0.05, 3.0), 3),
                               inputs=inputs, first_use=first, last_use=rng.randint(first, steps - 1)))
    baseline = sorted((rng.randint(300, 700) for _ in range(steps)), reverse=True)
    step_ms = [0.0] + [round(rng.uniform(0.1, 1.5), 3) for _ in range(steps - 1)]
    forward_ms = 6.0
    ready = {c.name: round(rng.uniform(0.0, 5.0), 3) for c in cands if rng.random() < 0.85}
    bandwidth = rng.choice([25e9, 50e9, 100e9, 200e9])
    budget = rng.randint(min(baseline) - 50, max(baseline))
    host = rng.choice([None, None, 100 * MiB])
    forward_peak = rng.choice([None, baseline[0] + rng.randint(0, 100)])
    return _problem(cands, baseline, step_ms, forward_ms, ready, bandwidth, budget, host, forward_peak)


def _random_mid_forward_problem(rng):
    """A random problem with a forward peak over the end of forward, and waits mid-forward."""
    problem = _random_problem(rng)
    peak = problem.savings.baseline[0] + rng.randint(10, 200) * MiB
    return dataclasses.replace(problem, forward_peak=peak, forward_peak_ms=round(rng.uniform(0.5, 6.0), 3))


_MID_FORWARD_SEEDS = range(1000, 1024)


def test_the_random_mid_forward_problems_exercise_the_values_freed_mid_forward():
    """Among the problems below, waiting mid-forward changes the best plan (by brute force) in some."""
    changed = 0
    for seed in _MID_FORWARD_SEEDS:
        problem = _random_mid_forward_problem(random.Random(seed))
        changed += _brute_force(problem) != _brute_force(dataclasses.replace(problem, forward_peak_ms=None))
    assert changed >= 2


def _matches_brute_force(problem):
    """The program's plan replays to the brute force's least time, or both find none."""
    best = _brute_force(problem)
    if best is None:
        with pytest.raises(InfeasibleError):
            solve_offload_plan(problem, EXACT)
        return
    plan, run = _checked(problem)
    assert run.time_ms == pytest.approx(best, abs=1e-6)


@pytest.mark.parametrize("seed", _MID_FORWARD_SEEDS)
def test_random_problems_with_waits_mid_forward_match_brute_force_and_the_replay(seed):
    _matches_brute_force(_random_mid_forward_problem(random.Random(seed)))


_SYNCHRONOUS_SEEDS = range(2000, 2016)


def test_the_random_synchronous_problems_exercise_the_copies_charged_in_full():
    """Among the problems below, synchronous copies change the best plan (by brute force) in some."""
    changed = sum(
        _brute_force(p) != _brute_force(dataclasses.replace(p, forward_copies_synchronous=True))
        for p in (_random_mid_forward_problem(random.Random(seed)) for seed in _SYNCHRONOUS_SEEDS))
    assert changed >= 2


@pytest.mark.parametrize("seed", _SYNCHRONOUS_SEEDS)
def test_random_problems_with_synchronous_copies_match_brute_force_and_the_replay(seed):
    problem = dataclasses.replace(_random_mid_forward_problem(random.Random(seed)), forward_copies_synchronous=True)
    _matches_brute_force(problem)


@pytest.mark.parametrize("seed", range(12))
def test_random_small_problems_match_brute_force_and_the_replay(seed):
    _matches_brute_force(_random_problem(random.Random(seed)))


def test_without_offloadable_values_the_program_is_the_recompute_program():
    problem = _two_values(bandwidth=200e9)
    problem = OffloadProblem(savings=problem.savings, step_ms=problem.step_ms, forward_ms=problem.forward_ms,
                             ready_ms={}, bandwidth=problem.bandwidth)
    plan = solve_offload_plan(problem, EXACT)
    alone = solve_savings_plan(problem.savings, EXACT)
    assert plan.recompute == alone.recompute and not plan.offload


def test_reload_starts_far_from_the_first_use_are_a_few_leads():
    x = Candidate("x", 100 * MiB, 1.0, first_use=100, last_use=100)
    steps = 101
    problem = _problem([x], [500] * steps, [0.0] + [0.5] * (steps - 1), 10.0, {"x": 1.0}, 200e9, 400)
    starts = reload_starts(problem, "x")
    assert starts[-1] == 100 and len(starts) <= 5
    # 0.52 ms of copy needs two 0.5 ms steps before the first use; 2, 4 and 8 times it 3, 5 and 9
    assert starts == [91, 95, 97, 98, 100]
    assert with_budget(problem, 7).savings.budget == 7


# --- a real joint graph: the problem, the plan, the emission -----------------------------------------

def _graph():
    """An annotated joint graph of a small MLP, planned for an H100 (the cost model's timeline)."""
    from sac_compiler.capture import capture_joint
    from sac_compiler.plan_graph import build_plan_problem, plan_joint

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 8))
    x = torch.randn(1024, 32)
    graph = capture_joint(model, x, target_device="cpu")
    config = SACConfig(device="H100-SXM", compiler="eager")
    result = plan_joint(graph, config)
    problem, _, _ = build_plan_problem(result.analysis)
    return model, x, result, problem, config


def _offload_problem(result, problem, **kwargs):
    return offload_mod.build_offload_problem(result.analysis, problem, **kwargs)


def test_the_problem_of_a_joint_graph():
    _, _, result, problem, _ = _graph()
    off = _offload_problem(result, problem)
    assert off.bandwidth == 48e9  # the H100's host link
    assert len(off.step_ms) == len(problem.baseline) and off.step_ms[0] == 0.0
    assert sum(off.step_ms) > 0 and off.forward_ms > 0
    by_name = {c.name: c for c in problem.candidates}
    assert off.ready_ms and all(0 < t <= off.forward_ms for t in off.ready_ms.values())
    assert all(by_name[n].first_use is not None for n in off.ready_ms)
    gm = result.analysis.graph.gm
    out = next(iter(gm.graph.find_nodes(op="output")))
    model_output = out.args[0][0]
    assert model_output.name not in off.ready_ms  # the caller holds it: never offloaded
    # the last linear's input (read by its addmm, the forward's last op but one) is ready later
    # than the first linear's output
    ready = sorted(off.ready_ms.items(), key=lambda kv: kv[1])
    assert ready[0][1] < ready[-1][1]


def test_the_plan_of_a_joint_graph_checks_out_on_the_replay():
    _, _, result, problem, _ = _graph()
    # a link fast enough for the cost model's microsecond ops, and a budget below the everything-kept peak
    off = _offload_problem(result, problem, bandwidth=5e12)
    budget = max(problem.baseline) - max(c.nbytes for c in problem.candidates)
    off = with_budget(off, budget)
    plan, run = _checked(off)
    assert plan.offload and run.peak_bytes <= budget


_cpu_graph_copy_stream = pytest.mark.skipif(
    torch.accelerator.current_accelerator() is not None,
    reason="a CPU graph where torch has an accelerator (CUDA) gets no copy stream of its own (partitioner_config), so the "
           "stream ops these tests read are not inserted; the CUDA graph's copies are checked by "
           "test_an_offloaded_step_on_the_gpu_gives_the_eager_gradients")


@_cpu_graph_copy_stream
def test_tagging_and_the_partitioner_insert_the_copies():
    """On CPU, PyTorch's partitioner inserts the offload ops for the tagged values (its prefetch, which
    times ops on the GPU, stays off without CUDA)."""
    reason = offload_mod.offload_support()
    if reason is not None:
        pytest.skip(reason)
    _, _, result, problem, _ = _graph()
    off = with_budget(_offload_problem(result, problem, bandwidth=5e12), max(problem.baseline) - 2**18)
    plan = solve_offload_plan(off, EXACT)
    assert plan.offload
    graph = result.analysis.graph
    inputs = [n.meta.get("val") for n in graph.gm.graph.find_nodes(op="placeholder")]
    fw, bw = offload_mod.partition_with_offload(graph.gm, inputs, graph.num_fwd_outputs, plan.recompute,
                                                plan.offload, off.bandwidth)
    for name in plan.offload:
        assert f"torch.ops.ao.offload.default({name})" in fw.code
        assert f"torch.ops.ao.reload.default(cpu_offload_{name}," in bw.code
    assert "cpu_offload_" in fw.code.split("return")[-1]  # the host copies are what backward gets
    # the forward waits for its copies at its end (sink_wait), after its last compute op
    fw_ops = [n for n in fw.graph.nodes if n.op == "call_function"]
    waits = [i for i, n in enumerate(fw_ops) if n.target is torch.ops.ao.wait_tensor.default]
    assert waits and min(waits) > max(i for i, n in enumerate(fw_ops) if n.target is torch.ops.aten.addmm.default)
    assert not [n for n in graph.gm.graph.nodes if n.meta.get("should_offload") and n.name not in plan.offload]


def test_must_cpu_offload_alone_is_not_what_this_torch_reads():
    """torch 2.13's partitioner acts on ``should_offload`` of a saved value, not on the MUST_CPU_OFFLOAD
    policy: a value tagged with the policy alone is saved on the device. If this fails, the installed
    torch reads the policy, and tag_offload can write it instead."""
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch.utils.checkpoint import CheckpointPolicy

    from sac_compiler.plan_graph import tag_graph

    if offload_mod.offload_support() is not None:
        pytest.skip(offload_mod.offload_support())
    _, _, result, problem, _ = _graph()
    graph = result.analysis.graph
    tag_graph(graph.gm, ())
    name = next(iter(_offload_problem(result, problem).ready_ms))
    node = next(n for n in graph.gm.graph.nodes if n.name == name)
    node.meta["recompute"] = CheckpointPolicy.MUST_CPU_OFFLOAD
    inputs = [n.meta.get("val") for n in graph.gm.graph.find_nodes(op="placeholder")]
    with offload_mod.offload_partitioning(5e12):
        fw, _ = min_cut_rematerialization_partition(graph.gm, inputs, num_fwd_outputs=graph.num_fwd_outputs)
    assert "ao.offload" not in fw.code and name in fw.code.split("return")[-1]


def test_tag_offload_refuses_what_the_partitioner_cannot_offload():
    _, _, result, problem, _ = _graph()
    graph = result.analysis.graph
    out = next(iter(graph.gm.graph.find_nodes(op="output")))
    with pytest.raises(ValueError, match="an output of the forward"):
        offload_mod.tag_offload(graph.gm, [out.args[0][0].name], graph.num_fwd_outputs)
    with pytest.raises(ValueError, match="not in the graph"):
        offload_mod.tag_offload(graph.gm, ["no_such_value"], graph.num_fwd_outputs)
    placeholder = next(iter(graph.gm.graph.find_nodes(op="placeholder")))
    with pytest.raises(ValueError, match="not a forward op"):
        offload_mod.tag_offload(graph.gm, [placeholder.name], graph.num_fwd_outputs)


def test_partitioner_config_names_what_this_torch_has():
    from torch._functorch import config as functorch_config

    entries = offload_mod.partitioner_config(64 * 2**30, prefetch=False)
    assert all(hasattr(functorch_config, name) for name in entries)
    if offload_mod.offload_support() is None:
        assert entries["enable_activation_offloading"]
        # the copies' own stream only for a CUDA graph: PyTorch's stream pass fails on a CPU graph
        # where torch has an accelerator (a CUDA build, even without a GPU: it has no stream for
        # the CPU device)
        assert offload_mod.partitioner_config(1e9, cuda=True)["activation_offload_separate_stream"]
        cpu_graph = offload_mod.partitioner_config(1e9, cuda=False)["activation_offload_separate_stream"]
        assert cpu_graph == (torch.accelerator.current_accelerator() is None)
    if "activation_offload_cpu_gpu_bw" in entries:
        assert entries["activation_offload_cpu_gpu_bw"] == 64.0  # PyTorch takes GiB/s
    if "activation_reload_prefetch" in entries:
        assert offload_mod.partitioner_config(1e9)["activation_reload_prefetch"] == torch.cuda.is_available()
        assert not offload_mod.partitioner_config(1e9, cuda=False)["activation_reload_prefetch"]


def test_without_the_torch_support_offload_is_not_offered_and_the_report_says_why(monkeypatch):
    monkeypatch.setattr(offload_mod, "_REQUIRED_CONFIG", (*offload_mod._REQUIRED_CONFIG, "no_such_switch"))
    reason = offload_mod.offload_support()
    assert reason is not None and "no_such_switch" in reason and torch.__version__ in reason
    with pytest.raises(RuntimeError, match="no_such_switch"):
        with offload_mod.offload_partitioning(48e9):
            pass
    _, _, result, _, _ = _graph()
    config = SACConfig(device="H100-SXM", compiler="eager", offload=True)
    outcome = offload_mod.plan_offload(result.analysis, config, budget=10**9)
    assert outcome.plan is None and outcome.reason == reason

    class Policy:  # a CheckpointPolicy of a torch before offloading
        MUST_SAVE = 0

    monkeypatch.setattr(offload_mod, "CheckpointPolicy", Policy)
    assert "MUST_CPU_OFFLOAD" in offload_mod.offload_support()


def test_the_report_says_why_offload_is_not_offered_on_a_cpu_graph():
    from sac_compiler.capture import capture_joint
    from sac_compiler.plan_graph import plan_joint
    from sac_compiler.report import format_plan

    graph = capture_joint(nn.Linear(8, 8), torch.randn(4, 8), target_device="cpu")
    result = plan_joint(graph, SACConfig(device="H100-SXM", compiler="eager", offload=True))
    assert "runs on cpu" in result.offload_note
    assert f"offload: {result.offload_note}" in format_plan(result)
    assert plan_joint(capture_joint(nn.Linear(8, 8), torch.randn(4, 8), target_device="cpu"),
                      SACConfig(device="H100-SXM", compiler="eager")).offload_note is None


def _wide_mlp_for_cuda():
    """Six 4096-wide Linear + GELU layers at 16384 rows, captured on meta for a CUDA target: 256 MiB
    per activation, and a backward that peaks above the end of forward."""
    with torch.device("meta"):
        layers = [m for _ in range(6) for m in (nn.Linear(4096, 4096), nn.GELU())]
        model = nn.Sequential(*layers)
    return model, torch.randn(16384, 4096, device="meta")


def test_the_backend_plan_offloads_where_it_is_faster_than_recomputing():
    """Under a budget between the forward's peak and the backward's, recomputation alone pays for
    two GELUs; offloading two values whose copies the link hides costs nothing. The plan takes the
    offload, tags it for PyTorch's partitioner, fits the budget, and an independent replay of the
    copy stream agrees on its stalls and host bytes; the report shows it per module."""
    from torch.utils.checkpoint import CheckpointPolicy

    from sac_compiler.capture import capture_joint
    from sac_compiler.plan_graph import build_plan_problem, plan_joint
    from sac_compiler.report import format_plan

    model, x = _wide_mlp_for_cuda()
    sim = plan_joint(capture_joint(model, x, target_device="cuda"), SACConfig(device="H100-SXM", compiler="eager")
                     ).analysis.memory
    forward = max([sim.end_of_forward_bytes, *sim.step_peaks[:sim.first_backward]])
    assert sim.peak_bytes > forward + 256 * MiB
    budget = forward + 64 * MiB
    alone = plan_joint(capture_joint(model, x, target_device="cuda"),
                       SACConfig(device="H100-SXM", compiler="eager", memory_budget=budget))
    assert alone.plan.recompute and alone.offload is None
    result = plan_joint(capture_joint(model, x, target_device="cuda"),
                        SACConfig(device="H100-SXM", compiler="eager", memory_budget=budget, offload=True))
    offload = result.offload
    assert offload is not None and offload.starts and result.offload_note is None
    assert result.predicted_peak <= budget
    assert offload.recompute_only_ms == pytest.approx(alone.plan.recompute_ms)
    assert result.plan.recompute_ms + offload.stall_ms < alone.plan.recompute_ms
    gm = result.analysis.graph.gm
    tagged = {n.name for n in gm.graph.nodes if n.meta.get("should_offload")}
    assert tagged == set(offload.starts)
    assert all(n.meta["recompute"] == CheckpointPolicy.MUST_SAVE for n in gm.graph.nodes if n.name in tagged)
    problem, _, _ = build_plan_problem(result.analysis)
    run = replay(offload_mod.build_offload_problem(result.analysis, problem), result.plan.recompute,
                 result.plan.kept_for_recompute, offload.starts)
    assert run.forward_stall_ms == 0.0
    assert run.backward_stall_ms == pytest.approx(offload.stall_ms, abs=1e-6)
    assert run.host_peak_bytes == offload.bytes
    report = format_plan(result)
    assert f"{len(offload.starts)} values, {offload.bytes / 2**20:.2f} MiB" in report and "MiB offloaded" in report


def test_plan_offload_plans_with_the_options_host_budget():
    _, _, result, problem, _ = _graph()
    config = SACConfig(device="H100-SXM", compiler="eager", offload=True, host_memory_budget=1)
    outcome = offload_mod.plan_offload(result.analysis, config, budget=max(problem.baseline), bandwidth=5e12)
    assert outcome.plan is not None and not outcome.plan.offload and outcome.problem.host_budget == 1


def _offload_backend(records, bandwidth=5e12):
    """A ``backend=`` for torch.compile that plans keep / recompute / offload on each joint graph just
    under its everything-kept peak, emits it through PyTorch's partitioner and runs the partitioned
    graphs eagerly; ``records`` gets (plan, forward graph, backward graph) of each."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from sac_compiler.capture import JointGraph, attach_capture_info, describe_inputs
    from sac_compiler.plan_graph import (
        _torch_threads_kept,
        build_plan_problem,
        plan_joint,
    )

    def backend(source_gm, example_inputs):
        def partition(gm, joint_inputs, *, num_fwd_outputs, **_):
            devices = [n.meta["val"].device for n in gm.graph.find_nodes(op="placeholder")
                       if isinstance(n.meta.get("val"), torch.Tensor)]
            graph = JointGraph(gm=gm, num_fwd_outputs=num_fwd_outputs,
                               inputs=describe_inputs(source_gm, gm, "Sequential"), root_name="Sequential",
                               target_device=devices[0], has_backward=True, source_gm=source_gm)
            attach_capture_info(graph)
            result = plan_joint(graph, SACConfig(device="H100-SXM", compiler="eager"))
            gm.meta.pop("sac_capture", None)
            problem, _, _ = build_plan_problem(result.analysis)
            off = offload_mod.build_offload_problem(result.analysis, problem, bandwidth=bandwidth)
            off = with_budget(off, max(problem.baseline) - max(c.nbytes for c in problem.candidates))
            with _torch_threads_kept():  # the solver's OpenMP runtime may reset torch's thread count
                plan = solve_offload_plan(off, EXACT)
            fw, bw = offload_mod.partition_with_offload(
                gm, joint_inputs, num_fwd_outputs, plan.recompute, plan.offload, bandwidth,
                reload_before=offload_mod.reload_anchors(result.analysis, plan.offload))
            records.append((plan, fw, bw))
            return fw, bw

        def compiler(gm, _inputs):
            return make_boxed_func(gm.forward)

        return aot_autograd(fw_compiler=compiler, bw_compiler=compiler, partition_fn=partition)(source_gm, example_inputs)

    return backend


def _gpu_mlp_with_eager_grads():
    """A three-layer MLP on the GPU, a batch, and eager's gradients of ``model(x).sum()`` (cleared)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 2048), nn.GELU(), nn.Linear(2048, 2048), nn.GELU(), nn.Linear(2048, 8)).cuda()
    x = torch.randn(4096, 256, device="cuda")
    model(x).sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return model, x, expected


def _assert_grads(model, expected):
    """Each parameter's gradient equals ``expected``'s (eager's) to fp32 matmul rounding."""
    for got, want in zip((p.grad for p in model.parameters()), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_an_offloaded_step_on_the_gpu_gives_the_eager_gradients():
    """On CUDA the partitioned graphs run: the copies go out on the transfer stream in forward, come
    back from the plan's reload starts in backward, and the gradients are eager's."""
    model, x, expected = _gpu_mlp_with_eager_grads()
    records = []
    compiled = torch.compile(model, backend=_offload_backend(records))
    compiled(x).sum().backward()
    torch.cuda.synchronize()
    (plan, fw, bw), = records
    assert plan.offload
    # torch 2.13 inserts ao.offload / ao.reload ops; torch 2.11 copies to and from the host under
    # names of the same kind (its forward returns cpu_offload_<value>)
    fw_names = [n.name for n in fw.graph.nodes]
    bw_names = [n.name for n in bw.graph.nodes]
    assert "torch.ops.ao.offload.default" in fw.code or any(n.startswith("cpu_offload_") for n in fw_names), fw.code
    assert "torch.ops.ao.reload.default" in bw.code or any("reload" in n for n in bw_names), bw.code
    _assert_grads(model, expected)


@_cpu_graph_copy_stream
def test_reloads_start_where_the_plan_starts_them():
    """With the plan's reload starts the partitioned backward issues each reload before the op of its
    start step (PyTorch's prefetch off), and waits for it before the first read, as before."""
    if offload_mod.offload_support() is not None:
        pytest.skip(offload_mod.offload_support())
    _, _, result, problem, _ = _graph()
    off = with_budget(_offload_problem(result, problem, bandwidth=5e12), max(problem.baseline) - 2**18)
    plan = solve_offload_plan(off, EXACT)
    early = {name: 1 for name in plan.offload}  # every reload at the backward's first step
    anchors = offload_mod.reload_anchors(result.analysis, early)
    graph = result.analysis.graph
    inputs = [n.meta.get("val") for n in graph.gm.graph.find_nodes(op="placeholder")]
    fw, bw = offload_mod.partition_with_offload(graph.gm, inputs, graph.num_fwd_outputs, plan.recompute,
                                                plan.offload, off.bandwidth, reload_before=anchors)
    order = [n.name for n in bw.graph.nodes]
    for name, anchor in anchors.items():
        assert anchor in order, anchor
        assert order.index(f"async_gpu_reload_{name}") < order.index(anchor) <= order.index(f"gpu_reload_{name}")


def _wide_mlp_on_gpu():
    """The six-layer MLP of ``_wide_mlp_for_cuda`` on the GPU (seeded) and its batch."""
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(4096, 4096), nn.GELU())]).cuda()
    return model, torch.randn(16384, 4096, device="cuda")


def _offloaded_gpu_step(model, x, **options):
    """One step of ``model(x).sum()`` through backend="sac" with ``options`` (offload on): the plan,
    which must offload and whose forward must copy out, and the step's measured peak."""
    from tests.test_plan import recording_backend

    backend, records = recording_backend(offload=True, **options)
    compiled = torch.compile(model, backend=backend)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    compiled(x).sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    (result, fw, _), = records
    assert result.offload is not None and result.offload.starts, result.offload_note
    assert "ao.offload" in fw.code or any(n.name.startswith("cpu_offload_") for n in fw.graph.nodes), fw.code
    return result, peak


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_backend_offloads_on_the_gpu_within_its_budget_with_eager_gradients():
    """backend="sac" with offload=True on CUDA, under a budget between the forward's peak and the
    backward's: the plan offloads, PyTorch's partitioner copies the values out and back, the step's
    measured peak is within the budget and the gradients are eager's."""
    from sac_compiler.capture import capture_joint
    from sac_compiler.plan_graph import plan_joint

    meta_model, meta_x = _wide_mlp_for_cuda()
    sim = plan_joint(capture_joint(meta_model, meta_x, target_device="cuda"),
                     SACConfig(compiler="eager")).analysis.memory
    budget = max([sim.end_of_forward_bytes, *sim.step_peaks[:sim.first_backward]]) + 64 * MiB
    model, x = _wide_mlp_on_gpu()
    model(x).sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    result, peak = _offloaded_gpu_step(model, x, memory_budget=budget, compiler="eager")
    print(f"\n{torch.cuda.get_device_name()} torch {torch.__version__}: budget {budget / 2**20:.0f} MiB, "
          f"predicted {result.predicted_peak / 2**20:.0f} MiB, measured {peak / 2**20:.0f} MiB, "
          f"offloaded {result.offload.bytes / 2**20:.0f} MiB")
    assert peak <= budget
    _assert_grads(model, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.xfail(offload_mod.forward_copies_synchronous("inductor"), strict=True,
                   reason="with torch's offload pass without the ao ops (torch 2.11) the measured peak went over the "
                          "plan's and the budget (figures in docs/results.md); not yet explained")
def test_the_backend_offloads_under_inductor_below_recomputations_floor_with_compiles_gradients():
    """backend="sac" with offload=True under Inductor, at a budget 10% under the lowest peak
    recomputation alone reaches: the plan offloads, the step's measured peak is within the budget,
    and the gradients are plain ``torch.compile``'s (on torch 2.11 each copy is waited for at once:
    ``offload.forward_copies_synchronous``; sunk waits gave wrong gradients there)."""
    from sac_compiler.capture import capture_joint
    from sac_compiler.plan_graph import plan_joint

    meta_model, meta_x = _wide_mlp_for_cuda()
    lowest = plan_joint(capture_joint(meta_model, meta_x, target_device="cuda"), SACConfig(memory_budget=0.0))
    budget = int(lowest.predicted_peak * 0.9)
    model, x = _wide_mlp_on_gpu()
    torch.compile(model)(x).sum().backward()
    expected = [p.grad.cpu() for p in model.parameters()]  # off the device: not held beside the step
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    # the planned figure holds the parameters and the input; the process holds a little more (the
    # matmul workspaces, what plain compile left): count it in the budget
    planned_static = sum(t.numel() * t.element_size() for t in (*model.parameters(), x))
    budget += max(0, torch.cuda.memory_allocated() - planned_static)
    result, peak = _offloaded_gpu_step(model, x, memory_budget=budget)
    print(f"\n{torch.cuda.get_device_name()} torch {torch.__version__}: synchronous forward copies "
          f"{offload_mod.forward_copies_synchronous('inductor')}, recompute-only lowest "
          f"{lowest.predicted_peak / 2**20:.0f} MiB, budget {budget / 2**20:.0f} MiB, predicted "
          f"{result.predicted_peak / 2**20:.0f} MiB, measured {peak / 2**20:.0f} MiB, offloaded "
          f"{result.offload.bytes / 2**20:.0f} MiB")
    assert peak <= budget
    for got, want in zip((p.grad.cpu() for p in model.parameters()), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_each_copy_is_waited_for_where_the_link_has_finished_it():
    """``wait_anchors``: the copies run one after another from the time their values' last forward
    readers have run; each value's wait goes after the first forward op that ends once its copy has
    finished (checked here by a plain replay of the copy stream), and a copy the forward's compute
    cannot hide keeps its wait at the end (no op)."""
    _, _, result, problem, _ = _graph()
    off = _offload_problem(result, problem, bandwidth=5e12)
    values = sorted(off.ready_ms)
    assert len(values) >= 2
    sizes = {c.name: c.nbytes for c in problem.candidates}
    ends = {n.name: t for n, t in offload_mod._forward_done_at(result.analysis).items() if n.op == "call_function"}

    def replay(bandwidth):
        free, finish = 0.0, {}
        for name in sorted(values, key=lambda v: (off.ready_ms[v], v)):
            free = finish[name] = max(off.ready_ms[name], free) + 1e3 * sizes[name] / bandwidth
        return finish

    for bandwidth in (5e12, 5e9, 5e6):
        anchors = offload_mod.wait_anchors(result.analysis, dataclasses.replace(off, bandwidth=bandwidth), values)
        finish = replay(bandwidth)
        for name in values:
            hiding = [op for op, t in ends.items() if t >= finish[name] and t > off.ready_ms[name]]
            if not hiding:
                assert name not in anchors
                continue
            anchor = anchors[name]
            assert ends[anchor] >= finish[name] and ends[anchor] > off.ready_ms[name]
            # the first such op: every op before it ends before the copy does
            assert all(t < finish[name] or t <= off.ready_ms[name] for op, t in ends.items()
                       if list(ends).index(op) < list(ends).index(anchor))
    slow = offload_mod.wait_anchors(result.analysis, dataclasses.replace(off, bandwidth=5e6), values)
    fast = offload_mod.wait_anchors(result.analysis, off, values)
    # at 5 MB/s no copy finishes within the forward; at 5 TB/s all but the value the forward's last
    # op reads (no op after it) do
    assert not slow and len(fast) == len(values) - 1


@_cpu_graph_copy_stream
def test_the_forward_waits_for_each_copy_mid_forward_and_frees_the_value_there():
    """With ``wait_after`` the partitioned forward waits for each copy after its anchor op instead of
    at its end, and the partitioned simulation frees the offloaded value there."""
    if offload_mod.offload_support() is not None:
        pytest.skip(offload_mod.offload_support())
    if not offload_mod.reloads_placeable():
        pytest.skip("this torch's offload pass emits no ao ops")
    _, _, result, problem, _ = _graph()
    off = with_budget(_offload_problem(result, problem, bandwidth=5e12), max(problem.baseline) - 2**18)
    plan = solve_offload_plan(off, EXACT)
    assert plan.offload
    anchors = offload_mod.wait_anchors(result.analysis, off, plan.offload)
    assert anchors
    graph = result.analysis.graph
    inputs = [n.meta.get("val") for n in graph.gm.graph.find_nodes(op="placeholder")]

    def partitioned(wait_after):
        fw, bw = offload_mod.partition_with_offload(graph.gm, inputs, graph.num_fwd_outputs, plan.recompute,
                                                    plan.offload, off.bandwidth, wait_after=wait_after)
        return fw, bw, result.simulate(fw, bw)

    fw_end, _, at_end = partitioned(None)
    fw_mid, _, mid = partitioned(anchors)
    order = [n.name for n in fw_mid.graph.nodes]
    last_compute = max(i for i, n in enumerate(fw_mid.graph.nodes) if n.target is torch.ops.aten.addmm.default)
    for name, anchor in anchors.items():
        wait = order.index(f"cpu_offload_{name}")
        assert order.index(f"async_cpu_offload_{name}") < order.index(anchor) < wait == order.index(anchor) + 1
        if order.index(anchor) < last_compute:
            assert wait < last_compute  # moved into the forward's compute
    freed = {life.name: life.free_step for life in mid.lifetimes[0]}
    freed_at_end = {life.name: life.free_step for life in at_end.lifetimes[0]}
    moved = [name for name, anchor in anchors.items() if order.index(anchor) < last_compute]
    assert moved and all(freed[name] < freed_at_end[name] for name in moved)
    # what the forward hands to the backward is the same: the host copies
    assert mid.saved_bytes == at_end.saved_bytes and fw_end.code.count("ao.offload") == fw_mid.code.count("ao.offload")


def test_the_problem_knows_when_the_forwards_peak_op_starts_where_waits_move(monkeypatch):
    """Where the forward waits mid-forward, the problem carries the time the forward's peak op starts
    (the copies finished by then count as freed there); where it waits at its end, none."""
    _, _, result, problem, _ = _graph()
    monkeypatch.setattr(offload_mod, "waits_mid_forward", lambda: True)
    off = _offload_problem(result, problem)
    assert off.forward_peak is not None
    assert 0.0 <= off.forward_peak_ms <= off.forward_ms
    monkeypatch.setattr(offload_mod, "waits_mid_forward", lambda: False)
    assert _offload_problem(result, problem).forward_peak_ms is None


def test_under_inductor_without_the_ao_ops_each_copy_is_waited_for_at_once(monkeypatch):
    """torch 2.11's layout (no ``ao`` ops, nothing keeps a copied value alive until its wait): under
    Inductor the forward waits for each copy as it is issued (PyTorch's sink wait off), and the
    problem says so: no copy has to hide behind the forward, and the forward's peak knows when its op
    starts (a value read last before it is gone there). With the ``ao`` ops, or on the eager route,
    the waits are sunk as before."""
    _, _, result, problem, _ = _graph()
    monkeypatch.setattr(offload_mod, "waits_mid_forward", lambda: False)
    assert offload_mod.forward_copies_synchronous("inductor")
    assert not offload_mod.forward_copies_synchronous("eager")
    if offload_mod.offload_support() is None:  # a torch that offloads has the sink-wait switch
        assert offload_mod.partitioner_config(1e9, sink_wait=False)["activation_offload_sink_wait"] is False
    off = _offload_problem(result, problem, synchronous=True)
    assert off.forward_copies_synchronous and off.forward_peak is not None
    assert 0.0 <= off.forward_peak_ms <= off.forward_ms
    # every value read in backward may be offloaded, however long its copy
    slow = _offload_problem(result, problem, synchronous=True, bandwidth=1e3)
    assert offloadable(slow) and offloadable(slow) == offloadable(off)
    assert not offloadable(_offload_problem(result, problem, bandwidth=1e3))
    monkeypatch.setattr(offload_mod, "waits_mid_forward", lambda: True)
    assert not offload_mod.forward_copies_synchronous("inductor")
    if offload_mod.offload_support() is None:
        assert offload_mod.partitioner_config(1e9)["activation_offload_sink_wait"] is True


def test_with_synchronous_copies_the_exact_check_frees_each_value_after_its_last_forward_read(monkeypatch):
    """``plan_with_offload`` where the forward waits for each copy at once: the exact simulation of
    its plan has every offloaded value gone from the op after its last forward read to its reload,
    and the plan's time charges each copy in full."""
    import functools

    from sac_compiler.plan_graph import _simulate

    _, _, result, problem, _ = _graph()
    analysis = result.analysis
    monkeypatch.setattr(offload_mod, "waits_mid_forward", lambda: False)
    config = SACConfig(device="H100-SXM", offload=True)  # Inductor
    simulate = functools.partial(_simulate, analysis, config)
    budget = int(analysis.memory.peak_bytes * 0.8)  # low enough that the plan offloads
    choice = offload_mod.plan_with_offload(analysis, config, problem, budget, EXACT, simulate)
    assert choice is not None and choice.plan.offload and choice.problem.forward_copies_synchronous
    position = {n.name: i for i, n in enumerate(analysis.graph.gm.graph.nodes)}
    readers = {b.name: r.name for b, r in offload_mod._last_forward_readers(analysis).items()}
    sim = simulate(choice.plan.recompute)
    expected = offload_mod.offloaded_simulation(
        sim, problem, choice.plan.offload, {n: position[readers[n]] for n in choice.plan.offload})
    at_end = offload_mod.offloaded_simulation(sim, problem, choice.plan.offload)
    assert choice.simulation.step_peaks == expected.step_peaks != at_end.step_peaks
    assert choice.simulation.peak_bytes <= budget
    copies = sum(choice.problem.copy_ms(c.nbytes) for c in problem.candidates if c.name in choice.plan.offload)
    assert choice.plan.stall_ms >= copies - 1e-9


def test_the_exact_check_frees_an_offloaded_value_after_its_wait():
    """``offloaded_simulation``: a value whose wait follows forward step j is gone from step j + 1 to
    its reload; before that, and without a wait mid-forward, it is there through the forward."""
    _, _, result, problem, _ = _graph()
    sim = result.analysis.memory
    fb = sim.first_backward
    value = next(c for c in problem.candidates if c.first_use and c.first_use > 1)
    at_end = offload_mod.offloaded_simulation(sim, problem, {value.name: 1})
    after = fb - 3
    mid = offload_mod.offloaded_simulation(sim, problem, {value.name: 1}, {value.name: after})
    assert mid.step_peaks[:after + 1] == at_end.step_peaks[:after + 1] == sim.step_peaks[:after + 1]
    assert all(m == e - value.nbytes for m, e in zip(mid.step_peaks[after + 1:fb], at_end.step_peaks[after + 1:fb]))
    assert mid.step_peaks[fb:] == at_end.step_peaks[fb:] and mid.end_of_forward_bytes == at_end.end_of_forward_bytes


def test_the_stream_op_fake_torch_2_11_registers_wrongly_is_mended(monkeypatch):
    """torch 2.11's offload pass records each copied value's stream with ``streams.record_stream``,
    whose fake function it registers with another op's arguments: Inductor, running the graph on
    fake tensors, failed with "missing 1 required positional argument: 'to_dealloc'". Here that
    registration is put back in place and mended: the op then runs on a fake tensor."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    streams = pytest.importorskip("torch._dynamo.variables.streams")
    op = getattr(streams, "record_stream", None)
    if op is None or not hasattr(op, "_abstract_fn"):
        pytest.skip(f"torch {torch.__version__} has no streams.record_stream custom op")

    def as_in_torch_2_11(src_stream_index, wait_event_index, to_dealloc):
        return None

    monkeypatch.setattr(op, "_abstract_fn", as_in_torch_2_11)
    with FakeTensorMode() as mode:
        value = mode.from_tensor(torch.ones(4))
        with pytest.raises(TypeError, match="to_dealloc"):
            torch.ops.streams.record_stream.default(value, 0)
        assert offload_mod.stream_op_fakes_usable()  # mendable: offload stays offered
        assert offload_mod.mend_stream_op_fakes()
        torch.ops.streams.record_stream.default(value, 0)  # the mended fake: no error
    assert op._abstract_fn is not as_in_torch_2_11
    assert offload_mod.mend_stream_op_fakes()  # already right: nothing to do


@_cpu_graph_copy_stream
def test_the_hand_picked_anchor_offloads_every_matmul_output_the_partitioner_saves():
    """The benchmarks' hand-picked offload anchor (``benchmarks/offload_anchor.py``): every matmul
    output marked, PyTorch's partitioner saves what it saves and its offload pass copies out each
    saved matmul output; nothing else is offloaded."""
    from benchmarks.offload_anchor import MATMUL_OPS, MatmulOffloadPartitioner, matmul_offload
    from sac_compiler.capture import capture_joint

    if offload_mod.offload_support() is not None:
        pytest.skip(offload_mod.offload_support())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 8))
    graph = capture_joint(model, torch.randn(1024, 32), target_device="cpu")
    inputs = [n.meta.get("val") for n in graph.gm.graph.find_nodes(op="placeholder")]
    matmuls = {n.name for n in graph.gm.graph.nodes if n.target in MATMUL_OPS}
    with matmul_offload(prefetch=False):
        fw, bw = MatmulOffloadPartitioner()(graph.gm, inputs, num_fwd_outputs=graph.num_fwd_outputs)
    returned = [a.name for a in next(iter(fw.graph.find_nodes(op="output"))).args[0][graph.num_fwd_outputs:]
                if isinstance(a, torch.fx.Node)]
    offloaded = {name.removeprefix("cpu_offload_") for name in returned if name.startswith("cpu_offload_")}
    assert offloaded and offloaded <= matmuls
    # no matmul output is saved on the device
    assert not [name for name in returned if name in matmuls]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_hand_picked_anchor_runs_under_inductor_on_the_gpu_with_eager_gradients():
    """The hand-picked offload anchor compiles with Inductor on CUDA (on torch 2.11 only once the
    stream op's fake function is mended), copies the saved matmul outputs out and back, and gives
    eager's gradients."""
    from benchmarks.offload_anchor import MatmulOffloadPartitioner, matmul_offload

    if offload_mod.offload_support() is not None:
        pytest.skip(offload_mod.offload_support())
    model, x, expected = _gpu_mlp_with_eager_grads()
    forwards = []
    real = MatmulOffloadPartitioner.__call__

    def recording(self, gm, joint_inputs, **kwargs):
        fw, bw = real(self, gm, joint_inputs, **kwargs)
        forwards.append(fw.code)
        return fw, bw

    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    # no compiled graph from a cache: the partitioner must run for its forward to be read
    with pytest.MonkeyPatch.context() as patch, matmul_offload(), inductor_config.patch(fx_graph_cache=False), \
            functorch_config.patch(enable_autograd_cache=False):
        patch.setattr(MatmulOffloadPartitioner, "__call__", recording)
        torch.compile(model)(x).sum().backward()
    torch.cuda.synchronize()
    assert forwards and "cpu_offload_" in forwards[0], forwards
    _assert_grads(model, expected)


def test_the_offload_search_beside_a_recompute_plan_is_short(monkeypatch):
    """Where recomputation alone has a plan, the keep / recompute / offload program only tries to
    beat it: its solves get ``_OFFLOAD_BESIDE_S``; below recomputation's floor they get the
    configured limit."""
    from sac_compiler import plan_graph
    from sac_compiler.plan_graph import BudgetError, plan_joint

    model, x, result, _, _ = _graph()
    peak = result.analysis.memory.peak_bytes
    limits = []

    def recording(analysis, config, problem, goal, options, simulate):
        limits.append(options.time_limit_s)
        return None

    monkeypatch.setattr(offload_mod, "plan_with_offload", recording)
    from sac_compiler.capture import capture_joint

    def plan(budget):
        graph = capture_joint(model, x, target_device="cpu")
        return plan_joint(graph, SACConfig(device="H100-SXM", compiler="eager", offload=True, time_limit_s=30,
                                           memory_budget=budget))

    monkeypatch.setattr(offload_mod, "offload_note", lambda config, analysis=None, bandwidth=None: None)
    planned = plan(int(peak * 0.9))
    assert planned.plan.recompute and limits == [plan_graph._OFFLOAD_BESIDE_S]
    limits.clear()
    with pytest.raises(BudgetError):
        plan(int(peak * 0.5))
    assert limits == [30]


def test_a_plan_made_again_at_run_time_leaves_offload_out_where_torch_cannot_compile_it(monkeypatch, caplog):
    """Outside Dynamo's compile (the enforcer's replan at run time) a torch whose offload pass needs
    Dynamo's own compile (2.11's stream ops) is planned without offload, and the log says so;
    within Dynamo's compile, or with the ``ao`` ops, the configuration is kept."""
    import logging

    from torch._guards import TracingContext, tracing
    from torch._subclasses.fake_tensor import FakeTensorMode

    from sac_compiler.backend import offload_at_this_compile

    config = SACConfig(offload=True)
    monkeypatch.setattr(offload_mod, "reloads_placeable", lambda: False)
    with caplog.at_level(logging.WARNING, logger="sac_compiler.backend"):
        assert offload_at_this_compile(config, "graph 0/0").offload is False
    assert "planned again at run time" in caplog.text and "graph 0/0" in caplog.text
    with tracing(TracingContext(FakeTensorMode())):
        assert offload_at_this_compile(config) is config
    monkeypatch.setattr(offload_mod, "reloads_placeable", lambda: True)
    assert offload_at_this_compile(config) is config
    assert offload_at_this_compile(SACConfig()).offload is False


def test_where_reloads_cannot_be_placed_each_starts_at_its_first_read(monkeypatch):
    """Without ``ao.reload`` (torch 2.11), under Inductor, a reload is issued before its value's
    first backward read (PyTorch's prefetch, off, would move it by estimates of its own): the
    program offers that start alone and its plan's reloads all start there; the replay charges the
    copy. The eager route keeps PyTorch's prefetch."""
    import functools

    from sac_compiler.plan_graph import _simulate

    _, _, result, problem, _ = _graph()
    analysis = result.analysis
    first = {c.name: c.first_use for c in problem.candidates}
    off = _offload_problem(result, problem, reloads_at_first_use=True)
    assert all(reload_starts(off, n) == [first[n]] for n in offloadable(off))
    one = _one_value(budget=400, bandwidth=200e9)
    assert reload_starts(one, "x") == [1, 2, 3, 4]
    assert reload_starts(dataclasses.replace(one, reloads_at_first_use=True), "x") == [4]
    # reloaded at its first read, nothing hides the copy (0.52 ms), still under recomputing it (2 ms)
    plan, run = _checked(dataclasses.replace(one, reloads_at_first_use=True))
    assert dict(plan.offload) == {"x": 4} and not plan.recompute
    assert run.backward_stall_ms == pytest.approx(1e3 * 100 * MiB / 200e9)
    monkeypatch.setattr(offload_mod, "reloads_placeable", lambda: False)
    assert offload_mod.reloads_at_first_read("inductor") and not offload_mod.reloads_at_first_read("eager")
    config = SACConfig(device="H100-SXM", offload=True)  # Inductor
    choice = offload_mod.plan_with_offload(analysis, config, problem, int(analysis.memory.peak_bytes * 0.8), EXACT,
                                           functools.partial(_simulate, analysis, config))
    assert choice is not None and choice.plan.offload and choice.problem.reloads_at_first_use
    assert all(start == first[n] for n, start in choice.plan.offload.items())
    run = replay(choice.problem, choice.plan.recompute, choice.plan.kept_for_recompute, choice.plan.offload)
    assert run.backward_stall_ms > 0


def test_a_timed_transfer_names_its_direction():
    """``transfer_ms`` (the backend's link measurement, ``benchmarks/link_bandwidth.py``) takes
    "d2h" or "h2d" and says so for anything else, before touching a device."""
    with pytest.raises(ValueError, match="direction must be 'd2h' or 'h2d'"):
        offload_mod.transfer_ms(torch.device("cuda"), 1024, "up")
