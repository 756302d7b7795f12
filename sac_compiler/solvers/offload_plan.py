"""Keep, recompute or offload: the savings program (``savings_plan``) with a third choice per value.

An offloaded value is copied to pinned host memory after its last forward read and copied back
(reloaded) before its first backward read. The memory model, on the savings program's step axis
(step 0 is the end of forward, step ``t >= 1`` the backward's ``t``-th op):

* the value is freed on the device once its device-to-host copy has finished and the forward has
  waited for it, which it does at its end (PyTorch's ``activation_offload_sink_wait``). Copies in
  forward must finish by the end of forward's compute (an offload whose copy the forward's
  remaining compute cannot hide is not offered), so the value is gone at step 0 (the end of
  forward, after those waits) but still there at the forward's own peak (``forward_peak``), where
  only recomputation helps, unless the forward waits for each copy once the stream has finished
  it (``forward_peak_ms``, torch's ``ao`` ops): then a value whose copy is done before the peak's
  op starts is gone there too;
* its reload starts at a step ``s`` the program chooses, ``1 <= s <= first_use``; the value is
  allocated again from ``s`` (the reload's buffer) until its last backward read, as if kept. It saves
  its bytes on the prefix ``[0, s)``, as a recomputed value saves them up to its first read.

Copies run on one copy stream, first in, first out, and overlap compute. The link moves
``bandwidth`` bytes/s (per direction); a copy of ``b`` bytes takes ``b / bandwidth``. Backward reloads
are issued in the order of their first backward reads (reload starts are non-decreasing in first
use, as PyTorch's prefetch issues them); for such a FIFO stream a set of reloads meets its first
reads exactly when every window of steps ``[a, b]`` has room for the reloads that start at or after
``a`` and are read by ``b``::

    sum(copy time of v : a <= s_v, first_use_v <= b)  <=  compute(a .. b-1) + stall(a .. b)

``stall_t`` is the time the compute stream waits before step ``t`` for a reload it reads there: the
transfer time that compute cannot hide. The program charges it in the objective, next to the
savings program's recompute time and keep costs. Forward copies have the one deadline of the end of
forward: for every ready time ``a``, the copies ready at or after ``a`` fit in the forward's compute
after ``a``. Pinned host memory holds every offloaded value at the end of forward: their bytes are
bounded by ``host_budget``.

Variables: the savings program's ``r_v`` (recompute) and ``k_u`` (kept for a recomputation), and per
offloadable value and candidate reload start ``s`` a binary ``o_{v,s}`` (offload, reload from ``s``),
``sum_s o_{v,s} + r_v <= 1``; an offloaded value is no input of a recomputed one; continuous stalls
``e_t >= 0`` at the steps reloads are read; running maxima ``m_j`` of the reload starts over the
first-use order. The savings rows become ``recompute savings_t + sum(bytes_v * o_{v,s} : s > t)
>= baseline_t - budget``, and the forward's peak gets a row of its own: ``recompute savings_0 >=
forward_peak - budget``.

``sac_compiler.solvers.offload_replay`` replays a plan independently (a copy-stream simulation) to
check the program's peak, host bytes and stalls.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sac_compiler.solvers._mip import (
    BINARY,
    CONTINUOUS,
    InfeasibleError,
    SolverOptions,
    solve,
    xsum,
)
from sac_compiler.solvers.savings_plan import (
    SavingsProblem,
    _build,
    _consumers,
    _mib,
    _time_objective,
)

logger = logging.getLogger(__name__)

# Objective tie-break per byte offloaded: at equal time, keep rather than offload, offload fewer bytes.
_OFFLOAD_TIE_BREAK_MS = 1e-14
# Candidate reload starts per value: every step when the first use is this near, else a few leads.
_ALL_STARTS_UP_TO = 32
_LEADS = (1.0, 2.0, 4.0, 8.0)


@dataclass(frozen=True)
class OffloadProblem:
    """The savings problem, with what offloading needs: a compute timeline and a link.

    Attributes:
        savings: candidates, baseline (step 0: end of forward) and device budget.
        step_ms: compute time of each step of ``savings.baseline`` (step 0, the end of forward, has none).
        forward_ms: compute time of the forward.
        ready_ms: the offloadable values, each with the forward time at which its last forward
            read has run (its copy to the host may start then). Values backward does not read are
            never offloaded.
        bandwidth: bytes per second the host link moves in each direction.
        host_budget: pinned host bytes the offloaded values may take; None: unlimited.
        forward_peak: live bytes at the forward's own peak with everything kept, when it is above
            the end of forward (``savings.baseline[0]``, after the forward's waits for its copies):
            offloaded values are still on the device there. None: no such peak.
        forward_peak_ms: the forward time at which the op of that peak starts, where the forward
            waits for each copy once the copy stream has finished it (torch's ``ao`` ops, waits
            placed by ``offload.place_offload_waits``): a value whose copy finishes by then is
            freed before the peak. None: the forward waits for its copies at its end only.
        reloads_at_first_use: each reload is issued just before its value's first backward read
            (the emitted graph cannot start it earlier where the plan would: torch 2.11, whose
            reloads only PyTorch's own prefetch moves, by estimates of its own); the compute waits
            for it there.
        forward_copies_synchronous: the forward waits for each copy as soon as it is issued (the
            emitted graph cannot let it overlap compute safely: ``offload.forward_copies_synchronous``).
            Each offloaded value's copy time is then charged in full, none has to hide behind the
            forward's compute, and a value is freed once its copy is done, before the next op
            runs: with ``forward_peak_ms``, a value whose last forward read runs before the peak's op
            is gone there.
    """

    savings: SavingsProblem
    step_ms: tuple[float, ...]
    forward_ms: float
    ready_ms: Mapping[str, float] = field(default_factory=dict)
    bandwidth: float = 48e9
    host_budget: int | None = None
    forward_peak: int | None = None
    forward_peak_ms: float | None = None
    forward_copies_synchronous: bool = False
    reloads_at_first_use: bool = False

    def __post_init__(self) -> None:
        if len(self.step_ms) != len(self.savings.baseline):
            raise ValueError(f"step_ms has {len(self.step_ms)} steps, the baseline {len(self.savings.baseline)}")
        if any(t < 0 for t in self.step_ms) or self.forward_ms < 0:
            raise ValueError("compute times must be >= 0")
        if not self.bandwidth > 0:
            raise ValueError(f"bandwidth must be > 0 bytes/s, got {self.bandwidth!r}")
        names = {c.name for c in self.savings.candidates}
        unknown = sorted(set(self.ready_ms) - names)
        if unknown:
            raise ValueError(f"ready_ms names values that are not candidates: {unknown[:8]}")
        if self.host_budget is not None and self.host_budget < 0:
            raise ValueError(f"host_budget must be >= 0 bytes or None, got {self.host_budget!r}")
        if self.forward_peak_ms is not None and not 0 <= self.forward_peak_ms <= self.forward_ms:
            raise ValueError(f"forward_peak_ms must be within the forward's [0, {self.forward_ms}] ms, "
                             f"got {self.forward_peak_ms!r}")

    def copy_ms(self, nbytes: int) -> float:
        """Time the link takes to move ``nbytes`` one way."""
        return 1e3 * nbytes / self.bandwidth


@dataclass(frozen=True)
class OffloadPlan:
    """A keep / recompute / offload plan. Values in neither ``recompute`` nor ``offload`` are kept.

    ``offload`` maps each offloaded value to the step its reload starts at; ``stall_ms`` is the
    transfer time the program charges (compute waiting for reloads), ``time_ms`` the program's time
    (recompute time, keep costs of what stays on the device or goes through the host, stalls)."""

    recompute: frozenset[str]
    kept_for_recompute: frozenset[str]
    offload: Mapping[str, int]
    recompute_ms: float
    stall_ms: float
    host_bytes: int
    status: str
    gap: float
    solve_s: float
    n_vars: int
    n_constraints: int


def reload_starts(problem: OffloadProblem, name: str) -> list[int]:
    """The reload starts the program may choose for an offloadable value (ascending).

    Its first use alone where reloads cannot start earlier (``reloads_at_first_use``). Else every
    step from 1 to its first use when that is near (``_ALL_STARTS_UP_TO``); else the first use
    itself (no prefetch) and the latest steps whose compute up to the first use covers the copy
    time 1, 2, 4 and 8 times over (room for other reloads in the same window)."""
    c = _by_name(problem)[name]
    first = c.first_use
    if first is None or first < 1:
        return []
    if problem.reloads_at_first_use:
        return [first]
    if first <= _ALL_STARTS_UP_TO:
        return list(range(1, first + 1))
    starts = {first}
    need = problem.copy_ms(c.nbytes)
    for lead in _LEADS:
        covered, s = 0.0, first
        while s > 1 and covered < lead * need:
            s -= 1
            covered += problem.step_ms[s]
        starts.add(s)
    return sorted(starts)


def _by_name(problem: OffloadProblem) -> dict[str, Any]:
    return {c.name: c for c in problem.savings.candidates}


def offloadable(problem: OffloadProblem) -> list[str]:
    """Values the program may offload, in candidate order: named in ``ready_ms``, read by backward,
    of a non-zero size, and whose copy the forward's compute after their last read can hide (any
    copy, where the forward waits for each at once: ``forward_copies_synchronous``)."""
    out = []
    for c in problem.savings.candidates:
        if c.name not in problem.ready_ms or c.first_use is None or c.first_use < 1 or c.nbytes <= 0:
            continue
        if not problem.forward_copies_synchronous and \
                problem.ready_ms[c.name] + problem.copy_ms(c.nbytes) > problem.forward_ms:
            continue
        out.append(c.name)
    return out


def solve_offload_plan(problem: OffloadProblem, options: SolverOptions | None = None) -> OffloadPlan:
    """The fastest keep / recompute / offload plan under the device budget (and the host budget).

    Raises InfeasibleError when no plan fits, NoSolutionError when the time limit stops the search
    before any plan."""
    options = options if options is not None else SolverOptions()
    start = time.perf_counter()
    savings = problem.savings
    by_name = _by_name(problem)
    consumers = _consumers(savings.candidates)
    names = offloadable(problem)
    if problem.host_budget is not None:
        names = [n for n in names if by_name[n].nbytes <= problem.host_budget]
    state: dict[str, Any] = {}

    def extend(m: Any, r: dict, add: Any) -> None:
        o: dict[tuple[str, int], Any] = {}
        for i, name in enumerate(names):
            for s in reload_starts(problem, name):
                o[name, s] = m.add_var(name=f"o_{i}_{s}", var_type=BINARY)
        chosen = {name: xsum(var for (n, _), var in o.items() if n == name) for name in names}
        for name in names:
            if name in r:
                m += chosen[name] + r[name] <= 1
            else:
                m += chosen[name] <= 1
            for v in consumers[name]:  # a recomputed value reads its inputs on the device
                if v in r:
                    m += chosen[name] + r[v] <= 1
        for (name, s), var in o.items():
            add(s, _mib(by_name[name].nbytes) * var)  # freed on the steps [0, s)
        offloaded_mib = xsum(_mib(by_name[n].nbytes) * chosen[n] for n in names)
        if problem.host_budget is not None and names:
            m += xsum(_mib(by_name[n].nbytes) * chosen[n] for n in names) <= _mib(problem.host_budget)
        # forward: copies ready at or after a fit in the compute after a (synchronous copies are
        # charged in the objective instead)
        for a in sorted({problem.ready_ms[n] for n in names} if not problem.forward_copies_synchronous else ()):
            late = [n for n in names if problem.ready_ms[n] >= a]
            m += xsum(problem.copy_ms(by_name[n].nbytes) * chosen[n] for n in late) <= problem.forward_ms - a
        # backward: stalls where reloads are read, and the window rows
        deadlines = sorted({by_name[n].first_use for n in names})
        stall = {t: m.add_var(name=f"e_{t}", var_type=CONTINUOUS, lb=0) for t in deadlines}
        prefix = [0.0]
        for t in range(len(problem.step_ms)):
            prefix.append(prefix[-1] + problem.step_ms[t])
        # Only windows that start at some reload's start and end at some reload's first read can
        # bind (a wider one holds no more reloads and has more room), and only those whose reloads,
        # one start per value, could take more than the window's compute.
        jobs_by_start: dict[int, list[tuple[str, int]]] = {}
        for (n, s) in o:
            jobs_by_start.setdefault(s, []).append((n, s))
        for a in sorted(jobs_by_start):
            inside = [(n, s) for (n, s) in o if s >= a]
            ends = sorted({by_name[n].first_use for n, s in jobs_by_start[a]})
            for b in deadlines:
                if b < ends[0] or not any(by_name[n].first_use == b for n, _ in inside):
                    continue
                jobs = [(n, s) for (n, s) in inside if by_name[n].first_use <= b]
                most = sum(problem.copy_ms(by_name[n].nbytes) for n in {n for n, _ in jobs})
                room = prefix[b] - prefix[a]
                if most <= room:
                    continue
                m += xsum(problem.copy_ms(by_name[n].nbytes) * o[n, s] for n, s in jobs) <= \
                    room + xsum(stall[t] for t in deadlines if a <= t <= b)
        # reload starts do not decrease along first use (the FIFO order of the copy stream)
        previous = None
        for d in deadlines:
            group = [n for n in names if by_name[n].first_use == d]
            if previous is not None:
                prev_var, prev_d = previous
                for n in group:
                    start_expr = xsum(s * o[n, s] for s in reload_starts(problem, n))
                    m += start_expr >= prev_var - prev_d * (1 - chosen[n])
            if len(deadlines) > 1:
                run = m.add_var(name=f"m_{d}", var_type=CONTINUOUS, lb=0, ub=d)
                if previous is not None:
                    m += run >= previous[0]
                for n in group:
                    m += run >= xsum(s * o[n, s] for s in reload_starts(problem, n))
                previous = (run, d)
        state.update(o=o, stall=stall, offloaded_mib=offloaded_mib, chosen=chosen)

    model, r, kept, rows, reach = _build(savings, options, "offload_plan", extend=extend)
    need = savings.need
    for var, lo, hi in rows:
        model += var >= _mib(max(need[lo:hi]))
    uncovered = max(need[reach:], default=0)
    if uncovered > 0:
        raise InfeasibleError(
            f"offload_plan: {uncovered} bytes over budget at steps no recomputation or offload reaches "
            "(gradients and backward temporaries); raise the budget")
    o, stall = state["o"], state["stall"]
    if problem.forward_peak is not None and problem.forward_peak > savings.budget:
        # the forward's peak: recomputation's savings at step 0 (every offload term reaches step 0: take it out)
        first = next((var for var, lo, _ in rows if lo == 0), None)
        recomputed_mib = (first - state["offloaded_mib"]) if first is not None else 0
        if first is None:
            raise InfeasibleError(
                f"offload_plan: the forward's peak is {problem.forward_peak - savings.budget} bytes over budget "
                "and no recomputation lowers it; raise the budget")
        # with waits mid-forward, a value whose copy the stream has finished by the peak's op is
        # gone there: f_v (offloaded and finished by then) counts its bytes
        freed = _freed_by_forward_peak(model, problem, names, by_name, state["chosen"])
        model += recomputed_mib + xsum(_mib(by_name[n].nbytes) * f for n, f in freed.items()) >= \
            _mib(problem.forward_peak - savings.budget)
    # the forward's own waits: each synchronous copy in full
    forward_copies = xsum(problem.copy_ms(by_name[n].nbytes) * state["chosen"][n] for n in names) \
        if problem.forward_copies_synchronous else 0
    model.objective = _time_objective(savings, r, kept) + xsum(stall.values()) + forward_copies + \
        xsum(_OFFLOAD_TIE_BREAK_MS * by_name[n].nbytes * var for (n, _), var in o.items())
    outcome = solve(model, options)
    recompute = frozenset(n for n, var in r.items() if var.x is not None and var.x >= 0.5)
    kept_names = frozenset(u for u, var in kept.items() if var.x is not None and var.x >= 0.5)
    offload = {n: s for (n, s), var in o.items() if var.x is not None and var.x >= 0.5}
    stall_ms = sum(max(0.0, var.x or 0.0) for var in stall.values())
    if problem.forward_copies_synchronous:
        stall_ms += sum(problem.copy_ms(by_name[n].nbytes) for n in offload)
    elapsed = time.perf_counter() - start
    logger.debug("offload_plan: %d candidates (%d offloadable), %d steps -> %d recomputed, %d offloaded in %.3f s",
                 len(savings.candidates), len(names), len(savings.baseline), len(recompute), len(offload), elapsed)
    return OffloadPlan(
        recompute=recompute, kept_for_recompute=kept_names, offload=dict(sorted(offload.items())),
        recompute_ms=sum(by_name[n].cost_ms for n in recompute), stall_ms=stall_ms,
        host_bytes=sum(by_name[n].nbytes for n in offload), status=outcome.status, gap=outcome.gap,
        solve_s=elapsed, n_vars=outcome.num_vars, n_constraints=outcome.num_constraints)


def _freed_by_forward_peak(model: Any, problem: OffloadProblem, names: list[str], by_name: Mapping[str, Any],
                           chosen: Mapping[str, Any]) -> dict[str, Any]:
    """Binaries ``f_v``: value ``v`` is offloaded and its copy has finished by ``forward_peak_ms``.

    The copies run first in, first out, in the order of their ready times (candidate order at a
    tie); the copy of ``v`` finishes at the largest, over ready times ``a``, of ``a`` plus the copy
    times of the offloaded values from ``a`` up to ``v`` in that order (a single machine with
    release times). Each such sum is bounded by ``forward_peak_ms`` where ``f_v`` is 1.

    Where the forward waits for each copy at once (``forward_copies_synchronous``), a value is
    freed before the op after its last forward read: ``f_v`` is its offload choice where that read
    runs before the peak's op starts."""
    deadline = problem.forward_peak_ms
    if deadline is None:
        return {}
    if problem.forward_copies_synchronous:
        return {v: chosen[v] for v in names if problem.ready_ms[v] <= deadline}
    index = {c.name: i for i, c in enumerate(problem.savings.candidates)}
    key = {n: (problem.ready_ms[n], index[n]) for n in names}
    copy = {n: problem.copy_ms(by_name[n].nbytes) for n in names}
    big = sum(copy.values()) + max(problem.ready_ms[n] for n in names) if names else 0.0
    freed: dict[str, Any] = {}
    for v in names:
        if problem.ready_ms[v] + copy[v] > deadline:
            continue
        f = model.add_var(name=f"f_{index[v]}", var_type=BINARY)
        model += f <= chosen[v]
        for a in sorted({problem.ready_ms[u] for u in names if key[u] <= key[v]}):
            ahead = [u for u in names if problem.ready_ms[u] >= a and key[u] <= key[v]]
            most = a + sum(copy[u] for u in ahead)
            if most <= deadline:
                continue
            model += a + xsum(copy[u] * chosen[u] for u in ahead) <= deadline + big * (1 - f)
        freed[v] = f
    return freed


def with_budget(problem: OffloadProblem, budget: int) -> OffloadProblem:
    """The same problem under another device budget."""
    return dataclasses.replace(problem, savings=dataclasses.replace(problem.savings, budget=budget))


__all__ = [
    "OffloadPlan",
    "OffloadProblem",
    "offloadable",
    "reload_starts",
    "solve_offload_plan",
    "with_budget",
]
