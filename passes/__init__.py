"""Standalone FX annotation passes over joint (or forward-only) ATen graphs.

Each pass is a function over an ``fx.GraphModule`` that writes its fields of the per-node record
``node.meta["sac"]`` (see :mod:`sac_compiler.passes.record`) and returns its graph-level result.
"""

from sac_compiler.passes.annotate_memory import (
    MemorySimulation,
    ModuleMemory,
    annotate_memory,
)
from sac_compiler.passes.annotate_modules import ModuleOrders, annotate_modules
from sac_compiler.passes.annotate_ops import annotate_ops
from sac_compiler.passes.annotate_runtime import annotate_runtime
from sac_compiler.passes.record import MemoryCategory, SACNodeRecord, Side, get_record

__all__ = [
    "MemoryCategory",
    "MemorySimulation",
    "ModuleMemory",
    "ModuleOrders",
    "SACNodeRecord",
    "Side",
    "annotate_memory",
    "annotate_modules",
    "annotate_ops",
    "annotate_runtime",
    "get_record",
]
