"""The budget enforced at run time: measure the step's real peak and plan again if it went over.

The plan is made before anything runs, from a simulation of the graphs Inductor will run; what
the caller does around the compiled region (a criterion that saves its own tensors, outputs kept
alive, the optimizer's first step) is outside that simulation. On CUDA, for an absolute budget,
:class:`BudgetEnforcer` runs the compiled graph and, on the second step of each compiled version
(the first one includes compilation and lazy library workspaces), reads the caching allocator's
high-water mark before the step's first forward and once its backward has finished. A step whose
peak does not raise the high-water mark above where it stood before peaked at most there. The
user's statistics are left alone unless the mark is already over the budget before the measured
step (an earlier plan went over it), which would hide the step's own peak: then the peak
statistic is reset, and the log says so.

The mark is read once more as the graph's next forward begins: a mark that rose over the budget
after the measured backward (in the optimizer step, or in the caller's own code between steps)
is logged as a warning and shown in the report; nothing the graph keeps is alive there, so no plan
changes it, and the graph is not planned again for it.

If the step went over the budget, the graph is planned again and recompiled at the next call; at
most ``MAX_REPLANS`` times. What the new plan counts depends on where the step peaked: at the
caller's loss between forward and backward, that loss there only (``SACConfig.loss_memory``);
else what the plan did not see (the measured peak over the predicted one) as memory held outside
the graph, or, where no plan gives up that much, the graph's lowest-peak plan (a graph beside
others in its step with nothing more to give keeps its plan while they plan again). A replan that
gave back less than it was asked for makes the next one ask for
proportionally more. If the budget is still exceeded after that, the next call raises
:class:`BudgetExceededError` naming the measured peak.

Two corrections need no measurement: a graph whose first step shows it running several times
(one graph serving every block) is planned for all its runs, and a graph compiled after a graph
break with no plan beside what the step's earlier graphs hold asks them for the room it lacks
(:func:`make_room_in_step`; at most ``MAX_ROOM_REQUESTS`` times per graph, apart from its replans,
so a graph that gave room still plans again for the excess its own measured step shows).
"""

from __future__ import annotations

import copy
import logging
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

from sac_compiler.config import format_bytes
from sac_compiler.plan_graph import BudgetError

log = logging.getLogger(__name__)

MAX_REPLANS = 2
# how many times a graph may be asked for room by graphs later in its step (make_room); apart from
# MAX_REPLANS, so that room given to a later graph's compile leaves the graph its own replans for
# the excess its measured step then shows
MAX_ROOM_REQUESTS = 2
# which step of each compiled version is measured (1 is the first)
MEASURED_STEP = 2
# the most a later replan scales the measured excess by, after an earlier one gave back less
MAX_SCALE = 4.0


# the enforced graphs whose step is under way (forward run, backward not finished): a graph that
# ran alone in its step is the only one whose prediction the step's measured peak can be set against
_IN_STEP: weakref.WeakSet[BudgetEnforcer] = weakref.WeakSet()
# forward calls of every enforced graph so far: a graph whose backward starts after another graph
# ran forward (a graph break) cannot read the caller's loss from the mark between its own
_FORWARD_CALLS = [0]


def held_for_backwards() -> int:
    """What the enforced graphs that ran forward in the step under way, and wait for their
    backward, hold for it: each run's saved values and the inputs its backward reads, as their
    plans count them."""
    return sum(enforcer._held_now() for enforcer in list(_IN_STEP) if enforcer._awaits_backward())


def make_room_in_step(error: BudgetError, budget_bytes: int, graph: str) -> int | None:
    """A graph compiled in the middle of a step (after a graph break) has no plan under the budget
    with what the step's earlier graphs hold while it runs. If those graphs wait for their
    backward, ask each for its share of the room it lacks (``error.least_budget`` over the budget;
    they plan again at their next call) and return that room, which the caller plans this graph
    with; None when there is no such graph or no known least budget."""
    need = getattr(error, "least_budget", None)
    earlier = [e for e in list(_IN_STEP) if e._awaits_backward() and e.room_requests < MAX_ROOM_REQUESTS]
    if need is None or need <= budget_bytes or not earlier:
        return None
    room = need - budget_bytes
    for enforcer, share in zip(earlier, room_shares(room, [enforcer._held_now() for enforcer in earlier])):
        enforcer.make_room(share)
    log.warning("sac: %s has no plan under the budget %s beside the %d graph(s) that ran before it in the step; "
                "they plan again at their next call to leave it %s", graph, format_bytes(budget_bytes),
                len(earlier), format_bytes(room))
    return room


def room_shares(room: int, held: Sequence[int]) -> list[int]:
    """``room`` split among the graphs asked for it in proportion to what each holds for its
    backward (a graph holding little, such as an embedding's, has little to give); equal shares
    when none holds anything. The shares add up to at least ``room``."""
    total = sum(held)
    if total <= 0:
        return [-(-room // len(held))] * len(held)
    return [-(-room * h // total) for h in held]


class BudgetExceededError(BudgetError):
    """The measured peak of a step stayed over an absolute budget after planning again."""


# compile(gm, example_inputs, extra_bytes, runs_per_step=...) -> (callable, partitioner)
Compile = Callable[..., tuple[Callable[..., Any], Any]]


class BudgetEnforcer:
    """A compiled Dynamo graph that measures its step's peak and recompiles lower when over budget.

    ``compile(gm, example_inputs, extra_bytes, runs_per_step=k, loss_memory=b)`` compiles a fresh
    copy of the graph with ``extra_bytes`` more counted as held outside it, planned for ``k``
    forward runs before its backwards and ``b`` bytes of the caller's loss between forward and
    backward (None: as configured), and returns the callable and its partitioner (whose
    ``last_result`` is the plan). ``read_peak`` returns the allocator's high-water mark,
    ``read_allocated`` (optional) the bytes in use: with it, the measured step also reads both as
    forward ends and the mark as backward reaches the graph, which tells the caller's loss between
    them (a criterion outside the compiled model) from the graph's own peaks: a step whose peak is
    there is planned again with that loss counted there only (``SACConfig.loss_memory``).

    A step is one backward pass through the graph's outputs. The graph may run several times in
    it (one compiled block serving every block of a model compiled block by block), each run
    holding its own saved values through the others: the first step that shows ``k`` runs is
    planned again for ``k`` (:class:`sac_compiler.backend.SACPartitioner`'s ``runs_per_step``);
    an excess with an unknown number of runs is shared among them.
    """

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], budget_bytes: int, compile: Compile,
                 read_peak: Callable[[], int], reset_peak: Callable[[], None] | None = None,
                 read_allocated: Callable[[], int] | None = None, extra_bytes: int = 0,
                 runs_per_step: int = 1) -> None:
        self._pristine = fx.GraphModule(gm, copy.deepcopy(gm.graph))
        self._compile = compile
        self.budget_bytes = budget_bytes
        self.read_peak = read_peak
        self.reset_peak = reset_peak
        self.extra_bytes = extra_bytes  # counted outside the graph besides what it held at its compile
        self._asked_room = 0  # the room later graphs of the step asked for (make_room), planned as loss_memory
        self.replans = 0  # plans made again for an excess this graph measured (at most MAX_REPLANS)
        self.room_requests = 0  # plans made again for room a later graph asked for (at most MAX_ROOM_REQUESTS)
        self.measured: list[int | None] = []  # per measured step: its peak, or None (at most the mark before it)
        self.predicted: list[int | None] = []  # per measured step: the peak its plan predicted
        self._pending_excess: int | None = None
        self._last_request = 0  # the excess the last replan was asked to give up
        self._error: BudgetExceededError | None = None
        self._steps = 0  # steps of the compiled version now running
        self._calls = 0  # forward calls in the step under way
        self._before = 0  # the high-water mark as the step under way began
        self._held: list[int] = []  # bytes of outputs the caller held as each backward began
        self._step_queued = False
        self._alone = False  # no other enforced graph ran in the step under way
        self._pending: list[weakref.ref[Any]] = []  # autograd nodes of forward runs awaiting backward
        self.runs_per_step = runs_per_step  # forward runs per step the plan now running counts
        self._pending_runs: int | None = None
        self.read_allocated = read_allocated
        # the caller's loss between forward and backward, as measured (None: not measured) and as
        # the plan now running counts it (None: the configured loss_memory)
        self.measured_loss_memory: int | None = None
        self.loss_memory: int | None = None
        self._pending_loss_memory: int | None = None
        self._forward_end: tuple[int, int] | None = None  # (bytes in use, high-water mark) after forward
        # the high-water mark as backward reached the graph (-1: other graphs ran forward in between)
        self._backward_mark: int | None = None
        # the mark after the measured step's backward, for the check at the next forward (None: none due)
        self._after_step: int | None = None
        self.compiled, self.partitioner = compile(self._fresh(), example_inputs, extra_bytes,
                                                  runs_per_step=runs_per_step)
        # the caller's loss the configuration counts between forward and backward
        self._configured_loss_memory = getattr(self.result, "loss_memory", 0) or 0

    def _fresh(self) -> fx.GraphModule:
        return fx.GraphModule(self._pristine, copy.deepcopy(self._pristine.graph))

    @property
    def result(self) -> Any:
        """The plan of the compiled version now running."""
        return getattr(self.partitioner, "last_result", None)

    def __call__(self, *args: Any) -> Any:
        """Dynamo calls a backend's callable with the graph's inputs as positional arguments."""
        if self._error is not None:
            raise self._error
        if self._calls == 0:  # the first forward call of a step
            if self._after_step is not None:
                self._check_between_steps()
            if self._pending_excess is not None:
                self._recompile(args)
            if self._steps == MEASURED_STEP - 1:
                self._before = self._mark_before_step()
        self._calls += 1
        _FORWARD_CALLS[0] += 1
        out = self.compiled(*args)
        tensors = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
        if not tensors or self._steps >= MEASURED_STEP:
            self._calls = 0  # no backward to wait for, or nothing left to measure
            if tensors:  # still one of the step's graphs: a later graph may ask it for room
                self._pending = [ref for ref in self._pending if ref() is not None]
                self._pending.extend(weakref.ref(t.grad_fn) for t in tensors if t.grad_fn is not None)
                _IN_STEP.add(self)
        else:
            outputs = [weakref.ref(t) for t in tensors]
            self._pending.extend(weakref.ref(t.grad_fn) for t in tensors if t.grad_fn is not None)
            _IN_STEP.add(self)
            measuring = self._steps == MEASURED_STEP - 1 and self.read_allocated is not None
            if measuring:  # what forward leaves, and the mark so far (the forward's own peak)
                self._forward_end = (self.read_allocated(), self.read_peak())
                forward_calls = _FORWARD_CALLS[0]

            def backward_started(_grads: Any) -> None:
                # the outputs the caller still holds as its backward starts stay alive through it
                held = {id(t): t for t in (ref() for ref in outputs) if t is not None}
                self._held.append(sum(t.untyped_storage().nbytes() for t in held.values()))
                if measuring and self._backward_mark is None:  # the mark after the caller's loss
                    # (none when other graphs ran forward in between: their peaks are in the mark)
                    self._backward_mark = self.read_peak() if _FORWARD_CALLS[0] == forward_calls else -1
                if not self._step_queued:  # once per backward pass, however many runs it goes through
                    self._step_queued = True
                    # backward starts once every graph of the step has run forward
                    self._alone = not any(e is not self and e._awaits_backward() for e in list(_IN_STEP))
                    torch.autograd.Variable._execution_engine.queue_callback(self._step_done)

            torch.autograd.graph.register_multi_grad_hook(tensors, backward_started, mode="any")
        return out

    def make_room(self, nbytes: int) -> None:
        """A later graph of the step needs ``nbytes`` more room: plan again at the next call with
        that much more held between this graph's forward and its backward, where the later graph
        runs (as a caller's loss is: ``loss_memory``), not through the whole step: what this graph
        must give up is what it keeps for its backward. Counted apart from the replans for the
        excess this graph's own measured steps show (``room_requests``, at most
        ``MAX_ROOM_REQUESTS``)."""
        self.room_requests += 1
        self._pending_excess = self._pending_excess or 0
        self._asked_room += nbytes

    def _held_now(self) -> int:
        """What this graph's forward runs of the step under way hold for their backward, as its
        plan counts them."""
        result = self.result
        return 0 if result is None else max(1, self._calls) * (result.held_per_run_bytes or 0)

    def _awaits_backward(self) -> bool:
        """Whether the autograd graph of this graph's forward runs is still alive, waiting for a
        backward. A forward whose outputs were dropped without a backward (an evaluation with grad
        enabled, an error in the caller's loss) frees its autograd nodes and is no part of a later
        step."""
        self._pending = [ref for ref in self._pending if ref() is not None]
        return bool(self._pending)

    def _mark_before_step(self) -> int:
        """The high-water mark as the measured step begins. A mark already over the budget (an
        earlier plan, or earlier work of the process, went over it) would hide the step's own peak:
        then, and only then, the peak statistic is reset, and the log says so and what it was."""
        mark = self.read_peak()
        if mark > self.budget_bytes and self.reset_peak is not None:
            log.warning("sac: the allocator's high-water mark %s is over the budget %s, which would hide this "
                        "step's own peak: resetting the peak statistic (torch.cuda.reset_peak_memory_stats)",
                        format_bytes(mark), format_bytes(self.budget_bytes))
            self.reset_peak()
            mark = self.read_peak()
        return mark

    def _recompile(self, args: Sequence[Any]) -> None:
        asked = self._pending_excess or 0
        self._pending_excess = None
        running_extra = self.extra_bytes  # what the plan now running counts
        running = (self.runs_per_step, self.loss_memory)
        self.extra_bytes += asked
        if self._pending_runs is not None:
            self.runs_per_step, self._pending_runs = self._pending_runs, None
        if self._pending_loss_memory is not None:
            self.loss_memory, self._pending_loss_memory = self._pending_loss_memory, None
        try:
            try:
                self.compiled, self.partitioner = self._compile(self._fresh(), list(args), self.extra_bytes,
                                                                runs_per_step=self.runs_per_step,
                                                                loss_memory=self._between())
            except BudgetError as whole_error:
                failure = whole_error
                # with a graph break, the graphs that ran forward before this one in the step hold
                # their saved values through its step (and through the caller's loss after it):
                # ask them for the room this graph's plan lacks, as at its first compile
                room = make_room_in_step(failure, self.budget_bytes, self._name())
                if room is None:
                    share = self._most_it_gives(failure, running_extra)
                    if share is None and (self._alone or not self.measured):
                        raise failure
                    if share is None:
                        # nothing more to give beside the other graphs that held memory through
                        # the step's peak: keep the plan now running while they plan again; the
                        # step measured next decides (an error once the replans are spent)
                        log.warning("sac: %s has no plan that gives up more than its plan now running; it keeps "
                                    "that plan while the other graphs of its step plan again", self._name())
                        self.extra_bytes, self._last_request, self._steps = running_extra, 0, 0
                        self.runs_per_step, self.loss_memory = running
                        return
                    # no plan gives up the whole excess: plan the lowest peak it has (with other graphs
                    # in the step, they plan again too); the step measured next decides
                    log.warning("sac: %s has no plan that gives up %s more; planning its lowest peak, %s less "
                                "than its last plan", self._name(), format_bytes(self.extra_bytes - running_extra),
                                format_bytes(share - running_extra))
                    self.extra_bytes = share
                    self._last_request = share - running_extra
                    room = 0
                self.extra_bytes -= room
                self.compiled, self.partitioner = self._compile(self._fresh(), list(args), self.extra_bytes,
                                                                runs_per_step=self.runs_per_step,
                                                                loss_memory=self._between())
        except BudgetError as error:
            peak = self.measured[-1] if self.measured else None
            counted = []  # what the plan that failed counted besides the graph
            if self._asked_room:
                counted.append(f"the {format_bytes(self._asked_room)} a graph later in the step asked it to give up")
            if self.extra_bytes > 0:
                counted.append(f"the {format_bytes(self.extra_bytes)} counted beside the graph for what the measured "
                               "steps showed over their plans' predictions (the caller, the allocator, or the plan's "
                               "own error; scaled up after a replan that gave back less than it was asked)")
            elif self.extra_bytes < 0:  # planned with room the graphs before it in the step give up
                counted.append(f"{format_bytes(-self.extra_bytes)} less held outside the graph (the room the graphs "
                               "before it in the step were asked for)")
            if self.loss_memory:
                counted.append(f"the {format_bytes(self.loss_memory)} the caller's loss holds between forward and "
                               "backward")
            if self.runs_per_step > 1:
                counted.append(f"the graph's {self.runs_per_step} runs in a step")
            room = " and ".join(counted) or "what the step measured beyond the graph"
            # asked for room by a graph after a break before a step of its own was measured
            measured = (f"the step measured {format_bytes(peak)} ({peak} bytes)" if peak is not None else
                        f"a graph later in the step asked it for {format_bytes(self._asked_room)} of room")
            raise BudgetExceededError(
                f"memory budget {format_bytes(self.budget_bytes)}: {measured}, and no plan leaves room for {room}: "
                f"{error}") from error
        self._steps = 0

    def _most_it_gives(self, failure: BudgetError, running_extra: int) -> int | None:
        """The most the graph can count outside itself and still have a plan (``failure.least_budget``
        over the budget, off what it was asked): its lowest-peak plan, when that counts more than
        the plan now running; else None."""
        need = getattr(failure, "least_budget", None)
        if need is None or need <= self.budget_bytes:
            return None
        most = self.extra_bytes - (need - self.budget_bytes)
        return most if most > running_extra else None

    def _check_between_steps(self) -> None:
        """Read the mark as the next step begins: a rise over the budget since the measured step's
        backward came from work between the steps (the optimizer step, the caller's own code)."""
        after, self._after_step = self._after_step, None
        mark = self.read_peak()
        if mark <= after or mark <= self.budget_bytes:
            return
        result = self.result
        if result is not None:
            result.measured_outside_peak = mark
            self._report(result)
        log.warning("sac: after %s's backward and before its next forward (in the optimizer step, or the caller's "
                    "own code) the allocator's high-water mark reached %s (%d bytes), over the budget %s; the graph "
                    "holds nothing there, so no plan of it lowers that peak: raise memory_budget to at least it, "
                    "or lower what runs between the steps (e.g. the optimizer's foreach=False)",
                    self._name(), format_bytes(mark), mark, format_bytes(self.budget_bytes))

    def _report(self, result: Any) -> None:
        """With ``report`` set, the plan's report again, now with what the step measured beside
        what was predicted (the peak, the outputs the caller held, the caller's loss)."""
        config = getattr(self.partitioner, "config", None)
        if config is None or not config.report or getattr(result, "plan", None) is None:
            return
        from sac_compiler.report import write_report

        write_report(result, config.report)

    def _between(self) -> int | None:
        """What the next plan counts between forward and backward (``loss_memory``): the caller's
        loss as measured (else as configured) and the room later graphs of the step asked for;
        None: as configured."""
        if self.loss_memory is None and not self._asked_room:
            return None
        caller = self.loss_memory if self.loss_memory is not None else self._configured_loss_memory
        return caller + self._asked_room

    def _name(self) -> str:
        from sac_compiler.backend import _graph_name

        return getattr(self.partitioner, "name", None) or _graph_name(self._pristine)

    def _step_done(self) -> None:
        """The backward pass has finished: one step of this compiled version is done."""
        self._step_queued = False
        self._pending = []
        _IN_STEP.discard(self)
        calls, self._calls = self._calls, 0
        held, self._held = self._held, []
        forward_end, self._forward_end = self._forward_end, None
        backward_mark, self._backward_mark = self._backward_mark, None
        self._steps += 1
        if self._steps == 1 and calls > 1 and calls != self.runs_per_step and self._pending_excess is None:
            # the first step showed the graph running several times (one graph serving every block):
            # plan for all its runs at once, before the step that is measured, rather than after
            # measuring it over the budget (not counted among the replans: the runs are found once)
            self._pending_runs, self._pending_excess = calls, 0
            log.info("sac: the graph ran %d times in its first step and its plan counted %d: planning again for "
                     "%d runs", calls, self.runs_per_step, calls)
            return
        if self._steps != MEASURED_STEP:
            return
        before = self._before
        held_bytes = held[0] if calls == 1 and held else 0
        result = self.result
        if result is not None:
            result.caller_held_bytes = held_bytes
        if held_bytes:
            log.info("sac: the caller held %s of the graph's outputs through backward", format_bytes(held_bytes))
        after = self.read_peak()
        peak = after if after > before else None
        self.measured.append(peak)
        # the caller's loss between the graphs: the mark rose after forward returned, before the
        # backward reached the graph. Measured for a graph whose plan counts every run of it in the
        # step (one compiled block serving every block: what runs after its last forward and
        # before the backward reaches it, the eager head and the criterion, is held on top of every
        # run's saved values, and is freed before the blocks' backwards)
        loss_peak = None
        if (calls == self.runs_per_step and forward_end is not None and backward_mark is not None
                and backward_mark > forward_end[1]):
            loss_peak = backward_mark
            self.measured_loss_memory = backward_mark - forward_end[0]
            if result is not None:
                result.measured_loss_memory = self.measured_loss_memory
            log.info("sac: the caller's loss held %s between forward and backward",
                     format_bytes(self.measured_loss_memory))
        predicted_bytes = getattr(result, "step_peak_bytes", None)  # None: no plan, or none simulated
        self.predicted.append(predicted_bytes)
        if result is not None:
            result.measured_peak = peak
            self._report(result)
        if peak is None:
            log.info("sac: the step did not raise the allocator's high-water mark (%s): its peak is at most that",
                     format_bytes(before))
            if before <= self.budget_bytes:
                self._after_step = before if self._alone else None
                return
            log.warning("sac: the allocator's high-water mark %s was over the budget %s before this step; "
                        "its own peak cannot be read without resetting the statistics",
                        format_bytes(before), format_bytes(self.budget_bytes))
            return
        log.info("sac: measured step peak %s, predicted %s, budget %s", format_bytes(peak),
                 format_bytes(predicted_bytes) if predicted_bytes is not None else "?", format_bytes(self.budget_bytes))
        if peak <= self.budget_bytes:
            # the plan stays: check what runs before the next step (with other graphs in the step,
            # their backwards may run after this one's, not between steps)
            self._after_step = after if self._alone else None
            return
        planned_loss = self.loss_memory if self.loss_memory is not None else self._configured_loss_memory
        if (loss_peak is not None and loss_peak == peak and self.measured_loss_memory is not None
                and self.measured_loss_memory > planned_loss and self.replans < MAX_REPLANS):
            # the step peaked at the caller's loss, between the graphs, where the plan counted less:
            # plan again with it counted there (not through the whole step, which would leave room
            # neither for the forward's peak nor for the backward's)
            self.replans += 1
            self._pending_excess, self._last_request = 0, 0
            self._pending_loss_memory = self.measured_loss_memory
            log.warning("sac: the step measured %s, over the budget %s, while the caller's loss held %s between "
                        "forward and backward (planned: %s); planning again with it counted there (%d of %d)",
                        format_bytes(peak), format_bytes(self.budget_bytes),
                        format_bytes(self.measured_loss_memory), format_bytes(planned_loss), self.replans,
                        MAX_REPLANS)
            return
        # What the plan did not see is the measured peak over the predicted one (over the budget
        # only, when the plan had no room left): a plan with room to spare that was counted as
        # lowering by peak - budget would keep that room and measure the same peak again. It is
        # measured against the prediction only for a graph alone in its step whose plan counted
        # every run of it (runs_per_step): with other graphs in the step, the peak holds their
        # memory too, and only the part over the budget is counted.
        counted = calls == self.runs_per_step
        alone = counted and self._alone and predicted_bytes is not None
        unseen = max(peak - self.budget_bytes, peak - predicted_bytes if alone else 0)
        new_runs = calls > 1 and not counted
        # runs the plan did not count: plan for them (their saved values are most of the excess);
        # else an excess with runs counted comes off the step, with runs uncounted off each run
        excess = 0 if new_runs else unseen if counted else -(-unseen // max(calls, 1))
        previous = self.measured[-2] if len(self.measured) >= 2 else None
        if self._last_request and previous is not None and not new_runs:
            # the last replan gave back less than it was asked for (the plan's peak moved to a step
            # it does not model, or the caller's memory overlaps it): ask for the excess scaled by
            # what that replan achieved per byte asked, at most MAX_SCALE times
            achieved = (previous - peak) / (1 if counted else max(calls, 1))
            scale = MAX_SCALE if achieved <= 0 else min(MAX_SCALE, max(1.0, self._last_request / achieved))
            excess = int(excess * scale)
        if self.replans >= MAX_REPLANS:
            self._error = BudgetExceededError(
                f"memory budget {format_bytes(self.budget_bytes)}: the step measured {format_bytes(peak)} "
                f"({peak} bytes) after planning again {self.replans} times for what the measured steps showed "
                "over their plans' predictions (the caller, the allocator, or the plan's own error); raise "
                "memory_budget, or set enforce_budget=False to run anyway")
            return
        self.replans += 1
        self._pending_excess = self._last_request = excess
        if new_runs:
            self._pending_runs = calls
            log.warning("sac: the graph ran %d times in the step and its plan counted %d: planning again for "
                        "%d runs (%d of %d)", calls, self.runs_per_step, calls, self.replans, MAX_REPLANS)
            return
        log.warning("sac: the step measured %s, %s over the budget %s (predicted %s); planning again lower by the "
                    "excess at the next call (%d of %d)", format_bytes(peak), format_bytes(excess),
                    format_bytes(self.budget_bytes),
                    format_bytes(predicted_bytes) if predicted_bytes is not None else "?", self.replans, MAX_REPLANS)
