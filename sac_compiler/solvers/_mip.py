"""The one place that talks to python-mip: options, model creation, solve and status.

python-mip is imported lazily so that importing the solver layer costs nothing until a
model is built. CBC ships with python-mip; HiGHS needs the ``highspy`` package.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    import mip

__all__ = [
    "BINARY",
    "CONTINUOUS",
    "InfeasibleError",
    "NoSolutionError",
    "SolveOutcome",
    "SolverError",
    "SolverOptions",
    "new_model",
    "solve",
    "xsum",
]

logger = logging.getLogger(__name__)

# A solve that runs longer than this says so at INFO, and again at each such interval, until it
# returns (the solver runs in native code without the GIL, so a timer thread can speak meanwhile)
PROGRESS_EVERY_S = 5.0

SOLVERS = ("cbc", "highs")
SENSES = ("MIN", "MAX")
# python-mip's variable type codes.
BINARY = "B"
CONTINUOUS = "C"


class SolverError(RuntimeError):
    """The MILP solver did not return a usable solution."""


class InfeasibleError(SolverError):
    """The solver proved that no solution satisfies the constraints."""


class NoSolutionError(SolverError):
    """The search stopped (time limit) before finding any feasible solution."""


@dataclass(frozen=True)
class SolverOptions:
    """How to run the MILP solver.

    Attributes:
        solver: ``"cbc"`` (bundled with python-mip) or ``"highs"`` (needs highspy).
        time_limit_s: wall-clock limit of one solve in seconds; ``None``: no limit.
        mip_gap: relative optimality gap at which the search stops; ``None``: the
            solver's default (1e-4). PyTorch's PuLP version used 0.05.
        threads: solver threads; ``None``: the solver's default.
        verbose: let the solver print its log.
        mip_gap_abs: absolute optimality gap (in the objective's units) at which the search
            stops as well; ``None``: the solver's default. An objective with constants left
            out has no meaningful relative gap: the planner bounds its error in milliseconds.
    """

    solver: str = "cbc"
    time_limit_s: float | None = None
    mip_gap: float | None = None
    threads: int | None = None
    verbose: bool = False
    mip_gap_abs: float | None = None

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(
                f"SolverOptions.solver must be one of {SOLVERS}, got {self.solver!r}"
            )
        if self.time_limit_s is not None and not (
            _is_real(self.time_limit_s) and math.isfinite(self.time_limit_s)
            and self.time_limit_s > 0
        ):
            raise ValueError(
                "SolverOptions.time_limit_s must be None or a finite number of seconds > 0, "
                f"got {self.time_limit_s!r}"
            )
        if self.mip_gap is not None and not (
            _is_real(self.mip_gap) and 0 <= self.mip_gap < 1
        ):
            raise ValueError(
                f"SolverOptions.mip_gap must be None or a relative gap in [0, 1), "
                f"got {self.mip_gap!r}"
            )
        if self.mip_gap_abs is not None and not (
            _is_real(self.mip_gap_abs) and math.isfinite(self.mip_gap_abs) and self.mip_gap_abs >= 0
        ):
            raise ValueError(
                f"SolverOptions.mip_gap_abs must be None or a finite number >= 0, got {self.mip_gap_abs!r}"
            )
        if self.threads is not None and not (
            isinstance(self.threads, int) and not isinstance(self.threads, bool)
            and self.threads >= 1
        ):
            raise ValueError(
                f"SolverOptions.threads must be None or an int >= 1, got {self.threads!r}"
            )
        if not isinstance(self.verbose, bool):
            raise ValueError(
                f"SolverOptions.verbose must be True or False, got {self.verbose!r}"
            )


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SolveOutcome:
    """What a successful solve returned.

    Attributes:
        status: ``"OPTIMAL"`` or ``"FEASIBLE"`` (stopped by the time limit).
        objective_value: objective of the returned solution.
        objective_bound: best bound proven on the objective.
        gap: relative gap between the two (at most ``mip_gap`` when OPTIMAL;
            ``inf`` when the objective is 0 and the bound is not).
        solve_time_s: wall-clock time of ``optimize``.
        num_vars: number of variables of the model.
        num_constraints: number of constraints of the model.
        solver: the solver that ran (``SolverOptions.solver``).
    """

    status: str
    objective_value: float
    objective_bound: float
    gap: float
    solve_time_s: float
    num_vars: int
    num_constraints: int
    solver: str


def _relative_gap(objective_value: float, objective_bound: float) -> float:
    difference = abs(objective_value - objective_bound)
    if abs(objective_value) > 1e-10:
        return difference / abs(objective_value)
    return 0.0 if difference <= 1e-10 else math.inf


def _import_mip() -> ModuleType:
    try:
        import mip
    except ImportError as err:
        raise ImportError(
            "sac_compiler's MILP solvers need python-mip: pip install 'mip>=1.15'"
        ) from err
    return cast(ModuleType, mip)


def _check_highs() -> None:
    missing = (
        "SolverOptions(solver='highs') needs the highspy package: pip install highspy "
        "(or pip install 'sac-compiler[highs]'), or use SolverOptions(solver='cbc')"
    )
    if importlib.util.find_spec("highspy") is None:
        raise ImportError(missing)
    import mip.highs

    if not mip.highs.has_highs:
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = f"highspy {version('highspy')}"
        except PackageNotFoundError:
            found = "highspy (version unknown)"
        raise ImportError(
            f"python-mip could not load HiGHS from {found} (python-mip 2.0 cannot use highspy 1.16: "
            "pip install 'highspy<1.16'). " + missing
        )


def xsum(terms: Iterable[object]) -> mip.LinExpr:
    """python-mip's ``xsum`` (a linear expression summing ``terms``), imported lazily."""
    return _import_mip().xsum(terms)


def new_model(name: str, sense: str, options: SolverOptions) -> mip.Model:
    """An empty python-mip model configured from ``options``.

    Args:
        name: model name, used in log messages and errors.
        sense: ``"MIN"`` or ``"MAX"``.
        options: solver, gap, threads and verbosity (the time limit applies in ``solve``).
    """
    if sense not in SENSES:
        raise ValueError(f"sense must be one of {SENSES}, got {sense!r}")
    mip_module = _import_mip()
    if options.solver == "highs":
        _check_highs()
    solver_name = mip_module.CBC if options.solver == "cbc" else mip_module.HIGHS
    model = mip_module.Model(name=name, sense=sense, solver_name=solver_name)
    model.verbose = int(options.verbose)
    if options.mip_gap is not None:
        model.max_mip_gap = options.mip_gap
    if options.mip_gap_abs is not None:
        model.max_mip_gap_abs = options.mip_gap_abs
    if options.threads is not None:
        model.threads = options.threads
    return model


class _progress:
    """While a solve runs: after ``PROGRESS_EVERY_S`` seconds and at each such interval, log at INFO
    how long it has run, against its time limit, and the program's size."""

    def __init__(self, model: mip.Model, options: SolverOptions, start: float) -> None:
        self.model, self.options, self.start = model, options, start
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="sac-solve-progress", daemon=True)

    def _run(self) -> None:
        limit = self.options.time_limit_s
        while not self.done.wait(PROGRESS_EVERY_S):
            logger.info("%s: still solving after %.0f s%s (%d variables, %d constraints)", self.model.name,
                        time.perf_counter() - self.start, f" of at most {limit:g} s" if limit is not None else "",
                        self.model.num_cols, self.model.num_rows)

    def __enter__(self) -> _progress:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()


def solve(model: mip.Model, options: SolverOptions, limit_expected: bool = False) -> SolveOutcome:
    """Optimizes ``model`` and checks the solver status explicitly.

    Returns the outcome for OPTIMAL and FEASIBLE (time limit hit with a solution: the
    gap is logged at warning level, at debug level where the caller set a short limit on
    purpose, ``limit_expected``). Raises ``InfeasibleError`` when the model is
    proven infeasible, ``NoSolutionError`` when the search stopped without a solution,
    and ``SolverError`` for any other status (unbounded, solver error, ...).
    """
    mip_module = _import_mip()
    status_enum = mip_module.OptimizationStatus
    max_seconds = options.time_limit_s if options.time_limit_s is not None else mip_module.INF
    start = time.perf_counter()
    with _progress(model, options, start):
        status = model.optimize(max_seconds=max_seconds)
    solve_time_s = time.perf_counter() - start
    logger.debug(
        "%s: %d variables (%d integer), %d constraints; %s returned %s in %.3f s",
        model.name, model.num_cols, model.num_int, model.num_rows,
        options.solver, status.name, solve_time_s,
    )

    if status in (status_enum.INFEASIBLE, status_enum.INT_INFEASIBLE):
        raise InfeasibleError(
            f"{model.name}: {options.solver} proved that no solution satisfies the "
            "constraints; relax them (e.g. a larger memory budget)"
        )
    if status == status_enum.NO_SOLUTION_FOUND:
        raise NoSolutionError(
            f"{model.name}: {options.solver} stopped after {solve_time_s:.1f} s "
            f"(time_limit_s={options.time_limit_s}) without a feasible solution; "
            "raise SolverOptions.time_limit_s or relax the constraints"
        )
    if status == status_enum.UNBOUNDED:
        raise SolverError(
            f"{model.name}: {options.solver} reports the objective unbounded, which "
            "means the formulation is missing a bound; please report it with the inputs"
        )
    if status not in (status_enum.OPTIMAL, status_enum.FEASIBLE):
        raise SolverError(
            f"{model.name}: {options.solver} returned status {status.name}; rerun with "
            "SolverOptions(verbose=True) to see the solver log, or try the other solver"
        )

    objective_value = float(model.objective_value)
    objective_bound = float(model.objective_bound)
    gap = _relative_gap(objective_value, objective_bound)
    if status == status_enum.FEASIBLE:
        (logger.debug if limit_expected else logger.warning)(
            "%s: %s stopped at the time limit (%.1f s) with a feasible solution "
            "%.6g, gap %.2f%% to the bound %.6g; raise SolverOptions.time_limit_s "
            "for a proven optimum",
            model.name, options.solver, solve_time_s, objective_value, 100 * gap,
            objective_bound,
        )
    return SolveOutcome(
        status=status.name,
        objective_value=objective_value,
        objective_bound=objective_bound,
        gap=gap,
        solve_time_s=solve_time_s,
        num_vars=model.num_cols,
        num_constraints=model.num_rows,
        solver=options.solver,
    )
