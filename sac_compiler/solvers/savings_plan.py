"""Which forward values to recompute, as memory *savings* against the everything-kept baseline.

The baseline keeps every forward value the backward reads from the moment it is made until its last
backward read. Recomputing value ``v`` instead frees it between the end of forward and its first
backward read ``first_v``: in backward step order (step 0 is the end of forward), its saving is a
*prefix* ``[0, first_v)``. A plan fits the budget when at every step the savings cover the
baseline's excess there::

    need_t = baseline_t - budget            savings_t = sum of the prefixes covering t  >=  need_t

Prefixes make the program small: a suffix sum per breakpoint instead of one long row per step.
Two corrections keep it honest:

* recomputing ``v`` needs its inputs. An input ``u`` that backward also reads is kept or recomputed
  anyway; if ``u`` is recomputed too, it must exist at ``first_v`` already, so its saving ends at the
  earliest recomputed consumer (``y_u``). An input backward does not read must be kept for ``v``
  (``k_u``, costing its bytes over ``[0, first_v)``) or recomputed;
* values of one group (a multi-output op, an in-place chain) share one decision, and ``must_save``
  values are never recomputed.

The objective is time: each recomputed value's ``cost_ms``, and each kept value's ``keep_cost_ms``
(what a fusing compiler pays to write a value out in forward and read it back in backward).

A graph that runs several times before its backwards (one compiled block serving every block of
a model) holds, through each run, what ``other_runs`` earlier runs keep for their backwards: every
step needs ``other_runs`` times the bytes kept at the end of forward more, and a value recomputed
(or one kept for a recomputation) lowers (raises) that at every step.

The lifetimes are a model: the caller re-checks a plan on its exact memory simulation and
tightens the budget if the check finds a higher peak.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sac_compiler.solvers._mip import (
    BINARY,
    CONTINUOUS,
    InfeasibleError,
    SolverOptions,
    new_model,
    solve,
    xsum,
)

logger = logging.getLogger(__name__)

# Objective tie-break per byte recomputed: prefers freeing fewer bytes at equal time.
_BYTES_TIE_BREAK_MS = 1e-15
# The program counts memory in MiB: byte counts near 1e10 next to 0/1 variables trouble solvers' tolerances.
_MIB = float(2**20)


def _mib(nbytes: float) -> float:
    return nbytes / _MIB


@dataclass(frozen=True)
class Candidate:
    """One forward allocation.

    Attributes:
        name: unique name.
        nbytes: bytes of the allocation.
        cost_ms: time to recompute it (0 for a group's later members: the group's op runs once).
        inputs: candidates it is computed from (others, like parameters, are always there).
        first_use: first backward step (1-based; step 0 is the end of forward) that reads it;
            None when backward does not read it.
        must_save: never recomputed.
        group: members of one group share one decision.
        keep_cost_ms: time that keeping it costs, against recomputing it (under a fusing compiler,
            a pointwise value kept for backward is written out in forward and read back, where
            recomputing it folds into the backward's kernels): keeping it when backward reads it,
            or keeping it for a recomputed consumer, adds this to the objective.
        last_use: last backward step that reads it (None when backward does not read it).
        inline: recomputed, it is never a buffer: a fusing compiler folds it into each kernel that
            reads it (a pointwise value only pointwise ops read), so it saves its bytes up to its
            last read, and what it is made from must live until then.
    """

    name: str
    nbytes: int
    cost_ms: float
    inputs: tuple[str, ...] = ()
    first_use: int | None = None
    must_save: bool = False
    group: str | None = None
    keep_cost_ms: float = 0.0
    last_use: int | None = None
    inline: bool = False


@dataclass(frozen=True)
class SavingsProblem:
    """``baseline[t]``: live bytes at step ``t`` with everything kept (step 0: end of forward)."""

    candidates: tuple[Candidate, ...]
    baseline: tuple[int, ...]
    budget: int
    # runs of the same graph whose kept values are held through this run (runs in a step less one)
    other_runs: int = 0
    # what one run holds at its end of forward with everything kept (None: the values backward
    # reads; a caller with an exact simulation gives its figure, outputs included)
    held_per_run: int | None = None

    @property
    def held_by_other_runs(self) -> int:
        """What the other runs hold with everything kept."""
        if not self.other_runs:
            return 0
        held = self.held_per_run
        if held is None:
            held = sum(c.nbytes for c in self.candidates if c.first_use is not None)
        return self.other_runs * held

    @property
    def need(self) -> tuple[int, ...]:
        held = self.held_by_other_runs
        return tuple(b + held - self.budget for b in self.baseline)


@dataclass(frozen=True)
class SavingsPlan:
    recompute: frozenset[str]
    kept_for_recompute: frozenset[str]
    recompute_ms: float
    status: str
    gap: float
    solve_s: float
    n_vars: int
    n_constraints: int


def _when(candidates: Sequence[Candidate], consumers: dict[str, list[str]]) -> dict[str, int | None]:
    """The first backward step at which each value must exist if recomputed: its first read, or for
    a value backward never reads, the earliest such step of the values made from it."""
    when: dict[str, int | None] = {}
    for c in reversed(candidates):
        reaches = [when[v] for v in consumers[c.name] if when.get(v) is not None]
        when[c.name] = c.first_use if c.first_use is not None else (min(reaches) if reaches else None)
    return when


def _reach(candidates: Sequence[Candidate], consumers: dict[str, list[str]],
           when: dict[str, int | None]) -> dict[str, int]:
    """The last backward step at which recomputing each value needs its inputs: its rebuild
    (``when``), or for an inline value, every step that reads it or an inline value made from it."""
    by_name = {c.name: c for c in candidates}
    reach: dict[str, int] = {}
    for c in reversed(candidates):
        steps = [when[c.name] or 0]
        if c.inline:
            steps.append(c.last_use or 0)
            steps += [reach[v] if by_name[v].inline else (when[v] or 0) for v in consumers[c.name]]
        reach[c.name] = max(steps)
    return reach


def _input_reach(u: str, consumers: dict[str, list[str]], reach: dict[str, int]) -> int:
    """How long a value kept for its recomputed consumers must live."""
    return max((reach[v] for v in consumers[u]), default=0)


# How far down the forward graph the program looks for a recomputed value that needs a value
# rebuilt earlier than its own read. A residual stream recomputed whole is rebuilt at the read of
# its last value; looking three values down, the program counted each earlier value as saved
# until its own read and the exact simulation then found the stream alive from the first backward
# steps (docs/results.md has the zoo's plans at three and at five).
_CHAIN_DEPTH = 5
# How far down a rebuild's inputs are counted as materialised with it (the transients' rows).
_TRANSIENT_DEPTH = 2


def _descendants(name: str, consumers: dict[str, list[str]], depth: int = _CHAIN_DEPTH) -> dict[str, None]:
    """Values made from ``name`` within ``depth`` steps of the forward graph, in the order found
    (a dict as an ordered set: the program's rows are built in that order, and a set's order of
    strings changes with each process's hash seed, and with it which of equally good plans the
    solver returns)."""
    out: dict[str, None] = {}
    frontier = [name]
    for _ in range(depth):
        frontier = [v for u in frontier for v in consumers[u] if v not in out]
        out.update(dict.fromkeys(frontier))
    return out


def savings_profile(problem: SavingsProblem, recompute: Iterable[str], kept: Iterable[str] = ()) -> list[int]:
    """Bytes a plan saves at each step under this module's model (the MILP's rows, evaluated)."""
    recompute, kept = set(recompute), set(kept)
    by_name = {c.name: c for c in problem.candidates}
    consumers = _consumers(problem.candidates)
    when = _when(problem.candidates, consumers)
    steps = len(problem.baseline)
    saved = [0] * steps

    def cover(end: int, nbytes: int) -> None:
        for t in range(min(end, steps)):
            saved[t] += nbytes

    reach = _reach(problem.candidates, consumers, when)
    materialised: set[tuple[str, int]] = set()
    for c in problem.candidates:
        if c.name in recompute and c.first_use is not None and c.inline:
            cover((c.last_use or c.first_use) + 1, c.nbytes)
        elif c.name in recompute and c.first_use is not None:
            early = [when[v] for v in _descendants(c.name, consumers) if v in recompute and when[v] is not None
                     and when[v] < c.first_use]
            cover(min(early) if early else c.first_use, c.nbytes)
        if c.name in kept:
            cover(_input_reach(c.name, consumers, reach) + 1 if _feeds_inline(c, by_name, consumers)
                  else _input_reach(c.name, consumers, reach), -c.nbytes)
        if c.name in recompute and when[c.name] is not None and when[c.name] < steps:
            for u in c.inputs:
                if not (u in recompute and by_name[u].first_use is None and not by_name[u].inline):
                    continue
                if c.inline and reach[c.name] > when[c.name]:
                    for step in range(when[c.name], min(reach[c.name] + 1, steps)):
                        saved[step] -= by_name[u].nbytes
                    continue
                materialised.add((u, when[c.name]))
                materialised.update((u, when[w]) for w in _descendants(c.name, consumers, _TRANSIENT_DEPTH)
                                    if w in recompute and when[w] is not None and when[w] < when[c.name])
    for u, step in materialised:  # once per step, however many rebuilds read it there
        saved[step] -= by_name[u].nbytes
    if problem.other_runs:  # what the other runs no longer (or also) hold, at every step
        held = sum(c.nbytes for c in problem.candidates if c.name in recompute and c.first_use is not None)
        held -= sum(c.nbytes for c in problem.candidates if c.name in kept and c.first_use is None)
        saved = [v + problem.other_runs * held for v in saved]
    return saved


def plan_time_ms(problem: SavingsProblem, recompute: Iterable[str], kept: Iterable[str] = ()) -> float:
    """The objective's time of a plan: recompute costs, and the keep costs of what stays kept."""
    recompute, kept = set(recompute), set(kept)
    return sum(c.cost_ms if c.name in recompute
               else c.keep_cost_ms if (c.first_use is not None or c.name in kept) else 0.0
               for c in problem.candidates)


def check_plan(problem: SavingsProblem, recompute: set[str], kept: set[str]) -> None:
    """Raise ValueError if a plan breaks the rules (not its memory: see ``savings_profile``)."""
    by_name = {c.name: c for c in problem.candidates}
    unknown = (recompute | kept) - set(by_name)
    if unknown:
        raise ValueError(f"unknown values in the plan: {sorted(unknown)}")
    for c in problem.candidates:
        if c.must_save and c.name in recompute:
            raise ValueError(f"{c.name} must be saved but is recomputed")
        if c.name in recompute:
            for u in c.inputs:
                if u in by_name and by_name[u].first_use is None and u not in recompute and u not in kept:
                    raise ValueError(f"recomputing {c.name} needs {u}, which is neither kept nor recomputed")
    groups: dict[str, set[bool]] = {}
    for c in problem.candidates:
        if c.group is not None:
            groups.setdefault(c.group, set()).add(c.name in recompute)
    split = sorted(g for g, decisions in groups.items() if len(decisions) > 1)
    if split:
        raise ValueError(f"groups split between kept and recomputed: {split}")


def _consumers(candidates: Sequence[Candidate]) -> dict[str, list[str]]:
    consumers: dict[str, list[str]] = {c.name: [] for c in candidates}
    for c in candidates:
        for u in c.inputs:
            if u in consumers:
                consumers[u].append(c.name)
    return consumers


def solve_savings_plan(problem: SavingsProblem, options: SolverOptions | None = None) -> SavingsPlan:
    """Minimise recompute time (less the keep costs it avoids) so that the savings cover the need at every step.

    With keep costs a plan may recompute values even where nothing is over the budget: under a
    fusing compiler recomputing a cheap pointwise value is faster than writing it out and reading it back.

    Raises InfeasibleError when no plan covers the need (recomputing everything allowed is not
    enough), NoSolutionError when the time limit stops the search before any plan.
    """
    options = options if options is not None else SolverOptions()
    start = time.perf_counter()
    gains = any(c.keep_cost_ms > c.cost_ms and c.first_use is not None and not c.must_save for c in problem.candidates)
    if max(problem.need, default=0) <= 0 and not gains:
        return SavingsPlan(frozenset(), frozenset(), 0.0, "OPTIMAL", 0.0, time.perf_counter() - start, 0, 0)
    model, r, kept, suffixes, reach = _build(problem, options, "savings_plan")
    need = problem.need
    for var, lo, hi in suffixes:
        model += var >= _mib(max(need[lo:hi]))  # the savings cover the need on steps [lo, hi)
    uncovered = max(need[reach:], default=0)
    if uncovered > 0:
        raise InfeasibleError(
            f"savings_plan: {uncovered} bytes over budget at steps no recomputation reaches "
            "(gradients and backward temporaries); raise the budget"
        )
    model.objective = _time_objective(problem, r, kept)
    outcome = solve(model, options)
    return _plan(problem, r, kept, outcome, start)


def greedy_savings_plan(problem: SavingsProblem) -> SavingsPlan:
    """A plan without the MILP solver, for when it fails: recompute the values backward reads,
    cheapest per byte first and a whole group at a time, until ``savings_profile`` covers the need
    at every step; what a recomputed value is made from and backward does not read stays kept.
    Slower than the program's plans, and checked by ``check_plan``.

    Raises InfeasibleError when recomputing every such value does not cover the need."""
    start = time.perf_counter()
    by_name = {c.name: c for c in problem.candidates}
    units: dict[str, list[Candidate]] = {}
    for c in problem.candidates:
        units.setdefault(c.group or f"name:{c.name}", []).append(c)
    eligible = [members for members in units.values()
                if not any(c.must_save for c in members) and any(c.first_use is not None for c in members)]
    eligible.sort(key=lambda m: sum(c.cost_ms for c in m) / max(1, sum(c.nbytes for c in m)))

    def kept_for(recompute: set[str]) -> set[str]:
        return {u for n in recompute for u in by_name[n].inputs
                if u in by_name and by_name[u].first_use is None and u not in recompute}

    need = problem.need
    recompute: set[str] = set()
    covered = max(need, default=0) <= 0
    for members in eligible:
        if covered:
            break
        recompute |= {c.name for c in members}
        saved = savings_profile(problem, recompute, kept_for(recompute))
        covered = all(s >= n for s, n in zip(saved, need))
    if not covered:
        raise InfeasibleError("savings_plan (greedy): recomputing every value backward reads does not cover "
                              "the need; raise the budget")
    kept = kept_for(recompute)
    check_plan(problem, recompute, kept)
    return SavingsPlan(frozenset(recompute), frozenset(kept), sum(by_name[n].cost_ms for n in recompute),
                       "GREEDY", math.inf, time.perf_counter() - start, 0, 0)


def _time_objective(problem: SavingsProblem, r: dict, kept: dict) -> Any:
    """Recompute time, plus the keep cost of what stays kept (constants left out)."""
    by_name = {c.name: c for c in problem.candidates}

    def recompute_coefficient(c: Candidate) -> float:
        # keeping c when backward reads it costs keep_cost_ms; recomputing it avoids that
        avoided = c.keep_cost_ms if c.first_use is not None else 0.0
        return c.cost_ms - avoided + _BYTES_TIE_BREAK_MS * c.nbytes

    return xsum(recompute_coefficient(by_name[n]) * v for n, v in r.items()) + \
        xsum((by_name[u].keep_cost_ms + _BYTES_TIE_BREAK_MS * by_name[u].nbytes) * k for u, k in kept.items())


def min_feasible_peak(problem: SavingsProblem, options: SolverOptions | None = None) -> int:
    """The lowest peak any valid plan reaches under this model (the budget is ignored)."""
    return min_peak_plan(problem, options)[0]


def min_peak_plan(problem: SavingsProblem, options: SolverOptions | None = None,
                  limit_expected: bool = False) -> tuple[int, SavingsPlan]:
    """The lowest peak any valid plan reaches under this model (the budget is ignored), and a plan
    that reaches it (not the fastest such plan: its objective is the peak alone).
    ``limit_expected``: ``options.time_limit_s`` is a short limit set on purpose, the best plan
    found by then is wanted (its peak is then an upper bound of the lowest), and reaching it is
    no warning."""
    options = options if options is not None else SolverOptions()
    start = time.perf_counter()
    model, r, kept, suffixes, reach = _build(problem, options, "savings_min_peak")
    peak = model.add_var(name="peak", var_type=CONTINUOUS, lb=0)
    held = problem.held_by_other_runs
    for var, lo, hi in suffixes:
        model += peak >= _mib(max(problem.baseline[lo:hi]) + held) - var  # the peak on steps [lo, hi)
    if reach < len(problem.baseline):
        model += peak >= _mib(max(problem.baseline[reach:]) + held)
    model.objective = peak
    outcome = solve(model, options, limit_expected=limit_expected)
    return int(round(outcome.objective_value * _MIB)), _plan(problem, r, kept, outcome, start)


def _build(problem: SavingsProblem, options: SolverOptions, name: str,
           extend: Callable[[Any, dict, Callable[[int, Any], None]], None] | None = None,
           ) -> tuple[Any, dict, dict, list, int]:
    """The variables and savings expressions.

    Returns (model, r, kept, rows, reach): each row ``(saving, lo, hi)`` is the bytes saved on every
    step of ``[lo, hi)``; no recomputation saves anything at steps ``>= reach``.

    ``extend(model, r, add)``, if given, adds its own variables and constraints to the model before
    the rows are formed, and its own savings through ``add(end, expr)`` (an expression in MiB saved
    on the steps ``[0, end)``); without it the program is the recompute-only one.
    """
    cands = problem.candidates
    by_name = {c.name: c for c in cands}
    consumers = _consumers(cands)
    steps = len(problem.baseline)
    m = new_model(name, "MIN", options)
    # a finite lower bound for the savings rows (kept-for-recompute values count negative):
    # python-mip passes -inf on to some solvers as 0
    floor = _mib(sum(c.nbytes for c in cands)) + 1.0
    # values whose recomputation can matter, and group members (their group may be recomputed)
    # (with other runs every input kept for a recomputation costs at every step: any value may
    # then be worth recomputing instead)
    recomputable = [c for c in cands if not c.must_save and (
        c.group is not None or problem.other_runs > 0 or _useful(c, by_name, consumers))]
    r = {c.name: m.add_var(name=f"r_{i}", var_type=BINARY) for i, c in enumerate(recomputable)}

    # groups share one decision
    group_rep: dict[str, str] = {}
    for c in cands:
        if c.group is None:
            continue
        rep = group_rep.setdefault(c.group, c.name)
        if rep == c.name:
            continue
        if (c.name in r) != (rep in r):  # a member may not be recomputed: neither may the group
            for member in (c.name, rep):
                if member in r:
                    m += r[member] == 0
        elif c.name in r:
            m += r[c.name] == r[rep]

    # terms[e]: expressions whose saving covers the prefix of steps [0, e)
    terms: dict[int, list[Any]] = {}

    def add(end: int, expr: Any) -> None:
        end = min(end, steps)
        if end > 0:
            terms.setdefault(end, []).append(expr)

    when = _when(cands, consumers)

    kept: dict[str, Any] = {}
    for c in recomputable:
        rc = r[c.name]
        # recomputing c needs each input that backward does not read: kept for it, or recomputed
        for u in c.inputs:
            uc = by_name.get(u)
            if uc is None or uc.first_use is not None:
                continue
            if u not in kept:
                kept[u] = m.add_var(name=f"k_{len(kept)}", var_type=BINARY)
            m += rc <= kept[u] + (r[u] if u in r else 0)
        if c.first_use is None:
            continue
        if c.inline:  # never a buffer when recomputed
            add((c.last_use or c.first_use) + 1, _mib(c.nbytes) * rc)
            continue
        # a recomputed value made from c (within a few steps) that is needed before c's own read
        # needs c rebuilt then (conservative: as if the values in between were recomputed too)
        descendants = _descendants(c.name, consumers)
        early = [when[v] for v in descendants if v in r and when[v] is not None and when[v] < c.first_use]
        if not early:
            add(c.first_use, _mib(c.nbytes) * rc)
            continue
        # c saves up to its earliest early consumer for sure, and on past each later one (up to
        # its own first use) while no consumer that needs it by then is recomputed: y_j says c
        # still saves on [e_j, e_j+1)
        stops = sorted(set(early))
        ys = []
        for j, stop in enumerate(stops):
            y = m.add_var(name=f"y_{c.name}_{j}", var_type=CONTINUOUS, lb=0, ub=1)
            m += y <= (ys[-1] if ys else rc)
            for v in descendants:  # those with an earlier stop bound y through the y before it
                if v in r and when[v] == stop:
                    m += y <= 1 - r[v]
            ys.append(y)
        # the prefixes add up: b*r before e_1, b*y_j on [e_j, e_j+1)
        add(stops[0], _mib(c.nbytes) * (rc - ys[0]))
        for j in range(1, len(stops)):
            add(stops[j], _mib(c.nbytes) * (ys[j - 1] - ys[j]))
        add(c.first_use, _mib(c.nbytes) * ys[-1])
    if extend is not None:
        extend(m, r, add)
    reach = _reach(cands, consumers, when)
    for u, k in kept.items():
        until = _input_reach(u, consumers, reach)
        add(until + 1 if _feeds_inline(by_name[u], by_name, consumers) else until, -_mib(by_name[u].nbytes) * k)
    if problem.other_runs:
        # the other runs hold what this one keeps at the end of forward, through every step
        runs = problem.other_runs
        for c in recomputable:
            if c.first_use is not None:
                add(steps, _mib(runs * c.nbytes) * r[c.name])
        for u, k in kept.items():
            add(steps, -_mib(runs * by_name[u].nbytes) * k)

    # transients: rebuilding v at when[v] materialises the recomputed inputs that backward never
    # reads (those it reads are covered by their shortened prefix above); an inline v is rebuilt
    # in every kernel that reads it, so those inputs live from when[v] through reach[v]
    # (u materialised at a step counts once, however many rebuilds there read it)
    present: dict[tuple[str, int], Any] = {}

    def materialised(u: str, step: int) -> Any:
        if (u, step) not in present:
            present[u, step] = m.add_var(name=f"w_{u}_{step}", var_type=CONTINUOUS, lb=0, ub=1)
        return present[u, step]

    for v in recomputable:
        at = when[v.name]
        if at is None or at >= steps:
            continue
        for u in v.inputs:
            if u not in r or by_name[u].first_use is not None or by_name[u].inline:
                continue
            if v.inline and reach[v.name] > at:
                both = m.add_var(name=f"w_{u}_{v.name}", var_type=CONTINUOUS, lb=0, ub=1)
                m += both >= r[u] + r[v.name] - 1
                add(at, _mib(by_name[u].nbytes) * both)  # -bytes on the steps [at, reach]
                add(reach[v.name] + 1, -_mib(by_name[u].nbytes) * both)
                continue
            m += materialised(u, at) >= r[u] + r[v.name] - 1
            # v itself is rebuilt earlier when a recomputed consumer needs it before its own read
            for w in _descendants(v.name, consumers, _TRANSIENT_DEPTH):
                if w in r and when[w] is not None and when[w] < at:
                    m += materialised(u, when[w]) >= r[u] + r[v.name] + r[w] - 2
    transients: dict[int, list[Any]] = {}
    for (u, step), var in present.items():
        transients.setdefault(step, []).append(_mib(by_name[u].nbytes) * var)

    # suffix sums: the saving on steps [previous end, end) is every prefix reaching beyond them
    ends = sorted(terms)
    suffixes: list[tuple[Any, int, int]] = []
    suffix: Any = None
    for idx in range(len(ends) - 1, -1, -1):
        end, lo = ends[idx], (ends[idx - 1] if idx > 0 else 0)
        var = m.add_var(name=f"s_{end}", var_type=CONTINUOUS, lb=-floor)
        m += var == xsum(terms[end]) + (suffix if suffix is not None else 0)
        suffix = var
        suffixes.append((var, lo, end))
    suffixes.reverse()
    # a step with transients gets its own row: the segment's savings less the transients there
    for step, exprs in transients.items():
        segment = next(var for var, lo, hi in suffixes if lo <= step < hi) if any(
            lo <= step < hi for _, lo, hi in suffixes) else None
        saving = segment if segment is not None else 0
        var = m.add_var(name=f"t_{step}", var_type=CONTINUOUS, lb=-floor)
        m += var == saving - xsum(exprs)
        suffixes.append((var, step, step + 1))
    return m, r, kept, suffixes, (ends[-1] if ends else 0)


def _plan(problem: SavingsProblem, r: dict, kept: dict, outcome: Any, start: float) -> SavingsPlan:
    by_name = {c.name: c for c in problem.candidates}
    recompute = frozenset(n for n, var in r.items() if var.x is not None and var.x >= 0.5)
    kept_names = frozenset(u for u, var in kept.items() if var.x is not None and var.x >= 0.5)
    elapsed = time.perf_counter() - start
    logger.debug("savings_plan: %d candidates, %d steps -> %d recomputed in %.3f s",
                 len(problem.candidates), len(problem.baseline), len(recompute), elapsed)
    return SavingsPlan(
        recompute=recompute,
        kept_for_recompute=kept_names,
        recompute_ms=sum(by_name[n].cost_ms for n in recompute),
        status=outcome.status,
        gap=outcome.gap,
        solve_s=elapsed,
        n_vars=outcome.num_vars,
        n_constraints=outcome.num_constraints,
    )


def _feeds_inline(c: Candidate, by_name: dict[str, Candidate], consumers: dict[str, list[str]]) -> bool:
    """An inline consumer reads c at the step it reaches to (inclusive), not only before it."""
    return any(by_name[v].inline for v in consumers[c.name])


def _useful(c: Candidate, by_name: dict[str, Candidate], consumers: dict[str, list[str]]) -> bool:
    """Recomputing c can matter: backward reads it, or it feeds a value backward reads."""
    return c.first_use is not None or any(by_name[v].first_use is not None or consumers[v] for v in consumers[c.name])


__all__ = [
    "Candidate",
    "SavingsPlan",
    "SavingsProblem",
    "check_plan",
    "greedy_savings_plan",
    "min_feasible_peak",
    "min_peak_plan",
    "plan_time_ms",
    "savings_profile",
    "solve_savings_plan",
]
