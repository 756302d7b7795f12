"""The planner's memory/time trade-off as a picture (matplotlib, an optional dependency).

``pareto_plot`` draws a budget sweep: each point is one plan, at its predicted peak (x) and its
predicted recompute time (y); the plans no other plan beats on both are joined into the Pareto
front, and the plan chosen for the requested budget is marked. The figure is drawn on an Agg
canvas of its own, so no pyplot state or interactive backend is touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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


def _unit(values: Sequence[int]) -> tuple[str, int]:
    """The binary unit that shows the largest value as a number >= 1."""
    top = max(values, default=0)
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if top >= size:
            return unit, size
    return "B", 1


def pareto_plot(points: Sequence[PlotPoint], chosen: PlotPoint | None, path: str | Path, title: str = "") -> Path:
    """Write the sweep's recompute time against predicted peak to ``path`` (the suffix picks the
    format: .png, .pdf, .svg); ``chosen`` is marked apart. Returns the path written."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    every = [*points, *([chosen] if chosen is not None else [])]
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
    ax.set_xlabel(f"predicted peak ({unit})")
    ax.set_ylabel("predicted recompute time (ms)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    out = Path(path)
    fig.savefig(out, dpi=120)
    return out
