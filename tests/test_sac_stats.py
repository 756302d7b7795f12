"""Greedy order, trade-off fit and tables of the SAC statistics layer."""

from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path

import numpy as np
import pytest

from sac_compiler.sac_stats import (
    MSPS,
    SACStats,
    format_sac_stats,
    format_sac_tradeoff_stats,
    get_greedy_order_meta,
    get_sac_tradeoff_pwlf_stats,
)
from tests.seed_data import seed_sac_stats

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def test_greedy_order_on_seed_stats() -> None:
    meta = get_greedy_order_meta(seed_sac_stats())
    # Groups: copy_ (0) writes a storage from outside the module, so it heads its own
    # in-place group and is always stored; relu_ (7) writes linear's (5) output, so
    # {5, 7} go together. The only random op, dropout (4), is its own random group.
    # The view t (6) is always recomputed.
    assert meta.inplace_op_groups == {0: {0}, 5: {5, 7}}
    assert meta.random_ops_group == {4: {4}}
    assert meta.stored_ops == {0}
    assert meta.recomputed_ops == {6}
    # MSPS = memory / runtime of each candidate (group):
    #   add 100/5 = 20, div 100/8 = 12.5, mm 120/15 = 8,
    #   linear+relu_ (100+0)/(9+5) = 7.14, dropout 0/15 = 0.
    # Recomputing the most memory per millisecond first gives add, div, mm,
    # linear+relu_, dropout.
    assert [c.op_idx for c in meta.msps_meta] == [1, 2, 3, 5, 4]
    assert meta.msps_meta[3] == MSPS({"aten.linear", "aten.relu_"}, 5, 100, 14, 100 / 14)
    assert [c.msps for c in meta.msps_meta] == pytest.approx([20, 12.5, 8, 100 / 14, 0])


def test_greedy_order_force_store_random() -> None:
    meta = get_greedy_order_meta(seed_sac_stats(force_store_random=True))
    # The random group is stored, so it is no longer a candidate.
    assert meta.stored_ops == {0, 4}
    assert [c.op_idx for c in meta.msps_meta] == [1, 2, 3, 5]


def test_greedy_order_groups_random_ops_and_breaks_ties_by_index() -> None:
    stats = SACStats(
        func_names=["aten.mm", "aten.bernoulli", "aten.mm", "aten.native_dropout", "aten.add"],
        runtimes=[2.0, 1.0, 2.0, 1.0, 0.0],
        memory=[10, 5, 10, 5, 7],
        view_like_ops=[],
        rand_ops=[1, 3],
        saved_autograd_ops=[],
        inplace_ops=[],
        force_store_random=False,
    )
    meta = get_greedy_order_meta(stats)
    assert meta.random_ops_group == {1: {1, 3}}
    # add has zero runtime (MSPS = float max); the two mms and the random group
    # (10 bytes, 2 ms together) tie at 5 and keep index order.
    assert [c.op_idx for c in meta.msps_meta] == [4, 0, 1, 2]
    assert meta.msps_meta[2] == MSPS({"aten.bernoulli", "aten.native_dropout"}, 1, 10, 2.0, 5.0)


def test_tradeoff_pwlf_stats_on_seed_stats() -> None:
    stats = seed_sac_stats()
    tradeoff = get_sac_tradeoff_pwlf_stats(stats, get_greedy_order_meta(stats))
    assert tradeoff.sac_memory == 420 and tradeoff.sac_runtime == 63
    # The curve: start with t recomputed (0 bytes, 1 ms), then add, div, mm, linear+relu_
    # and dropout (which reaches the same x: it frees 0 bytes), and close with copy_.
    xs, ys = list(tradeoff.tradeoff_curve), list(tradeoff.tradeoff_curve.values())
    assert xs == pytest.approx([0.01, 100 / 420 + 0.01, 200 / 420 + 0.01, 320 / 420 + 0.01, 1.01])
    assert ys == pytest.approx([1 / 63, 6 / 63, 14 / 63, 29 / 63, 1.0])
    # Four shifted points: two segments.
    assert tradeoff.n_segments == 2
    assert len(tradeoff.slopes) == len(tradeoff.intercepts) == 2
    assert len(tradeoff.fit_breaks) == 3
    assert tradeoff.fit_breaks == sorted(tradeoff.fit_breaks)
    assert tradeoff.fit_breaks[0] == pytest.approx(xs[0])
    assert tradeoff.fit_breaks[-1] == pytest.approx(xs[-2])
    # Discarding more memory never costs less recomputation: a convex, increasing fit.
    assert 0 < tradeoff.slopes[0] < tradeoff.slopes[1]
    # The fit follows the shifted points (x_k, y_{k+1}).
    lines = list(zip(tradeoff.slopes, tradeoff.intercepts, strict=True))
    fit = [max(s * x + b for s, b in lines) for x in xs[:-1]]
    assert np.abs(np.array(fit) - np.array(ys[1:])).max() < 0.06


def test_tradeoff_curve_is_monotone_and_fit_is_reproducible() -> None:
    rng = np.random.default_rng(0)
    n = 30
    stats = SACStats(
        func_names=[f"aten.op{i}" for i in range(n)],
        runtimes=rng.uniform(0.1, 5.0, n).round(3).tolist(),
        memory=rng.integers(0, 1000, n).tolist(),
        view_like_ops=[3, 17],
        rand_ops=[5, 9, 21],
        saved_autograd_ops=[],
        inplace_ops=[(8, 7), (12, 12)],
        force_store_random=False,
    )
    meta = get_greedy_order_meta(stats)
    first = get_sac_tradeoff_pwlf_stats(stats, meta, n_segments=3)
    second = get_sac_tradeoff_pwlf_stats(stats, meta, n_segments=3)
    assert first == second
    xs, ys = list(first.tradeoff_curve), list(first.tradeoff_curve.values())
    assert all(a < b for a, b in itertools.pairwise(xs))
    assert all(a <= b for a, b in itertools.pairwise(ys))
    assert xs[-1] == pytest.approx(1.01) and ys[-1] == pytest.approx(1.0)
    assert first.n_segments == 3 and len(first.fit_breaks) == 4
    assert all(s > 0 for s in first.slopes)


def test_short_and_degenerate_curves() -> None:
    # Two candidates: the curve has 3 shifted points, so only one segment is fitted.
    stats = SACStats(["aten.mm", "aten.add"], [2.0, 1.0], [10, 0], [], [], [], [], False)
    tradeoff = get_sac_tradeoff_pwlf_stats(stats, get_greedy_order_meta(stats), n_segments=2)
    assert tradeoff.n_segments == 1 and len(tradeoff.slopes) == 1
    # Only views: no memory, nothing to fit; a flat curve instead of a division by zero.
    views = SACStats(["aten.t", "aten.view"], [0.1, 0.1], [0, 0], [0, 1], [], [], [], False)
    flat = get_sac_tradeoff_pwlf_stats(views, get_greedy_order_meta(views))
    assert flat.n_segments == 1 and flat.slopes == [0.0]
    assert flat.sac_memory == 0
    with pytest.raises(ValueError, match="n_segments must be at least 1"):
        get_sac_tradeoff_pwlf_stats(stats, get_greedy_order_meta(stats), n_segments=0)


@pytest.mark.skipif(HAS_MATPLOTLIB, reason="checks the message shown without matplotlib")
def test_saving_the_graph_without_matplotlib_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    stats = seed_sac_stats()
    with pytest.raises(ImportError, match="pip install matplotlib"):
        get_sac_tradeoff_pwlf_stats(
            stats, get_greedy_order_meta(stats), save_tradeoff_graph=True,
            filename=str(tmp_path / "seed"),
        )
    assert not (tmp_path / "seed.png").exists()


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="needs matplotlib")
def test_saving_the_graph(tmp_path: Path) -> None:
    stats = seed_sac_stats()
    get_sac_tradeoff_pwlf_stats(
        stats, get_greedy_order_meta(stats), save_tradeoff_graph=True,
        filename=str(tmp_path / "graphs" / "Foo"), mod_name="Foo",
    )
    assert (tmp_path / "graphs" / "Foo.png").stat().st_size > 0


def test_format_sac_stats() -> None:
    stats = seed_sac_stats()
    table = format_sac_stats(stats, get_greedy_order_meta(stats))
    assert table.startswith("Total Memory: 420 B Total Runtime: 63 ms Store Random: False")
    for name in stats.func_names:
        assert name in table
    for header in ("Op Idx", "Op Name", "Runtimes(ms)", "Memory (B)", "In-place", "Greedy"):
        assert header in table
    relu_row = next(line for line in table.splitlines() if "aten.relu_" in line)
    assert relu_row.split()[-2:] == ["candidate", "#4"]  # with its parent linear
    assert "Greedy" not in format_sac_stats(stats)


def test_format_sac_tradeoff_stats() -> None:
    stats = seed_sac_stats()
    table = format_sac_tradeoff_stats(stats, get_greedy_order_meta(stats))
    for name in stats.func_names:
        assert name in table
    lines = [line for line in table.splitlines() if "aten." in line]
    # Always-recomputed t first, then the greedy order, then always-stored copy_.
    expected = [
        "aten.t", "aten.add", "aten.div", "aten.mm", "aten.linear, aten.relu_",
        "aten.native_dropout", "aten.copy_",
    ]
    assert len(lines) == len(expected)
    assert all(name in line for name, line in zip(expected, lines, strict=True))
    assert lines[-1].split()[-7:-3] == ["1.0000", "420", "1.0000", "63.0000"]
    assert "2.00e+01" in lines[1]  # add's MSPS
