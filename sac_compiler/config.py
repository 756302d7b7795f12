"""One frozen, validated configuration for ``backend="sac"``; ``options=`` maps onto it.

Every option is checked when the configuration is made, before any graph is captured or planned:
a wrong value fails with a ValueError that names the option, repeats the value and says what the
option accepts, so a typo costs no compile time and needs no reading of the code.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sac_compiler.device_specs import DEVICE_ALIASES, known_device_names

COMPILERS = ("inductor", "eager")
ESTIMATE_MODES = ("cost-model", "benchmark")
# the order the partitioned graphs are simulated in: their own (with the ordering rules), or the
# one Inductor's scheduler runs their kernels in (sac_compiler.inductor_order)
PARTITION_ORDERS = ("auto", "graph", "inductor")
SOLVERS = ("cbc", "highs")

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([+-]?[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")

_BYTES_FORM = "an int of bytes or a string like '6GiB'"
_BUDGET_FORM = (
    "a fraction of the activation memory as a float in [0, 1] (0.0: the lowest-peak plan, 1.0: the fastest) "
    "or an absolute size as a positive int of bytes or a string like '6GiB'"
)
_REPORT_FORM = "True/False or a file path (str or os.PathLike) to write the plan to"
# torch device types: a user who writes device="cuda" means the hardware, not a spec name
_TORCH_DEVICE_TYPES = ("cpu", "cuda", "meta", "mps", "xpu", "hip")
_MAX_REPR = 80


def _describe(value: Any) -> str:
    """``str '6GiB'``, ``bool True``, ``None``: the type and the repr, cut short if long, for messages."""
    if value is None:
        return "None"
    text = repr(value)
    if len(text) > _MAX_REPR:
        text = text[: _MAX_REPR - 3] + "..."
    return f"{type(value).__name__} {text}"


def _is_number(value: Any) -> bool:
    """A real number and not a bool (``True > 0`` holds, but ``time_limit_s=True`` is a mistake)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def parse_bytes(value: str | int, option: str | None = None, allow_zero: bool = False) -> int:
    """``"6GiB"`` -> 6442450944, ``"6000MB"`` -> 6000000000, ``1024`` -> 1024.

    ``option`` names the option in error messages; ``allow_zero`` accepts 0 (for a size that may be
    nothing, such as the state of an optimizer without any).
    """
    name = option or "a byte size"
    prefix = f"{option}: " if option else ""
    least = "a size >= 0" if allow_zero else "a positive size" if option else "positive"
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        raise ValueError(f"{name} must be {_BYTES_FORM}, got {_describe(value)}")
    if isinstance(value, numbers.Integral):
        nbytes = int(value)
    elif isinstance(value, numbers.Real):
        # a float such as 6e9 is a whole number of bytes; 2.5 or nan is not
        number = float(value)
        if not (math.isfinite(number) and number.is_integer()):
            raise ValueError(f"{name} must be {_BYTES_FORM} (a whole number of bytes), got {_describe(value)}")
        nbytes = int(number)
    else:
        match = _SIZE.match(value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(
                f"{prefix}cannot read {value!r} as a byte size; write an int of bytes or a number with one of the "
                f"units {sorted(u for u in _UNITS if u)} (e.g. '6GiB', '6000MB')"
            )
        number = float(match.group(1))
        scaled = number * _UNITS[unit]
        if not math.isfinite(scaled):
            raise ValueError(f"{prefix}{value!r} is too large for a byte size")
        if _UNITS[unit] == 1 and not number.is_integer():
            raise ValueError(f"{name} must be a whole number of bytes, got {value!r}; "
                             f"write {_BYTES_FORM}")
        nbytes = int(scaled)
    if nbytes < 0 or (nbytes == 0 and not allow_zero):
        form = f" ({_BYTES_FORM})" if option else ""
        raise ValueError(f"{name} must be {least}{form}, got {_describe(value)}")
    return nbytes


def format_bytes(nbytes: float) -> str:
    """``3.25 GiB``, ``12.50 MiB``, ``4.00 KiB``: the largest binary unit that keeps the number >= 1."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{int(nbytes)} B"


@dataclass(frozen=True)
class MemoryBudget:
    """Either absolute bytes for the whole step's peak, or a fraction of the activation memory."""

    bytes: int | None = None
    fraction: float | None = None

    @staticmethod
    def parse(value: Any) -> MemoryBudget:
        """A fraction from a float in [0, 1]; absolute bytes from an int or a string such as ``'6GiB'``.

        Values that look like a fraction but would read as bytes are refused rather than planned
        for: the ints 0 and 1 (0 or 1 byte) and unit-less strings such as ``'0.5'``.
        """
        if isinstance(value, MemoryBudget):
            return value
        if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
            raise ValueError(f"memory_budget must be {_BUDGET_FORM}, got {_describe(value)}")
        if isinstance(value, numbers.Integral):
            if value in (0, 1):
                plan = "the lowest-peak plan" if value == 0 else "the fastest plan"
                raise ValueError(
                    f"memory_budget={value!r} is an int, which means {value} byte{'' if value == 1 else 's'}; "
                    f"write the float {value}.0 "
                    f"for the fraction of the activation memory ({plan}), or give a size in bytes as a larger "
                    "int or a string like '6GiB'"
                )
            return MemoryBudget(bytes=parse_bytes(int(value), option="memory_budget"))
        if isinstance(value, numbers.Real):
            fraction = float(value)
            if not 0.0 <= fraction <= 1.0:  # nan fails this too
                raise ValueError(f"memory_budget must be {_BUDGET_FORM}, got {_describe(value)}")
            return MemoryBudget(fraction=fraction)
        match = _SIZE.match(value)
        if match is not None and not match.group(2):
            number = float(match.group(1))
            if number <= 1 or not number.is_integer():
                expected = f"a float ({number!r})" if 0 <= number <= 1 else "a float in [0, 1]"
                raise ValueError(
                    f"memory_budget={value!r} is a string without a unit: a fraction must be {expected}, not a "
                    "string, and a size needs a unit ('6GiB') or must be an int of bytes"
                )
        return MemoryBudget(bytes=parse_bytes(value, option="memory_budget"))

    def __str__(self) -> str:
        if self.fraction is not None:
            return f"{self.fraction:g} of the saved activations"
        if self.bytes is None:
            return "no budget"
        return format_bytes(self.bytes)


@dataclass(frozen=True)
class SACConfig:
    """The options of ``backend="sac"``, checked (and brought to one form) when made.

    ``memory_budget`` and ``optimizer_state_bytes`` given as strings or numbers are parsed here
    (to a :class:`MemoryBudget` and to bytes); ``report`` as an ``os.PathLike`` becomes a str.
    """

    memory_budget: MemoryBudget | None = None
    device: str = "auto"
    estimate_mode: str = "cost-model"
    solver: str = "highs"
    time_limit_s: float | None = 30.0
    mip_gap: float | None = 0.01
    compiler: str = "inductor"
    # ranks the parameters and gradients are sharded over (FSDP2's fully_shard); None: the initialised
    # process group's world size, else 1. Given, it must match an initialised process group's; it is
    # for planning offline, without one (sac_compiler.planner.plan(..., world_size=N))
    world_size: int | None = None
    optimizer_state_bytes: int | None = None
    optimizer: Any = None
    report: bool | str = False
    # on CUDA, an absolute budget is measured at run time and planned again if a step goes over it
    # (sac_compiler.enforce); False runs the first plan whatever it measures
    enforce_budget: bool = True
    # on a GPU under Inductor, run each convolution call once at compile time, in the layout
    # Inductor runs it in, and count cuDNN's workspace inside it (the conv_workspace memory rule;
    # docs/results.md has what it measured and what the first plans predicted with it)
    conv_workspaces: bool = True
    # the caller keeps the compiled function's outputs until backward (out = model(x);
    # loss = criterion(out, y); loss.backward()): the plan counts them through backward. False
    # when they are dropped before it (model(x).sum().backward(), or the loss computed inside)
    hold_outputs: bool = True
    # device memory the caller's own code holds between the compiled forward and its backward, on
    # top of what the graph leaves (a loss computed outside: its log-softmax, its gradient); counted
    # at that moment only (an int of bytes or a string like '1.5GiB'). Run-time enforcement measures
    # it and plans again with it
    loss_memory: int = 0
    # gradients of parameters the graph does not read that the step's backward makes before the
    # graph's own backward and that stay until the optimizer step (the rest of the model after a
    # graph break, an eager head): counted from the graph's backward on (an int of bytes or a
    # string like '1GiB'). For an absolute budget the backend finds them among its optimizers'
    # parameters when this is left at 0
    gradients_held: int = 0
    # how many times the compiled graph runs forward before the backwards of one step (a block
    # compiled once and called for every block of the model, as torchtitan compiles): each run holds
    # what it saves for its backward through the others. Run-time enforcement finds it on CUDA
    runs_per_step: int = 1
    # how the partitioned graphs are simulated after partitioning: "graph" (their order, with the
    # ordering rules), "inductor" (every plan's backward in the order Inductor's scheduler runs it:
    # it is lowered up to the scheduler once more per plan) or "auto": where the graph is compiled
    # by Inductor for a CUDA GPU, the plans are checked in graph order and the plan those checks
    # end on once more in Inductor's order, on the schedule the compile itself makes of its
    # backward (backend.confirms_in_compile; no lowering of its own), and a plan over the budget
    # there is compiled again with every plan checked in that order; elsewhere "graph"
    # (sac_compiler.inductor_order). On a GPU "auto" catches the plans graph order under-predicts
    # (docs/results.md), at the cost of a second compile where the compile's schedule peaks over
    partition_order: str = "auto"
    # Inductor's own reordering of the kernels it schedules by its estimate of their peak
    # (torch._inductor.config.reorder_for_peak_memory) for the graphs this backend compiles; on, as
    # in Inductor. Recorded with each partition, and followed by partition_order="inductor"
    reorder_for_peak_memory: bool = True
    # offer a third choice besides keeping and recomputing: offloading a saved value to pinned host
    # memory, on a CUDA graph (sac_compiler.offload.plan_with_offload; the report says where not)
    offload: bool = False
    # pinned host bytes the offloaded values may take (an int of bytes or a string like '32GiB');
    # None: unlimited
    host_memory_budget: int | None = None

    def __post_init__(self) -> None:
        if self.memory_budget is not None:
            self._set("memory_budget", MemoryBudget.parse(self.memory_budget))
        _check_device(self.device)
        _choice("estimate_mode", self.estimate_mode, ESTIMATE_MODES)
        _choice("solver", self.solver, SOLVERS)
        if self.time_limit_s is not None:
            if not (_is_number(self.time_limit_s) and math.isfinite(self.time_limit_s) and self.time_limit_s > 0):
                raise ValueError(
                    f"time_limit_s must be a number of seconds > 0 or None (no limit), got {_describe(self.time_limit_s)}"
                )
            self._set("time_limit_s", _plain_number(self.time_limit_s))
        if self.mip_gap is not None:
            if not (_is_number(self.mip_gap) and 0 <= self.mip_gap < 1):  # nan fails this too
                raise ValueError(
                    f"mip_gap must be in [0, 1) (a relative optimality gap such as 0.01) or None, "
                    f"got {_describe(self.mip_gap)}"
                )
            self._set("mip_gap", _plain_number(self.mip_gap))
        _choice("compiler", self.compiler, COMPILERS)
        if self.world_size is not None and (isinstance(self.world_size, bool)
                                            or not isinstance(self.world_size, numbers.Integral) or self.world_size < 1):
            raise ValueError(f"world_size must be an int >= 1 or None (the process group's), "
                             f"got {_describe(self.world_size)}")
        from sac_compiler.distributed import resolve_world_size

        self._set("world_size", resolve_world_size(None if self.world_size is None else int(self.world_size)))
        if self.optimizer_state_bytes is not None:
            self._set("optimizer_state_bytes",
                      parse_bytes(self.optimizer_state_bytes, option="optimizer_state_bytes", allow_zero=True))
        if self.optimizer is not None:
            _check_optimizer(self.optimizer)
        if self.optimizer_state_bytes is not None and self.optimizer is not None:
            raise ValueError(
                f"give either optimizer_state_bytes or optimizer, not both; got optimizer_state_bytes="
                f"{self.optimizer_state_bytes} and optimizer={type(self.optimizer).__name__}"
            )
        self._set("report", _checked_report(self.report))
        if not isinstance(self.enforce_budget, bool):
            raise ValueError(f"enforce_budget must be True or False, got {_describe(self.enforce_budget)}")
        if not isinstance(self.conv_workspaces, bool):
            raise ValueError(f"conv_workspaces must be True or False, got {_describe(self.conv_workspaces)}")
        if not isinstance(self.hold_outputs, bool):
            raise ValueError(f"hold_outputs must be True or False, got {_describe(self.hold_outputs)}")
        self._set("loss_memory", parse_bytes(self.loss_memory, option="loss_memory", allow_zero=True))
        self._set("gradients_held", parse_bytes(self.gradients_held, option="gradients_held", allow_zero=True))
        if (isinstance(self.runs_per_step, bool) or not isinstance(self.runs_per_step, numbers.Integral)
                or self.runs_per_step < 1):
            raise ValueError(f"runs_per_step must be an int >= 1 (how many times the compiled graph runs forward "
                             f"before the backwards of a step), got {_describe(self.runs_per_step)}")
        self._set("runs_per_step", int(self.runs_per_step))
        _choice("partition_order", self.partition_order, PARTITION_ORDERS)
        if not isinstance(self.reorder_for_peak_memory, bool):
            raise ValueError(f"reorder_for_peak_memory must be True or False (whether Inductor reorders the compiled "
                             f"graphs by its own peak estimate), got {_describe(self.reorder_for_peak_memory)}")
        if self.partition_order == "inductor" and self.compiler != "inductor":
            raise ValueError(f"partition_order='inductor' orders the graphs as Inductor schedules them, but compiler="
                             f"{self.compiler!r} runs them in graph order: use partition_order='graph', or compiler='inductor'")
        if not isinstance(self.offload, bool):
            raise ValueError(f"offload must be True or False, got {_describe(self.offload)}")
        if self.host_memory_budget is not None:
            self._set("host_memory_budget", parse_bytes(self.host_memory_budget, option="host_memory_budget"))

    def _set(self, name: str, value: Any) -> None:
        """Store the parsed form of an option (the dataclass is frozen)."""
        if getattr(self, name) is not value:
            object.__setattr__(self, name, value)

    @staticmethod
    def from_options(options: Mapping[str, Any] | None) -> SACConfig:
        """Validate ``torch.compile(..., options={...})`` for ``backend="sac"``."""
        if options is None:
            options = {}
        if not isinstance(options, Mapping):
            raise ValueError(
                "options must be a dict of backend='sac' options such as {'memory_budget': '6GiB'}, "
                f"got {_describe(options)}"
            )
        options = dict(options)
        known = {f.name for f in dataclasses.fields(SACConfig)}
        unknown = sorted((key for key in options if key not in known), key=str)
        if unknown:
            raise ValueError(f"unknown backend='sac' option(s) {unknown}; the options are {sorted(known)}")
        return SACConfig(**options)


def _plain_number(value: float) -> int | float:
    """An int or float as given; other reals (numpy scalars, Fraction) as a float, which the solvers take."""
    return value if isinstance(value, (int, float)) else float(value)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    """``value`` must be one of the ``allowed`` strings, exactly."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {_describe(value)}")


def _check_device(value: Any) -> None:
    """``device`` must name what the cost model can look up: 'auto' or a spec name or alias, in any case."""
    names = known_device_names()
    accepted = {"auto", *(name.lower() for name in names), *DEVICE_ALIASES}
    key = value.strip().lower() if isinstance(value, str) else None
    if key in accepted:
        return
    hint = ""
    if key is not None and key.split(":")[0] in _TORCH_DEVICE_TYPES:
        hint = ("; device names the GPU model whose specs the cost model uses, not a torch device: "
                "'auto' detects the visible GPU")
    raise ValueError(
        f"device must be 'auto' or a device spec name ({', '.join(names)}; aliases "
        f"{', '.join(sorted(DEVICE_ALIASES))}; any case), got {_describe(value)}{hint}"
    )


def _check_optimizer(value: Any) -> None:
    """``optimizer`` must be an optimizer instance: the plan counts the state it holds."""
    import torch

    if isinstance(value, torch.optim.Optimizer):
        return
    hint = ""
    if isinstance(value, type) and issubclass(value, torch.optim.Optimizer):
        hint = f"; pass an instance, such as {value.__name__}(model.parameters()), not the class"
    raise ValueError(
        f"optimizer must be None or a torch.optim.Optimizer instance (the plan counts its state), "
        f"got {_describe(value)}{hint}"
    )


def _checked_report(value: Any) -> bool | str:
    """``report`` as True/False or as a str path the plan can be written to.

    The path is checked now, so that a missing or read-only directory fails the configuration
    rather than the compile after all of its planning.
    """
    if isinstance(value, bool):
        return value
    path = os.fspath(value) if isinstance(value, os.PathLike) else value
    if not isinstance(path, str):
        raise ValueError(f"report must be {_REPORT_FORM}, got {_describe(value)}")
    if not path:
        raise ValueError("report='' is an empty path; use report=False for no report, or give a file path to "
                         "write the plan to")
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"report={path!r} is a directory; give a file path to write the plan to, such as "
                         f"{str(target / 'sac_plan.txt')!r}")
    if target.exists() and not os.access(target, os.W_OK):
        raise ValueError(f"report={path!r} is not writable; give a path the plan can be written to")
    parent = target.parent
    if not parent.exists():
        tilde = " ('~' is not expanded: write the directory out)" if path.startswith("~") else ""
        raise ValueError(f"report={path!r}: the directory {str(parent)!r} does not exist{tilde}; create it or "
                         "give a path in an existing directory")
    if not parent.is_dir():
        raise ValueError(f"report={path!r}: {str(parent)!r} is not a directory; give a path in a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"report={path!r}: the directory {str(parent)!r} is not writable; give a path in a "
                         "writable directory")
    return path
