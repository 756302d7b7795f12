"""The ``sac-compiler`` command line: plan or estimate your own model, or run the built-in demo.

    sac-compiler plan MODULE:FACTORY --inputs "long[8,1024]:0-50257" --budget 6GiB --device H100-SXM
    sac-compiler estimate MODULE:FACTORY --inputs "float[8,3,224,224]"
    sac-compiler demo            # also: python -m sac_compiler, with no subcommand

``MODULE:FACTORY`` names a function or class that builds the model; it is called under
``torch.device("meta")``, so the model's parameters take no memory, and the joint graph is captured
on fake tensors: nothing runs, and no GPU is needed. ``FACTORY`` may also return
``(model, example_inputs)``; ``--inputs`` then may be left out.

Every user error (a target that does not import, an input spec or budget that does not parse, an
unknown device, a budget no plan meets) ends the command with one line on stderr,
``sac-compiler: error: ...``, and a non-zero exit status; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

log = logging.getLogger(__name__)

PROG = "sac-compiler"
COMMANDS = ("plan", "estimate", "demo")
DEFAULT_SWEEP = "0,0.25,0.5,0.75,1"
EXIT_ERROR = 1
EXIT_USAGE = 2


class CLIError(Exception):
    """A user error: its message is the one line the command prints (it names the input and what to do)."""


# ----------------------------------------------------------------------------------------- logging

_LOGGERS = ("sac_compiler",)  # the passes log as sac_compiler.passes.*
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_handler: logging.Handler | None = None


def configure_logging(level: int) -> None:
    """Log the package's records (the ``sac_compiler`` logger, the passes' ``sac_compiler.passes`` included) at ``level`` and above to
    stderr. Called again, it replaces its earlier handler rather than adding a second one; the
    records do not also reach the root logger, so they are not printed twice."""
    global _handler
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        if _handler is not None:
            logger.removeHandler(_handler)
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
    _handler = handler


def logging_from_env() -> None:
    """``SAC_LOG=info|debug`` (or ``warning``, ``error``; any case): configure the package's logging at
    that level when ``sac_compiler`` is imported, for library users who set up no logging of their
    own. Unset or empty: logging is left alone. Another value: a warning, and logging is left alone."""
    value = os.environ.get("SAC_LOG", "").strip().lower()
    if not value:
        return
    level = _LEVELS.get(value)
    if level is None:
        warnings.warn(f"SAC_LOG={value!r} is not one of {', '.join(_LEVELS)}; sac_compiler's logging is left as it is",
                      stacklevel=3)
        return
    configure_logging(level)


# ------------------------------------------------------------------------------------------ inputs

# spec dtype names -> torch dtype attribute names
DTYPES = {
    "float": "float32", "float32": "float32", "fp32": "float32", "f32": "float32",
    "half": "float16", "float16": "float16", "fp16": "float16", "f16": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "double": "float64", "float64": "float64", "fp64": "float64", "f64": "float64",
    "long": "int64", "int64": "int64", "i64": "int64",
    "int": "int32", "int32": "int32", "i32": "int32",
    "short": "int16", "int16": "int16", "i16": "int16",
    "int8": "int8", "i8": "int8",
    "uint8": "uint8", "byte": "uint8", "u8": "uint8",
    "bool": "bool",
}
_INTEGER_DTYPES = {"int64": 63, "int32": 31, "int16": 15, "int8": 7}  # bits below the sign
_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_ITEM = re.compile(rf"^(?P<dtype>[A-Za-z][A-Za-z0-9]*)\s*\[(?P<dims>[^\]]*)\]\s*(?::\s*(?P<low>{_NUMBER})\s*-\s*"
                   rf"(?P<high>{_NUMBER}))?$")
INPUTS_FORM = ("DTYPE[D0,D1,...] with an optional :LOW-HIGH value range, several separated by ';' "
               "(e.g. \"long[8,1024]:0-50257; float[8,3,224,224]\")")


@dataclass(frozen=True)
class InputSpec:
    """One example input: a dtype (a torch dtype name), a shape, and the value range it stands for.

    The range (``low`` inclusive, ``high`` exclusive, as ``torch.randint``) documents what the
    input holds, token ids for instance; the inputs are made on the meta device, where no values
    exist, so it does not change the plan. It is checked (``low < high``, within the dtype) and
    written to the JSON.
    """

    text: str
    dtype: str
    shape: tuple[int, ...]
    low: float | None = None
    high: float | None = None

    def build(self) -> Any:
        """The input as a meta tensor."""
        import torch

        return torch.empty(self.shape, dtype=getattr(torch, self.dtype), device="meta")

    def as_json(self) -> dict[str, Any]:
        return {"spec": self.text, "dtype": self.dtype, "shape": list(self.shape),
                "range": None if self.low is None else [self.low, self.high]}


def parse_inputs(text: str) -> list[InputSpec]:
    """``"long[8,1024]:0-50257; bf16[4,2048,4096]"`` -> the input specs, in order (see ``INPUTS_FORM``)."""
    items = [item.strip() for item in text.split(";")]
    if not any(items):
        raise CLIError(f"--inputs {text!r} is empty; give {INPUTS_FORM}")
    return [_parse_input(item, i) for i, item in enumerate(items) if item or i < len(items) - 1]


def _parse_input(item: str, index: int) -> InputSpec:
    def bad(why: str) -> NoReturn:
        raise CLIError(f"--inputs: cannot read input {index} {item!r}: {why}; write {INPUTS_FORM}")

    if not item:
        bad("it is empty (two ';' in a row?)")
    match = _ITEM.match(item)
    if match is None:
        bad("it is not DTYPE[shape] with an optional :LOW-HIGH")
    name = match.group("dtype").lower()
    dtype = DTYPES.get(name)
    if dtype is None:
        bad(f"unknown dtype {match.group('dtype')!r} (known: {', '.join(DTYPES)})")
    dims_text = match.group("dims").strip()
    shape: list[int] = []
    for dim in dims_text.split(",") if dims_text else []:
        dim = dim.strip()
        if not dim.isdigit():
            bad(f"the dimension {dim!r} is not a whole number >= 0")
        shape.append(int(dim))
    low: float | None = None
    high: float | None = None
    if match.group("low") is not None:
        low_f, high_f = float(match.group("low")), float(match.group("high"))
        if dtype == "bool":
            bad("a bool input takes no value range")
        if not low_f < high_f:
            bad(f"the range's low {match.group('low')} must be below its high {match.group('high')} "
                "(LOW inclusive, HIGH exclusive)")
        if dtype in _INTEGER_DTYPES or dtype == "uint8":
            if not (low_f.is_integer() and high_f.is_integer()):
                bad(f"an integer input's range must be whole numbers, got {match.group('low')}-{match.group('high')}")
            least, most = (0, 256) if dtype == "uint8" else (-(2 ** _INTEGER_DTYPES[dtype]), 2 ** _INTEGER_DTYPES[dtype])
            if low_f < least or high_f > most:
                bad(f"the range {int(low_f)}-{int(high_f)} does not fit {dtype} ({least}-{most})")
            low, high = int(low_f), int(high_f)
        else:
            low, high = low_f, high_f
    return InputSpec(text=item, dtype=dtype, shape=tuple(shape), low=low, high=high)


# ------------------------------------------------------------------------------- budget and device


def parse_budget(text: str) -> float | str:
    """``--budget``: a number without a unit is a fraction in [0, 1] (``"0.5"``: half the saved
    activations); with a unit it is bytes (``"6GiB"``, ``"6000MB"``, ``"6442450944B"``)."""
    from sac_compiler.config import parse_bytes

    stripped = text.strip()
    try:
        number = float(stripped)
    except ValueError:
        number = None
    if number is not None:
        if not 0.0 <= number <= 1.0:  # nan fails too
            raise CLIError(f"--budget {text!r}: a number without a unit is a fraction of the saved activations "
                           "and must be in [0, 1] (0: the lowest peak found, 1: the fastest plan); for bytes give "
                           "a unit, e.g. '6GiB', '6000MB' or '6442450944B'")
        return number
    try:
        parse_bytes(stripped, option="--budget")
    except ValueError as error:
        raise CLIError(f"--budget {text!r} is neither a fraction in [0, 1] nor a size with a unit; write e.g. "
                       "0.5, 6GiB, 6000MB or 6442450944B (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)") from error
    return stripped


def check_device(name: str) -> str:
    """``--device``: ``auto`` or a spec name or alias (any case); the error lists the known ones."""
    from sac_compiler.device_specs import DEVICE_ALIASES, known_device_names

    names = known_device_names()
    if name.strip().lower() in {"auto", *(n.lower() for n in names), *DEVICE_ALIASES}:
        return name.strip()
    hint = ""
    if name.strip().lower().split(":")[0] in ("cpu", "cuda", "meta", "mps", "xpu"):
        hint = " (it names the GPU model whose specs the cost model uses, not a torch device)"
    raise CLIError(f"--device {name!r} is not a known device spec{hint}; give one of {', '.join(names)} "
                   f"(aliases {', '.join(sorted(DEVICE_ALIASES))}; any case), or auto for the visible GPU")


def parse_sweep(text: str) -> list[float]:
    """``--sweep "0,0.25,0.5"`` -> the fractions, sorted, duplicates dropped; ``none`` or ``""``: no sweep."""
    if text.strip().lower() in ("", "none", "off"):
        return []
    out = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            value = float("nan")
        if not 0.0 <= value <= 1.0:
            raise CLIError(f"--sweep {text!r}: {part.strip()!r} is not a fraction in [0, 1]; give fractions "
                           f"separated by commas (e.g. {DEFAULT_SWEEP!r}), or none")
        out.append(value)
    return sorted(set(out))


def read_anchors(path: str) -> list[dict[str, Any]]:
    """``--anchors``: other strategies' measured points, each ``{"label", "peak_bytes", "recompute_ms"}``."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as error:
        raise CLIError(f"--anchors {path}: cannot read it ({error.strerror or error})") from error
    except json.JSONDecodeError as error:
        raise CLIError(f"--anchors {path}: not JSON ({error.msg} at line {error.lineno})") from error
    form = ("a list of objects with 'label' (a string), 'peak_bytes' (an int of bytes > 0) and 'recompute_ms' "
            "(a number of ms >= 0)")
    if not isinstance(data, list):
        raise CLIError(f"--anchors {path}: expected {form}, got {type(data).__name__}")
    out = []
    for i, item in enumerate(data):
        ok = (isinstance(item, dict) and isinstance(item.get("label"), str)
              and isinstance(item.get("peak_bytes"), int) and not isinstance(item.get("peak_bytes"), bool)
              and item["peak_bytes"] > 0 and isinstance(item.get("recompute_ms"), (int, float))
              and not isinstance(item.get("recompute_ms"), bool) and item["recompute_ms"] >= 0)
        if not ok:
            raise CLIError(f"--anchors {path}: item {i} ({json.dumps(item)[:80]}) is not {form}")
        out.append({"label": item["label"], "peak_bytes": item["peak_bytes"], "recompute_ms": float(item["recompute_ms"])})
    return out


def check_output(flag: str, path: str | None) -> None:
    """An output path must be a file in an existing, writable directory (checked before any work)."""
    if path is None:
        return
    target = Path(path)
    if not path or target.is_dir():
        raise CLIError(f"{flag} {path!r} is not a file path; give a file to write, such as plan.json")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise CLIError(f"{flag} {path!r}: the directory {str(parent)!r} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise CLIError(f"{flag} {path!r} is not writable; give a path in a writable directory")


def check_plots(plots: Sequence[tuple[str, str | None]]) -> None:
    """The picture flags given (``(flag, path)``, path None when not given): each path writable and
    not another's, and matplotlib installed; checked before any work."""
    given = [(flag, path) for flag, path in plots if path is not None]
    for flag, path in given:
        check_output(flag, path)
    seen: dict[Path, str] = {}
    for flag, path in given:
        target = Path(path).resolve()
        if target in seen:
            raise CLIError(f"{flag} {path!r} is the file {seen[target]} writes too; give each picture a path of its own")
        seen[target] = flag
    if given:
        from sac_compiler.plots import MissingMatplotlib, require_matplotlib, supported_formats

        try:
            require_matplotlib()
        except MissingMatplotlib as error:
            raise CLIError(f"{given[0][0]}: {error}") from error
        formats = supported_formats()
        for flag, path in given:
            suffix = Path(path).suffix.lower().removeprefix(".")
            if suffix not in formats:
                raise CLIError(f"{flag} {path!r}: the file's suffix picks the picture's format, and matplotlib "
                               f"writes {', '.join('.' + f for f in sorted(formats))}; give e.g. timeline.png")


# ------------------------------------------------------------------------------------------ model


def load_factory(target: str) -> Callable[[], Any]:
    """``MODULE:FACTORY`` -> the callable. ``MODULE`` is a dotted module path importable from the
    current directory (which is put on ``sys.path``) or a path to a ``.py`` file; ``FACTORY`` is an
    attribute of it, dotted for a nested one (``Models.small``)."""
    module_part, sep, attr = target.rpartition(":")
    if not sep or not module_part or not attr:
        raise CLIError(f"{target!r} is not MODULE:FACTORY; name the module and the function or class that builds "
                       "the model, e.g. my_models:build_gpt or path/to/models.py:build_gpt")
    if module_part.endswith(".py") or "/" in module_part or os.sep in module_part:
        module = _import_file(module_part)
    else:
        module = _import_dotted(module_part)
    obj: Any = module
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            where = module_part if i == 0 else ".".join([module_part, *attr.split(".")[:i]])
            defined = sorted(n for n, v in vars(obj).items() if callable(v) and not n.startswith("_")) \
                if hasattr(obj, "__dict__") else []
            shown = ", ".join(defined[:12]) + (", ..." if len(defined) > 12 else "")
            raise CLIError(f"{where!r} has no {part!r}" + (f"; its callables are {shown}" if defined else ""))
        obj = getattr(obj, part)
    if not callable(obj):
        raise CLIError(f"{target!r} is a {type(obj).__name__}, not a function or class; name the callable that "
                       "builds the model")
    return obj


def _import_dotted(name: str) -> Any:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name and (name == error.name or name.startswith(error.name + ".")):
            raise CLIError(f"cannot import {name!r}: no module {error.name!r} in the current directory or on "
                           "the Python path; run from the directory that contains it, or give a path to a .py "
                           "file") from error
        raise CLIError(f"importing {name!r} failed: {_one_line(error)} (a module it imports; install it)") from error
    except Exception as error:  # the user's module may raise anything while importing
        raise CLIError(f"importing {name!r} failed: {_one_line(error)}") from error


def _import_file(path_text: str) -> Any:
    path = Path(path_text)
    if not path.is_file():
        raise CLIError(f"cannot import {path_text!r}: no such file; give a path to a .py file, or a dotted "
                       "module path importable from the current directory")
    name = re.sub(r"\W", "_", path.stem)
    if name in sys.modules:
        name = f"_sac_cli_{name}"
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)  # so that the file can import its neighbours
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise CLIError(f"cannot import {path_text!r}: not a Python source file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # the user's module may raise anything while importing
        sys.modules.pop(name, None)
        raise CLIError(f"importing {path_text!r} failed: {_one_line(error)}") from error
    return module


@dataclass
class LoadedModel:
    """The model (on the meta device), its example inputs, and how they were described."""

    model: Any
    inputs: tuple[Any, ...]
    input_specs: list[InputSpec] | None
    name: str
    parameters: int


def build_model(target: str, specs: list[InputSpec] | None) -> LoadedModel:
    """Call the factory under ``torch.device("meta")`` and make the example inputs: from ``specs``
    when given, else the ones the factory returned."""
    import torch

    factory = load_factory(target)
    with torch.device("meta"):
        try:
            made = factory()
        except Exception as error:  # the user's factory may raise anything
            raise CLIError(f"{target}() failed: {_one_line(error)}") from error
        inputs = tuple(s.build() for s in specs) if specs is not None else None
    model, returned = made, None
    if isinstance(made, (tuple, list)) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
        model, returned = made
    if not isinstance(model, torch.nn.Module):
        raise CLIError(f"{target}() returned an object of type {type(made).__name__}; it must return a "
                       "torch.nn.Module, or (model, example_inputs)")
    if inputs is None:
        if returned is None:
            raise CLIError(f"{target}() returned a model without example inputs; give them with --inputs, e.g. "
                           "--inputs \"long[8,1024]:0-50257\"")
        inputs = (returned,) if isinstance(returned, torch.Tensor) else tuple(returned) \
            if isinstance(returned, (tuple, list)) else None
        if inputs is None or not all(isinstance(t, torch.Tensor) for t in inputs):
            raise CLIError(f"{target}() returned example inputs of type {type(returned).__name__}; return a "
                           "tensor or a tuple of tensors, or give --inputs")
    if specs is not None and returned is not None:
        log.info("%s: using the --inputs given, not the example inputs the factory returned", target)
    if any(t.device.type != "meta" for t in (*model.parameters(), *model.buffers())):
        log.info("%s: the model's tensors are not all on the meta device; moving them there", target)
        model = model.to("meta")
    inputs = tuple(t if t.device.type == "meta" else t.to("meta") for t in inputs)
    parameters = sum(p.numel() for p in model.parameters())
    log.info("%s: built %s on the meta device, %d parameters, %d example input(s)", target, type(model).__name__,
             parameters, len(inputs))
    return LoadedModel(model, inputs, specs, type(model).__name__, parameters)


def _describe_inputs(loaded: LoadedModel) -> str:
    if loaded.input_specs is not None:
        return "; ".join(s.text for s in loaded.input_specs)
    return "; ".join(f"{str(t.dtype).removeprefix('torch.')}[{','.join(map(str, t.shape))}]" for t in loaded.inputs)


def _model_json(args: argparse.Namespace, loaded: Any) -> dict[str, Any]:
    """What the JSON of ``plan`` and ``estimate`` says of the model planned."""
    return {"target": args.target, "model": loaded.name, "parameters": loaded.parameters,
            "inputs": _inputs_json(loaded)}


def _inputs_json(loaded: LoadedModel) -> list[dict[str, Any]]:
    if loaded.input_specs is not None:
        return [s.as_json() for s in loaded.input_specs]
    return [{"spec": None, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "range": None}
            for t in loaded.inputs]


def _capture(loaded: LoadedModel, target: str, decompose: bool = False) -> Any:
    from sac_compiler.capture import capture_joint

    try:
        return capture_joint(loaded.model, *loaded.inputs, target_device="cuda", decompose=decompose)
    except Exception as error:  # tracing the user's model may fail in any way
        raise CLIError(f"capturing {target} on its inputs ({_describe_inputs(loaded)}) failed: "
                       f"{_one_line(error)}") from error


# ------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class SweepPoint:
    """One plan of the budget sweep (``memory_budget=<fraction>``)."""

    fraction: float
    budget_bytes: int | None
    predicted_peak: int | None
    recompute_ms: float | None
    recomputed_values: int | None
    status: str | None
    pareto: bool = True  # no other point has a lower or equal peak and a lower recompute time
    error: str | None = None


def _point(fraction: float, result: Any) -> SweepPoint:
    return SweepPoint(fraction, result.budget_bytes, result.predicted_peak, result.plan.recompute_ms,
                      len(result.plan.recompute), result.plan.status)


def run_sweep(graph: Any, config: Any, fractions: Sequence[float], chosen: Any) -> tuple[list[SweepPoint], Any]:
    """Plan ``graph`` at each fraction; return the points and the fraction range (lowest, fastest peak).

    The graph is captured once and planned again at each point (``plan_joint`` re-annotates it and
    rewrites its tags). The range is resolved once, by the chosen plan when it was a fraction below
    1, else by the sweep's first fraction below 1; the other points are planned for the bytes their
    fraction resolves to, which is what ``memory_budget=<fraction>`` plans, without searching the
    lowest peak again. A point equal to the chosen fraction reuses the chosen plan.
    """
    from sac_compiler.plan_graph import BudgetError, fraction_budget, plan_joint

    chosen_fraction = config.memory_budget.fraction
    known = chosen.fraction_range if chosen_fraction is not None and chosen_fraction < 1.0 else None
    points: list[SweepPoint] = []
    objectives: dict[float, float] = {}
    for fraction in fractions:
        frac_config = dataclasses.replace(config, memory_budget=float(fraction))
        start = time.perf_counter()
        try:
            if fraction == chosen_fraction:
                result = chosen
            elif known is None and fraction < 1.0:
                result = plan_joint(graph, frac_config)
                known = result.fraction_range
            elif known is None:
                result = plan_joint(graph, frac_config)
            else:
                result = plan_joint(graph, frac_config, budget=fraction_budget(fraction, *known))
        except BudgetError as error:
            log.warning("sweep: memory_budget=%g did not plan: %s", fraction, error)
            points.append(SweepPoint(fraction, None, None, None, None, None, pareto=False, error=_one_line(error)))
            continue
        points.append(_point(fraction, result))
        objectives[fraction] = _objective_ms(result)
        log.info("sweep: memory_budget=%g planned in %.2f s", fraction, time.perf_counter() - start)
    return _mark_pareto(_lower_budget_plans_kept(points, objectives)), known


def _objective_ms(result: Any) -> float:
    """The planner's objective for a plan (recompute time and the keep costs it pays), read while
    the plan's graph still carries its annotations."""
    from sac_compiler.plan_graph import _plan_ms, build_plan_problem

    problem, _, _ = build_plan_problem(result.analysis, fused_pointwise=result.fused_pointwise)
    return _plan_ms(problem, result.plan)


def _lower_budget_plans_kept(points: list[SweepPoint], objectives: dict[float, float]) -> list[SweepPoint]:
    """A plan that fits a lower budget fits every higher one: where the planner found a plan for a
    higher budget that its objective ranks slower (its program is a model; its search has a gap),
    the point takes the lower budget's plan, and its status says so."""
    out = list(points)
    best: tuple[float, SweepPoint] | None = None
    for i in sorted((i for i, p in enumerate(out) if p.budget_bytes is not None and p.fraction in objectives),
                    key=lambda i: out[i].budget_bytes or 0):
        point, objective = out[i], objectives[out[i].fraction]
        if best is not None and best[0] < objective:
            lower = best[1]
            out[i] = dataclasses.replace(point, predicted_peak=lower.predicted_peak, recompute_ms=lower.recompute_ms,
                                         recomputed_values=lower.recomputed_values,
                                         status=f"{lower.status} (the plan of {lower.fraction:g})")
        else:
            best = (objective, point)
    return out


def _mark_pareto(points: list[SweepPoint]) -> list[SweepPoint]:
    """Mark the planned points that another planned point beats: a peak as low or lower, and less
    recompute time (the solver's optimality gap can leave such a point in a sweep)."""
    planned = [(p, p.predicted_peak, p.recompute_ms) for p in points
               if p.predicted_peak is not None and p.recompute_ms is not None]

    def beaten(peak: int, ms: float) -> bool:
        return any(q_peak <= peak and q_ms < ms - 1e-12 for _, q_peak, q_ms in planned)

    marked = {id(p): beaten(peak, ms) for p, peak, ms in planned}
    return [dataclasses.replace(p, pareto=not marked[id(p)]) if id(p) in marked else p for p in points]


def _fmt_ms(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.4g}"


def format_sweep(points: Sequence[SweepPoint]) -> str:
    """The sweep as a table, lowest budget first."""
    from tabulate import tabulate

    from sac_compiler.config import format_bytes

    rows: list[tuple[str, ...]] = []
    for p in points:
        if p.budget_bytes is None or p.predicted_peak is None:
            rows.append((f"{p.fraction:g}", "-", "-", "-", "-", f"no plan: {p.error}"))
            continue
        rows.append((f"{p.fraction:g}", format_bytes(p.budget_bytes), format_bytes(p.predicted_peak),
                     _fmt_ms(p.recompute_ms), str(p.recomputed_values),
                     f"{p.status}{'' if p.pareto else ' (a lower-peak plan is faster)'}"))
    return tabulate(rows, headers=["fraction", "budget", "predicted peak", "recompute ms", "values recomputed",
                                   "plan"], tablefmt="simple", disable_numparse=True) + "\n"


def _cmd_plan(args: argparse.Namespace) -> int:
    from sac_compiler.config import MemoryBudget, SACConfig, format_bytes
    from sac_compiler.plan_graph import BudgetError, least_budget, plan_joint, simulate_plan
    from sac_compiler.planner import as_partitioned, plan_partitioned
    from sac_compiler.report import format_module_plan, format_plan, module_plan_rows

    budget = parse_budget(args.budget)
    device = check_device(args.device)
    fractions = parse_sweep(args.sweep)
    check_output("--json", args.json)
    check_plots([("--plot", args.plot), ("--timeline-plot", args.timeline_plot)])
    if args.plot is not None and not fractions:
        raise CLIError("--plot draws the budget sweep; leave --sweep on (it is on by default) or drop --plot")
    anchors = read_anchors(args.anchors) if args.anchors is not None else []
    if anchors and args.plot is None:
        raise CLIError("--anchors are drawn on the --plot picture: give --plot PATH too, or drop --anchors")
    if args.time_limit is not None and not args.time_limit > 0:
        raise CLIError(f"--time-limit {args.time_limit:g}: give a number of seconds > 0")
    specs = parse_inputs(args.inputs) if args.inputs is not None else None
    config = SACConfig(memory_budget=MemoryBudget.parse(budget), device=device, solver=args.solver,
                       compiler=args.compiler, time_limit_s=args.time_limit)

    loaded = build_model(args.target, specs)
    start = time.perf_counter()
    graph = as_partitioned(_capture(loaded, args.target, decompose=config.compiler == "inductor"))
    capture_s = time.perf_counter() - start
    start = time.perf_counter()
    try:
        # as the backend plans: partitioned by PyTorch's partitioner and checked on the partitioned graphs
        result = plan_joint(graph, config) if args.joint_only else plan_partitioned(graph, config)
    except BudgetError as error:
        raise CLIError(f"--budget {args.budget}: {error}") from error
    plan_s = time.perf_counter() - start
    # set by plan_joint with a budget
    assert result.budget_bytes is not None and result.predicted_peak is not None and result.baseline_peak is not None
    # read the plan's tables now: planning the sweep re-annotates the same graph
    plan_text = format_plan(result)
    modules_text = format_module_plan(result)
    modules = module_plan_rows(result)
    timelines = []
    if args.timeline_plot is not None:
        from sac_compiler.plots import timeline_panel

        timelines = [timeline_panel(result.analysis.memory, "no recomputation", result.budget_bytes),
                     timeline_panel(simulate_plan(result, config),
                                    f"the plan: {len(result.plan.recompute)} values recomputed", result.budget_bytes)]
    spec_name = result.analysis.device_spec.name
    fraction = config.memory_budget.fraction if config.memory_budget is not None else None
    fraction_text = "" if fraction is None else f" (fraction {fraction:g})"
    out = sys.stdout
    out.write(f"{args.target}: {loaded.name}, {loaded.parameters:,} parameters; inputs {_describe_inputs(loaded)}\n"
              f"device spec {spec_name}, compiler {args.compiler}, solver {args.solver}; captured on fake tensors "
              f"in {capture_s:.1f} s, planned in {plan_s:.1f} s\n\n")
    out.write(plan_text)
    out.write("\nper module: forward values kept for backward and recomputed\n")
    out.write(modules_text)

    start = time.perf_counter()
    points, known = run_sweep(graph, config, fractions, result) if fractions else ([], None)
    sweep_s = time.perf_counter() - start
    budget_range = None
    if known is not None:
        low = known[0]
        budget_range = {"smallest_feasible_peak": low, "no_recompute_peak": result.baseline_peak,
                        "smallest_budget": least_budget(result.analysis, config, low)}
    if points:
        out.write(f"\nbudget sweep (memory_budget as a fraction of the saved activations: 0 is the lowest peak "
                  f"found, 1 the fastest plan; planned in {sweep_s:.1f} s)\n")
        out.write(format_sweep(points))
    if budget_range is not None:
        out.write(f"smallest feasible peak {format_bytes(budget_range['smallest_feasible_peak'])}, least absolute "
                  f"budget that plans {format_bytes(budget_range['smallest_budget'])} "
                  f"({budget_range['smallest_budget']} bytes), peak without recomputation "
                  f"{format_bytes(result.baseline_peak)}\n")
    out.write(f"\nplan: predicted peak {format_bytes(result.predicted_peak)} under the budget "
              f"{format_bytes(result.budget_bytes)}{fraction_text}, recompute time {_fmt_ms(result.plan.recompute_ms)} "
              f"ms, {len(result.plan.recompute)} values recomputed ({result.plan.status})"
              + ("" if result.partitioned is None else
                 f"; partitioned graphs simulated at {format_bytes(result.step_peak_bytes)}") + "\n")
    log.info("plan: %s in %.1f s (capture %.1f s, sweep %.1f s)", args.target, capture_s + plan_s + sweep_s,
             capture_s, sweep_s)

    if args.json is not None:
        payload = {
            **_model_json(args, loaded),
            "device": spec_name,
            "compiler": args.compiler,
            "solver": args.solver,
            "budget": args.budget,
            "budget_fraction": fraction,
            "budget_bytes": result.budget_bytes,
            "predicted_peak": result.predicted_peak,
            # the partitioned graphs' simulated peak over the step (None with --joint-only)
            "partitioned_peak": None if result.partitioned is None else result.step_peak_bytes,
            "baseline_peak": result.baseline_peak,
            "recompute_ms": result.plan.recompute_ms,
            "recomputed_values": len(result.plan.recompute),
            "recomputed": sorted(result.plan.recompute),
            "status": result.plan.status,
            "solve_s": result.plan.solve_s,
            "fraction_range": list(result.fraction_range) if result.fraction_range is not None else None,
            "kept_random": list(result.kept_random),
            "kept_ops": dict(result.kept_ops),
            "modules": [dataclasses.asdict(m) for m in modules],
            "budget_range": budget_range,
            "sweep": [dataclasses.asdict(p) for p in points],
            "anchors": anchors,
            "timings_s": {"capture": capture_s, "plan": plan_s, "sweep": sweep_s},
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
        out.write(f"wrote {args.json}\n")
    if args.plot is not None:
        from sac_compiler.plots import PlotPoint, pareto_plot

        plot_points = [PlotPoint(p.predicted_peak, p.recompute_ms, f"{p.fraction:g}", p.pareto)
                       for p in points if p.predicted_peak is not None and p.recompute_ms is not None]
        chosen = PlotPoint(result.predicted_peak or 0, result.plan.recompute_ms, f"--budget {args.budget}")
        pareto_plot(plot_points, chosen, args.plot,
                    title=f"{args.target} on {spec_name} ({args.compiler}): recompute time vs peak",
                    anchors=[PlotPoint(a["peak_bytes"], a["recompute_ms"], a["label"]) for a in anchors])
        out.write(f"wrote {args.plot}\n")
    if args.timeline_plot is not None:
        from sac_compiler.plots import timeline_plot

        timeline_plot(timelines, args.timeline_plot,
                      title=f"{args.target} on {spec_name} ({args.compiler}): live bytes by category, simulated, "
                            f"budget {format_bytes(result.budget_bytes)}{fraction_text}")
        out.write(f"wrote {args.timeline_plot}\n")
    return 0


# --------------------------------------------------------------------------------------- estimate


def _cmd_estimate(args: argparse.Namespace) -> int:
    from sac_compiler.estimator import estimate
    from sac_compiler.report import format_analysis

    device = check_device(args.device)
    check_output("--json", args.json)
    check_plots([("--tradeoff-plot", args.tradeoff_plot)])
    if args.depth < 1:
        raise CLIError(f"--depth {args.depth}: give 1 (the root module only) or more")
    specs = parse_inputs(args.inputs) if args.inputs is not None else None
    loaded = build_model(args.target, specs)
    start = time.perf_counter()
    try:
        est = estimate(loaded.model, *loaded.inputs, mode=args.mode, device=device)
    except ValueError as error:
        raise CLIError(f"estimating {args.target} failed: {_one_line(error)}") from error
    elapsed = time.perf_counter() - start
    out = sys.stdout
    out.write(f"{args.target}: {loaded.name}, {loaded.parameters:,} parameters; inputs {_describe_inputs(loaded)}\n"
              f"device spec {est.analysis.device_spec.name}, mode {args.mode}; captured and estimated on fake "
              f"tensors in {elapsed:.1f} s\n\n")
    out.write(format_analysis(est.analysis))
    out.write(f"\nSAC statistics of every non-leaf module up to depth {args.depth} (SACEstimator's tables)\n\n")
    out.write(est.display_modulewise_sac_stats(depth=args.depth) + "\n")
    if args.tradeoff_plot is not None or (args.module_info and args.json is not None):
        start = time.perf_counter()
        est.pwlf_sac_tradeoff_curve()
        log.info("fitted the trade-off curves of %d modules in %.1f s", len(est.sac_mod_tradeoff_stats),
                 time.perf_counter() - start)
    if args.json is not None:
        payload = {
            **_model_json(args, loaded),
            "device": est.analysis.device_spec.name,
            "mode": args.mode,
            "sac_mod_stats": {fqn: dataclasses.asdict(s) for fqn, s in est.sac_mod_stats.items()},
            "leaf_modules": sorted(est.leaf_modules),
        }
        if args.module_info:
            payload["module_info"] = est.module_info()
        Path(args.json).write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
        out.write(f"wrote {args.json}\n")
    if args.tradeoff_plot is not None:
        from sac_compiler.plots import tradeoff_plot

        shown = {fqn: stats for fqn, stats in est.sac_mod_tradeoff_stats.items() if fqn.count(".") + 1 <= args.depth}
        if not shown:
            raise CLIError(f"--tradeoff-plot: {args.target} has no module with ops of its own up to --depth "
                           f"{args.depth} to draw")
        tradeoff_plot(shown, args.tradeoff_plot,
                      title=f"{args.target} on {est.analysis.device_spec.name}\nSAC trade-off per module "
                            "(greedy order) and its pwlf fit")
        out.write(f"wrote {args.tradeoff_plot}\n")
    return 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


# ------------------------------------------------------------------------------------------- demo


def _transformer(layers: int, dim: int, heads: int, seq: int, vocab: int, dropout: float) -> Any:
    from torch.testing._internal.distributed._tensor.common_dtensor import (
        ModelArgs,
        Transformer,
    )

    return Transformer(ModelArgs(n_layers=layers, n_heads=heads, vocab_size=vocab, max_seq_len=seq, dim=dim,
                                 dropout_p=dropout))


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from sac_compiler.plan_graph import BudgetError
    from sac_compiler.planner import plan
    from sac_compiler.report import format_plan

    budget = parse_budget(args.budget)
    device = check_device(args.device)
    with torch.device("meta"):
        model = _transformer(args.layers, args.dim, args.heads, args.seq, args.vocab, args.dropout)
        tokens = torch.randint(0, args.vocab, (args.batch, args.seq))
    start = time.perf_counter()
    try:
        result = plan(model, tokens, memory_budget=budget, device=device)
    except BudgetError as error:
        raise CLIError(f"--budget {args.budget}: {error}") from error
    elapsed = time.perf_counter() - start
    sys.stdout.write(f"Transformer: {args.layers} layers, dim {args.dim}, batch {args.batch} x {args.seq} tokens, "
                     f"memory_budget={budget!r}: captured, annotated and planned on fake tensors in {elapsed:.1f} s\n\n")
    sys.stdout.write(format_plan(result))
    if args.train_step:
        _train(args)
    return 0


def _train(args: argparse.Namespace) -> None:
    import torch

    torch.manual_seed(0)
    small = {"layers": 2, "dim": 64, "heads": 4, "seq": 64, "vocab": 512, "dropout": args.dropout}
    model = _transformer(**small)
    opt = torch.optim.Adam(model.parameters())
    compiled = torch.compile(model, backend="sac", options={"compiler": "eager"})
    tokens = torch.randint(0, small["vocab"], (4, small["seq"]))
    for step in range(args.train_step):
        loss = compiled(tokens).float().logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sys.stdout.write(f"step {step}: loss {loss.item():.4f}\n")


# ----------------------------------------------------------------------------------------- parser


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's help, without line breaks inside hyphenated words (``'sac-compiler[plot]'`` stays whole)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors as one line in the command line's own error format."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{PROG}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(EXIT_USAGE)


def _device_help() -> str:
    from sac_compiler.device_specs import known_device_names

    return ("device spec the costs and memory are for: " + ", ".join(known_device_names())
            + ", or auto (the visible GPU; H100-SXM without one); any case (default: %(default)s)")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log the planner's progress: -v INFO (the plan summary), -vv DEBUG (default: warnings "
                             "only, or the SAC_LOG environment variable's level)")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the Python traceback instead of one line (default: off)")


def _target_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="MODULE:FACTORY",
                        help="the function or class that builds the model (called with no arguments, under "
                             "torch.device('meta')): MODULE is a dotted module path importable from the current "
                             "directory or a path to a .py file; FACTORY may also return (model, example_inputs)")
    parser.add_argument("--inputs", metavar="SPEC", default=None,
                        help=f"the example inputs, positional, in order: {INPUTS_FORM}; dtypes: "
                             + ", ".join(sorted(set(DTYPES))) + " (default: the inputs FACTORY returns)")


def build_parser() -> argparse.ArgumentParser:
    """The ``sac-compiler`` parser and its subcommands."""
    from sac_compiler.config import COMPILERS, SOLVERS

    parser = _Parser(prog=PROG,
                     description="Plan activation recomputation for your own model under a memory budget, or "
                                 "print its SAC statistics, on fake tensors: no GPU and no model memory needed.",
                     epilog="Without a subcommand the demo runs, and its options work as before "
                            "('python -m sac_compiler --layers 2'). Options go after the subcommand; "
                            "'sac-compiler SUBCOMMAND --help' lists them.")
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", parser_class=_Parser)

    p = sub.add_parser("plan", help="plan recomputation for your model under a memory budget, and sweep budgets",
                       description="Capture MODULE:FACTORY's training step (forward and backward) on fake tensors, "
                                   "plan which activations to recompute under --budget, and sweep memory_budget "
                                   "fractions: the predicted peak, recompute time and per-module plan, as tables, "
                                   "JSON and a plot. Nothing runs on a GPU.")
    _target_args(p)
    p.add_argument("--budget", default="0.5", metavar="BUDGET",
                   help="memory budget for the step's peak: a number without a unit is a fraction in [0, 1] of "
                        "the saved activations (0: the lowest peak found, 1: the fastest plan); with a unit it is "
                        "bytes: 6GiB, 6000MB, 6442450944B (default: %(default)s)")
    p.add_argument("--device", default="auto", metavar="NAME", help=_device_help())
    p.add_argument("--solver", choices=SOLVERS, default="highs",
                   help="MILP solver: %(choices)s (default: %(default)s)")
    p.add_argument("--compiler", choices=COMPILERS, default="inductor",
                   help="the compiler the plan is for: inductor (pointwise recomputation fuses into backward "
                        "kernels) or eager (the partitioned graphs run op by op) (default: %(default)s)")
    p.add_argument("--time-limit", type=float, default=30.0, metavar="SECONDS",
                   help="time limit of each solver call, in seconds (default: %(default)g)")
    p.add_argument("--joint-only", action="store_true",
                   help="plan --budget on the joint graph alone, without partitioning it with PyTorch's "
                        "partitioner and planning again where the partitioned graphs peak over the budget, as "
                        "the backend does (faster; the backend may plan otherwise). The sweep always plans on "
                        "the joint graph alone (default: off)")
    p.add_argument("--sweep", default=DEFAULT_SWEEP, metavar="FRACTIONS",
                   help="memory_budget fractions to plan besides --budget, comma-separated, or none "
                        "(default: %(default)s)")
    p.add_argument("--json", metavar="PATH", default=None,
                   help="also write the plan, the per-module table and the sweep as JSON to PATH (default: none)")
    p.add_argument("--plot", metavar="PATH", default=None,
                   help="also draw the sweep's recompute time against predicted peak, the chosen plan marked, "
                        "to PATH (.png, .pdf or .svg; needs matplotlib: pip install 'sac-compiler[plot]') "
                        "(default: none)")
    p.add_argument("--anchors", metavar="PATH", default=None,
                   help="with --plot, also draw other strategies' measured points: a JSON file holding a list of "
                        "objects with 'label' (a name), 'peak_bytes' (the step's measured peak) and "
                        "'recompute_ms' (its measured step time over plain torch.compile's, in ms) (default: "
                        "none)")
    p.add_argument("--timeline-plot", metavar="PATH", default=None,
                   help="also draw the step's simulated live bytes by category (parameters, gradients, "
                        "activations, temporaries, ...) at every node, forward then backward, without "
                        "recomputation and with the plan side by side, the budget marked, to PATH (.png, .pdf "
                        "or .svg; needs matplotlib: pip install 'sac-compiler[plot]') (default: none)")
    _common(p)
    p.set_defaults(handler=_cmd_plan)

    e = sub.add_parser("estimate", help="SACEstimator-style per-module SAC statistics of your model",
                       description="Capture MODULE:FACTORY's training step on fake tensors and print the "
                                   "statistics PyTorch's eager SACEstimator gives (per-op tables and the greedy "
                                   "trade-off of every non-leaf module).")
    _target_args(e)
    e.add_argument("--device", default="auto", metavar="NAME", help=_device_help())
    e.add_argument("--mode", choices=("cost-model", "benchmark"), default="cost-model",
                   help="op runtimes from the roofline cost model on the device spec, or benchmarked on the "
                        "visible GPU (needs CUDA) (default: %(default)s)")
    e.add_argument("--depth", type=int, default=2, metavar="N",
                   help="print modules at most N levels deep (1: the root module only) (default: %(default)s)")
    e.add_argument("--json", metavar="PATH", default=None,
                   help="also write every module's SAC statistics as JSON to PATH (default: none)")
    e.add_argument("--module-info", action="store_true",
                   help="with --json, also fit the trade-off curves (pwlf) and write the ModuleInfo that "
                        "sac_milp takes (default: off)")
    e.add_argument("--tradeoff-plot", metavar="PATH", default=None,
                   help="also fit each module's trade-off curve (pwlf, 2 segments, as --module-info) and draw "
                        "the curves and their fits, one panel per module up to --depth, to PATH (.png, .pdf or "
                        ".svg; needs matplotlib: pip install 'sac-compiler[plot]') (default: none)")
    _common(e)
    e.set_defaults(handler=_cmd_estimate)

    d = sub.add_parser("demo", help="plan a built-in GPT-style Transformer (what 'python -m sac_compiler' runs)",
                       description="Plan a built-in GPT-style Transformer, captured on fake tensors, and print the "
                                   "analysis and the plan; --train-step also runs real training steps on the CPU.")
    d.add_argument("--layers", type=int, default=4, help="Transformer layers (default: %(default)s)")
    d.add_argument("--dim", type=int, default=256, help="model dimension (default: %(default)s)")
    d.add_argument("--heads", type=int, default=8, help="attention heads (default: %(default)s)")
    d.add_argument("--seq", type=int, default=512, help="sequence length in tokens (default: %(default)s)")
    d.add_argument("--batch", type=int, default=8, help="batch size (default: %(default)s)")
    d.add_argument("--vocab", type=int, default=8192, help="vocabulary size (default: %(default)s)")
    d.add_argument("--dropout", type=float, default=0.0,
                   help="dropout probability (on a CPU trace, attention with dropout lowers to the math kernel) "
                        "(default: %(default)s)")
    d.add_argument("--device", default="auto", metavar="NAME", help=_device_help())
    d.add_argument("--budget", default="0.5", metavar="BUDGET",
                   help="memory budget to plan for: a fraction in [0, 1] of the saved activations (0.5) or bytes "
                        "with a unit (6GiB) (default: %(default)s)")
    d.add_argument("--train-step", type=int, default=0, metavar="N",
                   help="also run N real training steps of a smaller model through torch.compile(backend='sac', "
                        "compiler='eager') (default: %(default)s)")
    _common(d)
    d.set_defaults(handler=_cmd_demo)
    return parser


def _with_default_command(argv: Sequence[str]) -> list[str]:
    """No subcommand (nothing, or options only): the demo, as ``python -m sac_compiler`` always ran it."""
    argv = list(argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        return ["demo", *argv]
    return argv


def _one_line(error: BaseException) -> str:
    """``Type: first line of the message``, with a pointer to --debug when more was cut."""
    text = str(error).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else ""
    more = " (more with --debug)" if len(lines) > 1 else ""
    name = type(error).__name__
    if isinstance(error, CLIError):
        return first + more
    return f"{name}: {first}{more}" if first else name


def _fail(message: str) -> int:
    sys.stderr.write(f"{PROG}: error: {message}\n")
    return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0, 1 for an error, 2 for a usage error)."""
    parser = build_parser()
    args = parser.parse_args(_with_default_command(sys.argv[1:] if argv is None else argv))
    if args.verbose:
        configure_logging(logging.DEBUG if args.verbose > 1 else logging.INFO)
    elif not os.environ.get("SAC_LOG", "").strip():
        configure_logging(logging.WARNING)
    try:
        return args.handler(args)
    except CLIError as error:
        if args.debug:
            raise
        return _fail(_one_line(error))
    except KeyboardInterrupt:
        if args.debug:
            raise
        return _fail("interrupted")
    except Exception as error:  # the command line's boundary: one line, --debug for the traceback
        if args.debug:
            raise
        return _fail(f"{_one_line(error)} (run again with --debug for the traceback)")
