"""Per-module SAC statistics, their greedy recomputation order and trade-off curve.

Torch-free ports of the records and helpers of PyTorch's eager SAC estimator
(``torch.distributed._tools.sac_estimator``): ``SACStats``, ``MSPS``,
``SACGreedyOrderMeta``, ``SACTradeOffStats``, ``SACEstimator._get_greedy_order_meta``,
``SACEstimator._get_sac_tradeoff_pwlf_stats`` and the two ``display_*`` tables (here
returning strings instead of printing).

Index meanings are PyTorch's: ops are numbered in execution order inside one module;
``view_like_ops`` and ``rand_ops`` list op indices; ``inplace_ops`` lists
``(op_idx, parent_idx)`` pairs where ``parent_idx`` is the first op that produced the
storage the in-place op writes (``parent_idx == op_idx`` when the storage came from
outside the module, e.g. an in-place op on an input).

Deliberate differences from PyTorch, all without changing any result on its inputs:

* the greedy order breaks MSPS ties by op index (PyTorch breaks them by set iteration
  order), and the pwlf fit is seeded, so both are reproducible;
* "store the in-place group if it contains a random op and ``force_store_random``"
  is tested as a boolean (PyTorch's ``flag & len(...) > 0`` only fires for odd counts);
* zero totals (a module whose ops have no memory or no runtime) give a flat curve
  instead of a ``ZeroDivisionError``;
* the trade-off graph is written to ``f"{filename}.png"`` (the caller picks the folder)
  through matplotlib's object API, without touching pyplot's global state.
"""

from __future__ import annotations

import logging
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "MSPS",
    "SACGreedyOrderMeta",
    "SACStats",
    "SACTradeOffStats",
    "format_sac_stats",
    "format_sac_tradeoff_stats",
    "get_greedy_order_meta",
    "get_sac_tradeoff_pwlf_stats",
]

logger = logging.getLogger(__name__)

# Offset PyTorch adds to every x of the trade-off curve (discarded-memory ratio).
_TRADEOFF_X_DELTA = 1e-2
# pwlf's own differential-evolution defaults, repeated so that a seed can be added:
# pwlf drops all of its defaults as soon as any keyword is passed to ``fit``.
_PWLF_DE_OPTIONS: dict[str, object] = {
    "strategy": "best1bin",
    "maxiter": 1000,
    "popsize": 50,
    "tol": 1e-3,
    "mutation": (0.5, 1),
    "recombination": 0.7,
    "polish": True,
    "init": "latinhypercube",
    "atol": 1e-4,
}


@dataclass
class SACStats:
    """Activation-checkpointing statistics of the ops of one module.

    Attributes:
        func_names: operator names (``aten`` overload packet names), one per op.
        runtimes: operator runtimes in milliseconds.
        memory: operator output memory in bytes (0 for view-like ops; 0 for the
            module's last op, which is always stored as the block's output).
        view_like_ops: indices of view-like operators.
        rand_ops: indices of random operators.
        saved_autograd_ops: indices of ops whose outputs autograd saves.
        inplace_ops: ``(op_idx, first_parent_idx)`` for every in-place operator.
        force_store_random: whether random ops must be stored (the module had no
            tensor inputs, so their RNG state cannot be replayed).
    """

    func_names: list[str]
    runtimes: list[float]
    memory: list[int]
    view_like_ops: list[int]
    rand_ops: list[int]
    saved_autograd_ops: list[int]
    inplace_ops: list[tuple[int, int]]
    force_store_random: bool


class MSPS(NamedTuple):
    """Memory and runtime of one recomputation candidate (an op or an op group).

    Attributes:
        func_names: names of the ops in the candidate.
        op_idx: the op index (the group head for op groups).
        memory: memory freed by recomputing the candidate, in bytes.
        runtime: time to recompute the candidate, in milliseconds.
        msps: memory saved per unit of recomputation time (``memory / runtime``;
            ``sys.float_info.max`` for zero runtime).
    """

    func_names: set[str]
    op_idx: int
    memory: int
    runtime: float
    msps: float


@dataclass
class SACTradeOffStats:
    """Piecewise-linear fit of the discarded-memory vs recomputation-time curve.

    Attributes:
        n_segments: number of linear segments fitted.
        slopes: slope of each segment.
        intercepts: intercept of each segment.
        fit_breaks: segment breakpoints (``n_segments + 1`` x values).
        tradeoff_curve: discarded-memory ratio (plus 0.01) -> recomputation-time ratio.
        sac_memory: total memory of the module's ops, in bytes.
        sac_runtime: total runtime of the module's ops, in milliseconds.
    """

    n_segments: int
    slopes: list[float]
    intercepts: list[float]
    fit_breaks: list[float]
    tradeoff_curve: OrderedDict[float, float]
    sac_memory: int
    sac_runtime: float


@dataclass
class SACGreedyOrderMeta:
    """The greedy SAC order of one module.

    Attributes:
        recomputed_ops: op (group head) indices always recomputed (view-like ops).
        stored_ops: op (group head) indices always stored.
        inplace_op_groups: group head -> ops of the in-place group (head included).
        random_ops_group: head (first random op) -> all random ops.
        msps_meta: recomputation candidates, best memory-per-runtime first.
    """

    recomputed_ops: set[int]
    stored_ops: set[int]
    inplace_op_groups: dict[int, set[int]]
    random_ops_group: dict[int, set[int]]
    msps_meta: list[MSPS]


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else 0.0


def _group_of(op_idx: int, greedy_meta: SACGreedyOrderMeta) -> set[int]:
    """The op itself plus the in-place group and random group it heads."""
    members = {op_idx}
    members.update(greedy_meta.inplace_op_groups.get(op_idx, ()))
    members.update(greedy_meta.random_ops_group.get(op_idx, ()))
    return members


def get_greedy_order_meta(sac_stats: SACStats) -> SACGreedyOrderMeta:
    """Groups the ops of a module and orders the recomputation candidates by MSPS.

    Port of ``SACEstimator._get_greedy_order_meta``:

    1. In-place ops form groups keyed by their top-most parent; a group is recomputed
       or stored as a whole, and stored if its head is itself an in-place op (its
       storage came from outside the module).
    2. Random ops form one group keyed by the first random op: they share the RNG
       state, so they are all recomputed or all stored (stored if
       ``force_store_random``).
    3. View-like ops are always recomputed (they cost no memory).
    4. Every other op or group head is a candidate; candidates are sorted by
       decreasing memory saved per millisecond of recomputation (MSPS).
    """
    # In-place groups: top-most parent -> ops writing the same storage.
    inplace_op_to_group_head: dict[int, int] = dict(sac_stats.inplace_ops)
    inplace_op_groups: dict[int, set[int]] = {}
    for op_idx, group_head_idx in inplace_op_to_group_head.items():
        inplace_op_groups.setdefault(group_head_idx, {group_head_idx}).add(op_idx)

    # Random ops: one group headed by the first random op.
    rand_ops = set(sac_stats.rand_ops)
    random_ops_group: dict[int, set[int]] = {}
    random_group_head_idx = min(rand_ops, default=-1)
    if rand_ops:
        random_ops_group[random_group_head_idx] = set(rand_ops)

    stored_ops: set[int] = set()
    recomputed_ops: set[int] = set(sac_stats.view_like_ops)
    if rand_ops and sac_stats.force_store_random:
        stored_ops.add(random_group_head_idx)
    for group_head_idx, op_group in inplace_op_groups.items():
        head_is_inplace = group_head_idx in inplace_op_to_group_head
        has_forced_random = sac_stats.force_store_random and bool(op_group & rand_ops)
        if head_is_inplace or has_forced_random:
            stored_ops.add(group_head_idx)

    recompute_candidates: set[int] = set()
    if rand_ops and random_group_head_idx not in stored_ops:
        recompute_candidates.add(random_group_head_idx)
    recompute_candidates.update(set(inplace_op_groups) - stored_ops)
    recompute_candidates.update(
        set(range(len(sac_stats.memory)))
        - recomputed_ops
        - stored_ops
        - set(inplace_op_to_group_head)
        - rand_ops
    )

    msps_meta: list[MSPS] = []
    for cand_idx in sorted(recompute_candidates):
        op_indices = {cand_idx}
        op_indices.update(inplace_op_groups.get(cand_idx, ()))
        if rand_ops and cand_idx == random_group_head_idx:
            op_indices.update(rand_ops)
        mem = sum(sac_stats.memory[i] for i in op_indices)
        runtime = sum(sac_stats.runtimes[i] for i in op_indices)
        func_names = {sac_stats.func_names[i] for i in op_indices}
        msps = mem / runtime if runtime > 0 else sys.float_info.max
        msps_meta.append(MSPS(func_names, cand_idx, mem, runtime, msps))
    # Largest memory saving per millisecond first; the sort is stable, so ties keep
    # increasing op index.
    msps_meta.sort(key=lambda cand: cand.msps, reverse=True)
    return SACGreedyOrderMeta(
        recomputed_ops, stored_ops, inplace_op_groups, random_ops_group, msps_meta
    )


def _tradeoff_curve(
    sac_stats: SACStats, greedy_meta: SACGreedyOrderMeta
) -> OrderedDict[float, float]:
    """Discarded-memory ratio (+0.01) -> recomputation-time ratio along the greedy order."""
    sac_memory = sum(sac_stats.memory)
    sac_runtime = sum(sac_stats.runtimes)
    curve: OrderedDict[float, float] = OrderedDict()

    def add_point(discarded_mem: float, recomp_runtime: float) -> None:
        x = _ratio(discarded_mem, sac_memory) + _TRADEOFF_X_DELTA
        curve[x] = _ratio(recomp_runtime, sac_runtime)

    # Start from the always-recomputed ops.
    recomp_indices: set[int] = set()
    for op_idx in greedy_meta.recomputed_ops:
        recomp_indices |= _group_of(op_idx, greedy_meta)
    discarded_mem = sum(sac_stats.memory[i] for i in recomp_indices)
    recomp_runtime = sum(sac_stats.runtimes[i] for i in recomp_indices)
    add_point(discarded_mem, recomp_runtime)
    # Then the candidates in greedy (decreasing MSPS) order.
    for cand in greedy_meta.msps_meta:
        discarded_mem += cand.memory
        recomp_runtime += cand.runtime
        add_point(discarded_mem, recomp_runtime)
    # Finally the always-stored ops, which closes the curve at (1 + delta, 1).
    stored_indices: set[int] = set()
    for op_idx in greedy_meta.stored_ops:
        stored_indices |= _group_of(op_idx, greedy_meta)
    discarded_mem += sum(sac_stats.memory[i] for i in stored_indices)
    recomp_runtime += sum(sac_stats.runtimes[i] for i in stored_indices)
    add_point(discarded_mem, recomp_runtime)
    return curve


def get_sac_tradeoff_pwlf_stats(
    sac_stats: SACStats,
    greedy_order_meta: SACGreedyOrderMeta,
    n_segments: int = 2,
    save_tradeoff_graph: bool = False,
    filename: str = "sac_tradeoff",
    mod_name: str | None = None,
    *,
    seed: int = 0,
) -> SACTradeOffStats:
    """Fits a piecewise-linear function to a module's SAC trade-off curve.

    Port of ``SACEstimator._get_sac_tradeoff_pwlf_stats``. The curve walks the greedy
    order (always-recomputed ops, then candidates by decreasing MSPS, then the
    always-stored ops) and records, after each step, the fraction of memory discarded
    and the fraction of runtime recomputed. The x values are shifted one step to the
    left of their y values so that the fit upper-bounds the recomputation time, and a
    fit of ``max(min(len(x) - 2, n_segments), 1)`` segments is returned.

    Args:
        sac_stats: the module's op statistics.
        greedy_order_meta: ``get_greedy_order_meta(sac_stats)``.
        n_segments: the wanted number of segments (fewer when the curve is short).
        save_tradeoff_graph: also write the curve and its fit to ``f"{filename}.png"``
            (needs matplotlib).
        filename: path stem of the PNG.
        mod_name: module name used in the graph title and in log messages.
        seed: seed of pwlf's differential evolution, so that fits are reproducible.

    Returns:
        SACTradeOffStats with the fit and the raw curve.
    """
    if n_segments < 1:
        raise ValueError(f"n_segments must be at least 1, got {n_segments}")
    sac_memory = sum(sac_stats.memory)
    sac_runtime = sum(sac_stats.runtimes)
    curve = _tradeoff_curve(sac_stats, greedy_order_meta)
    x_all = list(curve.keys())
    y_all = list(curve.values())
    x, y = x_all[:-1], y_all[1:]
    label = mod_name or os.path.basename(filename)

    if len(x) < 2:
        # Nothing to fit (e.g. every op is a view): a flat upper bound.
        logger.debug("%s: trade-off curve has %d point(s); using a flat fit", label, len(x_all))
        return SACTradeOffStats(
            n_segments=1,
            slopes=[0.0],
            intercepts=[max(y_all)],
            fit_breaks=[min(x_all), max(x_all)],
            tradeoff_curve=curve,
            sac_memory=sac_memory,
            sac_runtime=sac_runtime,
        )

    try:
        import pwlf
    except ImportError as err:
        raise ImportError(
            "get_sac_tradeoff_pwlf_stats needs pwlf: pip install pwlf"
        ) from err

    n_segments = max(min(len(x) - 2, n_segments), 1)
    fit = pwlf.PiecewiseLinFit(x, y)
    if n_segments == 1:
        fit.fit(n_segments)  # a least-squares line: deterministic, no search
    else:
        fit.fit(n_segments, seed=seed, **_PWLF_DE_OPTIONS)
    slopes = fit.calc_slopes().tolist()  # also computes fit.intercepts
    intercepts = fit.intercepts.tolist()
    fit_breaks = fit.fit_breaks.tolist()
    logger.debug(
        "%s: %d-segment fit of %d points, slopes %s, breaks %s",
        label, n_segments, len(x), slopes, fit_breaks,
    )
    if save_tradeoff_graph:
        _save_tradeoff_graph(fit, x, y, x_all, y_all, filename, label, sac_memory, sac_runtime)
    return SACTradeOffStats(
        n_segments=n_segments,
        slopes=slopes,
        intercepts=intercepts,
        fit_breaks=fit_breaks,
        tradeoff_curve=curve,
        sac_memory=sac_memory,
        sac_runtime=sac_runtime,
    )


def _save_tradeoff_graph(
    fit: object,
    x: list[float],
    y: list[float],
    x_all: list[float],
    y_all: list[float],
    filename: str,
    title: str,
    sac_memory: int,
    sac_runtime: float,
) -> None:
    try:
        import numpy as np
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "save_tradeoff_graph=True needs matplotlib: pip install matplotlib "
            "(or pip install 'sac-compiler[plot]'), or pass save_tradeoff_graph=False"
        ) from err
    x_hat = np.linspace(min(x), max(x), num=10000)
    y_hat = fit.predict(x_hat)  # type: ignore[attr-defined]
    fig = Figure()
    ax = fig.subplots()
    ax.plot(x, y, "o", label="Shifted")
    ax.plot(x_hat, y_hat, "-", label="Predicted")
    ax.plot(x_all, y_all, "x", label="Original")
    ax.set_ylabel("Recomp time / Total recomp time")
    ax.set_xlabel("Memory discarded / Total memory")
    ax.legend()
    ax.set_title(title)
    fig.suptitle(
        f"Total Memory = {sac_memory} B Total Runtime = {sac_runtime:.4f} ms", fontsize=10
    )
    path = f"{filename}.png"
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(path)
    logger.info("saved the SAC trade-off graph of %s to %s", title, path)


def _tabulate(headers: list[str], rows: list[list[str]]) -> str:
    try:
        from tabulate import tabulate
    except ImportError as err:
        raise ImportError("formatting SAC tables needs tabulate: pip install tabulate") from err
    return str(tabulate(rows, headers=headers, tablefmt="rst", disable_numparse=True))


def _greedy_labels(greedy_meta: SACGreedyOrderMeta) -> dict[int, str]:
    """Op index -> what the greedy order does with it."""
    labels: dict[int, str] = {}
    for op_idx in greedy_meta.recomputed_ops:
        labels.update(dict.fromkeys(_group_of(op_idx, greedy_meta), "always recomputed"))
    for op_idx in greedy_meta.stored_ops:
        labels.update(dict.fromkeys(_group_of(op_idx, greedy_meta), "always stored"))
    for rank, cand in enumerate(greedy_meta.msps_meta, start=1):
        labels.update(dict.fromkeys(_group_of(cand.op_idx, greedy_meta), f"candidate #{rank}"))
    return labels


def format_sac_stats(
    sac_stats: SACStats, greedy_meta: SACGreedyOrderMeta | None = None
) -> str:
    """The per-op table of ``SACEstimator.display_sac_stats``, as a string.

    With ``greedy_meta``, a last column says whether the op is always recomputed,
    always stored, or which greedy candidate (by rank) it belongs to.
    """
    op_parent = dict(sac_stats.inplace_ops)
    view_like, rand, saved = (
        set(sac_stats.view_like_ops),
        set(sac_stats.rand_ops),
        set(sac_stats.saved_autograd_ops),
    )
    labels = _greedy_labels(greedy_meta) if greedy_meta is not None else {}
    headers = [
        "Op Idx", "Op Name", "Runtimes(ms)", "Memory (B)",
        "View-like", "Random", "Saved Autograd", "In-place",
    ]
    if greedy_meta is not None:
        headers.append("Greedy")
    rows: list[list[str]] = []
    for i, fn_name in enumerate(sac_stats.func_names):
        row = [
            str(i),
            fn_name,
            f"{sac_stats.runtimes[i]:.4f}",
            str(sac_stats.memory[i]),
            str(i in view_like),
            str(i in rand),
            str(i in saved),
            str(op_parent.get(i)),
        ]
        if greedy_meta is not None:
            row.append(labels.get(i, ""))
        rows.append(row)
    summary = (
        f"Total Memory: {sum(sac_stats.memory)} B "
        f"Total Runtime: {sum(sac_stats.runtimes)} ms "
        f"Store Random: {sac_stats.force_store_random}"
    )
    return summary + "\n" + _tabulate(headers, rows)


def format_sac_tradeoff_stats(
    sac_stats: SACStats, greedy_meta: SACGreedyOrderMeta
) -> str:
    """The cumulative greedy trade-off table of ``SACEstimator.display_sac_tradeoff_stats``.

    One row per step of the greedy order (always-recomputed ops, candidates by
    decreasing MSPS, always-stored ops) with the cumulative discarded memory and
    recomputation time after that step.
    """
    total_memory, total_runtime = sum(sac_stats.memory), sum(sac_stats.runtimes)
    discarded_mem = 0
    recomp_runtime = 0.0
    rows: list[list[str]] = []

    def append_row(
        op_indices: set[int], msps: float | None, stored: bool, recomputed: bool
    ) -> None:
        names = sorted({sac_stats.func_names[i] for i in op_indices})
        rows.append([
            str(sorted(op_indices)),
            ", ".join(names),
            f"{_ratio(discarded_mem, total_memory):.4f}",
            str(discarded_mem),
            f"{_ratio(recomp_runtime, total_runtime):.4f}",
            f"{recomp_runtime:.4f}",
            f"{msps:.2e}" if msps is not None else "nan",
            str(stored),
            str(recomputed),
        ])

    for op_idx in sorted(greedy_meta.recomputed_ops):
        op_indices = _group_of(op_idx, greedy_meta)
        discarded_mem += sum(sac_stats.memory[i] for i in op_indices)
        recomp_runtime += sum(sac_stats.runtimes[i] for i in op_indices)
        append_row(op_indices, None, stored=False, recomputed=True)
    for cand in greedy_meta.msps_meta:
        discarded_mem += cand.memory
        recomp_runtime += cand.runtime
        append_row(_group_of(cand.op_idx, greedy_meta), cand.msps, stored=False, recomputed=False)
    for op_idx in sorted(greedy_meta.stored_ops):
        op_indices = _group_of(op_idx, greedy_meta)
        discarded_mem += sum(sac_stats.memory[i] for i in op_indices)
        recomp_runtime += sum(sac_stats.runtimes[i] for i in op_indices)
        append_row(op_indices, None, stored=True, recomputed=False)

    headers = [
        "Op Id(s)", "Op Name(s)", "Discarded Mem (%)", "Discarded Mem (B)",
        "Recomp time (%)", "Recomp time (ms)", "MSPS", "Always Stored", "Always Recomputed",
    ]
    return _tabulate(headers, rows)
