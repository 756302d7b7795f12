"""An op Inductor does not fuse across.

``torch.ops.sac_compiler.fusion_barrier(x)`` is a copy of ``x``. Inductor has no lowering for it,
so it runs as a call of its own: the kernel that makes ``x`` is not fused with anything that reads
the copy. The backend puts one after a sum Inductor would otherwise fuse into a kernel far later
in the graph (``backend.keep_reductions_apart``), so that the sum runs where the graph has it.
"""

from __future__ import annotations

import torch


@torch.library.custom_op("sac_compiler::fusion_barrier", mutates_args=())
def fusion_barrier(x: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` (an op's output may not alias its input)."""
    return x.clone()


@fusion_barrier.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)
