"""Small models the tests share (seed models and the shapes the issues name)."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


class Foo(nn.Module):
    """Seed 000's Foo: a view (t), then relu_, cos_, sin_ on the linear's output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 10)
        self.relu1 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        x = self.relu1(x)
        x = torch.cos_(x)
        x = torch.sin_(x)
        return x


class _TrackedFoo(nn.Module):
    def forward(self, x):
        x = x["a"].relu_()
        return {"a": torch.mm(x, x)}


class Mod(nn.Module):
    """Seed 004's Mod: forward c.0, a, b.nest."""

    def __init__(self) -> None:
        super().__init__()
        self.a = _TrackedFoo()
        self.b = nn.ModuleDict({"nest": _TrackedFoo()})
        self.c = nn.ModuleList([_TrackedFoo()])

    def forward(self, x):
        x = self.c[0](x)
        return self.b["nest"](self.a(x))


class CheckpointedLinears(nn.Module):
    """Seed 004's test_ac model: layers after the first wrapped in checkpoint."""

    def __init__(self, n_layers: int = 2, dim: int = 8, use_ac: bool = True) -> None:
        super().__init__()
        self.linears = nn.ModuleList([nn.Linear(dim, dim) for _ in range(n_layers)])
        self.use_ac = use_ac

    def forward(self, x):
        for i, block in enumerate(self.linears):
            if i >= 1 and self.use_ac:
                x = checkpoint(block, x, preserve_rng_state=True, use_reentrant=False)
            else:
                x = block(x)
            x = torch.nn.functional.relu(x)
        return x


class InplaceMLP(nn.Module):
    """Valid in-place chains: relu_ after a linear, add_ on a fresh product, a view mutated in place."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x):
        h = torch.relu_(self.fc1(x))
        h = h * 2
        h.add_(1)
        v = h.t()
        v.mul_(3)
        return self.fc2(v.t())


class DropoutMLP(nn.Module):
    def __init__(self, dim: int = 16, p: float = 0.3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.drop = nn.Dropout(p)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(self.drop(torch.nn.functional.gelu(self.fc1(x))))


class TiedLinear(nn.Module):
    """One weight used twice (shared parameter)."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.proj.weight = self.fc.weight

    def forward(self, x):
        return self.proj(torch.tanh(self.fc(x)))


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class Nested(nn.Module):
    def __init__(self, dim: int = 16, n_layers: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(dim) for _ in range(n_layers)])
        self.head = nn.Linear(dim, 4)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def tiny_transformer(n_layers: int = 2, dropout_p: float = 0.1) -> nn.Module:
    from torch.testing._internal.distributed._tensor.common_dtensor import (
        ModelArgs,
        Transformer,
    )

    return Transformer(ModelArgs(n_layers=n_layers, n_heads=4, vocab_size=64, max_seq_len=16, dim=32,
                                 dropout_p=dropout_p))


class MLPBlock(nn.Module):
    def __init__(self, dim: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.mlp_block = nn.Sequential(nn.Linear(dim, 2 * dim, dtype=dtype), nn.ReLU(), nn.Linear(2 * dim, dim, dtype=dtype))

    def forward(self, x):
        return self.mlp_block(x)


class CheckpointedMLP(nn.Module):
    """Seed 002's MyModule: MLP blocks, all but the first wrapped in checkpoint when use_ac."""

    def __init__(self, n_layers: int, dim: int, dtype: torch.dtype = torch.float32, use_ac: bool = False) -> None:
        super().__init__()
        self.mlp_blocks = nn.ModuleList([MLPBlock(dim, dtype) for _ in range(n_layers)])
        self.use_ac = use_ac

    def forward(self, x):
        for i, block in enumerate(self.mlp_blocks):
            if i >= 1 and self.use_ac:
                x = checkpoint(block, x, preserve_rng_state=True, use_reentrant=False)
            else:
                x = block(x)
        return x


class LinearReLUStack(nn.Module):
    """Seed 002's DummyModel: n x (Linear, ReLU)."""

    def __init__(self, n_layers: int, dim: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.linears = nn.ModuleList()
        for _ in range(n_layers):
            self.linears.append(nn.Linear(dim, dim, dtype=dtype))
            self.linears.append(nn.ReLU())

    def forward(self, x):
        for layer in self.linears:
            x = layer(x)
        return x


class SharedStack(nn.Module):
    """One Linear applied at every depth (shared weights), with a tied output projection."""

    def __init__(self, dim: int = 32, depth: int = 4) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.depth = depth

    def forward(self, x):
        for _ in range(self.depth):
            x = torch.tanh(self.fc(x)) + x
        return torch.nn.functional.linear(x, self.fc.weight)


class BatchNormNet(nn.Module):
    """Convolutions with BatchNorm (running statistics updated in forward) and a buffer of its own
    updated in place: inputs the forward mutates."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
        )
        self.head = nn.Linear(channels, 10)
        self.register_buffer("feature_mean", torch.zeros(channels))

    def forward(self, x):
        h = self.features(x).mean((2, 3))
        self.feature_mean.mul_(0.9).add_(h.detach().mean(0), alpha=0.1)
        return self.head(h)
