"""A model zoo after well-known public architectures, to measure whether the memory budget holds
on models this project was not written against.

``ZOO`` maps a name to a :class:`ZooEntry`, which builds the model and a batch at two sizes:
``"small"`` (CPU tests: a forward and backward in well under a second) and ``"full"`` (a GPU
benchmark: roughly 1-10 GiB of activations). ``LOOPS`` names the training loops users write
around ``torch.compile``; :class:`TrainStep` sets one of them up on a model with the caller's
``compile_fn`` and runs training steps::

    entry = ZOO["gpt2"]
    model, batch = entry.model("small"), entry.batch("small")
    step = TrainStep(entry, model, "loss_outside_criterion",
                     lambda m: torch.compile(m, backend="sac", options={"memory_budget": 0.5}))
    output, loss = step(batch, torch.optim.SGD(model.parameters(), lr=0.1))

Every model's forward is one Dynamo graph (no data-dependent Python control flow) unless its
``graph_break`` flag is set, which puts a ``torch._dynamo.graph_break()`` midway through it
(between the two halves of its blocks, or between encoder and decoder, or down and up paths).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# Batches and losses


@dataclass
class Batch:
    """The model's positional inputs and the target its loss compares the output with."""

    inputs: tuple[torch.Tensor, ...]
    target: torch.Tensor

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Batch:
        """On ``device``; floating tensors (images, noise, timesteps) cast to ``dtype`` when given."""

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)

        return Batch(tuple(move(t) for t in self.inputs), move(self.target))


def tensors(output: Any) -> list[torch.Tensor]:
    """The tensors of a model output (a tensor, or a tuple of them)."""
    return [output] if isinstance(output, torch.Tensor) else [t for t in output if isinstance(t, torch.Tensor)]


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Token cross-entropy (positions labelled -100 ignored), in fp32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


MOE_AUX_WEIGHT = 0.01  # the load-balancing term's weight in the MoE model's loss


def _lm_criterion(output: torch.Tensor, batch: Batch) -> torch.Tensor:
    return lm_loss(output, batch.target)


def _moe_criterion(output: tuple[torch.Tensor, torch.Tensor], batch: Batch) -> torch.Tensor:
    logits, aux = output
    return lm_loss(logits, batch.target) + MOE_AUX_WEIGHT * aux


def _class_criterion(output: torch.Tensor, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(output.float(), batch.target)


def _noise_criterion(output: torch.Tensor, batch: Batch) -> torch.Tensor:
    return F.mse_loss(output.float(), batch.target.float())


# ---------------------------------------------------------------------------------------------
# Shared blocks


class ZooModel(nn.Module):
    """The zoo models' base: ``graph_break = True`` breaks Dynamo's graph midway through forward."""

    graph_break: bool = False

    def midway(self) -> None:
        """Called midway through forward (outside any loop: Dynamo runs a frame that breaks in a
        loop eagerly, compiling only the calls inside it): a graph break there, if asked."""
        if self.graph_break:
            torch._dynamo.graph_break()

    def run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor, *args: Any) -> torch.Tensor:
        """``x`` through each block in turn (with ``args``), ``midway()`` between the two halves."""
        half = len(blocks) // 2
        for block in blocks[:half]:
            x = block(x, *args)
        self.midway()
        for block in blocks[half:]:
            x = block(x, *args)
        return x


def init_normal(module: nn.Module, std: float = 0.02) -> None:
    """GPT-2/BERT initialisation: linear and embedding weights N(0, std), biases zero."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    """Multi-head attention through ``F.scaled_dot_product_attention``: self-attention with one
    fused qkv projection, or cross-attention (``cross=True``: q from x, k and v from a context);
    grouped-query when ``n_kv_heads < n_heads``; rotary embeddings when given ``rope=(cos, sin)``."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int | None = None, bias: bool = True,
                 dropout: float = 0.0, scale: float | None = None, cross: bool = False) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads or n_heads
        self.head_dim = dim // n_heads
        kv_dim = self.n_kv_heads * self.head_dim
        if cross:
            self.q = nn.Linear(dim, dim, bias=bias)
            self.kv = nn.Linear(dim, 2 * kv_dim, bias=bias)
        else:
            self.qkv = nn.Linear(dim, dim + 2 * kv_dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.cross, self.dropout, self.scale = cross, dropout, scale

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        b, t, dim = x.shape
        kv_dim = self.n_kv_heads * self.head_dim
        if self.cross:
            q, kv = self.q(x), self.kv(context)
            k, v = kv.split(kv_dim, dim=-1)
        else:
            q, k, v = self.qkv(x).split([dim, kv_dim, kv_dim], dim=-1)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, k.shape[1], self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, v.shape[1], self.n_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if self.n_kv_heads != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, dim))


class MLP(nn.Module):
    """Linear, activation, Linear, dropout (GELU in GPT-2, BERT and ViT; ReLU without biases in T5)."""

    def __init__(self, dim: int, hidden: int, act: Callable[[], nn.Module] = nn.GELU, bias: bool = True,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden, bias=bias), act(), nn.Linear(hidden, dim, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class SwiGLU(nn.Module):
    """Llama's feed-forward: w2(silu(w1 x) * w3 x), no biases."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1, self.w2, self.w3 = (nn.Linear(dim, hidden, bias=False), nn.Linear(hidden, dim, bias=False),
                                     nn.Linear(dim, hidden, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class PreLNBlock(nn.Module):
    """x + attn(LN(x)), then x + mlp(LN(x)): the GPT-2 and ViT block."""

    def __init__(self, dim: int, n_heads: int, mlp: nn.Module, dropout: float = 0.0, causal: bool = False) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, n_heads, dropout=dropout)
        self.drop = nn.Dropout(dropout)
        self.mlp = mlp
        self.causal = causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), is_causal=self.causal))
        return x + self.mlp(self.ln2(x))


# ---------------------------------------------------------------------------------------------
# The architectures


class GPT2(ZooModel):
    """GPT-2 (Radford et al. 2019, as in nanoGPT): token and learned position embeddings, dropout,
    pre-LayerNorm blocks with causal SDPA (attention dropout in training) and a tanh-GELU MLP, a
    final LayerNorm and an output head tied to the token embedding; the loss inside given targets."""

    def __init__(self, vocab: int, seq_len: int, dim: int, n_layers: int, n_heads: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(seq_len, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            PreLNBlock(dim, n_heads, MLP(dim, 4 * dim, lambda: nn.GELU(approximate="tanh"), dropout=dropout),
                       dropout, causal=True) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        init_normal(self)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        x = self.run_blocks(self.blocks, x)
        logits = self.lm_head(self.ln_f(x))
        return logits if targets is None else lm_loss(logits, targets)


class LlamaBlock(nn.Module):
    """x + attn(RMSNorm(x)) with rotary embeddings, then x + SwiGLU(RMSNorm(x)); no biases."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, hidden: int) -> None:
        super().__init__()
        self.attn_norm, self.ffn_norm = nn.RMSNorm(dim, eps=1e-5), nn.RMSNorm(dim, eps=1e-5)
        self.attn = Attention(dim, n_heads, n_kv_heads, bias=False)
        self.ffn = SwiGLU(dim, hidden)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), is_causal=True, rope=rope)
        return x + self.ffn(self.ffn_norm(x))


class Llama(ZooModel):
    """Llama (Touvron et al. 2023, as in torchtitan): RMSNorm, rotary position embeddings,
    grouped-query causal SDPA, SwiGLU, no biases, an untied output head; the loss inside given targets."""

    def __init__(self, vocab: int, dim: int, n_layers: int, n_heads: int, n_kv_heads: int, hidden: int,
                 max_seq_len: int, rope_theta: float = 10000.0) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(LlamaBlock(dim, n_heads, n_kv_heads, hidden) for _ in range(n_layers))
        self.norm = nn.RMSNorm(dim, eps=1e-5)
        self.output = nn.Linear(dim, vocab, bias=False)
        init_normal(self)
        head_dim = dim // n_heads
        inv_freq = 1.0 / rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq).repeat(1, 2)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        t = tokens.shape[1]
        rope = (self.rope_cos[:t], self.rope_sin[:t])
        h = self.tok_embeddings(tokens)
        h = self.run_blocks(self.blocks, h, rope)
        logits = self.output(self.norm(h))
        return logits if targets is None else lm_loss(logits, targets)


class BertBlock(nn.Module):
    """Post-LN: LN(x + attn(x)), then LN(x + mlp(x)); padding masked through attn_mask."""

    def __init__(self, dim: int, n_heads: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.attn = Attention(dim, n_heads, dropout=dropout)
        self.drop = nn.Dropout(dropout)
        self.ln1, self.ln2 = nn.LayerNorm(dim, eps=1e-12), nn.LayerNorm(dim, eps=1e-12)
        self.mlp = MLP(dim, hidden, dropout=dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + self.drop(self.attn(x, attn_mask=mask)))
        return self.ln2(x + self.mlp(x))


class Bert(ZooModel):
    """BERT (Devlin et al. 2019) with its masked-LM head: word, position and token-type
    embeddings, post-LN GELU blocks with a padding mask, a dense+GELU+LN head whose decoder is tied
    to the word embedding; the MLM loss (labels -100 ignored) inside given targets."""

    def __init__(self, vocab: int, dim: int, n_layers: int, n_heads: int, hidden: int, max_pos: int,
                 type_vocab: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        self.word, self.position = nn.Embedding(vocab, dim), nn.Embedding(max_pos, dim)
        self.token_type = nn.Embedding(type_vocab, dim)
        self.emb_norm, self.drop = nn.LayerNorm(dim, eps=1e-12), nn.Dropout(dropout)
        self.blocks = nn.ModuleList(BertBlock(dim, n_heads, hidden, dropout) for _ in range(n_layers))
        self.mlm_dense, self.mlm_norm = nn.Linear(dim, dim), nn.LayerNorm(dim, eps=1e-12)
        self.mlm_bias = nn.Parameter(torch.zeros(vocab))
        init_normal(self)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, attention_mask: torch.Tensor,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word(input_ids) + self.position(pos) + self.token_type(token_type_ids)
        x = self.drop(self.emb_norm(x))
        mask = attention_mask[:, None, None, :].bool()  # (B, 1, 1, T): True where a key may be attended
        x = self.run_blocks(self.blocks, x, mask)
        logits = F.linear(self.mlm_norm(F.gelu(self.mlm_dense(x))), self.word.weight, self.mlm_bias)
        return logits if targets is None else lm_loss(logits, targets)


class ViT(ZooModel):
    """Vision Transformer (Dosovitskiy et al. 2021, ViT-B/16 at full size): a strided Conv2d patch
    embedding, a class token, learned positions, pre-LN GELU blocks, a linear head on the class token."""

    def __init__(self, image_size: int, patch: int, dim: int, n_layers: int, n_heads: int, num_classes: int,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, (image_size // patch) ** 2 + 1, dim) * 0.02)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(PreLNBlock(dim, n_heads, MLP(dim, 4 * dim, dropout=dropout), dropout)
                                    for _ in range(n_layers))
        self.norm, self.head = nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.drop(x + self.pos_embed)
        x = self.run_blocks(self.blocks, x)
        return self.head(self.norm(x)[:, 0])


class Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck: 1x1, 3x3 (strided), 1x1 (4x wider) convolutions with
    BatchNorm and in-place ReLU; a 1x1 conv + BN shortcut where the shape changes; ``out += identity``."""

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = 4 * width
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class ResNet(ZooModel):
    """ResNet-50 (He et al. 2016, as in torchvision): a 7x7 stride-2 stem with BatchNorm and max
    pooling, stages of bottleneck blocks (the first of each later stage strided), global average
    pooling and a linear head. ``blocks`` holds every stage's blocks in order."""

    def __init__(self, widths: tuple[int, ...] = (64, 128, 256, 512), depths: tuple[int, ...] = (3, 4, 6, 3),
                 stem: int = 64, num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, stem, 7, 2, 3, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], stem
        for stage, (width, depth) in enumerate(zip(widths, depths)):
            for i in range(depth):
                blocks.append(Bottleneck(cin, width, stride=2 if stage > 0 and i == 0 else 1))
                cin = 4 * width
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images)
        x = self.run_blocks(self.blocks, x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """DDPM's sinusoidal embedding of (float) timesteps: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(t.dtype)


class ResBlock(nn.Module):
    """The diffusion UNet's ResBlock: GroupNorm, SiLU, conv; plus the projected timestep
    embedding; GroupNorm, SiLU, dropout, conv; added to the (1x1-projected) input."""

    def __init__(self, cin: int, cout: int, temb_dim: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb_dim, cout)
        self.norm2, self.conv2 = nn.GroupNorm(groups, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SpatialAttention(nn.Module):
    """The UNet's attention block: GroupNorm, then self-attention (SDPA) over the H*W positions, added back."""

    def __init__(self, channels: int, n_heads: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.attn = Attention(channels, n_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        return x + self.attn(tokens).transpose(1, 2).reshape(b, c, h, w)


class UNetBlock(ZooModel):
    """One resolution level of a diffusion UNet (DDPM / Stable Diffusion): a sinusoidal timestep
    embedding MLP; a ResBlock and spatial attention; a strided-conv downsample; a middle of
    ResBlock, attention, ResBlock at twice the channels; a nearest-neighbour upsample and conv, a
    skip joined by cat, a ResBlock and attention; GroupNorm, SiLU, conv out. Predicts the noise."""

    def __init__(self, in_channels: int, channels: int, temb_dim: int, n_heads: int, groups: int,
                 dropout: float = 0.1) -> None:
        super().__init__()
        c = channels
        self.channels = c
        self.time = nn.Sequential(nn.Linear(c, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.conv_in = nn.Conv2d(in_channels, c, 3, padding=1)
        self.down = nn.ModuleList([ResBlock(c, c, temb_dim, groups, dropout), SpatialAttention(c, n_heads, groups)])
        self.downsample = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.mid = nn.ModuleList([ResBlock(c, 2 * c, temb_dim, groups, dropout),
                                  SpatialAttention(2 * c, n_heads, groups),
                                  ResBlock(2 * c, 2 * c, temb_dim, groups, dropout)])
        self.upsample = nn.Conv2d(2 * c, 2 * c, 3, padding=1)
        self.up = nn.ModuleList([ResBlock(3 * c, c, temb_dim, groups, dropout), SpatialAttention(c, n_heads, groups)])
        self.norm_out, self.conv_out = nn.GroupNorm(groups, c), nn.Conv2d(c, in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time(timestep_embedding(t, self.channels))
        h = self.conv_in(x)
        skip = h = self.down[1](self.down[0](h, temb))
        h = self.mid[1](self.mid[0](self.downsample(h), temb))
        self.midway()
        h = self.mid[2](h, temb)
        h = self.upsample(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.up[1](self.up[0](torch.cat([h, skip], dim=1), temb))
        return self.conv_out(F.silu(self.norm_out(h)))


class MoEFeedForward(nn.Module):
    """Top-k routed experts (Switch Transformer / GShard dispatch, Mixtral's renormalised top-k
    gates): a router linear and softmax, ``topk``; each (token, choice) takes the next slot of its
    expert's fixed capacity (cumsum over a one-hot), dropped beyond it; tokens are dispatched into
    the slots with ``index_add_``, each expert runs on its slots, results are gathered back by
    slot and summed per token with ``index_add_``. Also returns Switch's load-balancing term."""

    def __init__(self, dim: int, hidden: int, n_experts: int, top_k: int, capacity_factor: float = 1.25) -> None:
        super().__init__()
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(dim, hidden) for _ in range(n_experts))
        self.top_k, self.capacity_factor = top_k, capacity_factor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = x.reshape(-1, x.shape[-1])
        n, d, e, k = tokens.shape[0], tokens.shape[1], len(self.experts), self.top_k
        capacity = math.ceil(self.capacity_factor * n * k / e)
        probs = self.router(tokens).float().softmax(dim=-1)  # (N, E)
        gate, expert = probs.topk(k, dim=-1)  # (N, k)
        gate = (gate / gate.sum(dim=-1, keepdim=True)).flatten()
        expert = expert.flatten()  # (N*k,), token-major
        onehot = F.one_hot(expert, e)  # (N*k, E)
        position = (onehot.cumsum(dim=0) * onehot).sum(dim=-1) - 1  # the slot within its expert
        kept = position < capacity
        slot = torch.where(kept, expert * capacity + position, e * capacity)  # the spare last row: dropped
        source = torch.arange(n, device=x.device).repeat_interleave(k)  # the token of each choice
        dispatched = tokens.new_zeros(e * capacity + 1, d).index_add_(0, slot, tokens[source])
        outputs = [expert_mlp(dispatched[i * capacity:(i + 1) * capacity]) for i, expert_mlp in enumerate(self.experts)]
        outputs.append(tokens.new_zeros(1, d))
        weights = (gate * kept).to(tokens.dtype)[:, None]
        combined = tokens.new_zeros(n, d).index_add_(0, source, torch.cat(outputs)[slot] * weights)
        # Switch Transformer: E * sum_e (share of choices routed to e) * (mean router probability of e)
        aux = e * (onehot.float().mean(dim=0) * probs.mean(dim=0)).sum()
        return combined.view_as(x), aux


class MoEBlock(nn.Module):
    """A pre-LN transformer block whose feed-forward is the mixture of experts: returns (x, aux)."""

    def __init__(self, dim: int, n_heads: int, hidden: int, n_experts: int, top_k: int, dropout: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, n_heads, dropout=dropout)
        self.moe = MoEFeedForward(dim, hidden, n_experts, top_k)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.drop(self.attn(self.ln1(x), is_causal=True))
        y, aux = self.moe(self.ln2(x))
        return x + self.drop(y), aux


class MoETransformer(ZooModel):
    """A small mixture-of-experts decoder LM (Switch Transformer / Mixtral style feed-forward in
    GPT-style blocks): returns (logits, load-balancing term summed over blocks), or given targets
    the loss ``cross-entropy + MOE_AUX_WEIGHT * aux``."""

    def __init__(self, vocab: int, seq_len: int, dim: int, n_layers: int, n_heads: int, hidden: int,
                 n_experts: int, top_k: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, dim), nn.Embedding(seq_len, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(MoEBlock(dim, n_heads, hidden, n_experts, top_k, dropout) for _ in range(n_layers))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)
        init_normal(self)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> Any:
        x = self.drop(self.embed(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device)))
        aux, half = x.new_zeros((), dtype=torch.float32), len(self.blocks) // 2
        for block in self.blocks[:half]:
            x, block_aux = block(x)
            aux = aux + block_aux
        self.midway()
        for block in self.blocks[half:]:
            x, block_aux = block(x)
            aux = aux + block_aux
        logits = self.head(self.norm(x))
        return (logits, aux) if targets is None else lm_loss(logits, targets) + MOE_AUX_WEIGHT * aux


class T5LayerNorm(nn.Module):
    """T5's RMS norm: scale only, no mean subtraction, the variance in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(dim=-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps)).to(x.dtype)


class RelativePositionBias(nn.Module):
    """T5's relative position bias: key-minus-query offsets in log-spaced buckets, one learned
    scalar per bucket and head, computed once and added to every layer's attention scores."""

    def __init__(self, n_heads: int, bidirectional: bool, num_buckets: int = 32, max_distance: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(num_buckets, n_heads)
        self.bidirectional, self.num_buckets, self.max_distance = bidirectional, num_buckets, max_distance

    def bucket(self, rel: torch.Tensor) -> torch.Tensor:
        n, base = self.num_buckets, torch.zeros_like(rel)
        if self.bidirectional:
            n //= 2
            base = (rel > 0).long() * n
            rel = rel.abs()
        else:
            rel = -rel.clamp(max=0)
        exact = n // 2
        log_ratio = torch.log(rel.float().clamp(min=1) / exact) / math.log(self.max_distance / exact)
        large = (exact + (log_ratio * (n - exact)).long()).clamp(max=n - 1)
        return base + torch.where(rel < exact, rel, large)

    def forward(self, q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
        rel = torch.arange(k_len, device=device)[None, :] - torch.arange(q_len, device=device)[:, None]
        return self.embed(self.bucket(rel)).permute(2, 0, 1).unsqueeze(0)  # (1, H, q, k)


class T5Block(nn.Module):
    """T5 layer: x + self-attn(norm x) with the position bias as attn_mask (no score scaling),
    in the decoder x + cross-attn(norm x, encoder output), then x + ReLU MLP(norm x); no biases."""

    def __init__(self, dim: int, n_heads: int, hidden: int, dropout: float, cross: bool) -> None:
        super().__init__()
        self.norm1, self.norm3 = T5LayerNorm(dim), T5LayerNorm(dim)
        self.self_attn = Attention(dim, n_heads, bias=False, dropout=dropout, scale=1.0)
        if cross:
            self.norm2 = T5LayerNorm(dim)
            self.cross_attn = Attention(dim, n_heads, bias=False, dropout=dropout, scale=1.0, cross=True)
        self.mlp = MLP(dim, hidden, nn.ReLU, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop(self.self_attn(self.norm1(x), attn_mask=bias))
        if context is not None:
            x = x + self.drop(self.cross_attn(self.norm2(x), context=context))
        return x + self.drop(self.mlp(self.norm3(x)))


class T5(ZooModel):
    """T5 (Raffel et al. 2020, T5-base at full size): an encoder-decoder with a shared token
    embedding, T5's bucketed relative position bias (bidirectional in the encoder, causal in the
    decoder), RMS norms, cross-attention in the decoder, ReLU MLPs, no biases, and an output head
    tied to the embedding (with T5's d_model**-0.5 rescale) or untied; the loss inside given targets."""

    def __init__(self, vocab: int, dim: int, n_layers: int, n_heads: int, hidden: int, dropout: float = 0.1,
                 tie_embeddings: bool = True) -> None:
        super().__init__()
        self.shared = nn.Embedding(vocab, dim)
        self.enc_bias = RelativePositionBias(n_heads, bidirectional=True)
        self.dec_bias = RelativePositionBias(n_heads, bidirectional=False)
        self.encoder = nn.ModuleList(T5Block(dim, n_heads, hidden, dropout, cross=False) for _ in range(n_layers))
        self.decoder = nn.ModuleList(T5Block(dim, n_heads, hidden, dropout, cross=True) for _ in range(n_layers))
        self.enc_norm, self.dec_norm = T5LayerNorm(dim), T5LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        init_normal(self)
        self.tie_embeddings = tie_embeddings
        if tie_embeddings:
            self.lm_head.weight = self.shared.weight

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        s, t, device = input_ids.shape[1], decoder_input_ids.shape[1], input_ids.device
        enc_bias = self.enc_bias(s, s, device)
        x = self.drop(self.shared(input_ids))
        for block in self.encoder:
            x = block(x, enc_bias)
        enc = self.drop(self.enc_norm(x))
        self.midway()
        causal = torch.full((t, t), float("-inf"), device=device).triu(1)
        dec_bias = self.dec_bias(t, t, device) + causal
        y = self.drop(self.shared(decoder_input_ids))
        for block in self.decoder:
            y = block(y, dec_bias, enc)
        y = self.drop(self.dec_norm(y))
        if self.tie_embeddings:
            y = y * y.shape[-1] ** -0.5
        logits = self.lm_head(y)
        return logits if targets is None else lm_loss(logits, targets)


# ---------------------------------------------------------------------------------------------
# Batches of each kind


def _tokens(gen: torch.Generator, vocab: int, *shape: int) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=gen)


def _lm_batch(gen: torch.Generator, model: dict[str, Any], batch_size: int, seq_len: int) -> Batch:
    """Next-token prediction: inputs and targets one token apart."""
    tokens = _tokens(gen, model["vocab"], batch_size, seq_len + 1)
    return Batch((tokens[:, :-1],), tokens[:, 1:])


def _mlm_batch(gen: torch.Generator, model: dict[str, Any], batch_size: int, seq_len: int) -> Batch:
    """Sentence pairs (token types 0 then 1), each sequence after the first padded by a quarter;
    about 15% of real positions labelled (always the first), the rest -100."""
    input_ids = _tokens(gen, model["vocab"], batch_size, seq_len)
    token_type_ids = (torch.arange(seq_len) >= seq_len // 2).long().expand(batch_size, -1).contiguous()
    lengths = torch.tensor([seq_len if i == 0 else seq_len - seq_len // 4 for i in range(batch_size)])
    attention_mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    labelled = (torch.rand(batch_size, seq_len, generator=gen) < 0.15) & attention_mask.bool()
    labelled[:, 0] = True
    labels = torch.where(labelled, input_ids, -100)
    return Batch((input_ids, token_type_ids, attention_mask), labels)


def _image_batch(gen: torch.Generator, model: dict[str, Any], batch_size: int, image_size: int) -> Batch:
    images = torch.randn(batch_size, 3, image_size, image_size, generator=gen)
    return Batch((images,), torch.randint(0, model["num_classes"], (batch_size,), generator=gen))


def _diffusion_batch(gen: torch.Generator, model: dict[str, Any], batch_size: int, image_size: int) -> Batch:
    """Noisy latents, timesteps in [0, 1000) and the noise to predict."""
    shape = (batch_size, model["in_channels"], image_size, image_size)
    latents, noise = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    t = torch.randint(0, 1000, (batch_size,), generator=gen).float()
    alpha = torch.cos(t / 1000 * math.pi / 2)[:, None, None, None]
    return Batch((alpha * latents + (1 - alpha**2).sqrt() * noise, t), noise)


def _seq2seq_batch(gen: torch.Generator, model: dict[str, Any], batch_size: int, seq_len: int,
                   target_len: int) -> Batch:
    """Encoder tokens, and decoder inputs that are the labels shifted right after a start token 0."""
    input_ids = _tokens(gen, model["vocab"], batch_size, seq_len)
    labels = _tokens(gen, model["vocab"], batch_size, target_len)
    decoder_input_ids = torch.cat([torch.zeros(batch_size, 1, dtype=torch.long), labels[:, :-1]], dim=1)
    return Batch((input_ids, decoder_input_ids), labels)


# ---------------------------------------------------------------------------------------------
# The registry


SIZES = ("small", "full")


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model: its class, its constructor arguments and batch shape at each size, how a
    user computes its loss outside the model, and where its repeated blocks are."""

    name: str
    model_cls: type[ZooModel]
    sizes: dict[str, dict[str, dict[str, Any]]]  # size -> {"model": constructor kwargs, "batch": batch kwargs}
    make_batch: Callable[..., Batch]
    loss_fn: Callable[[Any, Batch], torch.Tensor]  # loss_fn(output, batch): the loss outside the model
    loss_inside: bool  # model(*batch.inputs, targets=batch.target) returns the scalar loss
    block_lists: tuple[str, ...] = ("blocks",)  # the nn.ModuleList attributes holding the repeated blocks

    def model(self, size: str = "small", device: torch.device | str | None = None,
              dtype: torch.dtype | None = None, seed: int = 0) -> ZooModel:
        """The model at ``size`` (initialised from ``torch.manual_seed(seed)``), built on ``device``."""
        torch.manual_seed(seed)
        with torch.device(device or "cpu"):
            model = self.model_cls(**self.sizes[size]["model"])
        return model.to(dtype=dtype) if dtype is not None else model

    def batch(self, size: str = "small", device: torch.device | str | None = None,
              dtype: torch.dtype | None = None, seed: int = 0) -> Batch:
        """A batch at ``size`` drawn from a generator seeded with ``seed`` (the global RNG untouched)."""
        gen = torch.Generator().manual_seed(seed)
        return self.make_batch(gen, self.sizes[size]["model"], **self.sizes[size]["batch"]).to(device, dtype)

    def block_slots(self, model: nn.Module) -> list[tuple[nn.ModuleList, int]]:
        """(list, index) of each repeated block, for compiling the blocks one by one."""
        return [(getattr(model, name), i) for name in self.block_lists for i in range(len(getattr(model, name)))]

    def checkpoint_blocks(self, model: nn.Module) -> None:
        """Full per-block activation checkpointing (``torch.utils.checkpoint``, non-reentrant, around
        every repeated block), in place: the zoo's ``full_ac`` anchor."""
        for blocks, i in self.block_slots(model):
            blocks[i] = Checkpointed(blocks[i])


class Checkpointed(nn.Module):
    """``block`` run under ``torch.utils.checkpoint`` (non-reentrant): only its inputs are saved,
    and its forward runs again in backward."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.block, *args, use_reentrant=False, **kwargs)


_LM_SMALL = dict(vocab=128, dim=32, n_layers=2, n_heads=4)

ZOO: dict[str, ZooEntry] = {e.name: e for e in [
    ZooEntry(
        "gpt2", GPT2,
        {"small": {"model": dict(_LM_SMALL, seq_len=16), "batch": dict(batch_size=2, seq_len=16)},
         # GPT-2 small (124M): 12 x 768, 1024 tokens
         "full": {"model": dict(vocab=50304, seq_len=1024, dim=768, n_layers=12, n_heads=12),
                  "batch": dict(batch_size=8, seq_len=1024)}},
        _lm_batch, _lm_criterion, loss_inside=True),
    ZooEntry(
        "llama", Llama,
        {"small": {"model": dict(_LM_SMALL, n_kv_heads=2, hidden=64, max_seq_len=16),
                   "batch": dict(batch_size=2, seq_len=16)},
         # a ~0.5B Llama: 8 x 2048, grouped-query (16 heads, 8 kv heads), SwiGLU 5632
         "full": {"model": dict(vocab=32000, dim=2048, n_layers=8, n_heads=16, n_kv_heads=8, hidden=5632,
                                max_seq_len=2048),
                  "batch": dict(batch_size=4, seq_len=2048)}},
        _lm_batch, _lm_criterion, loss_inside=True),
    ZooEntry(
        "bert", Bert,
        {"small": {"model": dict(_LM_SMALL, hidden=64, max_pos=16), "batch": dict(batch_size=2, seq_len=16)},
         # BERT-base: 12 x 768, 512 tokens
         "full": {"model": dict(vocab=30522, dim=768, n_layers=12, n_heads=12, hidden=3072, max_pos=512),
                  "batch": dict(batch_size=32, seq_len=512)}},
        _mlm_batch, _lm_criterion, loss_inside=True),
    ZooEntry(
        "vit", ViT,
        {"small": {"model": dict(image_size=16, patch=4, dim=32, n_layers=2, n_heads=4, num_classes=10),
                   "batch": dict(batch_size=2, image_size=16)},
         # ViT-B/16 at 224x224: 197 tokens
         "full": {"model": dict(image_size=224, patch=16, dim=768, n_layers=12, n_heads=12, num_classes=1000),
                  "batch": dict(batch_size=64, image_size=224)}},
        _image_batch, _class_criterion, loss_inside=False),
    ZooEntry(
        "resnet", ResNet,
        {"small": {"model": dict(widths=(8, 16), depths=(1, 1), stem=8, num_classes=10),
                   "batch": dict(batch_size=2, image_size=16)},
         # ResNet-50 at 224x224
         "full": {"model": dict(widths=(64, 128, 256, 512), depths=(3, 4, 6, 3), stem=64, num_classes=1000),
                  "batch": dict(batch_size=64, image_size=224)}},
        _image_batch, _class_criterion, loss_inside=False),
    ZooEntry(
        "unet_block", UNetBlock,
        {"small": {"model": dict(in_channels=4, channels=32, temb_dim=64, n_heads=4, groups=8),
                   "batch": dict(batch_size=2, image_size=16)},
         # Stable Diffusion's first level: 320 channels on 64x64 latents, 4096-token attention
         "full": {"model": dict(in_channels=4, channels=320, temb_dim=1280, n_heads=8, groups=32),
                  "batch": dict(batch_size=16, image_size=64)}},
        _diffusion_batch, _noise_criterion, loss_inside=False, block_lists=("down", "mid", "up")),
    ZooEntry(
        "moe", MoETransformer,
        {"small": {"model": dict(_LM_SMALL, seq_len=16, hidden=64, n_experts=4, top_k=2),
                   "batch": dict(batch_size=2, seq_len=16)},
         # 8 x 768 with 8 experts of 2048, top-2
         "full": {"model": dict(vocab=32000, seq_len=1024, dim=768, n_layers=8, n_heads=12, hidden=2048,
                                n_experts=8, top_k=2),
                  "batch": dict(batch_size=8, seq_len=1024)}},
        _lm_batch, _moe_criterion, loss_inside=True),
    ZooEntry(
        "t5", T5,
        # small: one encoder and one decoder block
        {"small": {"model": dict(_LM_SMALL, n_layers=1, hidden=64),
                   "batch": dict(batch_size=2, seq_len=16, target_len=8)},
         # T5-base: 12 + 12 x 768, 512 encoder and 128 decoder tokens
         "full": {"model": dict(vocab=32128, dim=768, n_layers=12, n_heads=12, hidden=3072),
                  "batch": dict(batch_size=16, seq_len=512, target_len=128)}},
        _seq2seq_batch, _lm_criterion, loss_inside=True, block_lists=("encoder", "decoder")),
]}


# ---------------------------------------------------------------------------------------------
# The loop matrix


LOOPS = ("loss_inside", "loss_outside_criterion", "loss_outside_sum", "autocast_bf16", "per_block_compile",
         "graph_break")


class TrainStep:
    """One of ``LOOPS`` set up on ``model`` the way a user writes it; ``compile_fn(module) ->
    module`` (e.g. ``lambda m: torch.compile(m, backend="sac", options=...)``; the identity, the
    default, runs eagerly) is applied once, here, to the module(s) that loop compiles:

    - ``loss_inside``: the model, which returns the loss given targets (entries with ``loss_inside``);
    - ``loss_outside_criterion``: the model alone; ``entry.loss_fn(model(*inputs), batch)`` outside;
    - ``loss_outside_sum``: the model alone; ``model(*inputs).float().mean()`` outside (summed over
      the output's tensors);
    - ``autocast_bf16``: the model alone (fp32 parameters), forward and criterion under
      ``torch.autocast(device_type, dtype=torch.bfloat16)``;
    - ``per_block_compile``: each repeated block (``entry.block_lists``) on its own, put back in its
      ``nn.ModuleList`` as torchtitan does, the rest eager; one ``compile_fn`` (one budget) for
      all; the criterion outside;
    - ``graph_break``: the model with ``model.graph_break = True`` (a ``torch._dynamo.graph_break()``
      midway through forward); the criterion outside.

    ``per_block_compile`` and ``graph_break`` change ``model`` in place (its block lists, its flag).
    Calling the step runs one training step: gradients zeroed, forward, loss, backward, and
    ``optimizer.step()`` when given one; it returns (output, loss), detached.
    """

    def __init__(self, entry: ZooEntry, model: ZooModel, loop: str,
                 compile_fn: Callable[[nn.Module], nn.Module] | None = None) -> None:
        if loop not in LOOPS:
            raise ValueError(f"unknown loop {loop!r}; one of {LOOPS}")
        if loop == "loss_inside" and not entry.loss_inside:
            raise ValueError(f"{entry.name} does not compute its loss inside")
        compile_fn = compile_fn or (lambda module: module)
        self.entry, self.model, self.loop = entry, model, loop
        if loop == "per_block_compile":
            for blocks, i in entry.block_slots(model):
                blocks[i] = compile_fn(blocks[i])
            self.forward = model
        else:
            if loop == "graph_break":
                model.graph_break = True
            self.forward = compile_fn(model)

    def forward_loss(self, batch: Batch) -> tuple[Any, torch.Tensor]:
        """The forward and the loss of this loop (no backward)."""
        if self.loop == "loss_inside":
            loss = self.forward(*batch.inputs, targets=batch.target)
            return loss, loss
        if self.loop == "autocast_bf16":
            with torch.autocast(batch.inputs[0].device.type, dtype=torch.bfloat16):
                output = self.forward(*batch.inputs)
                return output, self.entry.loss_fn(output, batch)
        output = self.forward(*batch.inputs)
        if self.loop == "loss_outside_sum":
            return output, sum(t.float().mean() for t in tensors(output))
        return output, self.entry.loss_fn(output, batch)

    def __call__(self, batch: Batch, optimizer: torch.optim.Optimizer | None = None) -> tuple[Any, torch.Tensor]:
        self.model.zero_grad(set_to_none=True)
        output, loss = self.forward_loss(batch)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        detached = output.detach() if isinstance(output, torch.Tensor) else tuple(t.detach() for t in output)
        return detached, loss.detach()


def train_step(entry: ZooEntry, model: ZooModel, batch: Batch, loop: str,
               compile_fn: Callable[[nn.Module], nn.Module] | None = None,
               optimizer: torch.optim.Optimizer | None = None) -> tuple[Any, torch.Tensor]:
    """One training step of ``loop`` (a fresh ``TrainStep``: for several steps keep one instead,
    so ``compile_fn`` is applied once)."""
    return TrainStep(entry, model, loop, compile_fn)(batch, optimizer)
