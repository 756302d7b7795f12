"""The strategy benchmark's CPU smoke mode: one record per strategy, times measured, errors kept as text."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_strategies.py"


@pytest.fixture(scope="module")
def compare_strategies():
    spec = importlib.util.spec_from_file_location("compare_strategies", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_smoke_writes_one_record_per_strategy(compare_strategies, tmp_path):
    compare_strategies.main(["--smoke", "--steps", "3", "--rounds", "2", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "results.json").read_text())

    names = [s.name for s in compare_strategies.SMOKE_STRATEGIES]
    assert [r["strategy"] for r in report["results"]] == names
    assert report["smoke"] is True and report["torch_version"] == torch.__version__
    assert report["steps"] == 3 and report["rounds"] == 2
    assert report["rounds_done"] == {"llama": 2} and report["complete"] is True
    for record in report["results"]:
        assert record["peak_bytes"] is None  # no peak on CPU
        if record["status"] == "ok":
            assert record["step_ms"] > 0 and len(record["step_ms_all"]) == 3 * 2  # steps x rounds
            assert all(t > 0 for t in record["step_ms_all"])
            assert record["error"] is None
        else:
            assert record["status"] == "error"
            assert isinstance(record["error"], str) and record["error"]
            assert isinstance(record["traceback"], str)
    # The eager strategies do not depend on the backend: they must run.
    by_name = {r["strategy"]: r for r in report["results"]}
    assert by_name["eager"]["status"] == by_name["eager + full AC"]["status"] == "ok"


def test_a_failing_strategy_is_recorded_not_raised(compare_strategies):
    def build(device):
        raise RuntimeError("model construction failed on purpose")

    workload = compare_strategies.Workload("broken", {}, build, lambda device: torch.zeros(1, 1, dtype=torch.long))
    strategies = [compare_strategies.Strategy("eager"), compare_strategies.Strategy("eager + full AC", checkpoint="full")]
    results, checks = compare_strategies.run_workload(workload, strategies, torch.device("cpu"), steps=1, warmup=1,
                                                      seed=0, rounds=2)
    assert [r.strategy for r in results] == ["eager", "eager + full AC"] and checks == []
    for result in results:  # each recorded, and the run went on past the first
        assert result.status == "error" and result.step_ms is None
        assert result.error == "RuntimeError: model construction failed on purpose"
        assert "Traceback" in result.traceback


def test_results_are_written_after_every_round_and_can_be_read_back(compare_strategies, tmp_path, capsys):
    workload = compare_strategies.llama_workload(compare_strategies.SMOKE_LLAMA)
    strategies = [compare_strategies.Strategy("eager"), compare_strategies.Strategy("eager + full AC", checkpoint="full")]
    seen = []
    results, _ = compare_strategies.run_workload(
        workload, strategies, torch.device("cpu"), steps=2, warmup=1, seed=0, rounds=3,
        on_round=lambda partial, done: seen.append((done, [len(r.step_ms_all) for r in partial])))
    # after each strategy of the first round, then each strategy's steps so far after every
    # round; the last report is the final result
    assert seen == [(0, [2]), (0, [2, 2]), (1, [2, 2]), (2, [4, 4]), (3, [6, 6])]
    assert [len(r.step_ms_all) for r in results] == [6, 6]

    # a results.json read back gives the same table
    compare_strategies.main(["--smoke", "--steps", "2", "--rounds", "1", "--out", str(tmp_path)])
    written = capsys.readouterr().out
    report = compare_strategies.main(["--from-json", str(tmp_path / "results.json"), "--out", str(tmp_path / "again")])
    again = capsys.readouterr().out
    assert report.complete and [r.strategy for r in report.results] == [s.name for s in compare_strategies.SMOKE_STRATEGIES]
    table = compare_strategies.format_table(report.results)
    assert table in written and table in again


def test_dumped_partitions_replay_to_their_recorded_peaks(compare_strategies, tmp_path, capsys):
    """``--dump-partitions`` writes each sac graph's partition; ``replay_partition.py`` re-simulates
    it (here with the same code, so to the same peak)."""
    compare_strategies.main(["--smoke", "--steps", "1", "--rounds", "1", "--dump-partitions", "--out", str(tmp_path)])
    records = sorted((tmp_path / "partitions").glob("*.json"))
    assert records and all("sac" in p.name for p in records)
    spec = importlib.util.spec_from_file_location("replay_partition", SCRIPT.parent / "replay_partition.py")
    replay = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(replay)
    rows = replay.replay_files(records)
    assert all(recorded == replayed for _, recorded, replayed, _ in rows)
    capsys.readouterr()
    assert replay.main([str(p) for p in records] + ["--timeline"]) == 0
    out = capsys.readouterr().out
    assert records[0].name in out and "backward, MiB over parameters" in out


def test_each_estimate_mode_gets_its_own_budgeted_sac_strategies(compare_strategies):
    both = compare_strategies.gpu_strategies(("cost-model", "benchmark"))
    names = [s.name for s in both]
    assert len(names) == len(set(names))
    assert [s.name for s in both if s.sac_estimate_mode == "benchmark"] == [
        f"sac {f:.0%} (benchmark)" for f in compare_strategies.SAC_FRACTIONS]
    assert [s for s in both if s.sac_estimate_mode == "cost-model"] == compare_strategies.gpu_strategies()
    # the mode reaches the backend: benchmark estimates need a GPU, and say so on this machine
    strategy = next(s for s in both if s.sac_estimate_mode == "benchmark")
    model = torch.nn.Linear(8, 8)
    loss = compare_strategies.compile_for(model, strategy, budget_bytes=2**20)
    if not torch.cuda.is_available():
        with pytest.raises(Exception, match="mode='benchmark' times ops on a GPU"):
            loss(torch.randn(4, 8))


def test_recompute_rates_needs_a_gpu_and_says_so(capsys):
    spec = importlib.util.spec_from_file_location("recompute_rates", SCRIPT.parent / "recompute_rates.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if torch.cuda.is_available():
        rows = module.main(["--batch", "1", "--seq", "256", "--dim", "256", "--ffn", "512", "--heads", "4"])
        assert len(rows) == 3 and all(ms > 0 and per_mib > 0 for _, ms, per_mib in rows)
    else:
        with pytest.raises(SystemExit):
            module.main([])
        assert "needs a CUDA GPU" in capsys.readouterr().err


def test_the_table_gives_each_sac_budget_over_compiles_parameters_and_inputs(compare_strategies):
    R = compare_strategies.StrategyResult
    compiled = R("m", compare_strategies.COMPILE, "ok", step_ms=1.0, before_bytes=2**30, peak_bytes=2**31,
                 extra_peak_gib=1.0)
    refused = R("m", "sac 50%", "error", budget_bytes=2**30 + 2**29, error="BudgetError: too low",
                error_summary="BudgetError: too low")
    row = next(line for line in compare_strategies.format_table([compiled, refused]).splitlines() if "sac 50%" in line)
    assert [cell.strip() for cell in row.split("|")][6] == "0.50"


def test_recorded_sac_compiles_skip_the_caches_quietly(compare_strategies):
    """The benchmark's recording partitioner must run on every compile (a cache hit would skip it
    and lose the plan) and its class cannot be pickled into a cache key: its compiles bypass
    Inductor's caches without the warning and traceback a failed key would log."""
    import logging

    class Seen(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    seen = Seen()
    logger = logging.getLogger("torch._inductor.codecache")
    logger.addHandler(seen)
    workload = compare_strategies.llama_workload(compare_strategies.SMOKE_LLAMA)
    strategy = compare_strategies.Strategy("sac, no budget", backend="sac")
    plans, records = [], []
    try:
        torch._dynamo.reset()
        torch.manual_seed(0)
        loss = compare_strategies.compile_for(workload.build(torch.device("cpu")), strategy, None, plans, records)
        loss(workload.tokens(torch.device("cpu"))).backward()
    finally:
        logger.removeHandler(seen)
        torch._dynamo.reset()
    assert len(plans) == len(records) == 1 and plans[0].partitioned is not None
    assert not [m for m in seen.messages if "pickle" in m], seen.messages
