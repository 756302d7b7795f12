"""The pictures of ``sac_compiler.plots`` from the figures they draw: the memory timeline's panels
from the joint and partitioned simulations (with and without a plan), the per-module trade-off
curves, and the files written (decoded back as images). Eager route only: nothing compiles."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch._functorch.partitioners import min_cut_rematerialization_partition

from sac_compiler import plots
from sac_compiler.capture import capture_joint
from sac_compiler.config import SACConfig
from sac_compiler.estimator import estimate
from sac_compiler.plan_graph import plan_joint, simulate_plan
from tests.models import Nested

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
needs_matplotlib = pytest.mark.skipif(
    not HAS_MATPLOTLIB, reason="matplotlib is not installed (pip install 'sac-compiler[plot]'; the test extra has it)")


@pytest.fixture(scope="module")
def planned():
    """Nested MLP blocks planned at half their saved activations on the eager route, and its config."""
    torch.manual_seed(0)
    config = SACConfig(memory_budget=0.5, compiler="eager", device="H100-SXM")
    graph = capture_joint(Nested(dim=32, n_layers=3), torch.randn(512, 32))
    result = plan_joint(graph, config)
    assert result.plan.recompute, "the plan recomputes nothing: the timeline would show no difference"
    return result, config


def _read_png(path: Path):
    """The image, decoded (matplotlib's PNG reader): rows x columns x channels."""
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return imread(path)


def test_timeline_panels_are_the_simulations_steps(planned) -> None:
    result, config = planned
    without = plots.timeline_panel(result.analysis.memory, "no recomputation", result.budget_bytes)
    sim = simulate_plan(result, config)
    with_plan = plots.timeline_panel(sim, "plan", result.budget_bytes)
    memory = result.analysis.memory
    assert [node for node, _ in without.steps] == [node for node, _ in memory.timeline]
    assert without.totals == memory.step_peaks
    assert without.first_backward == memory.first_backward
    assert set().union(*(c for _, c in without.steps)) <= set(plots.TIMELINE_CATEGORIES)
    # the peaks are the plan's figures: without recomputation the baseline, with it the prediction
    assert max(without.totals) == result.baseline_peak
    assert max(with_plan.totals) == result.predicted_peak <= result.budget_bytes < max(without.totals)
    # the plan frees activations between forward and backward
    def activations(panel):
        return dict(panel.steps[panel.first_backward][1]).get("activation", 0)

    assert activations(with_plan) < activations(without)


def test_timeline_panel_of_the_partitioned_graphs(planned) -> None:
    result, _ = planned
    gm = result.analysis.graph.gm
    fw, bw = min_cut_rematerialization_partition(gm, None, compiler="eager",
                                                 num_fwd_outputs=result.analysis.graph.num_fwd_outputs)
    partitioned = result.simulate(fw, bw)
    panel = plots.timeline_panel(partitioned, "partitioned")
    forward_nodes = [n.name for n in fw.graph.nodes]
    assert panel.first_backward == len(partitioned.steps[0]) == len(forward_nodes)
    assert [node for node, _ in panel.steps[:panel.first_backward]] == forward_nodes
    assert max(panel.totals) == partitioned.peak_bytes


@needs_matplotlib
def test_timeline_plot_writes_the_panels_side_by_side(planned, tmp_path: Path) -> None:
    result, config = planned
    panels = [plots.timeline_panel(result.analysis.memory, "no recomputation", result.budget_bytes),
              plots.timeline_panel(simulate_plan(result, config), "plan", result.budget_bytes)]
    one = _read_png(plots.timeline_plot(panels[:1], tmp_path / "one.png"))
    two = _read_png(plots.timeline_plot(panels, tmp_path / "two.png", title="Nested"))
    assert two.shape[0] == one.shape[0] and two.shape[1] > 1.5 * one.shape[1]
    svg = plots.timeline_plot(panels, tmp_path / "two.svg")
    assert svg.read_text().lstrip().startswith("<?xml") and "<svg" in svg.read_text()


@needs_matplotlib
def test_tradeoff_plot_draws_every_module(tmp_path: Path) -> None:
    torch.manual_seed(0)
    est = estimate(Nested(dim=16, n_layers=2), torch.randn(8, 16), device="H100-SXM")
    tradeoffs = est.pwlf_sac_tradeoff_curve(n_segments=2)
    assert len(tradeoffs) >= 3
    image = _read_png(plots.tradeoff_plot(tradeoffs, tmp_path / "tradeoff.png"))
    one = _read_png(plots.tradeoff_plot(dict(list(tradeoffs.items())[:1]), tmp_path / "one.png"))
    assert image.shape[0] >= one.shape[0] and image.shape[1] > 2 * one.shape[1]  # three columns, not one


def test_plots_refuse_nothing_to_draw(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one panel"):
        plots.timeline_plot([], tmp_path / "t.png")
    with pytest.raises(ValueError, match="at least one module"):
        plots.tradeoff_plot({}, tmp_path / "t.png")


def test_plots_without_matplotlib_say_how_to_install(planned, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    result, _ = planned
    panel = plots.timeline_panel(result.analysis.memory, "no recomputation")
    for draw in (lambda: plots.timeline_plot([panel], tmp_path / "t.png"),
                 lambda: plots.pareto_plot([plots.PlotPoint(1, 0.0, "1")], None, tmp_path / "p.png")):
        with pytest.raises(plots.MissingMatplotlib, match=r"pip install 'sac-compiler\[plot\]'"):
            draw()
    assert not list(tmp_path.iterdir())


# the CUDA caching allocator's record, in the layout of torch.cuda.memory._snapshot(): one trace per
# device, each entry an action with the bytes it concerns (tests/test_gpu.py records a real one)
_SNAPSHOT = {"segments": [], "device_traces": [[
    {"action": "segment_alloc", "addr": 0, "size": 2 << 20, "stream": 0},
    {"action": "alloc", "addr": 0, "size": 512, "stream": 0},
    {"action": "alloc", "addr": 512, "size": 1024, "stream": 0},
    {"action": "free_requested", "addr": 0, "size": 512, "stream": 0},
    {"action": "free_completed", "addr": 0, "size": 512, "stream": 0},
    {"action": "alloc", "addr": 0, "size": 4, "stream": 0},  # a scalar: the allocator counts 512
    {"action": "free_completed", "addr": 4096, "size": 2048, "stream": 0},  # allocated before the recording
]]}


def test_allocator_events_keep_allocations_and_completed_frees() -> None:
    events = plots.allocator_events(_SNAPSHOT)
    assert events == [("alloc", 512), ("alloc", 1024), ("free_completed", 512), ("alloc", 512),
                      ("free_completed", 2048)]
    with pytest.raises(ValueError, match="_record_memory_history"):
        plots.allocator_events({"segments": []})
    with pytest.raises(ValueError, match="device 1 is not among them"):
        plots.allocator_events(_SNAPSHOT, device=1)


def test_measured_timeline_panel_sums_to_the_bytes_allocated() -> None:
    base = 10_000
    panel = plots.measured_timeline_panel(plots.allocator_events(_SNAPSHOT), base, "measured",
                                          first_backward=2, budget_bytes=12_000)
    assert panel.totals == [base + 512, base + 1536, base + 1024, base + 1536, base - 512]
    assert panel.first_backward == 2 and panel.budget_bytes == 12_000
    assert all(by[plots.MEASURED_CATEGORIES[0]] == base for _, by in panel.steps)
    with pytest.raises(ValueError, match="unknown allocator action 'segment_alloc'"):
        plots.measured_timeline_panel([("segment_alloc", 1)], 0, "bad")


def test_allocator_live_at_peak_lists_the_blocks_held_at_the_highest_point() -> None:
    frames = {0: [{"filename": "gen.py", "line": 3}], 512: [{"filename": "gen.py", "line": 4}]}
    snapshot = {"device_traces": [[dict(e, frames=frames.get(e["addr"], [])) for e in _SNAPSHOT["device_traces"][0]]]}
    # live: +512 (a), +1024 (b), -512 (a freed), +512 (c at a's address), -2048 (from before)
    peak, index, blocks = plots.allocator_live_at_peak(snapshot)
    assert (peak, index) == (1536, 1)  # reached first after b; the later 1536 is not higher
    assert blocks == [(1024, "gen.py:4"), (512, "gen.py:3")]
    named = plots.allocator_live_at_peak(snapshot, where=lambda f: f[0]["line"] if f else None)[2]
    assert named == [(1024, 4), (512, 3)]
    with pytest.raises(ValueError, match="_record_memory_history"):
        plots.allocator_live_at_peak({"segments": []})


def test_allocator_trace_pairs_each_event_with_its_address_and_site() -> None:
    frames = {0: [{"filename": "gen.py", "line": 3}], 512: [{"filename": "gen.py", "line": 4}]}
    snapshot = {"device_traces": [[dict(e, frames=frames.get(e["addr"], [])) for e in _SNAPSHOT["device_traces"][0]]]}
    trace = plots.allocator_trace(snapshot)
    assert [(action, size) for action, size, _, _ in trace] == plots.allocator_events(snapshot)
    assert [(addr, site) for _, _, addr, site in trace] == [
        (0, "gen.py:3"), (512, "gen.py:4"), (0, "gen.py:3"), (0, "gen.py:3"), (4096, "?")]
    with pytest.raises(ValueError, match="_record_memory_history"):
        plots.allocator_trace({"segments": []})


@needs_matplotlib
def test_measured_panel_beside_the_simulation(planned, tmp_path: Path) -> None:
    result, config = planned
    measured = plots.measured_timeline_panel(plots.allocator_events(_SNAPSHOT), 10_000, "measured", first_backward=2)
    path = plots.timeline_plot([plots.timeline_panel(simulate_plan(result, config), "simulated"), measured],
                               tmp_path / "beside.png")
    assert _read_png(path).shape[1] > 0
