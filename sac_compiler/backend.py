"""``torch.compile(model, backend="sac", options={...})``.

Dynamo hands the backend an FX graph; AOTAutograd builds the joint forward+backward graph; the
backend's partitioner annotates it (and, with a ``memory_budget``, tags it with a recompute plan)
and lets PyTorch's own partitioner split it. Inductor stays in charge of the joint-graph passes and
code generation: the backend only substitutes the partition decision, through Inductor's
``custom_partitioner_fn``. ``compiler="eager"`` runs the partitioned graphs without Inductor.

Inductor's FX graph and AOTAutograd caches key a compiled graph on the partitioner's ``uuid()``:
a hash of every source file of ``sac_compiler`` and ``passes`` and of every ``SACConfig`` option,
so that a warm cache never hands back a partition planned by other code or for other options.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import gc
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomPartitionerFn

# registers torch.ops.sac_compiler.fusion_barrier, which graphs this backend compiles may call
# (also when Inductor serves them from its caches without running the partitioner)
import sac_compiler.fusion_barrier  # noqa: F401
from sac_compiler.config import MemoryBudget, SACConfig, format_bytes
from sac_compiler.passes.memory_model import rule_on

log = logging.getLogger(__name__)


def _root_name(gm: fx.GraphModule) -> str:
    """The compiled module's class name: the bare root of Dynamo's module stacks, else the traced code."""
    for node in gm.graph.nodes:
        for path, mod_type in (node.meta.get("nn_module_stack") or {}).values():
            if path.endswith("]") and "." not in path:  # the bare root, e.g. L['self']
                return getattr(mod_type, "__name__", "Model")
    from torch._guards import TracingContext

    context = TracingContext.try_get()
    codes = list(getattr(context, "traced_code", None) or [])
    if codes and getattr(codes[0], "co_qualname", "").endswith(".forward"):
        return codes[0].co_qualname.rsplit(".", 2)[-2]
    return "Model"


def _graph_name(gm: fx.GraphModule) -> str:
    """Which of the model's graphs this is: Dynamo's compile id (frame/recompile) and the code it traced."""
    from torch._guards import CompileContext, TracingContext

    compile_id = CompileContext.current_compile_id()
    context = TracingContext.try_get()
    codes = list(getattr(context, "traced_code", None) or [])
    where = f" of {codes[0].co_qualname} ({codes[0].co_filename}:{codes[0].co_firstlineno})" if codes else ""
    ops = sum(1 for n in gm.graph.nodes if n.op == "call_function")
    return f"graph {compile_id if compile_id is not None else '?'}{where}, {ops} ops"


_PARTITION_ROUNDS = 3
_BISECTIONS = 3
_OVERSHOOT = 8  # a replan for the partitioned graphs' excess aims 1/_OVERSHOOT of the margin lower too
# the partitioned graphs' room under the budget, as a fraction of it (less outside memory), that is
# worth planning again for
_SLACK_FRACTION = 0.02


class SACPartitioner(CustomPartitionerFn):
    """Annotate (and plan) the joint graph, then partition it with PyTorch's min-cut partitioner.

    Inductor keeps the partitioner in its config, and its cache-key code deep-copies and pickles
    config values. The partitioner holds the Dynamo graph, the last plan (with the joint graph) and
    the configured optimizer (with the model's parameters): copying those would duplicate the
    parameters, and pickling them fails on any part that does not pickle (a cycle, a class defined
    in a function) and logs a traceback per graph. So a deep copy is the partitioner itself (nothing
    in its key changes after construction), and a pickled partitioner is its cache key alone
    (:class:`PartitionerKey`, built from :meth:`uuid`).
    """

    def __init__(self, config: SACConfig, source_gm: fx.GraphModule, outside_bytes: int = 0,
                 runs_per_step: int | None = None) -> None:
        if runs_per_step is None:
            runs_per_step = config.runs_per_step
        if runs_per_step < 1:
            raise ValueError(f"runs_per_step must be at least 1, got {runs_per_step}")
        if config.runs_per_step != runs_per_step:  # the plan counts the runs (SACConfig.runs_per_step)
            config = dataclasses.replace(config, runs_per_step=runs_per_step)
        self.config = config
        self.source_gm = source_gm
        self.outside_bytes = outside_bytes  # device memory held outside the graph (see outside_bytes())
        # how many times the graph runs forward before its backwards in one step (one graph serving
        # every block of a model compiled block by block): the other runs hold what each saves
        self.runs_per_step = runs_per_step
        # of outside_bytes: what the step's earlier graphs hold for their backwards as this one is
        # compiled (a graph after a graph break), freed before the optimizer step
        self.freed_before_optimizer = 0
        # the graph's name in messages (_graph_name), given where it is compiled again outside
        # Dynamo's compile (a replan), which no longer knows which graph it is
        self.name: str | None = None
        self.last_result: Any = None
        self.ran = False  # called at least once (False after a compile that a cache served)
        # the FSDP2 parameters among the graph's inputs (sac_compiler.distributed.FSDPInputs), if any
        self.fsdp: Any = None
        # the device the plan is for, where the graph was traced elsewhere (the offline planner's
        # graph on CPU or meta fake tensors for a GPU); None: the device of the graph's inputs
        self.target_device: torch.device | None = None
        self._checks: list[tuple[int | None, int]] = []
        # the order the partitioned graphs are checked in now (GraphPlanResult.simulate's ``order``)
        self._order: str | None = None
        # partition_order="auto" on a GPU: the compile's recorder of Inductor's schedule (set by
        # _compile), the plan left for it to check (result, forward, backward, limit), and whether
        # that check found the plan over the budget (confirm_compiled)
        self.recorder: Any = None
        self.pending: tuple[Any, fx.GraphModule, fx.GraphModule, int] | None = None
        self.over_in_inductor_order = False

    def __call__(
        self, gm: fx.GraphModule, joint_inputs: Sequence[object], **kwargs: Any
    ) -> tuple[fx.GraphModule, fx.GraphModule]:
        from sac_compiler.plan_graph import BudgetError, recording_solves

        self.ran = True
        with recording_solves() as solve_times:
            try:
                return self._partition(gm, joint_inputs, solve_times, **kwargs)
            except BudgetError as error:
                # with graph breaks one model is several graphs, each planned on its own: say which
                raise BudgetError(f"{self.name or _graph_name(self.source_gm)}: {error}",
                                  least_budget=getattr(error, "least_budget", None)) from error

    def _partition(self, gm: fx.GraphModule, joint_inputs: Sequence[object], solve_times: list[float],
                   **kwargs: Any) -> tuple[fx.GraphModule, fx.GraphModule]:
        from torch._functorch.partitioners import min_cut_rematerialization_partition

        from sac_compiler.plan_graph import BudgetError, plan_and_tag, planning_margin

        start = time.perf_counter()
        partitioning: list[float] = []  # PyTorch's partitioner; plain torch.compile runs it once
        self._checks = []  # this graph's plans partitioned so far (GraphPlanResult.partition_checks)

        def partition(planned: Any) -> tuple[fx.GraphModule, fx.GraphModule]:
            """PyTorch's partition of the graph as ``planned`` tagged it (its offloaded values
            copied out by PyTorch's offload pass, their reloads issued where the plan starts them)."""
            t0 = time.perf_counter()
            offload = getattr(planned, "offload", None)
            if offload is None:
                out = min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)
            else:
                from sac_compiler.offload import (
                    forward_copies_synchronous,
                    offload_partitioning,
                    place_offload_waits,
                    place_reloads,
                    reloads_at_first_read,
                    reloads_placeable,
                )

                placeable = reloads_placeable()
                # the plan starts the reloads: placed below where the installed torch lets them be
                # moved; else each at its first read under Inductor (reloads_at_first_read), or by
                # PyTorch's prefetch on the eager route
                prefetch = not placeable and not reloads_at_first_read(self.config.compiler)
                with offload_partitioning(offload.bandwidth, prefetch=prefetch, cuda=True,
                                          sink_wait=not forward_copies_synchronous(self.config.compiler)):
                    out = min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)
                if placeable:
                    place_reloads(out[1], offload.reload_before)
                    place_offload_waits(out[0], offload.wait_after)
            if self.config.compiler == "inductor":
                emit_for_inductor(out[0], out[1], _joint_device(self.target_device, joint_inputs))
            partitioning.append(time.perf_counter() - t0)
            return out

        num_fwd_outputs = kwargs["num_fwd_outputs"]
        root = _root_name(self.source_gm)
        default = self.config.compiler == "eager" and self.config.memory_budget is None
        if not default:  # the min-cut partitioner will partition it: plan on the graph it partitions
            partitioned_graph(gm)
        if self.config.conv_workspaces and self.config.compiler == "inductor" and self.config.memory_budget is not None:
            _measure_convolutions(gm, _joint_device(self.target_device, joint_inputs))
        try:
            result = plan_and_tag(gm, num_fwd_outputs, self.source_gm, root, self.config,
                                  outside_bytes=self.outside_bytes, fsdp=self.fsdp, target_device=self.target_device,
                                  freed_before_optimizer=self.freed_before_optimizer)
        except BudgetError as error:
            raise self._least_partitioned(error, gm, num_fwd_outputs, root, partition) from error
        self.last_result = result
        if default:
            # No plan, no fusion: PyTorch's default partition saves what eager autograd saves.
            from torch._functorch.partitioners import default_partition

            kwargs.pop("compiler", None)
            kwargs.pop("static_lifetime_input_indices", None)
            fw, bw = default_partition(gm, joint_inputs, **kwargs)
        else:
            fw, bw = partition(result)
        if result is not None:
            # "auto": every plan checked in graph order (the rounds below), then the plan they end on
            # checked once more in Inductor's order where Inductor compiles the graphs for a CUDA GPU
            # this process sees, and the rounds run again in that order if it peaks over there
            confirm = self.config.partition_order == "auto"
            self._order = "graph" if confirm else self.config.partition_order
            self._check(result, fw, bw)
            # (no budget: no plan, and the rounds stop at once)
            # the partitioned graphs must leave the planner's margin free too: the plan aims there
            limit = (result.budget_bytes or 0) - planning_margin(result, self.config)
            result, fw, bw = self._settle(gm, num_fwd_outputs, root, result, fw, bw, partition, limit)
            defer = False
            if confirm and result.plan is not None and result.resolved_order(bw) == "inductor":
                # where this compile records Inductor's schedule of the backward (a ScheduleRecorder
                # in _compile), the compile's own schedule checks the plan (confirm_compiled):
                # nothing is lowered here
                defer = self.recorder is not None
                if not defer:
                    checked = result.step_peak_bytes
                    self._order = "inductor"
                    self._check(result, fw, bw)
                    log.info("sac: the plan's partitioned graphs peak at %d bytes in graph order, %d in the order "
                             "Inductor schedules the backward", checked, result.step_peak_bytes)
                    if result.step_peak_bytes > limit:
                        result, fw, bw = self._settle(gm, num_fwd_outputs, root, result, fw, bw, partition, limit)
            if result.plan is not None and result.plan.recompute and result.step_peak_bytes <= limit:
                result, fw, bw = self._take_slack(gm, num_fwd_outputs, root, result, fw, bw, partition, limit)
            if defer:
                from torch._subclasses.fake_tensor import unset_fake_temporarily

                # Inductor compiles the forward in place (its post-grad passes): the check
                # simulates the forward as partitioned
                with unset_fake_temporarily():
                    self.pending = (result, copy.deepcopy(fw), bw, limit)
                self.recorder.active = True
            # the backend's own time: all but the one partition plain torch.compile makes too
            result.planning_s = time.perf_counter() - start - (partitioning[0] if partitioning else 0.0)
            result.solve_times_s = list(solve_times)
            result.partition_checks = list(self._checks)
            self.last_result = result
            if result.plan is not None and result.budget_bytes is not None and result.step_peak_bytes > result.budget_bytes:
                log.warning("sac: the partitioned graphs still peak at %d bytes (%d runs in a step), over the "
                            "budget %d", result.step_peak_bytes, self.runs_per_step, result.budget_bytes)
            if self.config.report and result.plan is not None and self.pending is None:
                from sac_compiler.report import write_report

                write_report(result, self.config.report)
        return fw, bw

    def confirm_compiled(self) -> None:
        """Check the plan whose check in Inductor's order was left to the compile (``pending``) on
        the schedule the compile's :class:`~sac_compiler.inductor_order.ScheduleRecorder` read of
        its backward; where the compile scheduled none (Inductor's FX graph cache served the
        backward, or it compiles at its first run), the backward is lowered here to read it. Sets
        ``over_in_inductor_order`` where the plan peaks over the budget less the planner's margin
        in that order: the caller compiles the graph again, every plan checked in that order."""
        if self.pending is None:
            return
        result, fw, bw, limit = self.pending
        self.pending = None
        start = time.perf_counter()
        checked = result.step_peak_bytes
        found = self.recorder.found if self.recorder is not None else []
        if found:
            lowered, scheduled = found[-1]
            result.partitioned = result.simulate(fw, lowered, scheduled=scheduled)
        else:
            log.info("sac: the compile scheduled no backward here (a cache hit, or compiled when it first runs): "
                     "lowering it to check the plan in Inductor's order")
            result.partitioned = result.simulate(fw, bw, "inductor")
        self._count_runs(result, fw)
        log.info("sac: the plan's partitioned graphs peak at %d bytes in graph order, %d in the order Inductor "
                 "scheduled the backward", checked, result.step_peak_bytes)
        result.partition_checks = list(self._checks)
        result.planning_s = (result.planning_s or 0.0) + time.perf_counter() - start
        self.over_in_inductor_order = result.plan is not None and result.step_peak_bytes > limit
        if self.config.report and result.plan is not None:
            from sac_compiler.report import write_report

            write_report(result, self.config.report)

    def _check(self, result: Any, fw: fx.GraphModule, bw: fx.GraphModule) -> None:
        """Simulate ``result``'s partitioned graphs in this graph's current check order and count
        the graph's runs in a step (``_count_runs``)."""
        result.check_partition(fw, bw, order=self._order)
        self._count_runs(result, fw)

    def _settle(self, gm: fx.GraphModule, num_fwd_outputs: int, root: str, result: Any, fw: fx.GraphModule,
                bw: fx.GraphModule, partition: Callable[[Any], Any], limit: int) -> tuple[Any, Any, Any]:
        """(result, forward, backward): ``result`` (checked, partitioned as ``fw``, ``bw``), or where
        its partitioned graphs peak over ``limit`` the lowest-peak plan of the rounds that plan again
        lower, each checked in the current order."""
        from sac_compiler.plan_graph import BudgetError, plan_and_tag, planning_margin

        target = plannable = result.budget_bytes or 0
        best = (result.step_peak_bytes, result, fw, bw)
        for _ in range(_PARTITION_ROUNDS):
            if result.plan is None or result.step_peak_bytes <= limit:
                break
            # The partitioned graphs peak higher than the joint-graph plan said: plan lower, by
            # the excess below this plan's own joint-graph peak where that is under the target
            # (a target lowered by a few MiB that the plan already clears gives the same plan),
            # and by an eighth of the margin more (planning lower by the excess alone can land
            # a few MiB over again, round after round)
            margin = planning_margin(result, self.config)
            own = result.predicted_peak + margin if result.predicted_peak is not None else target
            target = min(target, own) - (result.step_peak_bytes - limit) - margin // _OVERSHOOT
            candidate = None
            for _ in range(_BISECTIONS):
                log.info("sac: partitioned graphs peak at %d bytes (%d runs in a step), over the budget %d "
                         "less the planner's margin; planning for %d", result.step_peak_bytes,
                         self.runs_per_step, result.budget_bytes, target)
                try:
                    candidate = plan_and_tag(gm, num_fwd_outputs, self.source_gm, root, self.config,
                                             target=target, budget=result.budget_bytes,
                                             outside_bytes=self.outside_bytes, fsdp=self.fsdp,
                                             target_device=self.target_device, previous=result,
                                             freed_before_optimizer=self.freed_before_optimizer)
                    break
                except BudgetError:
                    target = (target + plannable) // 2  # too low for any plan: halfway back
            if candidate is None:
                break
            if (candidate.plan is not None and candidate.offload is None and result.offload is None
                    and frozenset(candidate.plan.recompute) == frozenset(result.plan.recompute)
                    and (candidate.predicted_peak or 0) > target - planning_margin(candidate, self.config)):
                # the same plan again, above the target: the lowest the planner finds, which a lower
                # target gives again; partitioned, it would peak where it did
                break
            plannable, result = target, candidate
            fw, bw = partition(result)
            self._check(result, fw, bw)
            if result.step_peak_bytes < best[0]:
                best = (result.step_peak_bytes, result, fw, bw)
        _, result, fw, bw = best
        if result.plan is not None and result.step_peak_bytes > limit:
            lowest = self._lowest_plan_partitioned(gm, num_fwd_outputs, root, result, partition)
            if lowest is not None and lowest[0] < best[0]:
                _, result, fw, bw = lowest
        return result, fw, bw

    def _lowest_plan_partitioned(self, gm: fx.GraphModule, num_fwd_outputs: int, root: str, result: Any,
                                 partition: Callable[[Any], Any]) -> tuple[int, Any, Any, Any] | None:
        """(step peak, result, forward, backward) of the plan a refusal's least budget was checked
        with (``_least_partitioned``: the plan made at the least budget of the lowest peak found),
        partitioned, where the partition rounds ended over the budget: the rounds lower their
        target by each plan's excess and can end on another plan at the same joint-graph peak that
        partitions higher. None where the lowest-peak search has not run or no plan is made."""
        from sac_compiler.plan_graph import least_budget, lowest_peak_found

        low = lowest_peak_found(result.analysis)
        if low is None:
            return None
        named = least_budget(result.analysis, self.config, low + result.outside_bytes, result.outside_bytes)
        log.info("sac: the partition rounds ended over the budget; partitioning the plan made at the least budget "
                 "of the lowest peak found, %d", named)
        planned = self._partitioned_at(named, gm, num_fwd_outputs, root, partition, previous=result)
        if planned is None:
            return None
        candidate, fw, bw = planned
        candidate.budget_bytes, candidate.target_bytes = result.budget_bytes, named
        return candidate.step_peak_bytes, candidate, fw, bw

    def _partitioned_at(self, budget: int, gm: fx.GraphModule, num_fwd_outputs: int, root: str,
                        partition: Callable[[Any], Any], previous: Any = None) -> tuple[Any, Any, Any] | None:
        """(result, forward, backward) of the plan made for the absolute ``budget``, partitioned and
        checked, or None where that budget plans nothing. ``previous``: a plan of this graph made
        before, whose analysis (and the lowest-peak searches run on it) the plan reuses."""
        from sac_compiler.plan_graph import BudgetError, plan_and_tag

        config = dataclasses.replace(self.config, memory_budget=MemoryBudget(bytes=budget))
        try:
            result = plan_and_tag(gm, num_fwd_outputs, self.source_gm, root, config,
                                  outside_bytes=self.outside_bytes, fsdp=self.fsdp, target_device=self.target_device,
                                  previous=previous, freed_before_optimizer=self.freed_before_optimizer)
        except BudgetError:
            return None
        if result is None or result.plan is None:
            return None
        fw, bw = partition(result)
        self._check(result, fw, bw)
        return result, fw, bw

    def _least_partitioned(self, error: Any, gm: fx.GraphModule, num_fwd_outputs: int, root: str,
                           partition: Callable[[Any], Any]) -> Any:
        """A refusal of an absolute budget under Inductor, naming a least budget the partitioned
        graphs meet: the refusal's least budget comes from the joint graph's simulation of the
        lowest-peak plan, and the partitioned graphs of the plan made at it can peak higher (the
        UNet block's did until the joint simulation followed ``column_reduction_order``:
        docs/results.md), so that budget would plan and then measure over itself.
        The plan made at the least budget named is partitioned; where its graphs peak higher, the
        least budget named is theirs with the planner's margin. Any other error is returned as it is."""
        from sac_compiler.plan_graph import BudgetError, least_budget, least_budget_advice

        named = getattr(error, "least_budget", None)
        budget = self.config.memory_budget
        if named is None or self.config.compiler != "inductor" or budget is None or budget.bytes is None:
            return error
        planned = self._partitioned_at(named, gm, num_fwd_outputs, root, partition)
        if planned is None:
            return error
        result = planned[0]
        need = least_budget(result.analysis, self.config, result.step_peak_bytes, result.outside_bytes)
        if need <= named:
            return error
        finding = (f"{error.finding}; the plan made at {named} bytes has partitioned graphs peaking at "
                   f"{format_bytes(result.step_peak_bytes)}")
        return BudgetError(least_budget_advice(finding, need), least_budget=need, finding=finding)

    def _take_slack(self, gm: fx.GraphModule, num_fwd_outputs: int, root: str, result: Any,
                    fw: fx.GraphModule, bw: fx.GraphModule, partition: Callable[[Any], Any],
                    limit: int) -> tuple[Any, Any, Any]:
        """Where the partitioned graphs peak well under ``limit`` (the budget less the planner's
        margin), the joint-graph simulation was pessimistic about this plan (it does not follow
        every kernel Inductor fuses): plan again for the joint-graph peak plus what the partitioned
        graphs leave, and take that plan if its partitioned graphs fit and it recomputes less.
        Not where the plan's recomputation already costs no more than the solver's own tolerance
        (``plan_graph.step_tolerance_ms``): no plan could be told faster, and planning again costs
        as much as the first plan did."""
        from sac_compiler.plan_graph import BudgetError, plan_and_tag, step_tolerance_ms

        slack = limit - result.step_peak_bytes
        if result.predicted_peak is None or slack <= _SLACK_FRACTION * (result.budget_bytes - result.outside_bytes):
            return result, fw, bw
        tolerance = step_tolerance_ms(result.analysis)
        if result.plan is not None and result.offload is None and result.plan.recompute_ms <= tolerance:
            log.info("sac: partitioned graphs peak %d bytes under the budget; the plan recomputes %.4f ms, "
                     "within the solver's tolerance of %.4f ms: not planned again", slack,
                     result.plan.recompute_ms, tolerance)
            return result, fw, bw
        for share in (1.0, 0.5):
            target = result.predicted_peak + int(share * slack)
            if result.target_bytes is not None and target <= result.target_bytes:
                # the joint-graph simulation was not pessimistic (the partitioned graphs peak above
                # it): this target is below the one the plan was made for, no room for a faster plan
                continue
            try:
                candidate = plan_and_tag(gm, num_fwd_outputs, self.source_gm, root, self.config, target=target,
                                         budget=result.budget_bytes, outside_bytes=self.outside_bytes, fsdp=self.fsdp,
                                         target_device=self.target_device, previous=result,
                                         freed_before_optimizer=self.freed_before_optimizer)
            except BudgetError:
                continue
            if candidate is None or candidate.plan is None or candidate.plan.recompute_ms >= result.plan.recompute_ms:
                continue
            fw2, bw2 = partition(candidate)
            self._check(candidate, fw2, bw2)
            log.info("sac: partitioned graphs peak %d bytes under the budget; a plan for %d peaks at %d (%s)",
                     slack, target, candidate.step_peak_bytes,
                     "taken" if candidate.step_peak_bytes <= limit else "over: kept the first")
            if candidate.step_peak_bytes <= limit:
                candidate.slack_taken = True
                return candidate, fw2, bw2
        return result, fw, bw

    def _count_runs(self, result: Any, fw: fx.GraphModule) -> None:
        """Record on ``result`` how many times the graph runs before its backwards and what each
        other run holds through it (its saved activations and the inputs its backward reads besides
        parameters), from which ``result.step_peak_bytes`` follows."""
        result.runs_per_step = self.runs_per_step
        result.held_per_run_bytes = held_per_run(result, fw)
        if result.plan is not None:
            self._checks.append((result.predicted_peak, result.step_peak_bytes))

    def uuid(self) -> str:
        """The partition's cache key, which Inductor puts in its FX graph and AOTAutograd cache keys.

        Everything the partition depends on besides the joint graph (which Inductor keys itself):
        this class, every source file of ``sac_compiler`` and ``passes`` (solvers included), every
        ``SACConfig`` option (:func:`config_key`), the memory held outside the graph, in MiB, and the
        memory-model rules left out (``rules_disabled``).
        """
        from sac_compiler.passes.memory_model import disabled_rules

        key = (f"{type(self).__module__}.{type(self).__qualname__}", source_hash(_package_roots()),
               config_key(self.config), self.outside_bytes >> 20, self.runs_per_step, sorted(disabled_rules()))
        return hashlib.sha256(repr(key).encode()).hexdigest()

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (PartitionerKey, (self.uuid(),))

    def __copy__(self) -> SACPartitioner:
        copied = type(self).__new__(type(self))
        copied.__dict__.update(self.__dict__)
        return copied

    def __deepcopy__(self, memo: dict[int, Any]) -> SACPartitioner:
        return self


class PartitionerKey(CustomPartitionerFn):
    """What a pickled :class:`SACPartitioner` becomes: its ``uuid()``, nothing it partitions with.

    Inductor pickles its config into cache keys (and, compiling in a subprocess, to send it there
    after the partition is made): the key is all that either needs."""

    def __init__(self, key: str) -> None:
        self.key = key

    def uuid(self) -> str:
        return self.key

    def __call__(
        self, gm: fx.GraphModule, joint_inputs: Sequence[object], **kwargs: Any
    ) -> tuple[fx.GraphModule, fx.GraphModule]:
        raise RuntimeError(
            "this backend='sac' partitioner was unpickled, which keeps only its cache key (not the graph, "
            "the options or the optimizer it plans with); partition with the SACPartitioner that "
            "sac_compiler.backend.compile_graph made"
        )


# SACConfig fields left out of config_key, each with its reason; a new field is keyed unless it is
# listed here. None is listed: every option can change the plan, the partition or the compiled
# graphs, except ``report``, which only says where the plan goes; it stays keyed because compiles
# with a report skip the AOTAutograd cache anyway (see _compile), so keying on it loses no hits.
_CONFIG_KEY_EXCLUDED: frozenset[str] = frozenset()

# Optimizer param_group entries left out of the optimizer's key: ``params`` is keyed by the
# parameters' shapes instead; ``lr`` and ``initial_lr`` change under learning-rate schedulers during
# training and never change what the optimizer holds. Every other hyperparameter is keyed, as it can
# change the state the optimizer keeps (momentum, amsgrad) or its step's temporaries (foreach,
# fused, weight_decay).
_OPTIMIZER_KEY_EXCLUDED: frozenset[str] = frozenset({"params", "lr", "initial_lr"})


def config_key(config: SACConfig) -> tuple[tuple[str, Any], ...]:
    """Every ``SACConfig`` field but those in ``_CONFIG_KEY_EXCLUDED``, each as (name, stable value):
    plain data whose ``repr`` is the same in every process (no ``id()``, no hash order)."""
    return tuple((f.name, _stable(getattr(config, f.name), f.name))
                 for f in dataclasses.fields(config) if f.name not in _CONFIG_KEY_EXCLUDED)


def _stable(value: Any, option: str) -> Any:
    """``value`` as nested tuples of str, int, float, bool and None."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.optim.Optimizer):
        return _optimizer_key(value)
    if isinstance(value, torch.Tensor):
        return _tensor_key(value)
    if isinstance(value, (torch.device, torch.dtype)):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # e.g. MemoryBudget
        return (type(value).__qualname__,
                tuple((f.name, _stable(getattr(value, f.name), option)) for f in dataclasses.fields(value)))
    if isinstance(value, (tuple, list)):
        return tuple(_stable(v, option) for v in value)
    raise TypeError(
        f"backend='sac' option {option}: no stable cache-key form for a {type(value).__qualname__} "
        f"({value!r}); give that type one in sac_compiler.backend._stable"
    )


def _tensor_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    """What a tensor holds in memory: its shape, dtype and device type (not its values)."""
    return ("tensor", tuple(int(d) for d in tensor.shape), str(tensor.dtype), tensor.device.type)


def _optimizer_key(optimizer: torch.optim.Optimizer) -> tuple[Any, ...]:
    """An optimizer as what changes the plan: its class, each parameter group's parameter shapes
    and hyperparameters (less ``_OPTIMIZER_KEY_EXCLUDED``), and the state it holds per parameter
    (each entry's shape and dtype; a stepped optimizer is measured, an unstepped one estimated)."""
    groups = []
    for i, group in enumerate(optimizer.param_groups):
        hyper = []
        for name in sorted(k for k in group if k not in _OPTIMIZER_KEY_EXCLUDED):
            try:
                hyper.append((name, _stable(group[name], f"optimizer.param_groups[{i}][{name!r}]")))
            except TypeError:  # a hyperparameter of its own kind: keyed by its type
                hyper.append((name, type(group[name]).__qualname__))
        groups.append((tuple(_tensor_key(p) for p in group["params"]), tuple(hyper)))
    state = tuple(
        tuple(sorted((str(k), _tensor_key(v) if isinstance(v, torch.Tensor) else type(v).__qualname__)
                     for k, v in optimizer.state.get(p, {}).items()))
        for group in optimizer.param_groups for p in group["params"]
    )
    return (f"{type(optimizer).__module__}.{type(optimizer).__qualname__}", tuple(groups), state)


def _package_roots() -> tuple[Path, ...]:
    """The source folders of the packages the partition runs: ``sac_compiler`` and
    ``sac_compiler.passes`` (the repository's ``passes/`` folder, mapped into the package)."""
    import sac_compiler
    import sac_compiler.passes

    roots = []
    for package in (sac_compiler, sac_compiler.passes):
        if package.__file__ is None:  # a namespace package: nothing to hash, and so no cache key
            raise RuntimeError(f"{package.__name__} has no source folder to hash for the AOTAutograd cache key")
        roots.append(Path(package.__file__).parent)
    return tuple(roots)


def source_hash(roots: Sequence[Path]) -> str:
    """SHA-256 over every ``*.py`` file under ``roots``, subpackages included, each with its path
    relative to its root's parent (so the key does not depend on where the packages live)."""
    files = []
    for root in roots:
        for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
            stat = path.stat()
            files.append((str(path), f"{root.name}/{path.relative_to(root).as_posix()}", stat.st_mtime_ns,
                          stat.st_size))
    return _hash_files(tuple(files))


@functools.lru_cache(maxsize=16)
def _hash_files(files: tuple[tuple[str, str, int, int], ...]) -> str:
    """Hash of (path, name, mtime, size) files; cached on the listing, so an edit (a new mtime or
    size) or a new file is hashed again while unchanged sources are read once."""
    hasher = hashlib.sha256()
    for path, name, _mtime, _size in files:
        data = Path(path).read_bytes()
        hasher.update(f"{name}\0{len(data)}\0".encode())
        hasher.update(data)
    return hasher.hexdigest()


def partitioned_graph(gm: fx.GraphModule) -> None:
    """Make ``gm`` the graph PyTorch's min-cut partitioner partitions: it removes dead code and,
    with functorch's ``cse`` (on by default), merges repeated computations in place before it
    partitions (a backward that recomputes a forward value, such as GELU's, reads the forward's
    instead). Done before planning, the plan and every later plan for the graph are made on the
    graph that is partitioned, rather than on one the first partition then changes."""
    from torch._functorch import config as functorch_config
    from torch._functorch.compile_utils import fx_graph_cse

    gm.graph.eliminate_dead_code()
    if functorch_config.cse:
        gm.graph = fx_graph_cse(gm.graph)
    gm.recompile()


def held_per_run(result: Any, fw: fx.GraphModule) -> int:
    """Bytes one forward run of the partitioned graph leaves for its backward: the activations it
    saves and the inputs besides parameters and buffers its backward reads (a block's input, which
    the caller keeps for it)."""
    from sac_compiler.capture import InputKind
    from sac_compiler.passes.memory_model import round_allocation, tensor_nbytes

    kinds = {i.name: i.kind for i in result.analysis.graph.inputs}
    out = next(iter(fw.graph.find_nodes(op="output")))
    saved = [a for a in out.args[0][result.analysis.graph.num_fwd_outputs:] if isinstance(a, fx.Node)]
    device = result.analysis.graph.target_device
    inputs = sum(round_allocation(tensor_nbytes(n.meta["val"]), device) for n in saved
                 if n.op == "placeholder" and kinds.get(n.name) == InputKind.USER_INPUT
                 and isinstance(n.meta.get("val"), torch.Tensor))
    return result.partitioned.saved_bytes + inputs


def outside_bytes(example_inputs: Sequence[Any]) -> int:
    """CUDA memory the process holds beyond the graph's own inputs (other tensors, cuBLAS
    workspaces): it stays allocated through the step, so an absolute budget must leave room for it.
    0 off CUDA, or when the inputs are not real tensors on one CUDA device."""
    device = _cuda_device(example_inputs)
    if device is None:
        return 0
    storages = {}
    for x in example_inputs:
        if isinstance(x, torch.Tensor):
            storage = x.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return max(0, torch.cuda.memory_allocated(device) - sum(storages.values()))


def emit_for_inductor(fw: fx.GraphModule, bw: fx.GraphModule, device: torch.device | str | None) -> None:
    """Rewrite the partitioned graphs where Inductor would otherwise keep memory the plan counts as
    free, each rewrite switched by its rule: matmul-and-add folds kept apart (``far_addmm_apart``),
    accumulated sums kept apart (``accumulation_apart``), recomputed draws repeated in the backward
    (``draws_repeated``)."""
    if rule_on("far_addmm_apart"):
        for graph in (fw, bw):
            unfold_far_addmm(graph, device)
    if rule_on("accumulation_apart"):
        for graph in (fw, bw):
            keep_reductions_apart(graph)
    if rule_on("draws_repeated"):
        repeat_recomputed_draws(bw)


def unfold_far_addmm(gm: fx.GraphModule, device: torch.device | str | None) -> list[str]:
    """Keep apart the matmul-and-add pairs Inductor would fold although the fold keeps the matmul's
    operands alive long past their other readers (``memory_rules.far_addmm_folds``): each such
    ``add(mm(a, b), c)`` is written ``sub(c, neg(mm(a, b)))``, exactly the same sum (IEEE negation
    is exact, and ``c - (-p)`` is ``c + p``), which Inductor's ``addmm`` pattern does not match and
    fuses into one pointwise kernel after the matmul. Returns the adds rewritten."""
    from torch._subclasses.fake_tensor import FakeTensor

    from sac_compiler.passes.memory_rules import far_addmm_folds

    graph = gm.graph
    done = []
    for mm, add in far_addmm_folds(list(graph.nodes), device).items():
        other = add.args[1] if add.args[0] is mm else add.args[0]
        vals = (mm.meta.get("val"), other.meta.get("val") if isinstance(other, fx.Node) else None)
        if not all(isinstance(v, FakeTensor) for v in vals):
            continue
        mode = vals[0].fake_mode
        with graph.inserting_before(add):
            neg = graph.call_function(torch.ops.aten.neg.default, (mm,))
            sub = graph.call_function(torch.ops.aten.sub.Tensor, (other, neg))
        with mode:
            neg.meta["val"] = torch.ops.aten.neg.default(vals[0])
            sub.meta["val"] = torch.ops.aten.sub.Tensor(vals[1], neg.meta["val"])
        add.replace_all_uses_with(sub)
        done.append(add.name)
        graph.erase_node(add)
    if done:
        graph.lint()
        gm.recompile()
    return done


def keep_reductions_apart(gm: fx.GraphModule) -> list[str]:
    """Keep in its own kernel each sum Inductor would fuse into a later accumulation although the
    fused kernel keeps the sum's input alive past its other readers
    (``memory_rules.far_accumulated_reductions``): the sum's reader becomes a ``fusion_barrier``
    of it (a copy Inductor runs as a call of its own), so the sum runs where the graph has it and
    its input is freed there. Every value is unchanged. Returns the sums kept apart."""
    from torch._subclasses.fake_tensor import FakeTensor

    from sac_compiler.fusion_barrier import fusion_barrier
    from sac_compiler.passes.memory_rules import far_accumulated_reductions

    graph = gm.graph
    done = []
    for red in far_accumulated_reductions(list(graph.nodes)):
        val = red.meta.get("val")
        if not isinstance(val, FakeTensor):
            continue
        with graph.inserting_after(red):
            barrier = graph.call_function(torch.ops.sac_compiler.fusion_barrier.default, (red,))
        red.replace_all_uses_with(barrier, delete_user_cb=lambda user: user is not barrier)
        with val.fake_mode:
            barrier.meta["val"] = fusion_barrier(val)
        done.append(red.name)
    if done:
        graph.lint()
        gm.recompile()
    return done


def repeat_recomputed_draws(bw: fx.GraphModule, is_backward: Callable[[fx.Node], bool] | None = None) -> list[str]:
    """Give each backward kernel that reads a recomputed random draw, directly or through a value
    the rebuild makes from it (dropout's mask), a draw of its own: ``inductor_random`` draws from
    its seed by element index, so a second draw from the same seed is the same numbers (as
    Inductor's own recomputation of a draw relies on). Otherwise Inductor stores the rebuild's
    draw from the start of backward until the kernel that makes the mask again for its gradient
    runs (a residual stream's dropout draws, through the backward); now the rebuild's draw is
    read by the rebuild's kernel alone and drawn there (the ``random_drawn_in_chain`` rule), and
    each backward kernel draws its own. ``is_backward``: whether a node is the backward's own, not
    a forward value recomputed (default: AOTAutograd's tag on the node, ``partitioner_tag``).
    Returns the draws repeated."""
    from sac_compiler.passes.annotate_ops import is_pointwise_op, op_name

    if is_backward is None:
        def is_backward(node: fx.Node) -> bool:
            return node.meta.get("partitioner_tag") == "is_backward"

    graph = bw.graph
    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    backward = {n for n in nodes if n.op == "call_function" and is_backward(n)}
    done = []
    for draw in nodes:
        if draw.op != "call_function" or op_name(draw.target) != "prims.inductor_random" or draw in backward:
            continue
        # (the value read, the backward readers of it): the draw itself, and the rebuild's
        # pointwise values made from it that the rebuild reads too
        splits = [(draw, [u for u in draw.users if u in backward])]
        splits += [(made, [u for u in made.users if u in backward]) for made in draw.users
                   if made not in backward and made.op == "call_function" and is_pointwise_op(made)]
        repeated = False
        for value, readers in splits:
            if not readers or len(readers) == len(value.users):
                continue  # read by the backward only, or by the rebuild only: one kernel reads the draw
            with graph.inserting_before(min(readers, key=index.__getitem__)):
                again = graph.call_function(draw.target, draw.args, dict(draw.kwargs))
                again.meta = dict(draw.meta)
                if value is not draw:
                    made_again = graph.call_function(
                        value.target, tuple(again if a is draw else a for a in value.args), dict(value.kwargs))
                    made_again.meta = dict(value.meta)
                    again = made_again
            for reader in readers:
                reader.replace_input_with(value, again)
            repeated = True
        if repeated:
            done.append(draw.name)
    if done:
        graph.lint()
        bw.recompile()
    return done


def _joint_device(target_device: Any, joint_inputs: Any) -> Any:
    """The device the joint graph is compiled for: the target named, else its inputs' (None
    without tensor inputs)."""
    from torch.utils._pytree import tree_leaves

    return target_device or next((x.device for x in tree_leaves(joint_inputs) if isinstance(x, torch.Tensor)), None)


def _measure_convolutions(gm: fx.GraphModule, device: Any) -> None:
    """On a GPU, cuDNN's workspace for each convolution of the joint graph, measured once per
    call signature for the ``conv_workspace`` rule (``passes.memory_rules``)."""
    from sac_compiler.passes.memory_rules import measure_convolution_workspaces

    if device is None or torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return
    measured = measure_convolution_workspaces(gm, torch.device(device))
    if measured:
        log.info("sac: measured cuDNN's workspace for %d convolution call(s) on %s", measured, device)


def make_matmul_workspaces(device: torch.device, biased: bool = True) -> int:
    """Have cuBLAS make now the workspaces a training step's matmuls make on first use, and return
    their bytes, so that :func:`outside_bytes` counts them: the caching allocator holds one per
    thread and stream, and a step has two threads, the caller's for forward and autograd's device
    thread for backward. A first step would otherwise add them to its own peak unplanned.
    ``biased``: the step runs a linear with a bias (``addmm``, which may use cuBLASLt's own
    workspace); a model without one never makes that workspace, and making it would hold memory
    the step does not (see :func:`runs_biased_matmul`). Nothing is made while a CUDA graph is
    captured."""
    if torch.cuda.is_current_stream_capturing():
        return 0
    if torch.are_deterministic_algorithms_enabled() and not os.environ.get("CUBLAS_WORKSPACE_CONFIG"):
        # cuBLAS refuses to run then (PyTorch raises at the step's own first matmul, naming the setting)
        log.info("sac: deterministic algorithms without CUBLAS_WORKSPACE_CONFIG: no cuBLAS workspace is counted")
        return 0
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    before = torch.cuda.memory_allocated(device)
    with unset_fake_temporarily(), torch.inference_mode(False), torch.enable_grad(), \
            torch.autocast("cuda", enabled=False):
        a = torch.ones(16, 16, device=device, requires_grad=True)
        loss = (a @ a).sum()  # a matmul (cuBLAS)
        if biased:  # a linear with a bias (addmm, cuBLASLt's bias epilogue)
            loss = loss + torch.nn.functional.linear(a, a, torch.ones(16, device=device, requires_grad=True)).sum()
        loss.backward()
        del a, loss
    return max(0, torch.cuda.memory_allocated(device) - before)


# Dynamo-graph calls that run a matmul with a bias added in its epilogue when given one
# (torch.nn.functional.linear is this function)
_BIASED = (torch._C._nn.linear,)
_ADDMMS = (torch.addmm, torch.Tensor.addmm, torch.baddbmm, torch.Tensor.baddbmm)


def runs_biased_matmul(gm: fx.GraphModule) -> bool:
    """Whether the Dynamo graph ``gm`` runs a linear with a bias (or an ``addmm``), which cuBLASLt
    may run with its own workspace: a module call, or a call with a bias that is not None."""
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                return True
        elif node.op == "call_function" and node.target in _ADDMMS:
            return True
        elif node.op == "call_function" and node.target in _BIASED:
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            if bias is not None:
                return True
        elif node.op == "call_method" and node.target in ("addmm", "baddbmm"):
            return True
    return False


def optimizers_of(params: Sequence[torch.Tensor]) -> list[torch.optim.Optimizer]:
    """The live optimizers that step any of ``params`` (found among the process's objects: an
    optimizer is usually made before the first call compiles the model)."""
    ids = {id(p) for p in params}
    if not ids:
        return []
    found = []
    for obj in gc.get_objects():
        # type(), not isinstance(): isinstance reads __class__, which a dead weak proxy raises on
        if issubclass(type(obj), torch.optim.Optimizer) and any(
            id(p) in ids for group in obj.param_groups for p in group["params"]
        ):
            found.append(obj)
    return found


def _allocated_state_bytes(optimizer: torch.optim.Optimizer, device: torch.device) -> int:
    """Bytes of ``optimizer``'s state tensors on ``device`` (rounded as the allocator rounds)."""
    from sac_compiler.passes.annotate_memory import round_allocation, tensor_nbytes

    return sum(round_allocation(tensor_nbytes(v), device)
               for state in optimizer.state.values() for v in state.values()
               if isinstance(v, torch.Tensor) and v.dim() > 0 and v.device == device)


def future_optimizer_state_bytes(optimizers: Sequence[torch.optim.Optimizer], device: torch.device) -> int:
    """State the optimizers will allocate on ``device`` at their next step and have not yet (an
    unstepped Adam: two moments per parameter; a stepped one: nothing more). Optimizers whose
    state cannot be estimated before their first step count 0 (run-time enforcement measures it)."""
    from sac_compiler.passes.annotate_memory import (
        STATE_PER_PARAM,
        round_allocation,
        tensor_nbytes,
    )

    total = 0
    for optimizer in optimizers:
        per_param = STATE_PER_PARAM.get(type(optimizer).__name__)
        if per_param is None:
            log.info("sac: cannot estimate the state %s allocates at its first step; the budget's run-time "
                     "check measures it", type(optimizer).__name__)
            continue
        if callable(per_param):
            per_param = per_param(optimizer)
        params = {id(p): p for group in optimizer.param_groups for p in group["params"]
                  if isinstance(p, torch.Tensor) and p.device == device}
        expected = sum(int(per_param * round_allocation(tensor_nbytes(p), device)) for p in params.values())
        total += max(0, expected - _allocated_state_bytes(optimizer, device))
    return total


def stepping_optimizers(example_inputs: Sequence[Any], config: SACConfig) -> list[torch.optim.Optimizer]:
    """The optimizers that step the graph's parameters: ``config.optimizer``, else those found
    among live objects (:func:`optimizers_of`)."""
    if config.optimizer is not None:
        return [config.optimizer]
    return optimizers_of([x for x in example_inputs if isinstance(x, torch.nn.Parameter)])


def held_outside(example_inputs: Sequence[Any], config: SACConfig,
                 optimizers: Callable[[], Sequence[torch.optim.Optimizer]] | None = None,
                 biased: bool = True) -> int:
    """Device memory an absolute budget must leave room for besides the graph: what the process
    holds now beyond the graph's inputs (:func:`outside_bytes`) and the state its optimizers will
    allocate at their first step (found among live objects unless ``optimizer`` or
    ``optimizer_state_bytes`` is given; a given optimizer's allocated state is counted by the
    analysis, so it is taken out here). ``optimizers``: how to find them (default:
    :func:`stepping_optimizers`), so that a caller that needs them again finds them once.
    ``biased``: the graph runs a linear with a bias (see :func:`make_matmul_workspaces`)."""
    device = _cuda_device(example_inputs)
    if device is None or config.memory_budget is None:
        return 0
    made = make_matmul_workspaces(device, biased)
    if made:
        log.info("sac: counting %s of cuBLAS workspaces the step's forward and backward threads use",
                 format_bytes(made))
    held = outside_bytes(example_inputs)
    if config.optimizer is not None:
        return max(0, held - _allocated_state_bytes(config.optimizer, device))
    if config.optimizer_state_bytes is not None:
        return held
    found = optimizers() if optimizers is not None else stepping_optimizers(example_inputs, config)
    future = future_optimizer_state_bytes(found, device)
    if future:
        log.info("sac: counting %s of optimizer state not yet allocated (its first step makes it)",
                 format_bytes(future))
    return held + future


def gradients_made_before(example_inputs: Sequence[Any], config: SACConfig,
                          optimizers: Callable[[], Sequence[torch.optim.Optimizer]] | None = None
                          ) -> tuple[int, int]:
    """(bytes of the gradients the step's backward makes before this graph's backward, bytes of
    the graph's own parameters' gradients), for ``SACConfig.gradients_held``.

    The parameters its optimizers step (``config.optimizer``, else those found among live
    objects) that the graph does not read run elsewhere in the step: those the autograd history of
    the graph's inputs reaches ran before it (an embedding before a graph break), so their
    backward comes after its own; the others run after it (the rest of the model after a graph
    break, an eager head), and backward makes their gradients first, which stay until the optimizer
    step. A parameter whose gradient is allocated now is left out (the process holds it, and
    ``held_outside`` counts it). A graph that runs several times in a step reads other parameters
    on its other runs: the caller takes its own gradients out once per other run. ``optimizers``:
    as for :func:`held_outside`."""
    params = [x for x in example_inputs if isinstance(x, torch.nn.Parameter)]
    found = optimizers() if optimizers is not None else stepping_optimizers(example_inputs, config)
    if not found:
        return 0, 0
    from sac_compiler.passes.memory_model import round_allocation, tensor_nbytes

    own = {id(p) for p in params}
    before = _parameters_reached(x for x in example_inputs if isinstance(x, torch.Tensor) and id(x) not in own)
    stepped = {id(p): p for optimizer in found for group in optimizer.param_groups for p in group["params"]
               if isinstance(p, torch.Tensor) and p.requires_grad}

    def grad_bytes(p: torch.Tensor) -> int:
        return round_allocation(tensor_nbytes(p), p.device)

    later = sum(grad_bytes(p) for i, p in stepped.items() if i not in own and i not in before and p.grad is None)
    return later, sum(grad_bytes(p) for i, p in stepped.items() if i in own)


def _parameters_reached(tensors: Iterable[torch.Tensor]) -> set[int]:
    """ids of the leaf tensors whose gradients the autograd history of ``tensors`` accumulates."""
    stack: list[Any] = [t.grad_fn for t in tensors if t.grad_fn is not None]
    seen: set[Any] = set()
    leaves: set[int] = set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)  # AccumulateGrad
        if isinstance(variable, torch.Tensor):
            leaves.add(id(variable))
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return leaves


def _needs_backward(example_inputs: Sequence[Any]) -> bool:
    return torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs
    )


def sac_backend(
    gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict[str, Any] | None = None
) -> Callable[..., Any]:
    """The ``torch_dynamo_backends`` entry point ``sac``."""
    return compile_graph(gm, example_inputs, SACConfig.from_options(options))


def compile_graph(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    config: SACConfig,
    partitioner_cls: type[SACPartitioner] = SACPartitioner,
    read_peak: Callable[[], int] | None = None,
    read_allocated: Callable[[], int] | None = None,
) -> Callable[..., Any]:
    """Compile one Dynamo graph with ``config`` (``partitioner_cls`` lets tests record partitions).

    Under Inductor, a compile with ``report`` set, or with a ``partitioner_cls`` other than
    :class:`SACPartitioner`, skips the AOTAutograd cache, whose hits skip the partitioner: the
    report is written, and a recording partitioner sees every partition (see ``_compile``).

    On CUDA an absolute budget is enforced at run time (``enforce_budget``, see
    ``sac_compiler.enforce``): the step's measured peak is read, and a step over the budget is
    planned again lower. ``read_peak`` supplies the measurement (the allocator's high-water mark
    by default) and enforces the budget on any device; ``read_allocated`` (the allocator's bytes
    in use, by default on CUDA) lets it tell the caller's loss between the graphs apart."""
    if not _needs_backward(example_inputs):
        log.info("backend='sac': this graph has no backward (inference); compiling it as plain %s would",
                 config.compiler)
    # found once (a scan of the process's objects), for what is held outside and the gradients
    optimizers = functools.cache(lambda: stepping_optimizers(example_inputs, config))
    outside = held_outside(example_inputs, config, optimizers, biased=runs_biased_matmul(gm))
    name = _graph_name(gm)  # here, within Dynamo's compile, which knows the graph
    fsdp = None
    if (config.world_size or 1) > 1 and config.memory_budget is not None:
        from sac_compiler.distributed import fsdp_inputs

        fsdp = fsdp_inputs(example_inputs, config.world_size or 1)
    later_grads, own_grads = 0, 0
    if (fsdp is None and config.gradients_held == 0 and config.memory_budget is not None
            and config.memory_budget.bytes is not None and _needs_backward(example_inputs)):
        later_grads, own_grads = gradients_made_before(example_inputs, config, optimizers)

    def compile_once(graph: fx.GraphModule, inputs: Sequence[Any], extra_bytes: int,
                     runs_per_step: int | None = None, loss_memory: int | None = None,
                     order: str | None = None) -> tuple[Callable[..., Any], Any]:
        planned = config if loss_memory is None else dataclasses.replace(config, loss_memory=loss_memory)
        if order is not None:
            planned = dataclasses.replace(planned, partition_order=order)
        # the other runs of a graph that runs several times read parameters of their own
        held = max(0, later_grads - ((runs_per_step or config.runs_per_step) - 1) * own_grads)
        if held:
            log.info("sac: %s: counting %s of gradients the step's backward makes before the graph's own "
                     "(of parameters it does not read, which run after it)", name, format_bytes(held))
            planned = dataclasses.replace(planned, gradients_held=held)
        planned = offload_at_this_compile(planned, name)
        partitioner = partitioner_cls(planned, graph, outside + extra_bytes, runs_per_step=runs_per_step)
        partitioner.fsdp = fsdp
        partitioner.name = name
        from sac_compiler.enforce import held_for_backwards

        # the step's graphs before this one (a graph break) hold their saved values now, counted in
        # what is held outside it, and free them before the optimizer step; so is the excess the
        # enforcement measured over its plans (``extra_bytes`` > 0): it was read between this
        # graph's forward and the end of its backward, and the optimizer step's own peak is checked
        # apart (BudgetEnforcer._check_between_steps)
        partitioner.freed_before_optimizer = held_for_backwards() + max(0, extra_bytes)
        compiled = _compile(graph, inputs, planned, partitioner)
        if partitioner.over_in_inductor_order:
            # checked on the schedule Inductor compiled, the plan peaks over the budget: compile
            # again, every plan checked in that order (each lowers its backward once more)
            log.warning("sac: %s: the plan's partitioned graphs peak at %s in the order Inductor scheduled the "
                        "backward, over the budget less the planner's margin; compiling again with every plan "
                        "checked in that order", name, format_bytes(partitioner.last_result.step_peak_bytes))
            return compile_once(graph, inputs, extra_bytes, runs_per_step,
                                loss_memory, order="inductor")
        return compiled, partitioner

    device = _cuda_device(example_inputs)
    budget = config.memory_budget
    if (budget is not None and budget.bytes is not None and config.enforce_budget
            and (device is not None or read_peak is not None) and _needs_backward(example_inputs)):
        from sac_compiler.enforce import BudgetEnforcer, make_room_in_step
        from sac_compiler.plan_graph import BudgetError

        budget_bytes = budget.bytes

        def enforced(extra_bytes: int) -> BudgetEnforcer:
            if read_peak is not None:
                return BudgetEnforcer(gm, example_inputs, budget_bytes, compile_once, read_peak,
                                      read_allocated=read_allocated, extra_bytes=extra_bytes,
                                      runs_per_step=config.runs_per_step)
            return BudgetEnforcer(gm, example_inputs, budget_bytes, compile_once,
                                  functools.partial(torch.cuda.max_memory_allocated, device),
                                  functools.partial(torch.cuda.reset_peak_memory_stats, device),
                                  functools.partial(torch.cuda.memory_allocated, device), extra_bytes=extra_bytes,
                                  runs_per_step=config.runs_per_step)

        try:
            return enforced(0)
        except BudgetError as error:
            # with a graph break, the graphs that ran before this one in the step hold their saved
            # values while it runs: ask them for the room it lacks, and plan it with that room
            room = make_room_in_step(error, budget_bytes, name)
            if room is None:
                raise
            return enforced(-room)
    return compile_once(gm, example_inputs, 0)[0]


def offload_at_this_compile(config: SACConfig, name: str = "the graph") -> SACConfig:
    """``config`` for a compile now: without offload where this compile runs outside Dynamo's
    (a plan made again at run time) and the installed torch's offloaded graph cannot be compiled
    there (``offload.recompilable_outside_dynamo``); the log says so."""
    from torch._guards import TracingContext

    if not config.offload or TracingContext.try_get() is not None:
        return config
    from sac_compiler.offload import recompilable_outside_dynamo

    if recompilable_outside_dynamo():
        return config
    log.warning("sac: %s is planned again at run time, where torch %s cannot compile offloaded values (its "
                "offload pass needs Dynamo's own compile): planning it without offload", name, torch.__version__)
    return dataclasses.replace(config, offload=False)


def confirms_in_compile(config: SACConfig, example_inputs: Sequence[Any]) -> bool:
    """Whether the compile of a graph records Inductor's schedule of its backward to check the
    plan in that order (``partition_order="auto"`` under Inductor with a budget, on CUDA inputs,
    where the installed torch has the post-fusion hook and compiles backwards when asked)."""
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    if (config.partition_order != "auto" or config.compiler != "inductor" or config.memory_budget is None
            or not hasattr(inductor_config, "_post_fusion_custom_pass")
            or not hasattr(functorch_config, "force_non_lazy_backward_lowering")):
        return False
    return any(isinstance(x, torch.Tensor) and x.device.type == "cuda" for x in example_inputs)


def _cuda_device(example_inputs: Sequence[Any]) -> torch.device | None:
    """The one CUDA device the real (not fake) inputs live on, else None."""
    from torch._subclasses.fake_tensor import is_fake

    tensors = [x for x in example_inputs if isinstance(x, torch.Tensor)]
    devices = {x.device for x in tensors}
    if len(devices) != 1 or next(iter(devices)).type != "cuda" or any(is_fake(x) for x in tensors):
        return None
    return next(iter(devices))


@contextlib.contextmanager
def _partitioner_always_runs(active: bool) -> Iterator[None]:
    """While ``active``, compile without the AOTAutograd caches (local and remote), whose hits skip
    the partitioner and with it what it does besides partitioning (the report it writes, what a
    subclass records). Inductor's FX graph cache stays on: it serves the forward and backward
    graphs the partitioner made, keyed on those graphs, so a hit there neither skips the
    partitioner nor changes the plan."""
    if not active:
        yield
        return
    from torch._functorch import config as functorch_config

    with functorch_config.patch(enable_autograd_cache=False, enable_remote_autograd_cache=False):
        yield


def _compile(gm: fx.GraphModule, example_inputs: Sequence[Any], config: SACConfig,
             partitioner: SACPartitioner) -> Callable[..., Any]:
    """Compile ``gm`` with ``partitioner`` on ``config.compiler``.

    Under Inductor a compile with ``report`` set runs without the AOTAutograd caches: a cache hit
    would hand back the partitioned graphs without running the partitioner, and the report would
    not be written. Where the environment forces that cache on, the missing report is logged. A
    subclass of SACPartitioner (tests and benchmarks record partitions with one) skips the cache
    too: it would not see the partitions the cache serves.
    """
    if config.compiler == "inductor":
        from torch._dynamo.utils import counters
        from torch._inductor import config as inductor_config
        from torch._inductor.compile_fx import compile_fx

        hits = counters["aot_autograd"]["autograd_cache_hit"]
        from sac_compiler.distributed import plans_are_broadcast

        # a cache hit skips the partitioner: with a report, a recording subclass, or plans
        # broadcast from rank 0 (every rank must join every broadcast), it must run
        always_run = bool(config.report) or type(partitioner) is not SACPartitioner or plans_are_broadcast()
        hooks: dict[str, Any] = {}
        lowering = contextlib.nullcontext()
        if confirms_in_compile(config, example_inputs):
            from torch._functorch import config as functorch_config

            from sac_compiler.inductor_order import ScheduleRecorder

            # the plan is checked on the schedule this compile makes of its backward: compiled now,
            # not when it first runs, and with the AOTAutograd cache off (a plan it served would
            # go unchecked; Inductor's own cache of the graphs stays on)
            partitioner.recorder = ScheduleRecorder()
            hooks["_post_fusion_custom_pass"] = partitioner.recorder
            lowering = functorch_config.patch(force_non_lazy_backward_lowering=True)
            always_run = True
        # Inductor's reordering for peak memory as the option says (partition_order='inductor' follows it)
        patch = inductor_config.patch(custom_partitioner_fn=partitioner,
                                      reorder_for_peak_memory=config.reorder_for_peak_memory, **hooks)
        with patch, lowering, _partitioner_always_runs(always_run):
            compiled = compile_fx(gm, example_inputs)
        partitioner.confirm_compiled()
        if config.report and not partitioner.ran and counters["aot_autograd"]["autograd_cache_hit"] > hits:
            log.warning(
                "sac: report not written for %s: the graph came from Inductor's AOTAutograd cache, so the "
                "partitioner that writes the report did not run; the backend turns that cache off for "
                "compiles with a report, and TORCHINDUCTOR_AUTOGRAD_CACHE=1 in the environment forces it on: "
                "unset it (or set TORCHINDUCTOR_AUTOGRAD_CACHE=0) to bypass the cache",
                _graph_name(gm))
        return compiled

    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.debugging import boxed_nop

    # boxed_nop (as aot_eager): the graphs run op by op and free each input at its last use.
    return aot_autograd(fw_compiler=boxed_nop, bw_compiler=boxed_nop, partition_fn=partitioner)(gm, example_inputs)
