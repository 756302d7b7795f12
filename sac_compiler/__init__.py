"""sac-compiler: automatic selective activation checkpointing for torch.compile.

``torch.compile(model, backend="sac", options={...})`` finds the backend through the
``torch_dynamo_backends`` entry point; this package also offers the capture, the analysis and the
seed-compatible statistics and solvers on their own.
"""

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

from sac_compiler.capture import (
    CaptureError,
    GraphInput,
    InputKind,
    JointGraph,
    capture_joint,
)
from sac_compiler.config import MemoryBudget, SACConfig, parse_bytes
from sac_compiler.estimator import SACEstimate, estimate
from sac_compiler.planner import BudgetRange, budget_range, plan

try:
    __version__ = _version("sac-compiler")
except _PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "BudgetRange",
    "CaptureError",
    "GraphInput",
    "InputKind",
    "JointGraph",
    "MemoryBudget",
    "SACConfig",
    "SACEstimate",
    "__version__",
    "budget_range",
    "capture_joint",
    "estimate",
    "parse_bytes",
    "plan",
]

# SAC_LOG=info|debug (or warning, error) logs this package's messages to stderr at that level
# (README, "Command line"); unset, logging is left to the application.
from sac_compiler.cli import logging_from_env as _logging_from_env

_logging_from_env()
