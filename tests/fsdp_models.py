"""Models for the FSDP tests: a block FSDP2 shards, and one that shards itself in its graph.

``GatheredMLP`` is sharded as SimpleFSDP (torchtitan) shards a model: each parameter holds this
rank's rows, and the forward all-gathers them with a functional collective whose backward
reduce-scatters the gradient, so the captured graph holds ``all_gather_into_tensor``,
``reduce_scatter_tensor`` and their ``wait_tensor`` ops (and an ``all_reduce`` of the output, as
tensor parallelism adds one). ``Block`` is a plain transformer-style MLP block for ``fully_shard``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn


class Block(nn.Module):
    """``x + fc2(relu(fc1(x)))``: the unit FSDP2 shards and torch.compile compiles, one per block."""

    def __init__(self, dim: int = 16, hidden: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class Stack(nn.Module):
    """``depth`` blocks in a row (the model FSDP2 wraps block by block, then as a whole)."""

    def __init__(self, depth: int = 2, dim: int = 16, hidden: int = 64) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(dim, hidden) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class GatheredMLP(nn.Module):
    """Two linear maps whose weights hold this rank's ``1/world_size`` of the rows, all-gathered in
    forward (reduce-scattered in backward), pointwise ops between them, and an all-reduce of the
    output."""

    def __init__(self, world_size: int, dim: int = 16, hidden: int = 64) -> None:
        super().__init__()
        if hidden % world_size or dim % world_size:
            raise ValueError(f"dim {dim} and hidden {hidden} must divide by world_size {world_size}")
        self.w1 = nn.Parameter(torch.randn(hidden // world_size, dim) / dim**0.5)
        self.w2 = nn.Parameter(torch.randn(dim // world_size, hidden) / hidden**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.distributed._functional_collectives import all_gather_tensor_autograd, all_reduce

        group = dist.group.WORLD
        h = torch.relu(x @ all_gather_tensor_autograd(self.w1, 0, group).t())
        # values cheap to rebuild from h, which the backward reads: what a plan recomputes
        y = (torch.sin(h) * torch.cos(h)) @ all_gather_tensor_autograd(self.w2, 0, group).t()
        return all_reduce(y, "sum", group)
