"""One frozen, validated configuration for ``backend="sac"``; ``options=`` maps onto it."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

COMPILERS = ("inductor", "eager")
ESTIMATE_MODES = ("cost-model", "benchmark")
SOLVERS = ("cbc", "highs")

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: str | int) -> int:
    """``"6GiB"`` -> 6442450944, ``"6000MB"`` -> 6000000000, ``1024`` -> 1024."""
    if isinstance(value, bool):
        raise ValueError(f"a byte size must be an int or a string like '6GiB', got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"a byte size must be positive, got {value}")
        return value
    match = _SIZE.match(str(value))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"cannot read {value!r} as a byte size; write an int of bytes or a number with one of the "
            f"units {sorted(u for u in _UNITS if u)} (e.g. '6GiB', '6000MB')"
        )
    nbytes = int(float(match.group(1)) * _UNITS[unit])
    if nbytes <= 0:
        raise ValueError(f"a byte size must be positive, got {value!r}")
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
        if isinstance(value, float) and not isinstance(value, bool):
            if not 0.0 < value <= 1.0:
                raise ValueError(
                    f"memory_budget as a float is a fraction of the activation memory and must be in "
                    f"(0, 1], got {value}; give absolute sizes as an int of bytes or a string like '6GiB'"
                )
            return MemoryBudget(fraction=value)
        return MemoryBudget(bytes=parse_bytes(value))

    def __str__(self) -> str:
        if self.fraction is not None:
            return f"{self.fraction:g} of the saved activations"
        return format_bytes(self.bytes)


@dataclass(frozen=True)
class SACConfig:
    memory_budget: MemoryBudget | None = None
    device: str = "auto"
    estimate_mode: str = "cost-model"
    solver: str = "highs"
    time_limit_s: float | None = 30.0
    mip_gap: float | None = 0.01
    compiler: str = "inductor"
    world_size: int = 1
    optimizer_state_bytes: int | None = None
    optimizer: Any = None
    report: bool | str = False

    def __post_init__(self) -> None:
        _choice("estimate_mode", self.estimate_mode, ESTIMATE_MODES)
        _choice("solver", self.solver, SOLVERS)
        _choice("compiler", self.compiler, COMPILERS)
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"device must be 'auto' or a device spec name, got {self.device!r}")
        if self.time_limit_s is not None and not self.time_limit_s > 0:
            raise ValueError(f"time_limit_s must be a positive number of seconds or None, got {self.time_limit_s!r}")
        if self.mip_gap is not None and not 0 <= self.mip_gap < 1:
            raise ValueError(f"mip_gap must be in [0, 1), got {self.mip_gap!r}")
        if isinstance(self.world_size, bool) or not isinstance(self.world_size, int) or self.world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got {self.world_size!r}")
        if self.world_size != 1:
            raise ValueError(
                f"world_size={self.world_size}: backend='sac' does not yet plan sharded parameters and "
                "gradients; leave world_size at 1 (sac_milp plans FSDP sharding at module level)"
            )
        if self.optimizer_state_bytes is not None and self.optimizer is not None:
            raise ValueError("give either optimizer_state_bytes or optimizer, not both")
        if self.optimizer is not None:
            import torch

            if not isinstance(self.optimizer, torch.optim.Optimizer):
                raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(self.optimizer).__name__}")
        if not isinstance(self.report, (bool, str)):
            raise ValueError(f"report must be True/False or a file path to write the plan to, got {self.report!r}")

    @staticmethod
    def from_options(options: dict[str, Any] | None) -> SACConfig:
        """Validate ``torch.compile(..., options={...})`` for ``backend="sac"``."""
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(SACConfig)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown backend='sac' option(s) {unknown}; the options are {sorted(known)}")
        if options.get("memory_budget") is not None:
            options["memory_budget"] = MemoryBudget.parse(options["memory_budget"])
        if options.get("optimizer_state_bytes") is not None:
            options["optimizer_state_bytes"] = parse_bytes(options["optimizer_state_bytes"])
        return SACConfig(**options)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
