"""sac-compiler: automatic selective activation checkpointing for torch.compile.

``torch.compile(model, backend="sac", options={...})`` finds the backend through the
``torch_dynamo_backends`` entry point; this package also offers the capture, the analysis and the
seed-compatible statistics and solvers on their own.
"""

from sac_compiler.capture import CaptureError, GraphInput, InputKind, JointGraph, capture_joint
from sac_compiler.config import MemoryBudget, SACConfig, parse_bytes

__all__ = [
    "CaptureError",
    "GraphInput",
    "InputKind",
    "JointGraph",
    "MemoryBudget",
    "SACConfig",
    "capture_joint",
    "parse_bytes",
]
