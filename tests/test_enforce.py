"""The budget enforced at run time (sac_compiler.enforce), on CPU with a supplied peak reading."""

import copy
import functools
import gc
import re

import pytest
import torch

from sac_compiler.backend import SACPartitioner, compile_graph
from sac_compiler.config import SACConfig
from sac_compiler.enforce import (
    MAX_REPLANS,
    MAX_SCALE,
    BudgetEnforcer,
    BudgetExceededError,
)
from sac_compiler.planner import budget_range
from tests.models import Nested

MIB = 2**20


@pytest.fixture(autouse=True)
def _no_step_of_an_earlier_test():
    """Each test starts with no enforced graph waiting for a backward: a step an earlier test left
    unfinished (its tensors alive until a garbage collection) would otherwise be asked for room by
    this test's graphs."""
    import sac_compiler.enforce as enforce_module

    gc.collect()
    enforce_module._IN_STEP.clear()
    yield


class _Peaks:
    """A high-water mark reading: 0 before each measured forward, then what the test says the step reached."""

    def __init__(self, steps):
        self.steps = list(steps)
        self.reads = 0

    def __call__(self):
        self.reads += 1
        return 0 if self.reads % 2 else self.steps.pop(0)


def _recording(partitioners):
    """A SACPartitioner that appends every instance to ``partitioners``."""

    class Recording(SACPartitioner):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            partitioners.append(self)

    return Recording


def _setup(peaks):
    torch.manual_seed(0)
    model, x = Nested(dim=32, n_layers=3), torch.randn(2048, 32)
    span = budget_range(model, x, compiler="eager", target_device="cpu")
    budget = (span.smallest_budget + span.no_recompute_peak) // 2
    room = budget - span.smallest_budget  # what a replan can give up
    partitioners = []
    Recording = _recording(partitioners)
    enforcers = []

    def backend(gm, inputs):
        compiled = compile_graph(gm, inputs, SACConfig.from_options({"memory_budget": budget, "compiler": "eager"}),
                                 partitioner_cls=Recording, read_peak=_Peaks([p(budget, room) for p in peaks]))
        enforcers.append(compiled)
        return compiled

    return model, x, budget, room, backend, partitioners, enforcers


def _steps(model, x, backend, n):
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend=backend)
    for _ in range(n):
        for m, f in ((reference, reference), (model, compiled)):
            m.zero_grad(set_to_none=True)
            f(x).sum().backward()
        for p, q in zip(reference.parameters(), model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0)


def test_a_step_over_the_budget_is_planned_again_lower_by_the_excess():
    """The second step measures over the budget: the next call recompiles with the excess counted
    outside the graph, and the new plan leaves it free; the one after measures under the budget."""
    model, x, budget, room, backend, partitioners, enforcers = _setup([lambda b, r: b + r // 3, lambda b, r: b - 1])
    _steps(model, x, backend, 4)
    (enforcer,) = enforcers
    excess = room // 3
    assert isinstance(enforcer, BudgetEnforcer)
    assert enforcer.measured == [budget + excess, budget - 1]
    # the plan did not see the measured peak over its prediction (at most the budget)
    predicted = enforcer.predicted[0]
    assert predicted is not None and predicted <= budget
    unseen = budget + excess - predicted
    assert enforcer.replans == 1 and enforcer.extra_bytes == unseen >= excess
    first, second = partitioners
    assert second.outside_bytes == first.outside_bytes + unseen
    # the excess was measured within forward and backward: the optimizer step's peak, checked
    # apart between the steps, does not count it
    assert first.freed_before_optimizer == 0 and second.freed_before_optimizer == unseen
    assert second.last_result.analysis.freed_before_optimizer == unseen
    assert second.last_result.predicted_peak <= budget
    # the graph's own share of the budget shrank by what it did not see
    assert second.last_result.predicted_peak - second.last_result.outside_bytes <= budget - unseen
    assert second.last_result.measured_peak == budget - 1


def test_a_step_that_stays_over_the_budget_raises_naming_the_measured_peak():
    over = [lambda b, r: b + r // 8] * (MAX_REPLANS + 1)
    model, x, budget, room, backend, _, enforcers = _setup(over)
    with pytest.raises(Exception, match=rf"the step measured .* \({budget + room // 8} bytes\) after planning again "
                                        rf"{MAX_REPLANS} times for what the measured steps showed over their "
                                        r"plans' predictions"):
        _steps(model, x, backend, 2 * (MAX_REPLANS + 1) + 1)
    assert enforcers[0].replans == MAX_REPLANS


def test_no_plan_for_the_measured_excess_is_an_error_naming_the_peak():
    """Measured over the budget by more than any plan gives up: the replans plan the lowest peak, and
    a step still over the budget after them is an error naming the measured peak."""
    model, x, budget, room, backend, _, enforcers = _setup([lambda b, r: b + 2 * r] * (MAX_REPLANS + 1))
    with pytest.raises(Exception, match=rf"the step measured .* \({budget + 2 * room} bytes\)"):
        _steps(model, x, backend, 2 * (MAX_REPLANS + 1) + 1)
    assert enforcers[0].replans == MAX_REPLANS


def test_a_replan_with_no_plan_for_the_whole_excess_plans_the_lowest_peak():
    """The step measured over its prediction by more than any plan gives up, but over the budget by
    less (the plan had room left under the budget): the replan plans the graph's lowest peak, which
    gives up more than the excess over the budget, and that plan holds."""
    torch.manual_seed(0)
    model, x = Nested(dim=32, n_layers=3), torch.randn(2048, 32)
    span = budget_range(model, x, compiler="eager", target_device="cpu")
    budget = (span.smallest_budget + span.no_recompute_peak) // 2
    room = budget - span.smallest_budget  # the most any plan gives up
    enforcers = []

    class Reading:
        """0 before each measured forward; the first measured step over the prediction by more than
        ``room`` and over the budget by less; then under the budget."""

        def __init__(self):
            self.reads, self.steps = 0, 0

        def __call__(self):
            self.reads += 1
            if self.reads % 2:
                return 0
            self.steps += 1
            if self.steps > 1:
                return budget - 1
            predicted = enforcers[0].result.step_peak_bytes
            assert predicted < budget  # the plan left room (else the two asks are one)
            return predicted + room + (budget - predicted) // 2

    def backend(gm, inputs):
        enforcers.append(compile_graph(gm, inputs, SACConfig.from_options({"memory_budget": budget,
                                                                           "compiler": "eager"}),
                                       read_peak=Reading()))
        return enforcers[-1]

    _steps(model, x, backend, 4)
    (enforcer,) = enforcers
    first_measured, second_measured = enforcer.measured
    assert second_measured == budget - 1
    least = first_measured - budget
    assert 0 < least < room < first_measured - enforcer.predicted[0]
    # planned again once, at the lowest peak: as much as any plan gives up, more than the excess
    # over the budget, less than the whole excess
    assert enforcer.replans == 1 and least <= enforcer.extra_bytes <= room
    assert enforcer.result.predicted_peak <= budget


def test_enforcement_off_and_fractions_are_not_wrapped():
    for options in ({"memory_budget": 10 * MIB, "enforce_budget": False}, {"memory_budget": 0.5}):
        config = SACConfig.from_options({**options, "compiler": "eager"})
        backend = functools.partial(compile_graph, config=config, read_peak=lambda: 0)
        seen = []
        torch.compile(Nested(dim=32, n_layers=1), backend=lambda gm, inputs: seen.append(backend(gm, inputs)) or seen[-1])(
            torch.randn(64, 32)).sum().backward()
        assert not isinstance(seen[0], BudgetEnforcer), options


def test_outputs_the_caller_holds_through_backward_are_reported():
    """The simulation assumes the caller drops the outputs before backward; the measured step says
    how much the caller held (here the whole output, kept in a variable)."""
    model, x, budget, room, backend, partitioners, _ = _setup([lambda b, r: b - 1])
    compiled = torch.compile(model, backend=backend)
    for _ in range(2):
        out = compiled(x)
        out.sum().backward()
    assert partitioners[0].last_result.caller_held_bytes == out.untyped_storage().nbytes()


class _Blocks(torch.nn.Module):
    def __init__(self, n=4, dim=32):
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))
            for _ in range(n))

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


def test_one_graph_serving_every_block_is_planned_again_for_its_runs():
    """Compiled block by block (as torchtitan does), one graph runs once per block in a step and each
    run keeps its own saved values through the others: its first step shows the runs, and it is
    planned again for them before the step that is measured; a graph that ran once beside it counts
    the excess over the budget it measured."""
    torch.manual_seed(0)
    model, x = _Blocks(), torch.randn(2048, 32)
    span = budget_range(model.blocks[0], x, compiler="eager", target_device="cpu")
    budget = span.no_recompute_peak * 3
    excess = 4 * 2**16
    # per graph, in the order Dynamo compiles them: what its measured steps reach
    readings = iter([[budget + excess, budget], [budget - 1]])
    enforcers = []
    partitioners = []
    Recording = _recording(partitioners)

    def backend(gm, inputs):
        enforcers.append(compile_graph(gm, inputs, SACConfig.from_options({"memory_budget": budget, "compiler": "eager"}),
                                       partitioner_cls=Recording, read_peak=_Peaks(next(readings))))
        return enforcers[-1]

    reference = copy.deepcopy(model)
    for i in range(len(model.blocks)):
        model.blocks[i] = torch.compile(model.blocks[i], backend=backend)
    for _ in range(5):
        for m in (reference, model):
            m.zero_grad(set_to_none=True)
            m(x).sum().backward()
        for p, q in zip(reference.parameters(), model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0)
    # Dynamo compiles the first block apart (its input does not require grad) and one graph for the
    # other three
    assert len(enforcers) == 2
    first, blocks = enforcers
    # the graph of three runs: planned again for them after its first step, nothing counted
    # outside, no replan spent; its measured step then keeps the budget
    assert blocks.runs_per_step == 3 and blocks.extra_bytes == 0 and blocks.replans == 0
    assert blocks.measured == [budget - 1]
    replanned = [p for p in partitioners if p.runs_per_step == 3]
    assert len(replanned) == 1
    result = replanned[0].last_result
    assert result.runs_per_step == 3 and result.held_per_run_bytes > 0
    # the three runs' step: one run's peak and what the two others hold through it, under the budget
    assert result.partitioned.peak_bytes + 2 * result.held_per_run_bytes <= budget
    assert result.measured_peak == budget - 1
    # the graph that ran once, with another graph in its step: the excess over the budget
    assert first.runs_per_step == 1 and first.measured == [budget + excess, budget]
    assert first.replans == 1 and first.extra_bytes == excess


def test_a_mark_already_over_the_budget_is_reset_once_to_read_the_step():
    """The first plan went over the budget: the high-water mark hides every later step's own peak
    unless it is reset, which the enforcer does then (and only then)."""
    marks = {"now": 0, "resets": 0}
    torch.manual_seed(0)
    model, x = Nested(dim=32, n_layers=3), torch.randn(2048, 32)
    span = budget_range(model, x, compiler="eager", target_device="cpu")
    budget = (span.smallest_budget + span.no_recompute_peak) // 2
    readings = iter([budget + 2**16, budget - 1])  # what each measured step reaches

    def read_peak():
        return marks["now"]

    def reset_peak():
        marks["resets"] += 1
        marks["now"] = 0

    def backend(gm, inputs):
        config = SACConfig.from_options({"memory_budget": budget, "compiler": "eager"})

        def compile_once(graph, example_inputs, extra, runs_per_step=1, loss_memory=None):
            from sac_compiler.backend import _compile

            partitioner = SACPartitioner(config, graph, extra, runs_per_step=runs_per_step)
            return _compile(graph, example_inputs, config, partitioner), partitioner

        enforcer = BudgetEnforcer(gm, inputs, budget, compile_once, read_peak, reset_peak)
        real_done = enforcer._step_done

        def step_done():
            if enforcer._steps + 1 == 2:  # the measured step reached its peak
                marks["now"] = max(marks["now"], next(readings))
            real_done()

        enforcer._step_done = step_done
        return enforcer

    compiled = torch.compile(model, backend=backend)
    for _ in range(5):
        model.zero_grad(set_to_none=True)
        compiled(x).sum().backward()
    assert marks["resets"] == 1  # before the second version's measured step, the mark over the budget


def test_a_replan_that_gave_back_too_little_makes_the_next_ask_for_more():
    """The first replan was asked for what its plan did not see, an eighth of the room over the
    budget and the plan's own margin under it, and the step came down by only two thirds of the
    eighth: the second asks for the remaining excess scaled by how little that was. (Both asks
    fit the room: a second ask beyond it plans the lowest peak instead, another test.)"""
    steps = [lambda b, r: b + r // 8, lambda b, r: b + r // 24, lambda b, r: b - 1]
    model, x, budget, room, backend, partitioners, enforcers = _setup(steps)
    _steps(model, x, backend, 6)
    (enforcer,) = enforcers
    assert enforcer.measured == [budget + room // 8, budget + room // 24, budget - 1]
    # each replan asks for what its plan did not see; the second, scaled by how little the first
    # gave back for what it asked (at most MAX_SCALE times)
    first = budget + room // 8 - enforcer.predicted[0]
    unseen = budget + room // 24 - enforcer.predicted[1]
    achieved = room // 8 - room // 24
    scale = min(MAX_SCALE, max(1.0, first / achieved))
    assert enforcer.extra_bytes == first + int(unseen * scale)
    assert enforcer.replans == 2


def test_a_plan_with_room_to_spare_is_asked_for_what_it_did_not_see():
    """A first plan predicted well under the budget measures over it: the replan counts the whole
    gap between prediction and measurement outside the graph, not only the part over the budget
    (which the room the plan left would absorb, measuring the same peak again)."""
    model, x, budget, room, backend, partitioners, enforcers = _setup([lambda b, r: b + r // 8, lambda b, r: b - 1])
    _steps(model, x, backend, 4)
    (enforcer,) = enforcers
    predicted = enforcer.predicted[0]
    assert enforcer.extra_bytes == budget + room // 8 - min(predicted, budget)
    _, second = partitioners
    # measured - predicted counted outside: the new plan's own part is at most what the first measured lacked
    assert second.last_result.predicted_peak - second.outside_bytes <= budget - enforcer.extra_bytes


def test_a_forward_without_backward_elsewhere_leaves_the_graph_alone_in_its_step():
    """Another enforced graph ran forward and its outputs were dropped without a backward (an
    evaluation with grad enabled, an error in the caller's loss): it is no part of the later steps,
    which are still measured against this graph's prediction."""
    model, x, budget, room, backend, _, enforcers = _setup([lambda b, r: b + r // 8, lambda b, r: b - 1])
    other_model, other_x, *_, other_backend, _, others = _setup([])
    torch.compile(other_model, backend=other_backend)(other_x).sum()  # forward only, output dropped
    assert len(others) == 1
    _steps(model, x, backend, 4)
    enforcer = enforcers[-1]
    assert enforcer.extra_bytes == budget + room // 8 - min(enforcer.predicted[0], budget)


def test_a_plan_for_several_runs_in_a_step_keeps_the_step_under_the_budget():
    """Planned for one run, a block's graph keeps everything under a budget that three runs of it
    overflow; planned for three, it recomputes until the three runs' step fits."""
    from sac_compiler.backend import _compile

    torch.manual_seed(0)
    model, x = Nested(dim=32, n_layers=3), torch.randn(2048, 32)
    span = budget_range(model, x, compiler="eager", target_device="cpu")
    budget = int(span.no_recompute_peak * 1.5)
    config = SACConfig.from_options({"memory_budget": budget, "compiler": "eager"})
    results = {}
    for runs in (1, 3):
        def backend(gm, inputs, runs=runs):
            partitioner = SACPartitioner(config, gm, 0, runs_per_step=runs)
            compiled = _compile(gm, inputs, config, partitioner)
            results[runs] = partitioner
            return compiled

        torch.compile(copy.deepcopy(model), backend=backend)(x).sum().backward()
    one, three = results[1].last_result, results[3].last_result
    assert not one.plan.recompute  # one run fits without recomputing
    assert one.partitioned.peak_bytes + 2 * one.held_per_run_bytes > budget  # three such runs do not
    assert three.plan.recompute and three.partitioned.peak_bytes + 2 * three.held_per_run_bytes <= budget
    assert three.held_per_run_bytes < one.held_per_run_bytes
    with pytest.raises(ValueError, match="runs_per_step must be at least 1"):
        SACPartitioner(config, None, 0, runs_per_step=0)


class _StepReadings:
    """The allocator as a measured step sees it: the mark before the step, then bytes in use and the
    mark as forward ends, the mark as backward reaches the graph, the mark after backward."""

    def __init__(self, steps):
        self.steps = list(steps)  # per measured step: (in use at forward end, forward mark, backward mark, final mark)
        self.now = None
        self.phase = 0

    def peak(self):
        if self.now is None:  # the mark before the measured step
            self.now = self.steps.pop(0)
            self.phase = 0
            return 0
        self.phase += 1
        value = self.now[self.phase]  # forward mark, then backward mark, then final mark
        if self.phase == 3:
            self.now = None
        return value

    def allocated(self):
        return self.now[0]


def _reading_backend(budget, readings, partitioners=None, **options):
    """A backend compiling each Dynamo graph on the eager route with the absolute ``budget`` (and
    ``options``), its steps read from ``readings`` (a ``peak`` and an ``allocated`` reading);
    ``partitioners`` receives every partitioner made. Returns it and the list its enforcers go to."""
    enforcers = []
    kwargs = {} if partitioners is None else {"partitioner_cls": _recording(partitioners)}

    def backend(gm, inputs):
        config = SACConfig.from_options({"memory_budget": budget, "compiler": "eager", **options})
        enforcers.append(compile_graph(gm, inputs, config, read_peak=readings.peak,
                                       read_allocated=readings.allocated, **kwargs))
        return enforcers[-1]

    return backend, enforcers


def test_a_step_that_peaks_at_the_callers_loss_is_planned_again_with_the_loss_counted_there():
    """A criterion outside the compiled model: the mark rises after forward returns and before
    backward reaches the graph. The replan counts that memory between the graphs only (loss_memory),
    not through the whole step, and adds nothing outside the graph."""
    torch.manual_seed(0)
    model, x = Nested(dim=32, n_layers=3), torch.randn(2048, 32)
    span = budget_range(model, x, compiler="eager", target_device="cpu")
    budget = (span.smallest_budget + span.no_recompute_peak) // 2
    loss = (budget - span.smallest_budget) // 4
    end = budget - loss // 2  # in use as forward ends: with the loss on top, over the budget
    readings = _StepReadings([(end, end, end + loss, end + loss), (end - loss, end, end, end)])
    partitioners = []
    backend, enforcers = _reading_backend(budget, readings, partitioners)

    _steps(model, x, backend, 4)
    (enforcer,) = enforcers
    assert enforcer.measured == [end + loss, end]
    assert enforcer.measured_loss_memory == loss and enforcer.loss_memory == loss
    assert enforcer.replans == 1 and enforcer.extra_bytes == 0
    first, second = partitioners
    assert first.config.loss_memory == 0 and second.config.loss_memory == loss
    assert second.outside_bytes == first.outside_bytes
    planned = second.last_result
    assert planned.loss_memory == loss and planned.measured_peak == end
    # the new plan leaves room for the loss at the end of forward
    assert planned.partitioned.end_of_forward_bytes + loss <= budget
    assert first.last_result.measured_loss_memory == loss


def test_the_report_shows_what_the_step_measured_beside_the_prediction(capsys):
    """With ``report`` set, the report is written again once a step is measured: the measured
    peak beside the simulated one, and the caller's loss between forward and backward."""
    from sac_compiler.config import format_bytes

    torch.manual_seed(0)
    model, x = Nested(dim=32, n_layers=3), torch.randn(2048, 32)
    span = budget_range(model, x, compiler="eager", target_device="cpu")
    budget = (span.smallest_budget + span.no_recompute_peak) // 2
    loss = (budget - span.smallest_budget) // 4
    end = budget - loss // 2
    readings = _StepReadings([(end, end, end + loss, end + loss), (end - loss, end, end, end)])

    backend, _ = _reading_backend(budget, readings, report=True)

    _steps(model, x, backend, 4)
    out = capsys.readouterr().out
    # the first plan's measured step (over the budget, at the caller's loss), then the replan's
    measured = re.findall(r"measured peak of a step +(\S+ \S+)", out)
    assert measured == [format_bytes(end + loss), format_bytes(end)]
    assert re.findall(r"the caller's loss between forward and backward \(measured\) +(\S+ \S+)", out) == [
        format_bytes(loss)]
    # each measured report also has the prediction: written at each plan and after each measured step
    assert out.count("simulated peak of the partitioned graphs") >= 4


def test_a_loss_no_plan_leaves_room_for_is_an_error_naming_it():
    """The caller's loss measured larger than anything the graph can give up: the error names the
    step's measured peak and the loss it could not make room for (not a size of zero)."""
    from sac_compiler.config import format_bytes

    torch.manual_seed(0)
    model, x = Nested(dim=32, n_layers=3), torch.randn(2048, 32)
    span = budget_range(model, x, compiler="eager", target_device="cpu")
    budget = (span.smallest_budget + span.no_recompute_peak) // 2
    loss = span.no_recompute_peak  # no plan holds this between forward and backward
    end = budget - loss // 8
    readings = _StepReadings([(end, end, end + loss, end + loss)])
    backend, _ = _reading_backend(budget, readings)

    with pytest.raises(Exception, match=rf"\({end + loss} bytes\), and no plan leaves room for the "
                                        rf"{re.escape(format_bytes(loss))} the caller's loss holds between "
                                        r"forward and backward: .*smallest feasible peak"):
        _steps(model, x, backend, 3)


def test_an_excess_no_plan_gives_up_is_an_error_that_says_what_it_counted():
    """A step far over its prediction, not at a caller's loss: the replan counts the excess beside
    the graph, finds no plan, and the error says what that count is (what the measured step showed
    over the plan's prediction: the caller, the allocator, or the plan's own error), not that the
    caller and the allocator add it. The first replan plans the graph's lowest peak (the excess
    was measured within forward and backward: the optimizer step, which holds nothing of it, is no
    reason to refuse); the step after it measures as far over, and the second replan has nothing
    more to give."""
    torch.manual_seed(0)
    model, x = Nested(dim=32, n_layers=3), torch.randn(2048, 32)
    span = budget_range(model, x, compiler="eager", target_device="cpu")
    budget = (span.smallest_budget + span.no_recompute_peak) // 2
    over = budget + span.no_recompute_peak  # no plan gives this much up
    readings = _StepReadings([(budget // 2, budget // 2, budget // 2, over)] * 2)
    backend, enforcers = _reading_backend(budget, readings)

    with pytest.raises(Exception, match=rf"\({over} bytes\), and no plan leaves room for the .* counted beside the "
                                        r"graph for what the measured steps showed over their plans' predictions") as error:
        _steps(model, x, backend, 7)
    assert "optimizer step" not in str(error.value) and "smallest feasible peak" in str(error.value)
    (enforcer,) = enforcers
    assert enforcer.measured == [over, over] and enforcer.replans == 2


def _eager_backend(budget, read_peaks):
    """A backend compiling each Dynamo graph on the eager route with the absolute ``budget``, the
    n-th graph reading its steps' peaks from the n-th of ``read_peaks``; and the list its
    enforcers go to, in the order Dynamo compiles the graphs."""
    readers = iter(read_peaks)
    enforcers = []

    def backend(gm, inputs):
        enforcers.append(compile_graph(gm, inputs, SACConfig.from_options({"memory_budget": budget, "compiler": "eager"}),
                                       read_peak=next(readers)))
        return enforcers[-1]

    return backend, enforcers


class _TwoHalves(torch.nn.Module):
    """Two MLP halves with a graph break between them: Dynamo compiles two graphs."""

    def __init__(self, dim=32):
        super().__init__()
        self.first = Nested(dim=dim, n_layers=2).layers
        self.second = Nested(dim=dim, n_layers=2).layers

    def forward(self, x):
        for layer in self.first:
            x = layer(x)
        torch._dynamo.graph_break()
        for layer in self.second:
            x = layer(x)
        return x


def test_the_graph_before_a_break_does_not_take_the_next_graphs_peak_for_the_callers_loss():
    """With a graph break the step runs the second graph's forward and backward between the first
    graph's forward and its backward: the mark rising there is the second graph's, not the
    caller's loss, and the first graph does not plan for it as one."""
    torch.manual_seed(0)
    model, x = _TwoHalves(), torch.randn(2048, 32)
    span = budget_range(torch.nn.Sequential(*model.first), x, compiler="eager", target_device="cpu")
    budget = 4 * span.no_recompute_peak
    marks = iter(range(budget // 2, budget))  # every read a byte higher, all under the budget
    enforcers = []

    def backend(gm, inputs):
        enforcers.append(compile_graph(gm, inputs, SACConfig.from_options({"memory_budget": budget, "compiler": "eager"}),
                                       read_peak=lambda: next(marks), read_allocated=lambda: budget // 4))
        return enforcers[-1]

    _steps(model, x, backend, 3)
    first, second = enforcers
    assert first.measured and first.measured_loss_memory is None and first.replans == 0
    # the second graph's own gap (its forward's end to its backward) is the caller's: read as before
    assert second.measured_loss_memory is not None and second.measured_loss_memory > 0


def test_a_graph_asked_for_more_room_than_it_has_names_what_was_asked(monkeypatch):
    """The first graph is asked, before any step of its own was measured, for more room than any of
    its plans gives: the error names the room asked for (it used to fail on the missing
    measurement with an IndexError)."""
    import sac_compiler.backend as backend_module
    import sac_compiler.enforce as enforce_module
    from sac_compiler.config import format_bytes

    torch.manual_seed(0)
    model, x = _TwoHalves(), torch.randn(2048, 32)
    span = budget_range(torch.nn.Sequential(*model.first), x, compiler="eager", target_device="cpu")
    budget = span.no_recompute_peak
    slack = span.no_recompute_peak - span.smallest_budget
    held = 4 * slack  # the second graph lacks more room than the first holds for its backward
    outside = iter([0, held])
    monkeypatch.setattr(backend_module, "held_outside", lambda inputs, config, optimizers=None, biased=True: next(outside))
    # what the first graph is taken to hold is freed before the optimizer step, as it would be
    monkeypatch.setattr(enforce_module, "held_for_backwards", lambda: held)
    backend, enforcers = _eager_backend(budget, (_Peaks([budget - 1] * 4) for _ in range(2)))

    with pytest.raises(BudgetExceededError, match=r"a graph later in the step asked it for .* of room, and no plan "
                                                   r"leaves room for the .* a graph later in the step asked it to "
                                                   r"give up: .*smallest feasible peak") as raised:
        _steps(model, x, backend, 4)
    first = enforcers[0]
    assert first.measured == [] and first._asked_room > slack
    assert format_bytes(first._asked_room) in str(raised.value)
    # planned again outside Dynamo's compile, the graph is still named by its compile id and code
    assert re.search(r"give up: graph \d+/\d+ of _TwoHalves\.forward", str(raised.value)), str(raised.value)
    # the failed step's tensors (held by the traceback) must not leave the first graph waiting for
    # a backward in later tests' steps
    del raised
    gc.collect()
    assert not first._awaits_backward()


def test_a_graph_after_a_break_without_room_asks_the_graphs_before_it(monkeypatch):
    """The second graph of a step has no plan beside what the first holds while it runs: the first
    plans again at its next call to leave it the room it lacks, and the second is planned with that
    room; the gradients stay exact."""
    import sac_compiler.backend as backend_module

    torch.manual_seed(0)
    model, x = _TwoHalves(), torch.randn(2048, 32)
    span = budget_range(torch.nn.Sequential(*model.first), x, compiler="eager", target_device="cpu")
    budget = span.no_recompute_peak
    slack = span.no_recompute_peak - span.smallest_budget
    held = slack + slack // 2  # what the first graph holds as the second compiles
    outside = iter([0, held])
    monkeypatch.setattr(backend_module, "held_outside", lambda inputs, config, optimizers=None, biased=True: next(outside))
    backend, enforcers = _eager_backend(budget, (_Peaks([budget - 1] * 3) for _ in range(3)))

    _steps(model, x, backend, 4)
    first, second = enforcers
    assert isinstance(second, BudgetEnforcer)
    # what the first graph held for its backward as the second compiled is freed before the
    # optimizer step: the second graph's plan does not count it there
    freed = second.partitioner.freed_before_optimizer
    assert freed > 0
    assert second.result.analysis.freed_before_optimizer == min(freed, second.partitioner.outside_bytes)
    room = second.partitioner.outside_bytes - held
    assert room < 0  # planned with the room the first graph gives
    assert first.room_requests == 1 and first.replans == 0 and first.extra_bytes == 0 and first._asked_room == -room
    # the first graph's new plan counts that room between its forward and its backward, where the
    # second graph runs, and keeps what it holds for its backward under the budget with it
    assert first.partitioner.outside_bytes == 0 and first.partitioner.config.loss_memory == -room
    planned = first.partitioner.last_result
    assert planned.step_peak_bytes <= budget  # the partitioned graphs' peak, the plan's prediction
    assert planned.partitioned.end_of_forward_bytes - room <= budget
    with pytest.raises(Exception, match="smallest feasible peak"):
        # without a graph before it in the step, the same shortfall is an error
        monkeypatch.setattr(backend_module, "held_outside", lambda inputs, config, optimizers=None, biased=True: held)
        torch._dynamo.reset()
        torch.compile(torch.nn.Sequential(*Nested(dim=32, n_layers=2).layers), backend=backend)(x).sum().backward()


def test_a_graph_after_a_break_measured_over_with_no_plan_asks_the_graphs_before_it(monkeypatch):
    """The second graph of a step planned at its compile, then measured over the budget by more
    than it can give up beside what the first graph holds through its step: its replan asks the
    first graph for the room it lacks (as a compile does) instead of failing; the first plans again
    at its next call, and the gradients stay exact."""
    import sac_compiler.backend as backend_module

    torch.manual_seed(0)
    model, x = _TwoHalves(), torch.randn(2048, 32)
    span = budget_range(torch.nn.Sequential(*model.first), x, compiler="eager", target_device="cpu")
    budget = span.no_recompute_peak
    slack = span.no_recompute_peak - span.smallest_budget
    held = slack // 2  # what the first graph holds as the second compiles: the second still plans
    outside = iter([0, held])
    monkeypatch.setattr(backend_module, "held_outside", lambda inputs, config, optimizers=None, biased=True: next(outside))
    backend, enforcers = _eager_backend(budget, [_Peaks([budget - 1] * 8), _Peaks([budget + slack] + [budget - 1] * 8)])

    _steps(model, x, backend, 5)
    first, second = enforcers
    assert second.measured[0] == budget + slack
    # the replan counted the measured excess and the room the first graph was asked for
    assert second.replans == 1 and first.room_requests == 1 and first.replans == 0
    asked = first._asked_room
    assert asked > 0 and first.extra_bytes == 0 and second.extra_bytes == slack - asked
    assert second.partitioner.outside_bytes == held + second.extra_bytes
    assert second.partitioner.last_result.predicted_peak <= budget
    assert first.partitioner.config.loss_memory == asked


def test_room_is_asked_of_the_graphs_before_in_proportion_to_what_they_hold():
    """A graph holding nothing for its backward (an embedding's) is asked for nothing; the others
    in proportion to what they hold; the shares cover the room. Equal shares when none holds any."""
    from sac_compiler.enforce import room_shares

    assert room_shares(100, [0, 30, 70]) == [0, 30, 70]
    shares = room_shares(1000, [1, 2, 4])
    assert sum(shares) >= 1000 and shares[0] < shares[1] < shares[2]
    assert room_shares(10, [0, 0, 0]) == [4, 4, 4]


def test_a_graph_that_cannot_give_its_steps_whole_excess_gives_what_it_can_beside_the_others(monkeypatch):
    """With a graph break each graph of the step measures the step's excess over the budget, and
    each plans again for it. The first graph has no plan that gives up the whole excess: it plans
    its lowest peak instead of failing the step (the other graph plans again too), and the
    gradients stay exact."""
    import sac_compiler.backend as backend_module

    torch.manual_seed(0)
    model, x = _TwoHalves(), torch.randn(2048, 32)
    span = budget_range(torch.nn.Sequential(*model.first), x, compiler="eager", target_device="cpu")
    budget = span.no_recompute_peak
    slack = span.no_recompute_peak - span.smallest_budget  # the most the first graph gives up
    monkeypatch.setattr(backend_module, "held_outside", lambda inputs, config, optimizers=None, biased=True: 0)
    excess = slack + slack // 2
    backend, enforcers = _eager_backend(budget, [_Peaks([budget + excess] + [budget - 1] * 8), _Peaks([budget - 1] * 8)])

    _steps(model, x, backend, 5)
    first, second = enforcers
    assert first.measured == [budget + excess, budget - 1]
    assert not first._alone  # the second graph held memory through the first graph's step
    # planned once, counting less than the excess but more than nothing: the most it had a plan for
    assert first.replans == 1 and 0 < first.extra_bytes < excess
    assert first.partitioner.last_result.predicted_peak <= budget
    assert first.partitioner.last_result.predicted_peak - first.extra_bytes < span.no_recompute_peak


def test_a_graph_with_nothing_more_to_give_beside_others_keeps_its_plan(monkeypatch):
    """A graph already at its lowest peak measures a step over the budget beside another graph: it
    has nothing more to give, so it keeps the plan it runs (the other graphs plan again) and the
    next measured step decides, instead of failing at once."""
    import sac_compiler.backend as backend_module

    torch.manual_seed(0)
    model, x = _TwoHalves(), torch.randn(2048, 32)
    span = budget_range(torch.nn.Sequential(*model.first), x, compiler="eager", target_device="cpu")
    budget = span.smallest_budget
    monkeypatch.setattr(backend_module, "held_outside", lambda inputs, config, optimizers=None, biased=True: 0)
    backend, enforcers = _eager_backend(budget, [_Peaks([budget + MIB] + [budget - 1] * 8), _Peaks([budget - 1] * 8)])

    _steps(model, x, backend, 3)
    first = enforcers[0]
    assert first.measured == [budget + MIB]
    kept = first.partitioner
    _steps(model, x, backend, 3)
    assert first.measured == [budget + MIB, budget - 1] and not first._alone
    assert first.replans == 1 and first.extra_bytes == 0 and first.partitioner is kept


@pytest.mark.parametrize("over", [True, False])
def test_a_peak_between_steps_over_the_budget_is_reported_and_not_planned_for(over, caplog):
    """The measured step holds its budget; the mark then rises between its backward and the next
    forward (an optimizer step's temporaries): over the budget, a warning names that peak and the
    plan's result and report carry it, and the graph is not planned again (nothing it keeps is
    alive there); a rise that stays under the budget is no news."""
    torch.manual_seed(0)
    model, x = Nested(dim=32, n_layers=3), torch.randn(2048, 32)
    span = budget_range(model, x, compiler="eager", target_device="cpu")
    budget = (span.smallest_budget + span.no_recompute_peak) // 2
    between = budget + 4096 if over else budget - 4096
    marks = [budget // 2, budget - 8192, between]  # before the step, after its backward, at the next forward
    partitioners, enforcers = [], []
    Recording = _recording(partitioners)

    def read_peak():
        return marks.pop(0) if len(marks) > 1 else marks[0]

    def backend(gm, inputs):
        enforcers.append(compile_graph(gm, inputs, SACConfig.from_options({"memory_budget": budget, "compiler": "eager"}),
                                       partitioner_cls=Recording, read_peak=read_peak))
        return enforcers[-1]

    with caplog.at_level("WARNING", logger="sac_compiler.enforce"):
        _steps(model, x, backend, 4)
    (enforcer,) = enforcers
    assert enforcer.measured == [budget - 8192] and enforcer.replans == 0 and len(partitioners) == 1
    warned = [r.getMessage() for r in caplog.records if "before its next forward" in r.getMessage()]
    from sac_compiler.config import format_bytes
    from sac_compiler.report import format_plan

    row = "measured peak after backward, before the next forward (over the budget)"
    if over:
        assert enforcer.result.measured_outside_peak == between
        assert len(warned) == 1 and f"({between} bytes), over the budget" in warned[0]
        assert re.search(rf"{re.escape(row)} +{re.escape(format_bytes(between))}", format_plan(enforcer.result))
    else:
        assert enforcer.result.measured_outside_peak is None and not warned
        assert row not in format_plan(enforcer.result)


class _RunReadings:
    """The allocator for a graph that runs ``calls`` times in a step: per measured step (bytes in
    use as each forward ends, the mark then, the mark as backward reaches the graph, the mark
    after backward); the mark before a step, and any read beyond those given, is 0."""

    def __init__(self, calls, steps):
        self.reads = []
        self.in_use = []
        for end, forward_mark, backward_mark, final in steps:
            self.reads += [0] + [forward_mark] * calls + [backward_mark, final]
            self.in_use += [end] * calls

    def peak(self):
        return self.reads.pop(0) if self.reads else 0

    def allocated(self):
        return self.in_use.pop(0)


def test_blocks_compiled_one_by_one_count_the_callers_loss_once_between_forward_and_backward():
    """One graph serving every block, the criterion outside: what the caller holds after the last
    block's forward and before the backward reaches it (the eager head and the loss) is measured
    as the caller's loss, counted there once (loss_memory), not beside the graph through every
    step of every run, and not by each run."""
    torch.manual_seed(0)
    model, x = _Blocks(), torch.randn(2048, 32, requires_grad=True)
    span = budget_range(model.blocks[0], x, compiler="eager", target_device="cpu")
    budget = span.no_recompute_peak * 4
    loss = budget // 40
    end = budget - loss // 2  # in use as the last forward ends: with the loss on top, over the budget
    readings = _RunReadings(4, [(end, end, end + loss, end + loss), (end - loss, end, end, end)])
    partitioners = []
    backend, enforcers = _reading_backend(budget, readings, partitioners)

    reference = copy.deepcopy(model)
    for i in range(len(model.blocks)):
        model.blocks[i] = torch.compile(model.blocks[i], backend=backend)
    for _ in range(7):
        for m in (reference, model):
            m.zero_grad(set_to_none=True)
            x.grad = None
            m(x).sum().backward()
        for p, q in zip(reference.parameters(), model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0)
    (enforcer,) = enforcers  # the input requires grad: one graph for the four blocks
    assert enforcer.runs_per_step == 4
    assert enforcer.measured == [end + loss, end]
    assert enforcer.measured_loss_memory == loss and enforcer.loss_memory == loss
    assert enforcer.replans == 1 and enforcer.extra_bytes == 0
    planned = partitioners[-1]
    assert planned.runs_per_step == 4 and planned.config.loss_memory == loss
    result = planned.last_result
    assert result.loss_memory == loss and result.measured_peak == end
    # the joint graph's simulation counts the loss once, at the end of forward: the other runs
    # hold what one run keeps for its backward, without it
    sim = result.analysis.memory
    assert sim.loss_bytes == loss
    assert result.held_per_run_bytes > 0
    assert result.step_peak_bytes <= budget


def test_a_graph_before_a_break_counts_the_gradients_the_rest_of_the_model_makes_first(capsys):
    """Backward runs the second graph's backward first, and its parameters' gradients stay until the
    optimizer step: the first graph's plan counts them through its own backward
    (``SACConfig.gradients_held``), and its report says so; the second graph, whose backward comes
    first, counts none. Gradients equal eager's."""
    from sac_compiler.config import format_bytes

    torch.manual_seed(0)
    model, x = _TwoHalves(), torch.randn(2048, 32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    span = budget_range(torch.nn.Sequential(*model.first), x, compiler="eager", target_device="cpu")
    budget = 4 * span.no_recompute_peak
    partitioners = []

    def backend(gm, inputs):
        options = {"memory_budget": budget, "compiler": "eager", "report": True}
        return compile_graph(gm, inputs, SACConfig.from_options(options),
                             partitioner_cls=_recording(partitioners), read_peak=lambda: budget // 2,
                             read_allocated=lambda: budget // 4)

    _steps(model, x, backend, 2)
    second_bytes = sum(p.numel() * p.element_size() for p in model.second.parameters())
    first, second = partitioners[0], partitioners[1]
    assert first.config.gradients_held == second_bytes and second.config.gradients_held == 0
    assert first.last_result.gradients_held == second_bytes
    counted = re.findall(r"gradients made before this graph's backward \(counted through it\) +(\S+ \S+)",
                         capsys.readouterr().out)
    assert counted and set(counted) == {format_bytes(second_bytes)}
    del optimizer


def test_gradients_made_before_leave_out_the_graphs_own_earlier_and_allocated_parameters():
    """Of the parameters the optimizer steps: the graph's own are returned apart; those the inputs'
    history reaches ran before the graph (their backward comes after its); one whose gradient is
    allocated now is held already. The rest run after it: backward makes their gradients first."""
    from sac_compiler.backend import gradients_made_before

    pre, own, post, held = (torch.nn.Linear(16, 16) for _ in range(4))
    held.weight.grad = torch.zeros_like(held.weight)
    optimizer = torch.optim.SGD([*pre.parameters(), *own.parameters(), *post.parameters(), *held.parameters()], lr=0.1)
    h = pre(torch.randn(4, 16))

    def nbytes(*tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    later, own_bytes = gradients_made_before([h, *own.parameters()], SACConfig())
    assert later == nbytes(*post.parameters(), held.bias)
    assert own_bytes == nbytes(*own.parameters())
    # the optimizer given (SACConfig.optimizer) rather than found
    assert gradients_made_before([h, *own.parameters()], SACConfig(optimizer=optimizer)) == (later, own_bytes)
    # no optimizer steps these parameters: nothing is known of the others
    assert gradients_made_before([torch.randn(4, 16), *torch.nn.Linear(16, 16).parameters()], SACConfig()) == (0, 0)


class _BlocksAndHead(_Blocks):
    """``_Blocks`` with an eager output head after the blocks."""

    def __init__(self, n=4, dim=32):
        super().__init__(n, dim)
        self.head = torch.nn.Linear(dim, 8 * dim)

    def forward(self, x):
        return self.head(super().forward(x))


def test_blocks_compiled_one_by_one_count_the_gradients_of_the_blocks_after_and_of_the_head():
    """Compiled block by block with an eager head: the first block's graph counts every later
    block's gradients and the head's; the graph serving the other blocks, compiled at the second,
    counts the blocks after it and the head, and once its first step shows its three runs it
    counts the head's alone (its other runs read the other blocks)."""
    torch.manual_seed(0)
    model, x = _BlocksAndHead(), torch.randn(2048, 32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    span = budget_range(model.blocks[0], x, compiler="eager", target_device="cpu")
    budget = span.no_recompute_peak * 3
    partitioners = []

    def backend(gm, inputs):
        return compile_graph(gm, inputs, SACConfig.from_options({"memory_budget": budget, "compiler": "eager"}),
                             partitioner_cls=_recording(partitioners), read_peak=_Peaks([budget - 1] * 8))

    for i in range(len(model.blocks)):
        model.blocks[i] = torch.compile(model.blocks[i], backend=backend)
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    def nbytes(*modules):
        return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())

    block, head = nbytes(model.blocks[0]), nbytes(model.head)
    held = [(p.runs_per_step, p.config.gradients_held) for p in partitioners]
    assert held[0] == (1, 3 * block + head)  # the first block's graph
    assert (1, 2 * block + head) in held  # the other blocks' graph, compiled at the second block
    assert held[-1] == (3, head)  # planned again for its three runs
    del optimizer
