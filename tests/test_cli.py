"""The ``sac-compiler`` command line, end to end: plan and estimate in a subprocess on the small
models of ``tests/cli_models.py``, the JSON and the pictures they write (the Pareto curve, the
memory timeline, the per-module trade-off curves: decoded back as PNG images; skipped, with the
reason, where matplotlib is not installed), the one-line errors, complete ``--help`` pages, and the
logging switches (``-v``, ``SAC_LOG``).

The subprocesses run from the repository root, where ``tests.cli_models`` imports; most error
cases run in this process through ``cli.main``, which fails before any model is captured.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sac_compiler import cli
from sac_compiler.plan_graph import fraction_budget
from tests import cli_models

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GPT_INPUTS = "long[4,64]:0-512"
MLP_INPUTS = "float[8,16]"
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
needs_matplotlib = pytest.mark.skipif(
    not HAS_MATPLOTLIB, reason="matplotlib is not installed (pip install 'sac-compiler[plot]'; the test extra has it)")


def _run(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "SAC_LOG"}  # the package's default logging
    full_env.update({"OMP_NUM_THREADS": "1", **(env or {})})
    return subprocess.run([sys.executable, "-m", "sac_compiler", *args], check=False, cwd=ROOT,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


def _assert_one_line_error(stderr: str, *needles: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert lines[0].startswith("sac-compiler: error: "), lines[0]
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


@pytest.fixture(autouse=True)
def _restore_package_logging():
    """``cli.main`` configures the package's loggers; put them back as they were."""
    loggers = [logging.getLogger(name) for name in ("sac_compiler",)]
    saved = [(lg.level, list(lg.handlers), lg.propagate) for lg in loggers]
    yield
    for lg, (level, handlers, propagate) in zip(loggers, saved, strict=True):
        lg.setLevel(level)
        lg.handlers[:] = handlers
        lg.propagate = propagate


def _assert_png(path: Path) -> tuple[int, int]:
    """``path`` is a PNG image that decodes: its (height, width) in pixels."""
    from matplotlib.image import imread

    assert path.is_file(), f"{path} was not written"
    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, image.shape
    return image.shape[0], image.shape[1]


# other strategies' measured points for the Pareto plot (--anchors): a label, a peak, a step time over plain compile's
ANCHORS = [{"label": "full AC", "peak_bytes": 3_000_000, "recompute_ms": 0.01},
           {"label": "activation_memory_budget 0.5", "peak_bytes": 3_500_000, "recompute_ms": 0.004}]


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], dict, Path]:
    """``plan`` on the small GPT with --json, and with matplotlib --plot and --timeline-plot; the
    process, the JSON and the folder written to."""
    out = tmp_path_factory.mktemp("plan")
    (out / "anchors.json").write_text(json.dumps(ANCHORS))
    plots = ["--plot", str(out / "pareto.png"), "--timeline-plot", str(out / "timeline.png"),
             "--anchors", str(out / "anchors.json")] if HAS_MATPLOTLIB else []
    proc = _run("plan", "tests.cli_models:small_gpt", "--inputs", GPT_INPUTS, "--budget", "0.5",
                "--device", "H100-SXM", "--json", str(out / "plan.json"), *plots)
    assert proc.returncode == 0, proc.stderr
    return proc, json.loads((out / "plan.json").read_text()), out


def test_plan_joint_only_skips_the_partition(tmp_path) -> None:
    proc = _run("plan", "tests.cli_models:small_gpt", "--inputs", GPT_INPUTS, "--budget", "0.5", "--sweep", "none",
                "--device", "H100-SXM", "--joint-only", "--json", str(tmp_path / "plan.json"))
    assert proc.returncode == 0, proc.stderr
    assert "partitioned graphs simulated" not in proc.stdout
    assert json.loads((tmp_path / "plan.json").read_text())["partitioned_peak"] is None


def test_plan_prints_the_plan_and_the_sweep(planned) -> None:
    proc, _, _ = planned
    for text in ("predicted peak of the plan", "recompute time", "values kept", "MiB recomputed",
                 "budget sweep", "smallest feasible peak", "plan: predicted peak", "partitioned graphs simulated"):
        assert text in proc.stdout, text
    assert proc.stderr == "", "the package logs nothing by default"


def test_plan_json(planned) -> None:
    _, data, _ = planned
    assert data["target"] == "tests.cli_models:small_gpt"
    assert data["device"] == "H100-SXM" and data["compiler"] == "inductor" and data["solver"] == "highs"
    assert data["inputs"] == [{"spec": GPT_INPUTS, "dtype": "int64", "shape": [4, 64], "range": [0, 512]}]
    assert data["budget"] == "0.5" and data["budget_fraction"] == 0.5
    low, high = data["fraction_range"]
    assert data["budget_bytes"] == fraction_budget(0.5, low, high)
    assert data["predicted_peak"] <= data["budget_bytes"]
    assert data["predicted_peak"] <= data["baseline_peak"]
    # planned as the backend plans: its partitioned graphs checked against the budget
    assert 0 < data["partitioned_peak"] <= data["budget_bytes"]
    assert data["recompute_ms"] >= 0 and data["recomputed_values"] == len(data["recomputed"])
    # the per-module table splits the same plan
    assert sum(m["recomputed_values"] for m in data["modules"]) == data["recomputed_values"]
    assert all(m["kept_bytes"] >= 0 and m["recomputed_bytes"] >= 0 for m in data["modules"])

    sweep = data["sweep"]
    assert [p["fraction"] for p in sweep] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert all(p["error"] is None for p in sweep)
    for p in sweep:
        assert p["budget_bytes"] == fraction_budget(p["fraction"], low, high)
        assert p["predicted_peak"] <= p["budget_bytes"]
    chosen = next(p for p in sweep if p["fraction"] == 0.5)
    assert (chosen["predicted_peak"], chosen["recompute_ms"]) == (data["predicted_peak"], data["recompute_ms"])
    # a point is on the Pareto front unless another has as low a peak and less recompute time
    for p in sweep:
        beaten = any(q["predicted_peak"] <= p["predicted_peak"] and q["recompute_ms"] < p["recompute_ms"] - 1e-12
                     for q in sweep)
        assert p["pareto"] is not beaten, p
    front = sorted((p for p in sweep if p["pareto"]), key=lambda p: p["budget_bytes"])
    for lower, higher in itertools.pairwise(front):
        assert lower["recompute_ms"] >= higher["recompute_ms"] - 1e-12
    assert sweep[-1]["recompute_ms"] == 0.0 and sweep[-1]["pareto"]  # 1.0 is the fastest plan

    budget_range = data["budget_range"]
    assert budget_range["smallest_feasible_peak"] == low == sweep[0]["budget_bytes"]
    assert budget_range["no_recompute_peak"] == data["baseline_peak"]
    assert budget_range["smallest_budget"] >= budget_range["smallest_feasible_peak"]


def test_plan_sweep_is_monotone(planned) -> None:
    """A higher budget never plans slower: the whole sweep is its own Pareto front (a point whose
    plan the planner ranks slower than a lower budget's takes that plan, which fits it too)."""
    _, data, _ = planned
    by_budget = sorted(data["sweep"], key=lambda p: p["budget_bytes"])
    for lower, higher in itertools.pairwise(by_budget):
        assert lower["recompute_ms"] >= higher["recompute_ms"] - 1e-12, f"a lower budget planned faster: {lower}"


@needs_matplotlib
def test_plan_pictures_are_pngs(planned) -> None:
    """The Pareto plot, and the timeline with its two panels (no recomputation, the plan) side by side."""
    proc, _, out = planned
    _assert_png(out / "pareto.png")
    height, width = _assert_png(out / "timeline.png")
    assert width > 1.5 * height
    for name in ("pareto.png", "timeline.png"):
        assert f"wrote {out / name}" in proc.stdout


@needs_matplotlib
def test_estimate_draws_the_tradeoff_curves(tmp_path: Path) -> None:
    """The per-module pwlf fits: drawn with --tradeoff-plot, the same fits --module-info writes."""
    proc = _run("estimate", "tests.cli_models:small_gpt", "--inputs", GPT_INPUTS, "--device", "H100-SXM",
                "--depth", "3", "--json", str(tmp_path / "stats.json"), "--module-info",
                "--tradeoff-plot", str(tmp_path / "tradeoff.png"))
    assert proc.returncode == 0, proc.stderr
    height, width = _assert_png(tmp_path / "tradeoff.png")
    data = json.loads((tmp_path / "stats.json").read_text())
    fitted = [s["fqn"] for s in data["module_info"]["mod_stats"] if s["n_segments"] > 0]
    # the model and each of its layers have ops of their own, all within --depth 3: one panel each
    assert sorted(fitted) == sorted(data["sac_mod_stats"]) == sorted(
        ["SmallGPT", *(f"SmallGPT.layers.{i}" for i in range(cli_models.LAYERS))])
    assert width > 2 * height  # a row of three panels


def test_estimate_prints_the_sac_tables(tmp_path: Path) -> None:
    """A class as the factory; -v logs the package's INFO records."""
    proc = _run("estimate", "tests.cli_models:TinyMLP", "--inputs", MLP_INPUTS, "--device", "h100",
                "--json", str(tmp_path / "stats.json"), "-v")
    assert proc.returncode == 0, proc.stderr
    for text in ("Module: TinyMLP", "Op Name", "Saved Autograd", "Greedy", "Total Memory"):
        assert text in proc.stdout, text
    assert "INFO sac_compiler.cli" in proc.stderr
    data = json.loads((tmp_path / "stats.json").read_text())
    assert data["device"] == "H100-SXM" and "TinyMLP" in data["sac_mod_stats"]
    stats = data["sac_mod_stats"]["TinyMLP"]
    assert "addmm" in stats["func_names"] and len(stats["runtimes"]) == len(stats["func_names"])


@pytest.mark.parametrize(("args", "needles"), [
    (["plan", "no_such_module_xyz:build", "--inputs", MLP_INPUTS], ["cannot import 'no_such_module_xyz'"]),
    (["plan", "tests.cli_models:TinyMLP", "--inputs", MLP_INPUTS, "--budget", "6 gigs"], ["--budget '6 gigs'"]),
], ids=["factory-import", "bad-budget"])
def test_errors_in_a_subprocess(args: list[str], needles: list[str]) -> None:
    proc = _run(*args)
    assert proc.returncode != 0
    _assert_one_line_error(proc.stderr, *needles)


@pytest.mark.parametrize(("args", "needles"), [
    (["plan", "tests.cli_models:nope", "--inputs", MLP_INPUTS], ["has no 'nope'", "TinyMLP"]),
    (["plan", "tests.cli_models", "--inputs", MLP_INPUTS], ["not MODULE:FACTORY"]),
    (["plan", "tests/no_such_file.py:build", "--inputs", MLP_INPUTS], ["no such file"]),
    (["plan", "tests.cli_models:broken", "--inputs", MLP_INPUTS], ["broken() failed", "always fails"]),
    (["plan", "tests.cli_models:not_a_module", "--inputs", MLP_INPUTS], ["must return a torch.nn.Module"]),
    (["plan", "tests.cli_models:small_gpt"], ["without example inputs", "--inputs"]),
    (["plan", "tests.cli_models:TinyMLP", "--inputs", "float[8,16"], ["--inputs", "'float[8,16'"]),
    (["plan", "tests.cli_models:TinyMLP", "--inputs", "quad[8,16]"], ["unknown dtype 'quad'"]),
    (["plan", "tests.cli_models:TinyMLP", "--inputs", "long[8,x]"], ["'x' is not a whole number"]),
    (["plan", "tests.cli_models:TinyMLP", "--inputs", "long[8]:9-3"], ["below its high"]),
    (["plan", "tests.cli_models:TinyMLP", "--inputs", MLP_INPUTS, "--device", "H900"], ["--device 'H900'", "H100-SXM"]),
    (["estimate", "tests.cli_models:TinyMLP", "--inputs", MLP_INPUTS, "--device", "cuda"], ["not a torch device"]),
    (["plan", "tests.cli_models:TinyMLP", "--inputs", MLP_INPUTS, "--budget", "2"], ["--budget '2'", "[0, 1]"]),
    (["plan", "tests.cli_models:TinyMLP", "--inputs", MLP_INPUTS, "--budget", "6GB7"], ["--budget '6GB7'"]),
    (["plan", "tests.cli_models:TinyMLP", "--inputs", MLP_INPUTS, "--sweep", "0,2"], ["--sweep"]),
    (["plan", "tests.cli_models:TinyMLP", "--inputs", MLP_INPUTS, "--json", "no_such_dir/x.json"], ["does not exist"]),
    (["plan", "tests.cli_models:TinyMLP", "--inputs", MLP_INPUTS, "--budget", "1KiB", "--device", "H100-SXM",
      "--sweep", "none"], ["--budget 1KiB", "memory budget"]),
    (["plan", "tests.cli_models:TinyMLP", "--inputs", "float[8,5]", "--device", "H100-SXM"],
     ["capturing tests.cli_models:TinyMLP", "float[8,5]"]),
    (["plan", "tests.cli_models:TinyMLP", "--solver", "glpk"], ["invalid choice: 'glpk'"]),
    (["plan", "tests.cli_models:TinyMLP", "--inputs", MLP_INPUTS, "--plot", "p.png", "--timeline-plot", "./p.png"],
     ["--timeline-plot './p.png'", "--plot writes too"]),
    (["plan", "tests.cli_models:TinyMLP", "--inputs", MLP_INPUTS, "--timeline-plot", "no_such_dir/t.png"],
     ["--timeline-plot", "does not exist"]),
    (["estimate", "tests.cli_models:TinyMLP", "--inputs", MLP_INPUTS, "--tradeoff-plot", "tests"],
     ["--tradeoff-plot 'tests' is not a file path"]),
    (["plan"], ["MODULE:FACTORY"]),
])
def test_errors_are_one_line(args: list[str], needles: list[str], capsys: pytest.CaptureFixture[str],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    try:
        code = cli.main(args)
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    assert code not in (0, None)
    _assert_one_line_error(capsys.readouterr().err, *needles)


@needs_matplotlib
@pytest.mark.parametrize(("args", "needles"), [
    (["estimate", "tests.cli_models:TinyMLP", "--inputs", MLP_INPUTS, "--tradeoff-plot", "curves.txt"],
     ["--tradeoff-plot 'curves.txt'", ".png", ".svg"]),
    (["plan", "tests.cli_models:TinyMLP", "--inputs", MLP_INPUTS, "--timeline-plot", "timeline"],
     ["--timeline-plot 'timeline'", "suffix"]),
], ids=["unknown-format", "no-suffix"])
def test_picture_formats_are_checked_first(args: list[str], needles: list[str], capsys: pytest.CaptureFixture[str],
                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A picture path whose suffix matplotlib cannot write stops the command before any work."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(args) == cli.EXIT_ERROR
    _assert_one_line_error(capsys.readouterr().err, *needles)
    assert not list(tmp_path.iterdir())


def test_debug_shows_the_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    with pytest.raises(cli.CLIError, match="always fails") as info:
        cli.main(["plan", "tests.cli_models:broken", "--inputs", MLP_INPUTS, "--debug"])
    assert isinstance(info.value.__cause__, RuntimeError)


@pytest.mark.parametrize("args", [
    ["plan", "tests.cli_models:TinyMLP", "--inputs", MLP_INPUTS, "--plot", "p.png"],
    ["plan", "tests.cli_models:TinyMLP", "--inputs", MLP_INPUTS, "--timeline-plot", "t.png"],
    ["estimate", "tests.cli_models:TinyMLP", "--inputs", MLP_INPUTS, "--tradeoff-plot", "t.png"],
], ids=["plot", "timeline-plot", "tradeoff-plot"])
def test_plot_without_matplotlib(args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Each picture flag stops before any work, naming itself and the install command."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    monkeypatch.chdir(tmp_path)
    code = cli.main(args)
    assert code != 0
    _assert_one_line_error(capsys.readouterr().err, f"{args[-2]}: ", "pip install 'sac-compiler[plot]'")
    assert not list(tmp_path.iterdir())


def test_verbosity_sets_the_package_level(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SAC_LOG", raising=False)
    for flags, level in (([], logging.WARNING), (["-v"], logging.INFO), (["-vv"], logging.DEBUG)):
        cli.main(["plan", "tests.cli_models:TinyMLP", "--budget", "7", *flags])  # fails before any work
        assert logging.getLogger("sac_compiler").level == level
        assert logging.getLogger("sac_compiler.passes.annotate_memory").getEffectiveLevel() == level
        assert len(logging.getLogger("sac_compiler").handlers) == 1
    capsys.readouterr()


def test_sac_log_configures_the_logger_at_import() -> None:
    code = ("import logging, sac_compiler; lg = logging.getLogger('sac_compiler'); "
            "print(lg.level, len(lg.handlers))")
    env = {**os.environ, "SAC_LOG": "debug"}
    proc = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(logging.DEBUG), "1"]


def test_every_flag_has_help_and_a_default() -> None:
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    assert set(subparsers) == set(cli.COMMANDS)
    for name, sub in subparsers.items():
        text = sub.format_help()
        for action in sub._actions:
            if not action.option_strings or "-h" in action.option_strings:
                continue
            assert all(flag in text for flag in action.option_strings), (name, action.option_strings)
            assert action.help and "default" in action.help, (name, action.option_strings)


def test_help_pages(capsys: pytest.CaptureFixture[str]) -> None:
    expected = {
        "plan": ("MODULE:FACTORY", "--inputs", "--budget", "--device", "--solver", "--compiler", "--time-limit",
                 "--sweep", "--json", "--plot", "--timeline-plot", "--verbose", "--debug",
                 "pip install 'sac-compiler[plot]'"),
        "estimate": ("MODULE:FACTORY", "--inputs", "--device", "--mode", "--depth", "--json", "--module-info",
                     "--tradeoff-plot", "--verbose", "--debug"),
        "demo": ("--layers", "--dim", "--heads", "--seq", "--batch", "--vocab", "--dropout", "--device", "--budget",
                 "--train-step", "--verbose", "--debug"),
    }
    for command, flags in expected.items():
        with pytest.raises(SystemExit) as exit_:
            cli.main([command, "--help"])
        assert exit_.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        for flag in flags:
            assert flag in text, (command, flag)


def test_no_subcommand_runs_the_demo(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli._with_default_command([]) == ["demo"]
    assert cli._with_default_command(["--layers", "2"]) == ["demo", "--layers", "2"]
    assert cli._with_default_command(["plan", "m:f"]) == ["plan", "m:f"]
    code = cli.main(["--layers", "1", "--dim", "32", "--heads", "2", "--seq", "32", "--batch", "2", "--vocab", "128",
                     "--device", "H100-SXM"])
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith("Transformer: 1 layers, dim 32") and "predicted peak of the plan" in out


def test_input_specs() -> None:
    specs = cli.parse_inputs("long[8,1024]:0-50257; bf16[4,2048,4096];float[]")
    assert [(s.dtype, s.shape, s.low, s.high) for s in specs] == [
        ("int64", (8, 1024), 0, 50257), ("bfloat16", (4, 2048, 4096), None, None), ("float32", (), None, None)]
    assert cli.parse_inputs("fp16[2, 3] : -1.5-2.5")[0].low == -1.5
    tensor = specs[0].build()
    assert tensor.device.type == "meta" and tuple(tensor.shape) == (8, 1024)
    for bad in ("", "long[8]:0-1e30", "bool[2]:0-1", "int8[2]:0-300", "long[8];;float[2]", "long[8]:0.5-3"):
        with pytest.raises(cli.CLIError, match="--inputs"):
            cli.parse_inputs(bad)


def test_budget_and_sweep_parsing() -> None:
    assert cli.parse_budget("0.5") == 0.5 and isinstance(cli.parse_budget("1"), float)
    assert cli.parse_budget("0") == 0.0
    assert cli.parse_budget("6GiB") == "6GiB" and cli.parse_budget("6442450944B") == "6442450944B"
    for bad in ("1.5", "-0.1", "nan", "6442450944", "six"):
        with pytest.raises(cli.CLIError, match="--budget"):
            cli.parse_budget(bad)
    assert cli.parse_sweep("1, 0.5,0,0.5") == [0.0, 0.5, 1.0]
    assert cli.parse_sweep("none") == []


def test_factory_from_a_file_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    factory = cli.load_factory("tests/cli_models.py:TinyMLP")
    assert factory.__name__ == "TinyMLP"
    loaded = cli.build_model("tests/cli_models.py:small_gpt_with_inputs", None)
    assert loaded.name == "SmallGPT" and loaded.inputs[0].device.type == "meta"
    assert all(p.device.type == "meta" for p in loaded.model.parameters())


@needs_matplotlib
def test_plan_draws_the_anchors_it_is_given(planned) -> None:
    """--anchors: the measured points go into the JSON as read, and onto the Pareto plot."""
    proc, data, out = planned
    assert data["anchors"] == [{**a, "recompute_ms": float(a["recompute_ms"])} for a in ANCHORS]
    _assert_png(out / "pareto.png")


@pytest.mark.parametrize("content, fragment", [
    (None, "cannot read it"),
    ("{not json", "not JSON"),
    ('{"label": "x"}', "expected a list of objects"),
    ('[{"label": "x", "peak_bytes": -1, "recompute_ms": 1.0}]', "item 0"),
    ('[{"label": "x", "peak_bytes": 10, "recompute_ms": "fast"}]', "item 0"),
])
def test_bad_anchors_are_one_line_errors(tmp_path: Path, content: str | None, fragment: str) -> None:
    path = tmp_path / "anchors.json"
    if content is not None:
        path.write_text(content)
    proc = _run("plan", "tests.cli_models:small_gpt", "--inputs", GPT_INPUTS, "--budget", "0.5",
                "--device", "H100-SXM", "--plot", str(tmp_path / "p.png"), "--anchors", str(path))
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--anchors" in lines[0] and fragment in lines[0], proc.stderr
