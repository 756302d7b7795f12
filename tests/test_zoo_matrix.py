"""The GPU matrix's cell bookkeeping (benchmarks/zoo_matrix.py), on CPU: what it runs at the anchors'
peaks and the names its files get."""

from pathlib import Path

import pytest

from benchmarks.zoo_matrix import at_peak_cells, cell_stem, least_budget_cells, main


def test_sac_runs_at_each_anchor_peak_that_was_measured():
    base = {"size": "full", "warmup": 7, "steps": 3, "dtype": None}
    anchors = [
        {"model": "gpt2", "loop": "loss_inside", "strategy": "full_ac", "peak_bytes": 4190924288},
        {"model": "bert", "loop": "loss_inside", "strategy": "amb0.5", "error": "OutOfMemoryError"},
        {"model": "moe", "loop": "graph_break", "strategy": "amb0.5", "peak_bytes": 5492153856.0},
    ]
    cells = at_peak_cells(anchors, base, Path("out/partitions"))
    assert cells == [
        dict(base, model="gpt2", loop="loss_inside", strategy="sac@full_ac", budget_bytes=4190924288,
             dump="out/partitions"),
        dict(base, model="moe", loop="graph_break", strategy="sac@amb0.5", budget_bytes=5492153856,
             dump="out/partitions"),
    ]
    assert all(isinstance(c["budget_bytes"], int) for c in cells)
    assert "dump" not in at_peak_cells(anchors, base)[0]


def test_file_names_keep_only_portable_characters():
    assert cell_stem({"model": "gpt2", "loop": "loss_inside", "strategy": "sac@full_ac"}) == "gpt2-loss_inside-sac_full_ac"
    assert cell_stem({"model": "llama", "loop": "graph_break", "strategy": "sac 0.75"}) == "llama-graph_break-sac0.75"


def test_the_two_ways_to_take_anchor_peaks_exclude_each_other(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--at-peaks-of", str(tmp_path), "--at-anchor-peaks", "--out", str(tmp_path / "out")])
    assert "give one" in capsys.readouterr().err


def test_a_refused_sac_cell_runs_again_at_the_least_budget_it_names():
    base = {"size": "full", "warmup": 7, "steps": 3, "dtype": None}
    results = [
        {"model": "gpt2", "loop": "loss_inside", "strategy": "sac@full_ac", "error": "BackendCompilerFailed: graph 0/0: "
         "memory budget 3.90 GiB is below the smallest feasible peak found, 3.93 GiB; raise memory_budget to at "
         "least 4278288593 bytes, or give a fraction"},
        {"model": "bert", "loop": "loss_inside", "strategy": "sac@full_ac", "peak_bytes": 5824883200},
        {"model": "moe", "loop": "loss_inside", "strategy": "sac@full_ac", "error": "OutOfMemoryError"},
        {"model": "t5", "loop": "loss_inside", "strategy": "full_ac", "error": "raise memory_budget to at least 5 bytes"},
        # a second fraction refused with the same least budget: one cell
        {"model": "gpt2", "loop": "loss_inside", "strategy": "sac 0.5", "error": "raise memory_budget to at "
         "least 4278288593 bytes, or give a fraction"},
    ]
    assert least_budget_cells(results, base, Path("out/partitions")) == [
        dict(base, model="gpt2", loop="loss_inside", strategy="sac@least", budget_bytes=4278288593,
             dump="out/partitions")]


def test_at_the_anchors_peaks_every_cell_gets_its_timeline(tmp_path, monkeypatch):
    """``--at-anchor-peaks --timeline``: the anchors, sac at their peaks and sac at a least budget
    named each get OUT/timelines/CELL.png (CELL.json beside it)."""
    import benchmarks.zoo_matrix as zm

    batches = []

    def run_cells(cells, out, jobs):
        batches.append(cells)
        if len(batches) == 1:  # the anchors
            return [dict(c, peak_bytes=1000) for c in cells]
        if len(batches) == 2:  # sac at their peaks: refused
            return [dict(c, error="raise memory_budget to at least 1100 bytes") for c in cells]
        return [dict(c, peak_bytes=1050) for c in cells]

    monkeypatch.setattr(zm, "_run_cells", run_cells)
    zm.main(["--models", "gpt2", "--loops", "loss_inside", "--anchors", "full_ac", "--at-anchor-peaks", "--timeline",
             "--out", str(tmp_path)])
    strategies = [[c["strategy"] for c in cells] for cells in batches]
    assert strategies == [["full_ac"], ["sac@full_ac"], ["sac@least"]]
    for cells in batches:
        for c in cells:
            assert c["timeline"] == str(tmp_path / "timelines" / f"{cell_stem(c)}.png")
    assert (tmp_path / "timelines").is_dir()


def test_a_row_gives_the_steps_prediction_and_what_the_callers_loss_held():
    """The row's prediction is the step's (the graph's other runs and the caller's loss counted, as
    the enforcement compares it), and the row says what the caller's loss held; a record from
    before the step's prediction was kept shows the partitioned graphs' peak."""
    from benchmarks.zoo_matrix import _row

    gib = 2**30
    cell = dict(model="moe", loop="per_block_compile", strategy="sac 0.5", step_ms=189.6, extra_bytes=4 * gib,
                peak_bytes=int(7.715 * gib), budget_bytes=int(7.872 * gib))
    graph = dict(predicted_peak=int(7.129 * gib), first_measured=int(11.47 * gib), replans=1)
    row = _row(dict(cell, graphs=[dict(graph, step_predicted=int(7.71 * gib), caller_loss_bytes=int(3.93 * gib))]))
    assert "predicted 7.710" in row and "caller loss 3.930" in row and "replans 1" in row
    older = _row(dict(cell, graphs=[graph]))
    assert "predicted 7.129" in older and "caller loss" not in older


def test_the_matrix_runs_a_refused_sac_cell_again_at_the_least_budget_it_names(tmp_path, monkeypatch):
    """The plain matrix, like ``--at-anchor-peaks``: a sac fraction refused as out of reach runs
    again at the least budget its refusal names (the planner's promise: that budget compiles and
    holds), once for the fractions that name the same budget."""
    import benchmarks.zoo_matrix as zm

    spawned, batches = [], []

    def spawn(cell, logs=None):
        spawned.append(cell)
        if cell["strategy"] == "compile":
            return dict(cell, static_bytes=100, extra_bytes=1000, peak_bytes=1100, step_ms=1.0)
        return dict(cell, error="BudgetError: raise memory_budget to at least 900 bytes")

    def run_cells(cells, out, jobs):
        batches.append(cells)
        return [dict(c, peak_bytes=880, step_ms=1.0) for c in cells]

    monkeypatch.setattr(zm, "_spawn", spawn)
    monkeypatch.setattr(zm, "_run_cells", run_cells)
    zm.main(["--models", "unet_block", "--anchors", "--fractions", "0.5", "0.25", "--out", str(tmp_path)])
    assert sorted(c["strategy"] for c in spawned) == ["compile", "sac 0.25", "sac 0.5"]
    assert [[(c["strategy"], c["budget_bytes"]) for c in cells] for cells in batches] == [[("sac@least", 900)]]
