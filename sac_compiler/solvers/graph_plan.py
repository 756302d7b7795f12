"""Which forward values to keep for backward and which to recompute: the graph-level MILP.

Torch-free. The joint graph arrives as a ``PlanProblem``: forward values in topological
order, each with its bytes, recompute cost, forward inputs and the backward steps that read
it, plus the memory that does not depend on the plan at the end of forward and at every
backward step.

Memory model (``evaluate_plan`` implements it directly, without a solver):

* a kept (saved) value is live from the end of forward until its last need in backward;
* a recomputed value is recomputed just in time, at its first need, and is live until its
  last need;
* the needs of a value are the backward steps that read it (``bw_first_use`` ..
  ``bw_last_use``) and the steps at which recomputed values that read it are recomputed;
* a value is kept when backward or a recomputation reads it and it is not recomputed;
* the peak is the largest of base + live bytes at the end of forward and at every step.

The MILP, for values ``v`` with bytes ``m_v`` and recompute cost ``c_v``::

    minimise   sum_v c_v r_v  (+ a tie-break of 1e-7 of the smallest cost: fewer bytes)
    subject to s_v + r_v = 1                 v read by backward
               s_u + r_u >= r_v              u an input of v
               s_v <= sum_x r_x              v not read by backward, x its consumers
               r_v <= sum_x r_x              the same, v in no group
               r_v = r_w                     v, w in one group (one shared variable)
               r_v = 0 / s_v = 0             must_save / must_recompute
               base_eof + sum_v m_v s_v <= budget
               base_t + sum_v m_v live_vt <= budget          t a backward step

``r`` and ``s`` are binary; everything else is continuous and exact once they are
integral. ``z_vt`` (v recomputed by step t) is the OR of "t >= bw_first_use(v)" and
``z_xt`` over v's consumers x, linearised as ``z_vt >= z_xt - s_v``, ``z_vt <= r_v``,
``z_vt <= sum_x z_xt``. It only changes where some descendant is first read, so one
variable serves every step up to the next such read of v's descendants. ``live_vt`` is
``s_v + z_vt`` while backward still reads v; after that, v stays live while a consumer x
that is needed (``z_x,end``) is not recomputed yet (``1 - z_x,t-1``)::

    live_vt >= s_v + z_vt + z_x,end - z_x,t-1 - 1     for each such consumer x

Steps are pruned before any solve: the live set grows only at a step where some value
may be recomputed, so a step in between is dominated by an earlier one whose base bytes
are at least as large. The memory rows of the remaining steps are added lazily: the
solver sees the end of forward first, every answer is evaluated over all steps, and the
rows of the violated steps are added before solving again. Every model is a relaxation
of the full one, so the first answer that fits the budget is an optimum of the full model.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import math
import time
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

from sac_compiler.solvers._mip import (
    BINARY,
    InfeasibleError,
    NoSolutionError,
    SolveOutcome,
    SolverOptions,
    new_model,
    solve,
    xsum,
)

if TYPE_CHECKING:
    import mip

    _Term = Union[int, float, mip.Var, mip.LinExpr]

__all__ = [
    "GraphPlan",
    "PlanProblem",
    "PlanValue",
    "evaluate_plan",
    "min_feasible_peak",
    "solve_graph_plan",
]

logger = logging.getLogger(__name__)

# Tie-break weight (relative to the smallest positive recompute cost) for recomputed bytes.
_TIE_BREAK = 1e-7
# Most violated steps whose memory rows one round of the lazy loop adds.
_ROWS_PER_ROUND = 2
_PEAK_ROWS_PER_ROUND = int(__import__("os").environ.get("GP_PK", "2"))
# Memory coefficients are scaled by a power of two so that the largest one is below this.
_MAX_COEFFICIENT = 2**12


@dataclass(frozen=True)
class PlanValue:
    """One forward value of the joint graph.

    Attributes:
        name: unique name (the FX node name).
        nbytes: allocation bytes; 0 for views and aliases.
        recompute_ms: time to recompute it from its inputs.
        inputs: names of the forward values it is computed from; names that are not in
            the problem (parameters, graph inputs) are always available.
        bw_first_use: first index in the backward step order at which backward reads it
            directly; ``None`` if backward does not read it.
        bw_last_use: last such index; ``None`` exactly when ``bw_first_use`` is.
        fw_last_use: last forward use (documentation only; the plan does not need it).
        must_save: never recomputed (e.g. a random op that cannot be replayed safely).
        must_recompute: never kept (views: free to recompute).
        group: values of one group share one recompute decision (in-place chains, the
            random-op group).
    """

    name: str
    nbytes: int
    recompute_ms: float
    inputs: tuple[str, ...] = ()
    bw_first_use: int | None = None
    bw_last_use: int | None = None
    fw_last_use: int | None = None
    must_save: bool = False
    must_recompute: bool = False
    group: str | None = None


@dataclass(frozen=True)
class PlanProblem:
    """The planning problem of one joint graph.

    Attributes:
        values: forward values in topological order.
        n_steps: number of backward steps.
        base_bytes: per backward step, the bytes that do not depend on the plan
            (parameters, gradients, temporaries, optimizer state).
        end_of_forward_base: the same at the end of forward (parameters, outputs, ...).
        budget_bytes: peak-memory budget.
    """

    values: tuple[PlanValue, ...]
    n_steps: int
    base_bytes: tuple[int, ...]
    end_of_forward_base: int
    budget_bytes: int


@dataclass(frozen=True)
class GraphPlan:
    """A solved plan.

    Attributes:
        recompute: values recomputed in backward.
        save: values kept for backward (read by backward or by a recomputation).
        recompute_ms: total recompute time (``evaluate_plan``).
        peak_bytes: peak memory of the plan (``evaluate_plan``), at most the budget.
        status: ``"optimal"``, or ``"feasible"`` when the time limit stopped the search.
        gap: relative gap to the solver's bound (``inf`` when the plan costs 0 ms more
            than a bound of 0); ``None`` when no solver ran.
        solve_s: wall-clock seconds, model building and every round included.
        n_vars: variables of the final model.
        n_constraints: constraints of the final model.
    """

    recompute: frozenset[str]
    save: frozenset[str]
    recompute_ms: float
    peak_bytes: int
    status: str
    gap: float | None
    solve_s: float
    n_vars: int
    n_constraints: int


def _fmt_bytes(nbytes: float) -> str:
    return f"{nbytes / 2**30:.3f} GiB" if abs(nbytes) >= 2**30 else f"{nbytes / 2**20:.3f} MiB"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_problem(problem: PlanProblem) -> dict[str, int]:
    """Validates ``problem`` (ValueError naming the culprit); returns each name's index."""
    if not _is_int(problem.n_steps) or problem.n_steps < 0:
        raise ValueError(f"n_steps must be an int >= 0, got {problem.n_steps!r}")
    if len(problem.base_bytes) != problem.n_steps:
        raise ValueError(
            f"base_bytes has {len(problem.base_bytes)} entries for n_steps={problem.n_steps}"
        )
    for what, number in (
        ("end_of_forward_base", problem.end_of_forward_base),
        ("budget_bytes", problem.budget_bytes),
        *(("every base_bytes entry", b) for b in problem.base_bytes),
    ):
        if not _is_int(number) or number < 0:
            raise ValueError(f"{what} must be an int >= 0, got {number!r}")
    index: dict[str, int] = {}
    for position, v in enumerate(problem.values):
        if v.name in index:
            raise ValueError(f"value {v.name!r} appears twice; value names must be unique")
        index[v.name] = position
    for position, v in enumerate(problem.values):
        where = f"value {v.name!r}"
        if not _is_int(v.nbytes) or v.nbytes < 0:
            raise ValueError(f"{where}: nbytes must be an int >= 0, got {v.nbytes!r}")
        if not (isinstance(v.recompute_ms, (int, float)) and math.isfinite(v.recompute_ms)
                and v.recompute_ms >= 0):
            raise ValueError(f"{where}: recompute_ms must be a finite number >= 0")
        if v.must_save and v.must_recompute:
            raise ValueError(f"{where} is both must_save and must_recompute")
        if (v.bw_first_use is None) != (v.bw_last_use is None):
            raise ValueError(f"{where}: give both bw_first_use and bw_last_use, or neither")
        if v.bw_first_use is not None and not (
            _is_int(v.bw_first_use) and _is_int(v.bw_last_use)
            and 0 <= v.bw_first_use <= v.bw_last_use < problem.n_steps
        ):
            raise ValueError(
                f"{where}: need 0 <= bw_first_use <= bw_last_use < n_steps={problem.n_steps}, "
                f"got {v.bw_first_use!r} and {v.bw_last_use!r}"
            )
        later = [u for u in v.inputs if index.get(u, -1) >= position]
        if later:
            raise ValueError(
                f"{where} reads {later}, which do not come before it; give the values in "
                "topological order"
            )
    return index


@dataclass(frozen=True)
class _Profile:
    """Memory of one plan under the memory model: the evaluator's answer."""

    end_of_forward: int
    steps: tuple[int, ...]
    recompute_ms: float
    save: frozenset[str]

    @property
    def peak(self) -> int:
        return max(self.end_of_forward, max(self.steps, default=0))


def _memory_profile(
    problem: PlanProblem, index: dict[str, int], recompute: Iterable[str]
) -> _Profile:
    """Memory at the end of forward and at every backward step; ValueError if invalid."""
    values = problem.values
    recomputed = set(recompute)
    unknown = sorted(recomputed - index.keys())
    if unknown:
        raise ValueError(f"the plan recomputes values that are not in the problem: {unknown}")
    is_rec = [v.name in recomputed for v in values]
    groups: dict[str, list[str]] = {}
    for v in values:
        if v.must_save and v.name in recomputed:
            raise ValueError(f"value {v.name!r} is must_save but the plan recomputes it")
        if v.group is not None:
            groups.setdefault(v.group, []).append(v.name)
    for group, members in groups.items():
        chosen = [name for name in members if name in recomputed]
        if chosen and len(chosen) != len(members):
            raise ValueError(
                f"group {group!r} is split: the plan recomputes {chosen} but not "
                f"{[name for name in members if name not in recomputed]}"
            )
    # Recomputed consumers of each value, and each recomputed value's first need.
    readers: list[list[int]] = [[] for _ in values]
    for x, v in enumerate(values):
        if is_rec[x]:
            for u in {index[name] for name in v.inputs if name in index}:
                readers[u].append(x)
    first: list[int | None] = [None] * len(values)
    for i in reversed(range(len(values))):
        if is_rec[i]:
            own = [] if values[i].bw_first_use is None else [values[i].bw_first_use]
            needs = own + [first[x] for x in readers[i] if first[x] is not None]
            first[i] = min(needs, default=None)
    live = [0] * (problem.n_steps + 1)
    end_of_forward = problem.end_of_forward_base
    save = []
    for i, v in enumerate(values):
        saved = not is_rec[i] and (v.bw_first_use is not None or bool(readers[i]))
        if saved and v.must_recompute:
            if v.bw_first_use is not None:
                raise ValueError(
                    f"value {v.name!r} is read by backward and must be recomputed "
                    "(must_recompute), but the plan does not recompute it"
                )
            raise ValueError(
                f"recomputing {values[readers[i][0]].name!r} needs its input {v.name!r}, "
                "which is neither saved (it is must_recompute) nor recomputed"
            )
        own = [] if v.bw_last_use is None else [v.bw_last_use]
        last = max(own + [first[x] for x in readers[i] if first[x] is not None], default=None)
        if saved:
            save.append(v.name)
            end_of_forward += v.nbytes
            if last is not None:
                live[0] += v.nbytes
                live[last + 1] -= v.nbytes
        elif is_rec[i] and first[i] is not None:
            assert last is not None and last >= first[i]
            live[first[i]] += v.nbytes
            live[last + 1] -= v.nbytes
    steps, running = [], 0
    for base, change in zip(problem.base_bytes, live):
        running += change
        steps.append(base + running)
    return _Profile(
        end_of_forward=end_of_forward,
        steps=tuple(steps),
        recompute_ms=sum(v.recompute_ms for i, v in enumerate(values) if is_rec[i]),
        save=frozenset(save),
    )


def evaluate_plan(problem: PlanProblem, recompute: set[str]) -> tuple[int, float]:
    """Peak bytes and recompute ms of recomputing ``recompute`` (no solver involved).

    Every value that backward or a recomputation reads and that is not recomputed is
    kept. Lifetimes follow the module's memory model: a kept value is live from the end
    of forward to its last need, a recomputed one from its first need to its last.

    Raises:
        ValueError: an invalid problem, or an invalid plan: an unknown name, a must_save
            value recomputed, a group split, or a value that would have to be kept
            although it is must_recompute (read by backward, or an input of a recomputed
            value, and not recomputed).
    """
    index = _check_problem(problem)
    profile = _memory_profile(problem, index, recompute)
    return profile.peak, profile.recompute_ms


@dataclass(frozen=True)
class _Structure:
    """What the model needs to know about a problem (indices follow ``problem.values``).

    Attributes:
        index: each value's index by name.
        inputs, consumers: in-problem inputs and consumers, without duplicates.
        read: backward reads the value directly.
        grouped: the value shares its group with at least one other value.
        group_rep: index of the first value of its group (itself outside groups).
        may_recompute: some optimal plan might recompute it (it can be recomputed, and it
            is read by backward, by a value that may be recomputed, or is grouped).
        may_save: some plan might keep it.
        times: sorted steps at which a recomputation can start (first reads).
        candidates: per value, a bitmask over ``times``: the steps it may be recomputed at.
        check_steps: backward steps whose memory no earlier step dominates.
        certain_peak: a lower bound on the peak of every plan.
    """

    index: dict[str, int]
    inputs: tuple[tuple[int, ...], ...]
    consumers: tuple[tuple[int, ...], ...]
    read: tuple[bool, ...]
    grouped: tuple[bool, ...]
    group_rep: tuple[int, ...]
    may_recompute: tuple[bool, ...]
    may_save: tuple[bool, ...]
    times: tuple[int, ...]
    candidates: tuple[int, ...]
    check_steps: tuple[int, ...]
    certain_peak: int


def _analyze(problem: PlanProblem) -> _Structure:
    index = _check_problem(problem)
    values = problem.values
    n = len(values)
    inputs = tuple(
        tuple(dict.fromkeys(index[u] for u in v.inputs if u in index)) for v in values
    )
    consumers: list[list[int]] = [[] for _ in values]
    for x in range(n):
        for u in inputs[x]:
            consumers[u].append(x)
    read = tuple(v.bw_first_use is not None for v in values)
    groups: dict[str, list[int]] = {}
    for i, v in enumerate(values):
        if v.group is not None:
            groups.setdefault(v.group, []).append(i)
    members = [groups[v.group] if v.group is not None else [i] for i, v in enumerate(values)]

    # Recomputable: not must_save (anywhere in its group), and every input that must be
    # recomputed is recomputable (a fixpoint, since groups tie values across the order).
    can = [not any(values[j].must_save for j in members[i]) for i in range(n)]
    changed = True
    while changed:
        changed = False
        for i in range(n):
            if can[i] and any(values[u].must_recompute and not can[u] for u in inputs[i]):
                for j in members[i]:
                    can[j] = False
                changed = True
    for i, v in enumerate(values):
        if read[i] and v.must_recompute and not can[i]:
            raise ValueError(
                f"value {v.name!r} is read by backward and must be recomputed, but it cannot "
                "be: its group has a must_save value, or an input that must be recomputed "
                "cannot be; no plan exists"
            )

    may_recompute = [False] * n
    for i in reversed(range(n)):
        may_recompute[i] = can[i] and (
            len(members[i]) > 1 or read[i] or any(may_recompute[x] for x in consumers[i])
        )
    may_save = tuple(
        not v.must_recompute and (read[i] or any(may_recompute[x] for x in consumers[i]))
        for i, v in enumerate(values)
    )
    times = tuple(sorted({v.bw_first_use for i, v in enumerate(values)
                          if read[i] and may_recompute[i]}))
    position = {t: k for k, t in enumerate(times)}
    candidates = [0] * n
    for i in reversed(range(n)):
        if may_recompute[i]:
            mask = 1 << position[values[i].bw_first_use] if read[i] else 0
            for x in consumers[i]:
                mask |= candidates[x]
            candidates[i] = mask

    # Between two first reads the live set only shrinks: a step is dominated by an earlier
    # one of its stretch (or by the end of forward) with at least as many base bytes.
    check_steps, running, starts = [], problem.end_of_forward_base, set(times)
    for t, base in enumerate(problem.base_bytes):
        if t in starts or base > running:
            check_steps.append(t)
            running = base
    # Values read by backward are live while it reads them, in every plan; values that
    # cannot be recomputed from the end of forward on.
    certain = [0] * (problem.n_steps + 1)
    end_of_forward = problem.end_of_forward_base
    for i, v in enumerate(values):
        if read[i]:
            start = v.bw_first_use if may_recompute[i] else 0
            certain[start] += v.nbytes
            certain[v.bw_last_use + 1] -= v.nbytes
            end_of_forward += 0 if may_recompute[i] else v.nbytes
    certain_peak, running = end_of_forward, 0
    for base, change in zip(problem.base_bytes, certain):
        running += change
        certain_peak = max(certain_peak, base + running)
    return _Structure(
        index=index,
        inputs=inputs,
        consumers=tuple(tuple(c) for c in consumers),
        read=read,
        grouped=tuple(len(m) > 1 for m in members),
        group_rep=tuple(m[0] for m in members),
        may_recompute=tuple(may_recompute),
        may_save=may_save,
        times=times,
        candidates=tuple(candidates),
        check_steps=tuple(check_steps),
        certain_peak=certain_peak,
    )


def _is_zero(term: _Term) -> bool:
    return isinstance(term, (int, float)) and term == 0


def _linear(*pairs: tuple[float, _Term]) -> mip.LinExpr:
    """The sum of ``coefficient * term``. Always build expressions with it: in python-mip
    2.0, ``v - v`` for one variable ``v`` is ``-v``, not 0."""
    return xsum(coefficient * term for coefficient, term in pairs if not _is_zero(term))


class _PlanModel:
    """The MILP of one problem. Memory rows of backward steps are added on request.

    With ``minimize_peak`` the objective is a variable ``peak`` that bounds every memory
    row instead of the budget.
    """

    def __init__(
        self, problem: PlanProblem, st: _Structure, options: SolverOptions, minimize_peak: bool
    ) -> None:
        values = problem.values
        self.problem, self.st, self.minimize_peak = problem, st, minimize_peak
        name = "graph_plan_min_peak" if minimize_peak else "graph_plan"
        self.model = m = new_model(name, "MIN", options)
        import os
        for k in ("cuts", "emphasis", "preprocess", "clique", "cut_passes", "lp_method"):
            if os.environ.get("GP_" + k.upper()):
                setattr(m, k, int(os.environ["GP_" + k.upper()]))
        largest = max([v.nbytes for v in values] + [1])
        # Bytes in units of a power of two: exact, and coefficients of at most 2**12.
        self.unit = 2 ** max(0, (largest - 1).bit_length() - _MAX_COEFFICIENT.bit_length() + 1)
        self.rows: dict[int | None, mip.Constr] = {}
        self._z: dict[tuple[int, int], _Term] = {}
        self._live: dict[tuple[object, ...], mip.Var] = {}
        self._end = problem.n_steps - 1

        # r_v: v is recomputed (one variable per group).
        shared: dict[int, mip.Var] = {}
        self.r: list[mip.Var | None] = []
        for i in range(len(values)):
            if st.may_recompute[i] and st.group_rep[i] not in shared:
                shared[st.group_rep[i]] = m.add_var(name=f"r_{i}", var_type=BINARY)
            self.r.append(shared.get(st.group_rep[i]) if st.may_recompute[i] else None)
        # s_v: v is kept for backward (1 - r_v for values that backward reads).
        self.s: list[_Term] = []
        for i in range(len(values)):
            if not st.may_save[i]:
                self.s.append(0)
            elif st.read[i]:
                self.s.append(1 if self.r[i] is None else 1 - self.r[i])
            else:
                self.s.append(m.add_var(name=f"s_{i}", var_type=BINARY))

        # A value read by backward that must be recomputed is recomputed.
        for i, v in enumerate(values):
            if st.read[i] and v.must_recompute:
                self.r[i].lb = 1
        for i in range(len(values)):
            if st.read[i]:
                continue
            readers = [self.r[x] for x in st.consumers[i] if self.r[x] is not None]
            # Kept or recomputed, not both (for values read by backward, s = 1 - r).
            if not _is_zero(self.s[i]) and self.r[i] is not None:
                m += self.s[i] + self.r[i] <= 1
            # A value is kept only for a recomputation that reads it.
            if not _is_zero(self.s[i]):
                m += self.s[i] <= xsum(readers)
            # Outside groups, a value is recomputed only for a recomputation that reads it.
            if self.r[i] is not None and not st.grouped[i]:
                m += self.r[i] <= xsum(readers)
        # Recomputing a value needs each of its inputs kept or recomputed.
        for x, r_x in enumerate(self.r):
            for u in st.inputs[x] if r_x is not None else ():
                if st.read[u] or self.r[u] is r_x:
                    continue
                assert not (_is_zero(self.s[u]) and self.r[u] is None), (x, u)
                m += xsum(t for t in (self.s[u], self.r[u]) if t is not None and not _is_zero(t)) >= r_x

        costs: dict[mip.Var, float] = {}
        sizes: dict[mip.Var, float] = {}
        for i, v in enumerate(values):
            if self.r[i] is not None:
                costs[self.r[i]] = costs.get(self.r[i], 0.0) + v.recompute_ms
                sizes[self.r[i]] = sizes.get(self.r[i], 0.0) + v.nbytes / self.unit
        if minimize_peak:
            self.peak = m.add_var(name="peak", lb=st.certain_peak / self.unit)
            import os
            w = float(os.environ.get("GP_PEAK_TB", "0"))
            total = sum(costs.values()) or 1.0
            m.objective = self.peak + xsum(w * st.certain_peak / self.unit / total * costs[r] * r for r in costs)
        else:
            positive = [c for c in costs.values() if c > 0]
            weight = _TIE_BREAK * min(positive, default=1.0) / (sum(sizes.values()) + len(sizes) + 1)
            m.objective = xsum((costs[r] + weight * (sizes[r] + 1)) * r for r in costs)
            if os.environ.get("GP_ABS"):
                m.max_mip_gap_abs = float(os.environ["GP_ABS"]) * sum(v.recompute_ms for v in values)
        # Memory at the end of forward: base + kept values.
        self._add_row(
            None,
            [(v.nbytes, self.s[i]) for i, v in enumerate(values) if v.nbytes],
            problem.end_of_forward_base,
        )

    def _z_index(self, v: int, step: int) -> int | None:
        """Index into ``times`` of v's last possible recompute start <= step, or None."""
        if step < 0 or not self.st.may_recompute[v]:
            return None
        mask = self.st.candidates[v] & ((1 << bisect_right(self.st.times, step)) - 1)
        return mask.bit_length() - 1 if mask else None

    def _z_known(self, v: int, step: int) -> _Term | None:
        """z_v at ``step`` if it is a constant, r_v, or already built; else None."""
        k = self._z_index(v, step)
        if k is None:
            return 0
        if self.st.read[v] and self.st.times[k] >= self.problem.values[v].bw_first_use:
            return self.r[v]
        return self._z.get((v, k))

    def z(self, v: int, step: int) -> _Term:
        """1 when v is recomputed at or before backward step ``step``, else 0."""
        known = self._z_known(v, step)
        if known is not None:
            return known
        at = self.st.times[self._z_index(v, step)]
        stack = [v]
        while stack:
            u = stack[-1]
            if self._z_known(u, at) is not None:
                stack.pop()
                continue
            pending = [x for x in self.st.consumers[u] if self._z_known(x, at) is None]
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            self._z[(u, self._z_index(u, at))] = self._new_z(u, at)
        return self._z_known(v, step)

    def _new_z(self, u: int, at: int) -> _Term:
        m = self.model
        terms = [t for t in (self._z_known(x, at) for x in self.st.consumers[u]) if not _is_zero(t)]
        if len(terms) == 1 and _is_zero(self.s[u]):
            return terms[0]  # z_u = r_u AND z_x = z_x, since r_x <= r_u
        assert terms, (u, at)
        z_u = m.add_var(name=f"z_{u}_{at}", lb=0, ub=1)
        # Recomputed by step t: a consumer recomputed by t needs u kept or recomputed by t;
        for term in terms:
            m += z_u >= _linear((1, term), (-1, self.s[u]))
        # and u is recomputed by t only if it is recomputed and some consumer is.
        m += z_u <= self.r[u]
        m += z_u <= xsum(terms)
        return z_u

    def add_step(self, t: int) -> None:
        """Adds the memory row of backward step ``t``."""
        st, values = self.st, self.problem.values
        constant, terms = self.problem.base_bytes[t], []
        for i, v in enumerate(values):
            if not v.nbytes or (_is_zero(self.s[i]) and self.r[i] is None):
                continue
            if st.read[i] and t <= v.bw_last_use:
                if t >= v.bw_first_use:
                    constant += v.nbytes
                else:
                    terms += [(v.nbytes, self.s[i]), (v.nbytes, self.z(i, t))]
                continue
            extending = [x for x in st.consumers[i] if self._latest(x) >= t]
            start = _linear((1, 1)) if st.read[i] else _linear((1, self.s[i]), (1, self.z(i, t)))
            if not extending or not (st.read[i] or start.expr):
                continue
            # One variable serves every step at which the terms below are the same variables.
            key = (i, None if st.read[i] else self._z_index(i, t),
                   tuple((x, self._z_index(x, t - 1)) for x in extending))
            if key not in self._live:
                live = self._live[key] = self.model.add_var(name=f"live_{i}_{t}", lb=0, ub=1)
                # Past its last read, a value is live while a needed consumer is not recomputed yet.
                for x in extending:
                    self.model += live >= start + _linear(
                        (1, self.z(x, self._end)), (-1, self.z(x, t - 1)), (-1, 1))
            terms.append((v.nbytes, self._live[key]))
        self._add_row(t, terms, constant)

    def _latest(self, x: int) -> int:
        """Latest step at which x may be recomputed (-1: never)."""
        mask = self.st.candidates[x]
        if self.st.read[x]:
            return self.problem.values[x].bw_first_use
        return self.st.times[mask.bit_length() - 1] if mask else -1

    def _add_row(self, step: int | None, terms: list[tuple[int, _Term]], constant: int) -> None:
        constant += sum(nbytes * term for nbytes, term in terms if isinstance(term, int))
        expr = xsum(nbytes / self.unit * term for nbytes, term in terms if not isinstance(term, int))
        if self.minimize_peak:
            # Memory at this point is at most the peak.
            self.rows[step] = self.model.add_constr(expr - self.peak <= -constant / self.unit)
        elif expr.expr:
            # Memory at this point is within the budget.
            self.rows[step] = self.model.add_constr(
                expr <= (self.problem.budget_bytes - constant) / self.unit)
        else:
            assert constant + expr.const * self.unit <= self.problem.budget_bytes, (step, constant)

    def tighten(self, step: int | None, excess_bytes: int) -> None:
        """Lowers a row's bound after a rounded solution exceeded it by ``excess_bytes``."""
        row = self.rows[step]
        row.rhs = row.rhs - excess_bytes / self.unit

    def recompute(self) -> frozenset[str]:
        return frozenset(
            v.name for v, r in zip(self.problem.values, self.r) if r is not None and r.x >= 0.5
        )


@dataclass(frozen=True)
class _Solved:
    recompute: frozenset[str]
    profile: _Profile
    status: str  # "optimal" or "feasible"
    gap: float | None  # None: no solver ran
    n_vars: int
    n_constraints: int


def _solve_lazily(
    problem: PlanProblem, st: _Structure, options: SolverOptions, minimize_peak: bool
) -> _Solved:
    """Solves, evaluates the answer at every step, adds the violated rows, and repeats.

    With ``minimize_peak``, every round's answer is a plan whose evaluated peak bounds the
    smallest peak from above; when the time limit ends the rounds, the best one is
    returned (status "feasible", logged at warning level).

    Raises what ``_mip.solve`` raises; ``NoSolutionError`` also when the time limit ends
    the rounds before a plan fits the budget at every step.
    """
    if not any(st.may_recompute):
        # Nothing to decide: every value that backward reads is kept.
        return _Solved(frozenset(), _memory_profile(problem, st.index, ()), "optimal", None, 0, 0)
    start = time.perf_counter()
    pm = _PlanModel(problem, st, options, minimize_peak)
    best: _Solved | None = None
    rows_per_round = _PEAK_ROWS_PER_ROUND if minimize_peak else _ROWS_PER_ROUND
    for rounds in range(1, len(st.check_steps) + 64):
        round_options = options
        if options.time_limit_s is not None:
            left = options.time_limit_s - (time.perf_counter() - start)
            if left <= 0 and best is not None:
                logger.warning(
                    "%s: the time limit (%s s) ran out after %d rounds; the smallest peak "
                    "found is %d B, at most %.2f%% above the smallest possible",
                    pm.model.name, options.time_limit_s, rounds - 1, best.profile.peak,
                    100 * best.gap,
                )
                return best
            if left <= 0:
                raise NoSolutionError(
                    f"{pm.model.name}: the time limit ({options.time_limit_s} s) ran out after "
                    f"{rounds - 1} rounds, before a plan fitted every backward step; raise "
                    "SolverOptions.time_limit_s"
                )
            if minimize_peak:
                left = max(left / float(os.environ.get("GP_DIV", "1")), min(left, 1.0))
            round_options = dataclasses.replace(options, time_limit_s=left)
        try:
            outcome = solve(pm.model, round_options)
        except NoSolutionError:
            if best is None:
                raise
            logger.warning("%s: no plan in round %d; returning the best earlier one (%d B)",
                           pm.model.name, rounds, best.profile.peak)
            return best
        recompute = pm.recompute()
        profile = _memory_profile(problem, st.index, recompute)
        limit = (math.floor(pm.peak.x * pm.unit + 0.5) if minimize_peak
                 else problem.budget_bytes)
        over = [(profile.steps[t] - limit, t) for t in st.check_steps if profile.steps[t] > limit]
        if profile.end_of_forward > limit:
            over.append((profile.end_of_forward - limit, None))
        logger.debug(
            "%s round %d: %d rows, %s %.6g, %d steps over %d B",
            pm.model.name, rounds, len(pm.rows), outcome.status, outcome.objective_value,
            len(over), limit,
        )
        if minimize_peak:
            bound = outcome.objective_bound * pm.unit
            gap = max(0.0, (profile.peak - bound) / profile.peak) if profile.peak else 0.0
        else:
            gap = outcome.gap
        solved = _Solved(
            recompute, profile, "optimal" if outcome.status == "OPTIMAL" and not over else
            "feasible", gap, pm.model.num_cols, pm.model.num_rows,
        )
        if minimize_peak and (best is None or profile.peak < best.profile.peak):
            best = dataclasses.replace(solved, status="feasible")
        if not over:
            return solved if best is None or solved.profile.peak <= best.profile.peak else best
        added = 0
        for excess, step in sorted(over, key=lambda item: -item[0]):
            if step in pm.rows:
                pm.tighten(step, excess)  # a rounding artefact of the solver: rare
            elif added < rows_per_round:
                pm.add_step(step)
                added += 1
    raise AssertionError(f"{pm.model.name}: the lazy rows did not converge")


def min_feasible_peak(problem: PlanProblem, options: SolverOptions | None = None) -> int:
    """The smallest peak (bytes) of any valid plan, whatever the budget.

    Solves the model of ``solve_graph_plan`` with the peak as the objective instead of the
    budget, to a gap of 0 unless ``options.mip_gap`` says otherwise; the answer is the
    evaluated peak of the plan found (an upper bound if the time limit stops the search,
    logged at warning level).

    Raises:
        ValueError: an invalid problem, or one where no plan exists at all.
        SolverError: a solver failure.
    """
    options = options if options is not None else SolverOptions()
    return _solve_lazily(problem, _analyze(problem), options, True).profile.peak


def _over_budget(problem: PlanProblem, st: _Structure, options: SolverOptions) -> InfeasibleError:
    smallest = _solve_lazily(problem, st, options, True).profile.peak
    assert smallest > problem.budget_bytes, (smallest, problem.budget_bytes)
    return InfeasibleError(
        f"budget {problem.budget_bytes} B ({_fmt_bytes(problem.budget_bytes)}) is below the "
        f"smallest feasible peak {smallest} B ({_fmt_bytes(smallest)}, found by minimising the "
        f"peak over the same model); raise budget_bytes to at least {smallest}"
    )


def solve_graph_plan(problem: PlanProblem, options: SolverOptions | None = None) -> GraphPlan:
    """Keeps or recomputes each forward value to minimise recompute time within the budget.

    Args:
        problem: the values, backward steps, base memory and budget.
        options: solver options; ``SolverOptions()`` (CBC) by default. The time limit
            covers all rounds of the lazy rows.

    Returns:
        The plan, with its peak and recompute time from ``evaluate_plan``. Its status is
        ``"feasible"`` (with the gap, logged at warning level) when the time limit
        stopped the search with a plan that fits.

    Raises:
        ValueError: an invalid problem, or one where no plan exists at all.
        InfeasibleError: no plan fits the budget; the message names the smallest feasible
            peak (``min_feasible_peak``, computed on the spot).
        NoSolutionError: the time limit ran out before any plan fitted.
        SolverError: any other solver failure.
    """
    options = options if options is not None else SolverOptions()
    start = time.perf_counter()
    st = _analyze(problem)
    if problem.budget_bytes < st.certain_peak:
        raise _over_budget(problem, st, options)
    try:
        solved = _solve_lazily(problem, st, options, minimize_peak=False)
    except InfeasibleError as err:
        raise _over_budget(problem, st, options) from err
    if solved.profile.peak > problem.budget_bytes:
        assert solved.gap is None  # the solver's answers always fit
        raise _over_budget(problem, st, options)
    return GraphPlan(
        recompute=solved.recompute,
        save=solved.profile.save,
        recompute_ms=solved.profile.recompute_ms,
        peak_bytes=solved.profile.peak,
        status=solved.status,
        gap=solved.gap,
        solve_s=time.perf_counter() - start,
        n_vars=solved.n_vars,
        n_constraints=solved.n_constraints,
    )
