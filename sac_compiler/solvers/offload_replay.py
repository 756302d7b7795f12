"""Replay a keep / recompute / offload plan on a copy-stream timeline: the check of ``offload_plan``.

This module shares no constraint-building code with the program. It takes the problem's data (the
candidates, the baseline, the compute timeline, the link) and a plan, and runs the step as the
emitted graphs would:

* forward: each offloaded value's copy to the host is issued once its last forward read has run,
  onto one copy stream (first in, first out). The compute stream waits at the end of forward for
  every copy still running (exposed forward time), and then frees the device copies: at the
  forward's own peak (``forward_peak``) they are all still there, unless the forward waits for
  each copy once it has finished (``forward_peak_ms``): then those finished by the peak's op are
  gone there. Where the forward waits for each copy as soon as it is issued
  (``forward_copies_synchronous``), the compute stream stands still for the whole copy and the
  value is freed before the next op;
* backward, at each step ``t``: the reloads that start at ``t`` are issued onto the copy stream (in
  the order of their first reads), the reload buffer is allocated; then the compute stream waits
  for every reload read at ``t`` (exposed backward time), then the step's compute runs;
* a pinned host buffer is held from its copy's issue until its reload has finished.

Recomputation's effect on memory is the savings model's own evaluation (``savings_profile``); the
replay adds the offloaded values: gone at step 0 (the end of forward, after its waits), on the
device again from their reload's start.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from sac_compiler.solvers.offload_plan import OffloadProblem
from sac_compiler.solvers.savings_plan import plan_time_ms, savings_profile


@dataclass(frozen=True)
class Replay:
    """What a plan does on the timeline.

    Attributes:
        profile: device bytes at every step (step 0: the end of forward, after its waits).
        forward_peak_bytes: device bytes at the forward's own peak (None: the problem has none).
        peak_bytes: the largest of all of them.
        host_peak_bytes: the most pinned host bytes held at once.
        forward_stall_ms: time the compute stream waits in forward for copies (at its end; at each
            copy, where they are synchronous).
        backward_stall_ms: time it waits in backward for reloads, in all.
        stalls: per backward step, the wait before it (steps without one left out).
        time_ms: recompute time and keep costs (the savings model's) plus both stalls.
    """

    profile: tuple[int, ...]
    forward_peak_bytes: int | None
    peak_bytes: int
    host_peak_bytes: int
    forward_stall_ms: float
    backward_stall_ms: float
    stalls: Mapping[int, float]
    time_ms: float

    @property
    def exposed_ms(self) -> float:
        """Transfer time that compute did not hide."""
        return self.forward_stall_ms + self.backward_stall_ms


def replay(problem: OffloadProblem, recompute: Iterable[str] = (), kept: Iterable[str] = (),
           offload: Mapping[str, int] | None = None) -> Replay:
    """Run ``plan`` (recompute, kept for recompute, offload: value -> reload start step) on the timeline.

    Raises ValueError for a plan the emitted graphs cannot run: an offloaded value that is also
    recomputed, that a recomputed value reads, that backward never reads, or whose reload starts
    outside ``[1, first use]``."""
    recompute, kept = set(recompute), set(kept)
    offload = dict(offload or {})
    cands = {c.name: c for c in problem.savings.candidates}
    order = {c.name: i for i, c in enumerate(problem.savings.candidates)}
    steps = len(problem.savings.baseline)
    for name, start in offload.items():
        c = cands.get(name)
        if c is None:
            raise ValueError(f"offloaded value {name} is not a candidate")
        if name in recompute:
            raise ValueError(f"{name} is both offloaded and recomputed")
        if c.first_use is None:
            raise ValueError(f"{name} is offloaded but backward never reads it")
        if not 1 <= start <= c.first_use:
            raise ValueError(f"{name}: reload start {start} is outside [1, first use {c.first_use}]")
        readers = [v for v in recompute if name in cands[v].inputs]
        if readers:
            raise ValueError(f"{name} is offloaded but recomputed {sorted(readers)[0]} reads it")

    def copy_ms(name: str) -> float:
        return 1e3 * cands[name].nbytes / problem.bandwidth

    events: list[tuple[float, int]] = []  # (time, host bytes +/-) for the host peak
    # forward: one FIFO copy stream, copies in the order their last forward reads run
    stream = 0.0
    finished: dict[str, float] = {}  # on the compute timeline without the forward's stalls
    waited = 0.0  # synchronous copies: the compute stream's waits so far
    for name in sorted(offload, key=lambda n: (problem.ready_ms.get(n, problem.forward_ms), order[n])):
        ready_at = problem.ready_ms.get(name, problem.forward_ms)
        if problem.forward_copies_synchronous:
            # issued after its last read; the compute waits for it there, before its next op
            events.append((ready_at + waited, cands[name].nbytes))
            waited += copy_ms(name)
            finished[name] = ready_at
            stream = problem.forward_ms + waited
            continue
        begin = max(stream, ready_at)
        stream = finished[name] = begin + copy_ms(name)
        events.append((begin, cands[name].nbytes))
    forward_stall = waited if problem.forward_copies_synchronous else max(0.0, stream - problem.forward_ms)

    # backward
    now = problem.forward_ms + forward_stall
    ready: dict[str, float] = {}
    stalls: dict[int, float] = {}
    for t in range(steps):
        for name in sorted((n for n, s in offload.items() if s == t), key=lambda n: (cands[n].first_use, order[n])):
            begin = max(stream, now)
            stream = begin + copy_ms(name)
            ready[name] = stream
            events.append((stream, -cands[name].nbytes))
        waits = [ready[n] for n in offload if cands[n].first_use == t]
        wait = max(0.0, max(waits, default=now) - now)
        if wait > 0:
            stalls[t] = wait
        now += wait + problem.step_ms[t]

    saved = savings_profile(problem.savings, recompute, kept)
    profile = []
    for t in range(steps):
        away = sum(cands[n].nbytes for n, s in offload.items() if t < s)
        profile.append(problem.savings.baseline[t] - saved[t] - away)
    # the forward's peak, before its waits: the offloaded values are there, the recomputed ones are
    # gone as far as the savings model has them gone at step 0
    forward_peak = None if problem.forward_peak is None else problem.forward_peak - saved[0]
    if forward_peak is not None and problem.forward_peak_ms is not None:
        # waits mid-forward: a copy finished by the peak's op has been waited for, its value freed
        forward_peak -= sum(cands[n].nbytes for n, t in finished.items() if t <= problem.forward_peak_ms)
    host = peak_host = 0
    for _, delta in sorted(events, key=lambda e: (e[0], -e[1])):  # at a tie, count the allocation first
        host += delta
        peak_host = max(peak_host, host)
    backward_stall = sum(stalls.values())
    return Replay(
        profile=tuple(profile), forward_peak_bytes=forward_peak,
        peak_bytes=max([*profile, *([forward_peak] if forward_peak is not None else [])], default=0),
        host_peak_bytes=peak_host,
        forward_stall_ms=forward_stall, backward_stall_ms=backward_stall, stalls=stalls,
        time_ms=plan_time_ms(problem.savings, recompute, kept) + forward_stall + backward_stall)


__all__ = ["Replay", "replay"]
