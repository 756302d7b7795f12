"""The per-node record that every annotation pass writes under ``node.meta["sac"]``.

Invariants every pass relies on:

* ``node.meta["sac"]`` is a frozen :class:`SACNodeRecord`; a pass replaces it with a copy that has
  *its own* fields filled in. Each field belongs to exactly one pass (``FIELD_OWNERS``) and
  :func:`update_record` refuses a write to another pass's field, so passes compose in any order and a
  re-run of one pass never clobbers another's results.
* No pass rewrites ``node.meta["val"]`` or any other key PyTorch owns.
* Graph-level results (module orders, the memory simulation, ...) live in ``gm.meta["sac"]``, a dict
  keyed by pass name.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

META_KEY = "sac"


class Side(str, enum.Enum):
    FORWARD = "forward"
    BACKWARD = "backward"


class MemoryCategory(str, enum.Enum):
    PARAMETER = "parameter"
    BUFFER = "buffer"
    GRADIENT = "gradient"
    ACTIVATION = "activation"
    TEMPORARY = "temporary"
    INPUT = "input"
    OPTIMIZER_STATE = "optimizer_state"


@dataclass(frozen=True)
class SACNodeRecord:
    # annotate_modules
    module_fqn: str | None = None
    module_stack: tuple[str, ...] | None = None
    side: Side | None = None
    user_recompute: bool | None = None
    # annotate_ops
    op_name: str | None = None
    is_view: bool | None = None
    is_random: bool | None = None
    is_inplace: bool | None = None
    inplace_parent: str | None = None
    source_op: str | None = None
    saved_for_backward: bool | None = None
    is_collective: bool | None = None
    # annotate_memory
    nbytes: int | None = None
    alloc_bytes: int | None = None
    storage_owner: str | None = None
    category: MemoryCategory | None = None
    # annotate_runtime
    flops: int | None = None
    bytes_accessed: int | None = None
    runtime_ms: float | None = None
    runtime_source: str | None = None


FIELD_OWNERS: dict[str, str] = {
    **dict.fromkeys(("module_fqn", "module_stack", "side", "user_recompute"), "annotate_modules"),
    **dict.fromkeys(
        ("op_name", "is_view", "is_random", "is_inplace", "inplace_parent", "source_op", "saved_for_backward",
         "is_collective"),
        "annotate_ops",
    ),
    **dict.fromkeys(("nbytes", "alloc_bytes", "storage_owner", "category"), "annotate_memory"),
    **dict.fromkeys(("flops", "bytes_accessed", "runtime_ms", "runtime_source"), "annotate_runtime"),
}
assert set(FIELD_OWNERS) == {f.name for f in dataclasses.fields(SACNodeRecord)}


def get_record(node: fx.Node) -> SACNodeRecord:
    """The node's record (an empty one when no pass has run on it)."""
    return node.meta.get(META_KEY) or SACNodeRecord()


def update_record(node: fx.Node, owner: str, **fields: Any) -> SACNodeRecord:
    """Merge ``fields`` (all owned by pass ``owner``) into the node's record."""
    foreign = [name for name in fields if FIELD_OWNERS.get(name) != owner]
    assert not foreign, f"pass {owner} may not write fields {foreign} (owners: {FIELD_OWNERS})"
    record = dataclasses.replace(get_record(node), **fields)
    node.meta[META_KEY] = record
    return record


def graph_results(gm: fx.GraphModule) -> dict[str, Any]:
    """Graph-level results of the passes, keyed by pass name."""
    return gm.meta.setdefault(META_KEY, {})


def tensor_values(node: fx.Node) -> list[Any]:
    """The tensors (fake or real) a node produces, flattened; [] for non-tensor values."""
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return [val]
    if isinstance(val, (list, tuple)):
        return [v for v in val if isinstance(v, torch.Tensor)]
    return []


def call_functions(gm: fx.GraphModule) -> list[fx.Node]:
    """The graph's call_function nodes, in order."""
    return [node for node in gm.graph.nodes if node.op == "call_function"]


def size_hint(x: Any) -> int:
    """A concrete int for a size that may be symbolic (its hint: the example input's value)."""
    if not isinstance(x, torch.SymInt):
        return int(x)
    from torch.fx.experimental import symbolic_shapes

    # torch >= 2.13: optimization_hint; torch 2.11, 2.12: size_hint (their hint_int is its
    # deprecated name)
    hint = getattr(symbolic_shapes, "optimization_hint", None) or getattr(symbolic_shapes, "size_hint", None)
    if hint is None:
        hint = symbolic_shapes.hint_int
    return int(hint(x))
