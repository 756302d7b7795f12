"""Model factories for the command-line tests (``sac-compiler plan tests.cli_models:small_gpt ...``).

Each factory is what a user would point the CLI at: a function or class that builds an
``nn.Module`` (the CLI calls it under ``torch.device("meta")``), or one that also returns its
example inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 512
DIM = 64
HEADS = 4
LAYERS = 2
SEQ = 64
BATCH = 4


class _Block(nn.Module):
    """Pre-norm attention (SDPA, causal) and a GELU MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=-1)
        q, k, v = (t.view(b, s, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, s, d))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class SmallGPT(nn.Module):
    """A GPT-style language model small enough to capture and plan in seconds on a CPU."""

    def __init__(self, vocab: int = VOCAB, dim: int = DIM, heads: int = HEADS, layers: int = LAYERS,
                 seq: int = SEQ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq, dim)
        self.layers = nn.ModuleList([_Block(dim, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok(tokens) + self.pos(positions)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def small_gpt() -> nn.Module:
    """The model alone: the CLI builds its inputs from ``--inputs "long[4,64]:0-512"``."""
    return SmallGPT()


def small_gpt_with_inputs() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The model and its example inputs, so ``--inputs`` can be left out."""
    return SmallGPT(), (torch.randint(0, VOCAB, (BATCH, SEQ)),)


def not_a_module() -> int:
    """A factory returning something the CLI cannot plan (for the error tests)."""
    return 3


def broken() -> nn.Module:
    """A factory that fails (for the error tests)."""
    raise RuntimeError("this factory always fails")


class TinyMLP(nn.Module):
    """A class as the factory: ``sac-compiler estimate tests.cli_models:TinyMLP --inputs "float[8,16]"``."""

    def __init__(self, dim: int = 16, hidden: int = 64) -> None:
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))
