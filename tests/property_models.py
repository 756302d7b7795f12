"""Small composable blocks for the property-based suite (``tests/test_property.py``).

Every block maps a ``(batch, dim)`` activation to another of the same shape, so any sequence of
blocks composes. No block mutates the tensor it is given (in-place ops act on values the block
made itself), so a block never invalidates what an earlier block saved for backward; the in-place
ops, views, mutated buffers and parameters, parametrizations and graph breaks are all inside
single blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

BATCHES = (4, 64, 64)
DIMS = (8, 16)


class Linear(nn.Module):
    def __init__(self, dim: int, bias: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim, bias=bias)

    def forward(self, x):
        return self.fc(x)


class Conv1d(nn.Module):
    """(B, D) -> (B, 2, D/2) -> conv1d -> (B, D)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 2, 3, padding=1)

    def forward(self, x):
        b, d = x.shape
        return self.conv(x.view(b, 2, d // 2)).view(b, d)


class Conv2d(nn.Module):
    """(B, D) -> (B, D/4, 2, 2) -> conv2d -> BatchNorm2d -> flatten."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        c = dim // 4
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.norm = nn.BatchNorm2d(c)

    def forward(self, x):
        b, d = x.shape
        return self.norm(self.conv(x.view(b, d // 4, 2, 2))).flatten(1)


class BatchNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim)

    def forward(self, x):
        return self.norm(x)


class LayerNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(x)


class GroupNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(2, dim)

    def forward(self, x):
        return self.norm(x)


class Attention(nn.Module):
    """Self-attention over 2 tokens of D/2 features, 2 heads, through F.scaled_dot_product_attention."""

    def __init__(self, dim: int, dropout_p: float = 0.0) -> None:
        super().__init__()
        self.e = dim // 2
        self.qkv = nn.Linear(self.e, 3 * self.e)
        self.proj = nn.Linear(self.e, self.e)
        self.dropout_p = dropout_p

    def forward(self, x):
        b, d = x.shape
        t, e, h = 2, self.e, 2
        q, k, v = self.qkv(x.view(b, t, e)).split(e, dim=-1)
        q, k, v = (z.reshape(b, t, h, e // h).transpose(1, 2) for z in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout_p if self.training else 0.0)
        return x + self.proj(o.transpose(1, 2).reshape(b, t, e)).view(b, d)


class AttentionDropout(Attention):
    def __init__(self, dim: int) -> None:
        super().__init__(dim, dropout_p=0.25)


class Activation(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class InplaceChain(nn.Module):
    """A linear's output (which its own backward does not read) mutated: mul_, add_, then relu_."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        h = self.fc(x)
        h.mul_(0.5)
        h.add_(x)
        return torch.relu_(h)


class InplaceReLUModule(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True))

    def forward(self, x):
        return self.net(x)


class InplaceOnView(nn.Module):
    """In-place ops through views of a fresh value: a slice scaled, a transposed view shifted."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        b, d = x.shape
        h = self.fc(x) * 1.5
        v = h.view(b, 2, d // 2)
        v[:, 0].mul_(2.0)
        v.transpose(1, 2).add_(0.25)
        return h


class Dropout(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        return self.drop(x)


class TransposeView(nn.Module):
    def forward(self, x):
        b, d = x.shape
        return x.view(b, 2, d // 2).transpose(1, 2).reshape(b, d) * 1.0 + x.t().t()


class PermuteFlatten(nn.Module):
    def forward(self, x):
        b, d = x.shape
        return x.view(b, 2, 2, d // 4).permute(0, 3, 1, 2).flatten(1)


class ChunkCat(nn.Module):
    def forward(self, x):
        a, c = x.chunk(2, dim=1)
        return torch.cat([torch.tanh(c), a * 2.0], dim=1)


class SplitCat(nn.Module):
    def forward(self, x):
        d = x.shape[1]
        a, c = x.split([d // 4, d - d // 4], dim=1)
        return torch.cat([c, F.silu(a)], dim=1)


class SharedLinear(nn.Module):
    """One Linear applied twice."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        return self.fc(torch.tanh(self.fc(x)))


class TiedLinears(nn.Module):
    """Two Linears sharing one weight; the second also reads it transposed."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.a = nn.Linear(dim, dim)
        self.b = nn.Linear(dim, dim, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x):
        h = self.b(F.gelu(self.a(x)))
        return F.linear(h, self.a.weight.t())


class WeightNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = parametrizations.weight_norm(nn.Linear(dim, dim))

    def forward(self, x):
        return self.fc(x)


class SpectralNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = parametrizations.spectral_norm(nn.Linear(dim, dim))

    def forward(self, x):
        return self.fc(x)


class WideParametrized(nn.Module):
    """A parametrized Linear to twice the width (a non-square weight: spectral norm's two
    power-iteration vectors differ in size), a ReLU, and a plain Linear back."""

    def __init__(self, dim: int, parametrization: Callable[[nn.Module], nn.Module]) -> None:
        super().__init__()
        self.up = parametrization(nn.Linear(dim, 2 * dim))
        self.down = nn.Linear(2 * dim, dim)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class RunningMean(nn.Module):
    """A buffer updated in place in forward, under no_grad, and read by the output."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("buf", torch.zeros(()))

    def forward(self, x):
        with torch.no_grad():
            self.buf.mul_(0.9).add_(x.mean())
        return x - self.buf


class ClampedParam(nn.Module):
    """A parameter clamped in place under no_grad at the start of forward."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        with torch.no_grad():
            self.fc.weight.clamp_(-0.2, 0.2)
        return self.fc(x)


class ScaledByBuffer(nn.Module):
    """A buffer updated in place under no_grad, then multiplying the activation: the backward reads
    its new value (a recompute from the buffer in backward would update it a second time)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(dim))

    def forward(self, x):
        with torch.no_grad():
            self.scale.mul_(0.9).add_(x.mean(0).abs())
        return torch.tanh(x * self.scale)


class DecayedParam(nn.Module):
    """A parameter scaled in place under no_grad at the start of forward (unlike a clamp, doing it
    twice gives another value)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        with torch.no_grad():
            self.fc.weight.mul_(0.95)
        return F.gelu(self.fc(x))


class SharedBatchNorm(nn.Module):
    """One BatchNorm (and its running statistics) applied twice."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        return self.norm(self.fc(torch.relu(self.norm(x))))


class Gate(nn.Module):
    """A product of two activations (both saved for backward), then a softmax."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.a = nn.Linear(dim, dim)
        self.b = nn.Linear(dim, dim)

    def forward(self, x):
        return torch.softmax(self.a(x) * torch.sigmoid(self.b(x)), dim=-1)


class ResidualMLP(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(x)))


class GraphBreak(nn.Module):
    def forward(self, x):
        torch._dynamo.graph_break()
        return x


class Tap(nn.Module):
    """Marks the activation as an extra model output (see ``PropertyModel``)."""

    def forward(self, x):
        return x


def _no_arg(cls: type[nn.Module]) -> Callable[[int], nn.Module]:
    return lambda dim: cls()


def _act(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[int], nn.Module]:
    return lambda dim: Activation(fn)


BLOCKS: dict[str, Callable[[int], nn.Module]] = {
    "linear": Linear,
    "linear_nobias": lambda dim: Linear(dim, bias=False),
    "conv1d": Conv1d,
    "conv2d_bn": Conv2d,
    "batchnorm": BatchNorm,
    "layernorm": LayerNorm,
    "groupnorm": GroupNorm,
    "attention": Attention,
    "attention_dropout": AttentionDropout,
    "relu": _act(F.relu),
    "gelu": _act(F.gelu),
    "silu": _act(F.silu),
    "tanh": _act(torch.tanh),
    "inplace_chain": InplaceChain,
    "inplace_relu_module": InplaceReLUModule,
    "inplace_on_view": InplaceOnView,
    "dropout": Dropout,
    "transpose_view": _no_arg(TransposeView),
    "permute_flatten": _no_arg(PermuteFlatten),
    "chunk_cat": _no_arg(ChunkCat),
    "split_cat": _no_arg(SplitCat),
    "shared_linear": SharedLinear,
    "tied_linears": TiedLinears,
    "weight_norm": WeightNorm,
    "spectral_norm": SpectralNorm,
    "weight_norm_wide": lambda dim: WideParametrized(dim, parametrizations.weight_norm),
    "spectral_norm_wide": lambda dim: WideParametrized(dim, parametrizations.spectral_norm),
    "running_mean": RunningMean,
    "clamped_param": ClampedParam,
    "scaled_by_buffer": ScaledByBuffer,
    "decayed_param": DecayedParam,
    "shared_batchnorm": SharedBatchNorm,
    "gate": Gate,
    "residual_mlp": ResidualMLP,
    "graph_break": _no_arg(GraphBreak),
    "tap": _no_arg(Tap),
}

RANDOM_BLOCKS = frozenset({"dropout", "attention_dropout"})  # draw from the RNG in training
OUTPUT_KINDS = ("tensor", "tuple", "dict")


class PropertyModel(nn.Module):
    """A Linear stem (so no block mutates the model's input), the blocks, and the outputs: the last
    activation alone, a tuple of it and every tapped activation, or a nested dict of both."""

    def __init__(self, blocks: Sequence[str], dim: int, output: str = "tensor") -> None:
        super().__init__()
        self.names = list(blocks)
        self.output = output
        self.stem = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList([BLOCKS[name](dim) for name in self.names])

    def forward(self, x):
        x = self.stem(x)
        taps = []
        for name, block in zip(self.names, self.blocks):
            x = block(x)
            if name == "tap":
                taps.append(x)
        if self.output == "tensor":
            return x
        if self.output == "tuple":
            return (x, *taps)
        return {"out": x, "aux": {"taps": tuple(taps), "mean": x.mean(0)}}


def build(blocks: Sequence[str], dim: int, output: str = "tensor", seed: int = 0) -> PropertyModel:
    torch.manual_seed(seed)
    return PropertyModel(blocks, dim, output)


def leaves(tree) -> list[torch.Tensor]:
    """The tensors of a (nested) model output, in a fixed order."""
    return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def loss_of(tree) -> torch.Tensor:
    """The training loss, computed outside the compiled model from its outputs."""
    total = 0.0
    for i, t in enumerate(leaves(tree)):
        total = total + (t.float().pow(2).mean() + (i + 1) * 0.1 * t.float().sum())
    return total
