"""The planner's figures as pictures (matplotlib, an optional dependency).

- ``pareto_plot`` draws a budget sweep: each point is one plan, at its predicted peak (x) and its
  predicted recompute time (y); the plans no other plan beats on both are joined into the Pareto
  front, and the plan chosen for the requested budget is marked.
- ``timeline_plot`` draws a training step's live bytes by category (parameters, gradients,
  activations, ...) node by node, forward then backward, as the memory simulation counts them: one
  panel per simulation (without recomputation and with a plan, say), on one scale, so that where a
  plan lowers the peak and what it frees can be seen. On a GPU, ``measured_timeline_panel`` makes
  a panel of the same step from the CUDA caching allocator's own record
  (``torch.cuda.memory._record_memory_history``), to set beside the simulation's.
- ``tradeoff_plot`` draws each module's SAC trade-off curve (the fraction of its memory discarded
  against the fraction of its runtime recomputed, in the greedy order) and the piecewise-linear
  (pwlf) fit of it that ``sac_milp`` plans with.

Each figure is drawn on an Agg canvas of its own, so no pyplot state or interactive backend is
touched; the path's suffix picks the format (.png, .pdf, .svg).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PLOT_INSTALL_HINT = "pip install 'sac-compiler[plot]'"


class MissingMatplotlib(ImportError):
    """matplotlib is not installed; the message says how to install it."""


@dataclass(frozen=True)
class PlotPoint:
    """One plan of the sweep: its predicted peak in bytes, its recompute time in ms, and a label."""

    peak_bytes: int
    recompute_ms: float
    label: str
    pareto: bool = True


def require_matplotlib() -> None:
    """Raise ``MissingMatplotlib`` (with the install command) when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise MissingMatplotlib(f"plotting needs matplotlib, which is not installed: {PLOT_INSTALL_HINT}") from error


def supported_formats() -> set[str]:
    """The file suffixes (without the dot) matplotlib's savefig writes here: png, pdf, svg, ..."""
    require_matplotlib()
    from matplotlib.backend_bases import FigureCanvasBase

    return set(FigureCanvasBase.get_supported_filetypes())


def _unit(values: Sequence[int]) -> tuple[str, int]:
    """The binary unit that shows the largest value as a number >= 1."""
    top = max(values, default=0)
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if top >= size:
            return unit, size
    return "B", 1


def pareto_plot(points: Sequence[PlotPoint], chosen: PlotPoint | None, path: str | Path, title: str = "",
                anchors: Sequence[PlotPoint] = ()) -> Path:
    """Write the sweep's recompute time against predicted peak to ``path`` (the suffix picks the
    format: .png, .pdf, .svg); ``chosen`` is marked apart, and ``anchors`` (other strategies' points,
    as measured: their peak and their step time over plain ``torch.compile``'s) beside them.
    Returns the path written."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    every = [*points, *([chosen] if chosen is not None else []), *anchors]
    unit, size = _unit([p.peak_bytes for p in every])
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    front = sorted((p for p in points if p.pareto), key=lambda p: p.peak_bytes)
    if front:
        ax.plot([p.peak_bytes / size for p in front], [p.recompute_ms for p in front], "-o", color="tab:blue",
                label="sweep (Pareto front)")
    beaten = [p for p in points if not p.pareto]
    if beaten:
        ax.plot([p.peak_bytes / size for p in beaten], [p.recompute_ms for p in beaten], "o", mfc="none",
                color="tab:gray", label="sweep (beaten by a lower-peak plan)")
    for p in points:
        ax.annotate(p.label, (p.peak_bytes / size, p.recompute_ms), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    if chosen is not None:
        ax.plot([chosen.peak_bytes / size], [chosen.recompute_ms], "*", color="tab:red", markersize=14,
                label=f"chosen: {chosen.label}")
    if anchors:
        ax.plot([a.peak_bytes / size for a in anchors], [a.recompute_ms for a in anchors], "x", color="tab:green",
                markersize=9, label="other strategies (measured)")
        for a in anchors:
            ax.annotate(a.label, (a.peak_bytes / size, a.recompute_ms), textcoords="offset points", xytext=(4, -10),
                        fontsize=8, color="tab:green")
    ax.set_xlabel(f"predicted peak ({unit})")
    ax.set_ylabel("predicted recompute time (ms)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    out = Path(path)
    fig.savefig(out, dpi=120)
    return out


# the order the categories are stacked in, bottom up: what lives all step first, then what the
# step makes (gradients, the activations forward keeps, backward's temporaries)
TIMELINE_CATEGORIES = ("parameter", "buffer", "input", "optimizer_state", "gradient", "activation", "temporary")
_CATEGORY_COLORS = {
    "held before the step": "tab:gray", "allocated in the step": "tab:red",
    "parameter": "tab:gray", "buffer": "silver", "input": "tab:brown", "optimizer_state": "tab:purple",
    "gradient": "tab:green", "activation": "tab:blue", "temporary": "tab:orange",
}


@dataclass(frozen=True)
class TimelinePanel:
    """One simulated step for ``timeline_plot``: per step (a graph node, forward then backward), its
    node and the live bytes by category while it runs; ``first_backward`` is the index of the first
    backward step; ``budget_bytes`` is drawn as a line when given."""

    title: str
    steps: Sequence[tuple[str, Mapping[str, int]]]
    first_backward: int
    budget_bytes: int | None = None
    x_label: str = "step (graph node: forward, then backward)"

    @property
    def totals(self) -> list[int]:
        """Live bytes while each step runs, every category together."""
        return [sum(by_category.values()) for _, by_category in self.steps]


def timeline_panel(simulation: Any, title: str, budget_bytes: int | None = None) -> TimelinePanel:
    """A ``TimelinePanel`` from a memory simulation's ``category_timeline()``: the joint graph's
    (``MemorySimulation``, whose ``first_backward`` splits it) or the partitioned graphs'
    (``PartitionedPeak``, forward graph then backward graph)."""
    steps = [(node, {getattr(c, "value", str(c)): b for c, b in by_category.items()})
             for _, node, by_category in simulation.category_timeline()]
    if hasattr(simulation, "first_backward"):
        first_backward = simulation.first_backward
    else:  # the partitioned simulation: the forward graph's steps come first
        first_backward = len(simulation.steps[0]) if simulation.steps else len(steps)
    return TimelinePanel(title, steps, first_backward, budget_bytes)


# the measured panel's two layers: what was allocated when the recording began, and what the step
# allocated since
MEASURED_CATEGORIES = ("held before the step", "allocated in the step")


# the CUDA caching allocator rounds every block up to a multiple of 512 bytes (its kMinBlockSize) and
# counts the rounded bytes as allocated; its history records the requested size
ALLOCATOR_ROUNDING = 512


def allocator_trace(snapshot: Mapping[str, Any], device: int = 0,
                    where: Any = None) -> list[tuple[str, int, int, str]]:
    """Every allocation and completed free that ``snapshot`` (the dict
    ``torch.cuda.memory._snapshot()`` returns while ``_record_memory_history`` records) traced on
    ``device``, in order, as (action, bytes, address, where): the size rounded up as the allocator
    counts it (``ALLOCATOR_ROUNDING``), so that they sum to ``torch.cuda.memory_allocated()``; the
    address pairs a free with its allocation; ``where(frames)`` names the event from its stack
    (``_record_memory_history`` with ``stacks="python"``), by default the innermost frame as
    ``file:line``. Other actions (segment maps, ``free_requested``, ``snapshot``, ``oom``) change
    no allocated bytes and are left out."""
    traces = snapshot.get("device_traces")
    if traces is None:
        raise ValueError("the snapshot has no 'device_traces': record it with "
                         "torch.cuda.memory._record_memory_history(enabled='all') before the step")
    if device >= len(traces):
        raise ValueError(f"the snapshot traced {len(traces)} device(s); device {device} is not among them")
    name = where or (lambda frames: f"{frames[0]['filename']}:{frames[0]['line']}" if frames else "?")
    return [(e["action"], -(-int(e["size"]) // ALLOCATOR_ROUNDING) * ALLOCATOR_ROUNDING, int(e["addr"]),
             name(e.get("frames") or []))
            for e in traces[device] if e["action"] in ("alloc", "free_completed")]


def allocator_events(snapshot: Mapping[str, Any], device: int = 0) -> list[tuple[str, int]]:
    """The (action, bytes) of :func:`allocator_trace`'s events."""
    return [(action, size) for action, size, _, _ in allocator_trace(snapshot, device)]


def allocator_live_at(trace: Sequence[tuple[str, int, int, str]], index: int) -> list[tuple[int, str, int]]:
    """Every block of ``trace`` (:func:`allocator_trace`) allocated and still live after its event
    ``index``, as (bytes, where, the index of its allocation), largest first. Blocks allocated
    before the recording are not listed."""
    live: dict[int, tuple[int, str, int]] = {}
    for i, (action, size, addr, site) in enumerate(trace[:index + 1]):
        if action == "alloc":
            live[addr] = (size, site, i)
        else:
            live.pop(addr, None)
    return sorted(live.values(), key=lambda b: -b[0])


def allocator_live_at_peak(snapshot: Mapping[str, Any], device: int = 0,
                           where: Any = None) -> tuple[int, int, list[tuple[int, str]]]:
    """What the allocator held at the highest point of a recorded step: (the bytes over what was
    allocated when the recording began, the index of the event that reached it, and every block
    allocated during the recording and still live then as (bytes, where), largest first;
    ``where`` as for :func:`allocator_trace`). Blocks allocated before the recording are not
    listed (their frees lower the total, as in ``measured_timeline_panel``)."""
    trace = allocator_trace(snapshot, device, where)
    total = peak = 0
    peak_index = -1
    for i, (action, size, _, _) in enumerate(trace):
        total += size if action == "alloc" else -size
        if total > peak:
            peak, peak_index = total, i
    return peak, peak_index, [(size, site) for size, site, _ in allocator_live_at(trace, peak_index)]


def measured_timeline_panel(events: Sequence[tuple[str, int]], base_bytes: int, title: str,
                            first_backward: int | None = None, budget_bytes: int | None = None) -> TimelinePanel:
    """A ``TimelinePanel`` of a step as the allocator recorded it: ``events`` from
    ``allocator_events`` (alloc adds its bytes, free_completed takes them away), on top of
    ``base_bytes`` allocated when the recording began (``torch.cuda.memory_allocated()`` then);
    ``first_backward``: the number of events the forward (and the loss) made, where the backward
    starts. A free of memory allocated before the recording lowers what the step allocated below
    zero: the two layers still sum to the bytes allocated."""
    live = 0
    steps: list[tuple[str, Mapping[str, int]]] = []
    for action, size in events:
        if action == "alloc":
            live += size
        elif action == "free_completed":
            live -= size
        else:
            raise ValueError(f"unknown allocator action {action!r}: expected 'alloc' or 'free_completed'")
        steps.append((action, {MEASURED_CATEGORIES[0]: base_bytes, MEASURED_CATEGORIES[1]: live}))
    return TimelinePanel(title, steps, len(steps) if first_backward is None else first_backward, budget_bytes,
                         x_label="allocator event (allocations and frees, forward then backward)")


def timeline_plot(panels: Sequence[TimelinePanel], path: str | Path, title: str = "") -> Path:
    """Write the panels side by side, on one byte scale, to ``path``: each a stack of the live bytes
    by category at every step, the start of the backward and the budget marked, the peak labelled.
    Returns the path written."""
    if not panels:
        raise ValueError("timeline_plot needs at least one panel")
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    top = max([max(p.totals, default=0) for p in panels] + [p.budget_bytes or 0 for p in panels])
    unit, size = _unit([top])
    seen = {c for p in panels for _, by_category in p.steps for c in by_category}
    order = TIMELINE_CATEGORIES + MEASURED_CATEGORIES
    categories = [c for c in order if c in seen] + sorted(seen - set(order))
    fig = Figure(figsize=(5.6 * len(panels), 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, panel in zip(axes, panels, strict=True):
        x = list(range(len(panel.steps)))
        layers = [[by_category.get(c, 0) / size for _, by_category in panel.steps] for c in categories]
        ax.stackplot(x, layers, labels=[c.replace("_", " ") for c in categories],
                     colors=[_CATEGORY_COLORS.get(c, "tab:olive") for c in categories], step="post", alpha=0.85)
        if 0 < panel.first_backward < len(panel.steps):
            ax.axvline(panel.first_backward, color="black", linestyle=":", linewidth=1)
            ax.annotate("backward", (panel.first_backward, 0), textcoords="offset points", xytext=(3, 3), fontsize=8)
        if panel.budget_bytes is not None:
            ax.axhline(panel.budget_bytes / size, color="tab:red", linestyle="--", linewidth=1,
                       label=f"budget {panel.budget_bytes / size:.3g} {unit}")
        totals = panel.totals
        if totals:
            peak = max(totals)
            at = totals.index(peak)
            ax.plot([at], [peak / size], "v", color="black", markersize=6)
            ax.annotate(f"peak {peak / size:.3g} {unit}\n({panel.steps[at][0]})", (at, peak / size),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel(panel.x_label, fontsize=9)
        ax.set_xlim(0, max(len(panel.steps) - 1, 1))
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(f"live bytes ({unit})")
    axes[0].set_ylim(0, top / size * 1.15 if top else 1)
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:  # the budget line's label may differ between panels
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    fig.legend(handles, labels, fontsize=8, loc="outside right upper")
    if title:
        fig.suptitle(title, fontsize=10)
    out = Path(path)
    fig.savefig(out, dpi=120)
    return out


def tradeoff_plot(tradeoffs: Mapping[str, Any], path: str | Path, title: str = "") -> Path:
    """Write each module's SAC trade-off curve and its piecewise-linear fit to ``path``, one panel
    per module. ``tradeoffs`` maps a module's name to its ``SACTradeOffStats``
    (``SACEstimate.pwlf_sac_tradeoff_curve()``): the curve's points (memory discarded -> runtime
    recomputed, as fractions of the module's totals, x shifted by PyTorch's 0.01) and the fit's
    segments (``fit_breaks``, ``slopes``, ``intercepts``). Returns the path written."""
    if not tradeoffs:
        raise ValueError("tradeoff_plot needs at least one module's trade-off statistics")
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = min(3, len(tradeoffs))
    rows = math.ceil(len(tradeoffs) / columns)
    fig = Figure(figsize=(4.4 * columns, 3.6 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, (module, stats) in zip(axes, tradeoffs.items()):
        curve = list(stats.tradeoff_curve.items())
        ax.plot([x for x, _ in curve], [y for _, y in curve], "o", markersize=3, color="tab:blue",
                label="greedy order")
        # what the fit is of: each y one step to the left, so that the fit bounds the time from above
        ax.plot([x for x, _ in curve[:-1]], [y for _, y in curve[1:]], "o", markersize=4, mfc="none",
                color="tab:gray", label="shifted (fitted)")
        breaks = list(stats.fit_breaks)
        for i, (slope, intercept) in enumerate(zip(stats.slopes, stats.intercepts, strict=True)):
            low, high = breaks[i], breaks[i + 1]
            ax.plot([low, high], [slope * low + intercept, slope * high + intercept], "-", color="tab:red",
                    label=f"pwlf fit ({stats.n_segments} segment{'s' if stats.n_segments != 1 else ''})"
                    if i == 0 else None)
        ax.set_title(f"{module}\n{stats.sac_memory / 2**20:.3g} MiB, {stats.sac_runtime:.3g} ms", fontsize=9)
        ax.set_xlabel("memory discarded / total", fontsize=8)
        ax.set_ylabel("recompute time / total", fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(tradeoffs):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    out = Path(path)
    fig.savefig(out, dpi=120)
    return out
