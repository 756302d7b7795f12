"""Tracing on CPU or meta for a CUDA target: attention and RMSNorm as the GPU runs them, and a meta
trace whose backward reaches through ``cross_entropy``."""

import contextlib
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from sac_compiler.passes import annotate_memory, get_record
from sac_compiler.passes.record import MemoryCategory
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from sac_compiler import capture_joint
from sac_compiler.gpu_lowering import (
    CUDNN,
    EFFICIENT,
    FLASH,
    MATH,
    meta_autograd_gaps,
    sdpa_backend,
)
from sac_compiler.planner import budget_range, plan
from tests.conftest import requires_cuda
from tests.models import tiny_transformer

aten = torch.ops.aten
FUSED_ATTENTION = {
    aten._scaled_dot_product_cudnn_attention.default: CUDNN,
    aten._scaled_dot_product_flash_attention.default: FLASH,
    aten._scaled_dot_product_efficient_attention.default: EFFICIENT,
}
FUSED_ATTENTION_BACKWARD = {
    aten._scaled_dot_product_cudnn_attention_backward.default,
    aten._scaled_dot_product_flash_attention_backward.default,
    aten._scaled_dot_product_efficient_attention_backward.default,
}


class CausalAttention(nn.Module):
    """One causal self-attention layer: ``heads`` heads of ``head_dim``, optional attention dropout."""

    def __init__(self, heads: int = 4, head_dim: int = 16, dropout_p: float = 0.0) -> None:
        super().__init__()
        self.heads, self.head_dim, self.dropout_p = heads, head_dim, dropout_p
        dim = heads * head_dim
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, dim = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout_p, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, length, dim))


class RMSNormMLP(nn.Module):
    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(dim)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))


class LossModel(nn.Module):
    """A classifier that returns its cross-entropy loss (the loss inside the compiled graph)."""

    def __init__(self, dim: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.fc2(torch.relu(self.fc1(x))), target)


def _attention_model(dtype: torch.dtype, device: str = "cpu", length: int = 256, **kwargs) -> tuple[nn.Module, torch.Tensor]:
    with torch.device(device):
        model = CausalAttention(**kwargs).to(dtype)
        x = torch.randn(2, length, model.heads * model.head_dim, dtype=dtype)
    return model, x


def _values(node: torch.fx.Node) -> list[torch.Tensor]:
    val = node.meta.get("val")
    vals = val if isinstance(val, (tuple, list)) else [val]
    return [v for v in vals if isinstance(v, torch.Tensor)]


def _score_matrices(gm: torch.fx.GraphModule, length: int) -> list[str]:
    """Nodes holding a tensor whose last two dims are both the sequence length (a score matrix)."""
    return [n.name for n in gm.graph.nodes for v in _values(n)
            if v.dim() >= 2 and v.shape[-1] == length and v.shape[-2] == length]


def _targets(gm: torch.fx.GraphModule) -> set:
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("dtype, backends, expected", [
    (torch.bfloat16, None, CUDNN),  # PyTorch's order on an sm90 GPU with a recent cuDNN
    (torch.bfloat16, [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], FLASH),
    (torch.float32, None, EFFICIENT),
], ids=["bf16-default", "bf16-no-cudnn", "fp32"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_attention_traced_as_the_gpu_runs_it(dtype, backends, expected, dropout_p):
    length = 256
    model, x = _attention_model(dtype, length=length, dropout_p=dropout_p)
    with sdpa_kernel(backends) if backends else contextlib.nullcontext():
        graph = capture_joint(model, x, target_device="cuda")
    kernels = [FUSED_ATTENTION[n.target] for n in graph.gm.graph.nodes if n.target in FUSED_ATTENTION]
    assert kernels == [expected]
    assert _targets(graph.gm) & FUSED_ATTENTION_BACKWARD
    assert graph.lowered == (f"aten.scaled_dot_product_attention -> {expected}",)
    assert _score_matrices(graph.gm, length) == []
    assert aten._safe_softmax.default not in _targets(graph.gm)
    assert not any(n.target.namespace == "sac_gpu_lowering" for n in graph.gm.graph.nodes
                   if isinstance(n.target, torch._ops.OpOverload))


def test_flash_pads_an_odd_head_dim_as_cuda_does():
    model, x = _attention_model(torch.bfloat16, head_dim=20)  # cuDNN needs a multiple of 8: flash
    graph = capture_joint(model, x, target_device="cuda")
    flash = next(n for n in graph.gm.graph.nodes if n.target == aten._scaled_dot_product_flash_attention.default)
    assert [v.shape[-1] for v in _values(flash)[:1]] == [24]  # padded to a multiple of 8
    pads = [n for n in graph.gm.graph.nodes if n.target == aten.constant_pad_nd.default]
    assert len(pads) >= 3  # query, key and value in forward (backward slices the gradients back)
    scale = flash.kwargs.get("scale")
    assert scale == pytest.approx(1 / math.sqrt(20))  # the unpadded head dim's scale


def test_cpu_target_keeps_the_math_path():
    length = 256
    model, x = _attention_model(torch.float32, length=length, dropout_p=0.25)
    graph = capture_joint(model, x, target_device="cpu")
    assert graph.lowered == ()
    assert not _targets(graph.gm) & set(FUSED_ATTENTION)
    assert _score_matrices(graph.gm, length)
    # and the lowering is gone once a CUDA capture is done
    capture_joint(model, x, target_device="cuda")
    again = capture_joint(model, x, target_device="cpu")
    assert _score_matrices(again.gm, length)
    assert torch._C.DispatchKey.CompositeImplicitAutograd not in aten.scaled_dot_product_attention.default.py_kernels


def test_lowering_can_be_turned_off():
    model, x = _attention_model(torch.float32, dropout_p=0.25)
    graph = capture_joint(model, x, target_device="cuda", lower_for_target=False)
    assert graph.lowered == () and not _targets(graph.gm) & set(FUSED_ATTENTION)


def test_no_recompute_peak_far_below_the_math_path_for_long_sequences():
    model, x = _attention_model(torch.float32, length=1024, dropout_p=0.25)
    lowered = budget_range(model, x, compiler="eager")  # target_device="cuda"
    math_path = budget_range(model, x, compiler="eager", target_device="cpu")
    # the math path keeps a 2 x 4 x 1024 x 1024 score matrix per softmax, dropout mask and product
    assert lowered.no_recompute_peak < 0.2 * math_path.no_recompute_peak


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_attention_activations_are_its_output_and_logsumexp(dtype):
    batch, heads, length, head_dim = 2, 4, 256, 16
    model, x = _attention_model(dtype, length=length)
    graph = capture_joint(model, x, target_device="cuda")
    annotate_memory(graph.gm)
    attn = next(n for n in graph.gm.graph.nodes if n.target in FUSED_ATTENTION)
    kept = [u for u in attn.users if get_record(u).category == MemoryCategory.ACTIVATION]
    tensors = sum(get_record(u).nbytes for u in kept if u.meta["val"].dim() > 0)
    output = batch * heads * length * head_dim * dtype.itemsize
    # cuDNN keeps one fp32 logsumexp per query row; memory-efficient attention pads the rows to 32
    rows = length if dtype == torch.bfloat16 else math.ceil(length / 32) * 32
    logsumexp = batch * heads * rows * 4
    assert tensors == output + logsumexp
    # besides them, only the dropout RNG's seed and offset (scalars) are kept
    assert len([u for u in kept if u.meta["val"].dim() > 0]) == 2 and len(kept) <= 4


def test_multihead_attention_and_checkpointed_attention_are_lowered():
    mha = nn.MultiheadAttention(64, 4, batch_first=True)
    x = torch.randn(2, 128, 64)
    graph = capture_joint(lambda t: mha(t, t, t, need_weights=False)[0], x, target_device="cuda")
    assert aten._scaled_dot_product_efficient_attention.default in _targets(graph.gm)
    assert _score_matrices(graph.gm, 128) == []

    layer, y = _attention_model(torch.float32, length=128)
    graph = capture_joint(lambda t: checkpoint(layer, t, use_reentrant=False), y, target_device="cuda")
    assert aten._scaled_dot_product_efficient_attention.default in _targets(graph.gm)
    assert _score_matrices(graph.gm, 128) == []


def test_rms_norm_is_the_fused_kernel():
    with torch.device("meta"):
        model = RMSNormMLP().to(torch.bfloat16)
        x = torch.randn(4, 128, 64, dtype=torch.bfloat16)
    for device in ("meta", "cpu"):
        if device == "cpu":
            model, x = model.to_empty(device="cpu"), torch.randn(4, 128, 64, dtype=torch.bfloat16)
        graph = capture_joint(model, x, target_device="cuda")
        targets = _targets(graph.gm)
        assert {aten._fused_rms_norm.default, aten._fused_rms_norm_backward.default} <= targets, device
        fused = next(n for n in graph.gm.graph.nodes if n.target == aten._fused_rms_norm.default)
        out, rstd = _values(fused)
        assert out.dtype == torch.bfloat16 and rstd.dtype == torch.float32 and tuple(rstd.shape) == (4, 128, 1)
        # no fp32 copy of the activations (the decomposition's upcast)
        upcasts = [n for n in graph.gm.graph.nodes for v in _values(n)
                   if v.dtype == torch.float32 and tuple(v.shape) == (4, 128, 64)]
        assert upcasts == [], device
    cpu = capture_joint(model, x, target_device="cpu")
    assert aten._fused_rms_norm.default not in _targets(cpu.gm)


def test_meta_trace_backward_reaches_through_cross_entropy():
    with torch.device("meta"):
        model = LossModel()
        x, target = torch.randn(16, 32), torch.randint(0, 10, (16,))
    graph = capture_joint(model, x, target)
    assert graph.has_backward
    targets = _targets(graph.gm)
    assert aten.nll_loss_backward.default in targets and aten._log_softmax_backward_data.default in targets
    out = next(iter(graph.gm.graph.find_nodes(op="output")))
    grads = out.args[0][graph.num_fwd_outputs:]
    params = [i for i in graph.inputs if i.kind.value == "parameter"]
    assert len(params) == 4 and sum(g is not None for g in grads) == 4
    assert aten.nll_loss.default in meta_autograd_gaps()


def test_sdpa_backend_follows_the_switches():
    q = torch.empty(2, 8, 256, 64, device="meta", dtype=torch.bfloat16)
    kv = torch.empty(2, 2, 256, 64, device="meta", dtype=torch.bfloat16)
    assert sdpa_backend(q, q, q, is_causal=True) == CUDNN
    assert sdpa_backend(q, kv, kv, is_causal=True, enable_gqa=True) == CUDNN
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        assert sdpa_backend(q, kv, kv, is_causal=True, enable_gqa=True) == FLASH
        assert sdpa_backend(q, q, q, attn_mask=torch.empty(256, 256, device="meta", dtype=torch.bool)) == EFFICIENT
    fp32 = q.float()
    assert sdpa_backend(fp32, kv.float(), kv.float(), enable_gqa=True) == MATH  # no GQA in the efficient kernel
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), pytest.raises(ValueError, match="enable the math kernel"):
        sdpa_backend(fp32, fp32, fp32)


def test_planner_end_to_end_on_meta_for_a_cuda_target():
    with torch.device("meta"):
        model = tiny_transformer()
    tokens = torch.randint(0, 64, (8, 16), device="meta")
    span = budget_range(model, tokens)
    assert span.smallest_feasible_peak <= span.no_recompute_peak
    result = plan(model, tokens, memory_budget=0.5)
    assert result is not None
    graph = capture_joint(model, tokens, target_device="cuda")
    assert aten._scaled_dot_product_efficient_attention.default in _targets(graph.gm)


def _gpu_transformer(dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor]:
    from torch.testing._internal.distributed._tensor.common_dtensor import (
        ModelArgs,
        Transformer,
    )

    args = ModelArgs(n_layers=2, n_heads=8, vocab_size=4096, max_seq_len=1024, dim=512, dropout_p=0.1)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the dtype: Module.to cannot swap fake CUDA parameters
    try:
        model = Transformer(args)
    finally:
        torch.set_default_dtype(default)
    return model, torch.randint(0, args.vocab_size, (4, args.max_seq_len))


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_trace_for_cuda_plans_the_peak_of_a_cuda_trace(dtype):
    with FakeTensorMode():
        with torch.device("cuda"):
            model, tokens = _gpu_transformer(dtype)
        on_cuda = budget_range(model, tokens)
    torch._dynamo.reset()
    with torch.device("meta"):
        model, tokens = _gpu_transformer(dtype)
    on_meta = budget_range(model, tokens)
    torch._dynamo.reset()
    model, tokens = _gpu_transformer(dtype)
    on_cpu = budget_range(model, tokens)
    print(f"\n{dtype}: no-recompute peak traced on CUDA {on_cuda.no_recompute_peak / 2**20:.1f} MiB, "
          f"on CPU {on_cpu.no_recompute_peak / 2**20:.1f} MiB, on meta {on_meta.no_recompute_peak / 2**20:.1f} MiB")
    assert on_cpu.no_recompute_peak == pytest.approx(on_cuda.no_recompute_peak, rel=0.05)
    assert on_meta.no_recompute_peak == pytest.approx(on_cuda.no_recompute_peak, rel=0.05)
