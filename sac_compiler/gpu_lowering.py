"""Trace on CPU or ``meta`` fake tensors as a CUDA GPU will run the model.

A few ATen ops are composites whose body depends on the device they run on. Traced on CPU or meta
for a plan meant for a CUDA GPU, they lower to other ops than the GPU runs, and those ops keep other
tensors for backward:

* ``scaled_dot_product_attention``: on CPU and meta it is traced through its math lowering (the
  ``L x L`` score matrix per head, its softmax and, with dropout, a mask of the same size, all kept
  for backward) or CPU flash attention; a GPU runs one fused kernel (cuDNN, flash or
  memory-efficient attention) that keeps the output and a logsumexp row per query.
* ``rms_norm``: on CPU and meta it is decomposed into fp32 upcasts, a mean and products that
  backward keeps; a GPU runs ``_fused_rms_norm``, which keeps the input and one fp32 value per row.

:func:`lowered_as_on` installs, for the duration of a capture, Python kernels for these composites
that reproduce what their CUDA branch does (the kernel choice, the padding, the mask conversion),
so the joint graph holds the ops and the tensors the GPU will hold. It works at the dispatcher, as a
``CompositeImplicitAutograd`` kernel that AOTAutograd's Python dispatcher runs in place of the C++
one, so attention reached from any code path (``F.scaled_dot_product_attention``,
``nn.MultiheadAttention``, checkpointed regions) is lowered alike.

Traced on ``meta``, a second problem is fixed whatever the target: composite ops that also have a
Python meta kernel (``nll_loss``, so ``cross_entropy``; ``var``/``std``; ``where`` with a scalar)
resolve for autograd to that meta kernel, which has no derivative, and backward stops there (the
loss's gradient never reaches the model). During a capture on ``meta`` their autograd key runs the
composite instead, as it does on CPU.

Other ops were compared and need nothing: ``native_layer_norm``, ``native_dropout`` (a bool mask on
both), ``_log_softmax``/``nll_loss_forward`` trace to the same ops on CPU, meta and CUDA.
``native_layer_norm`` on a CPU trace keeps its per-row mean and rstd in the input's dtype where CUDA
keeps fp32: two values per row, left as they are.

The SDPA kernel choice mirrors ``select_sdp_backend`` of PyTorch 2.11 on an sm90 GPU (H100/H200)
with cuDNN 9.15 or newer: cuDNN attention first, then flash, memory-efficient and math attention,
each taken where its constraints hold. The usual switches steer it: ``torch.backends.cuda``'s
``enable_*_sdp`` flags and ``torch.nn.attention.sdpa_kernel`` (backends and a priority order), and
``TORCH_CUDNN_SDPA_DEPRIORITIZED=1``, which drops cuDNN's precedence as it does in PyTorch.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch._C import DispatchKey

from sac_compiler.passes.record import size_hint

aten = torch.ops.aten

# at::SDPBackend, as torch._C._get_sdp_priority_order() reports it
MATH, FLASH, EFFICIENT, CUDNN = "math", "flash", "efficient", "cudnn"
_BACKEND_IDS = {0: MATH, 1: FLASH, 2: EFFICIENT, 3: CUDNN}
_DEFAULT_ORDER = (FLASH, EFFICIENT, MATH, CUDNN)
_CUDNN_FIRST = (CUDNN, FLASH, EFFICIENT, MATH)

# Limits of the fused kernels on sm90, as PyTorch 2.11 (cuDNN 9.19) checks them
_FLASH_MAX_HEAD_DIM = 256
_CUDNN_MAX_HEAD_DIM = 256
_CUDNN_MAX_BATCH_OR_HEADS = 65535
_HALF = (torch.float16, torch.bfloat16)

_NAMESPACE = "sac_gpu_lowering"


def is_lowered_target(trace_device: torch.device | str | None, target_device: torch.device | str | None) -> bool:
    """Whether a trace on ``trace_device`` for a plan on ``target_device`` needs the CUDA lowering."""
    if trace_device is None or target_device is None:
        return False
    return torch.device(target_device).type == "cuda" and torch.device(trace_device).type in ("cpu", "meta")


# --------------------------------------------------------------------------------------------------
# Which SDPA kernel a CUDA GPU picks
# --------------------------------------------------------------------------------------------------


def _enabled_backends() -> dict[str, bool]:
    return {
        FLASH: torch.backends.cuda.flash_sdp_enabled(),
        EFFICIENT: torch.backends.cuda.mem_efficient_sdp_enabled(),
        MATH: torch.backends.cuda.math_sdp_enabled(),
        CUDNN: torch.backends.cuda.cudnn_sdp_enabled(),
    }


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE", "Y")


def sdpa_priority_order() -> tuple[str, ...]:
    """The order a CUDA GPU tries the SDPA kernels in.

    PyTorch keeps one order (``sdpa_kernel(..., set_priority=True)`` sets it). Left at its default,
    a CUDA build with cuDNN 9.15 or newer puts cuDNN first on sm90 at its first attention call,
    unless ``TORCH_CUDNN_SDPA_DEPRIORITIZED`` is set; a user-set order is kept as it is."""
    getter = getattr(torch._C, "_get_sdp_priority_order", None)
    order = tuple(_BACKEND_IDS[i] for i in getter() if i in _BACKEND_IDS) if getter is not None else _DEFAULT_ORDER
    if order == _DEFAULT_ORDER and not _env_flag("TORCH_CUDNN_SDPA_DEPRIORITIZED"):
        return _CUDNN_FIRST
    return order


def _int(x: Any) -> int:
    return size_hint(x)


def _dense_shapes_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, supports_gqa: bool,
                     enable_gqa: bool, ignore_singleton_dim: bool, attn_mask: torch.Tensor | None) -> bool:
    """The checks every fused kernel makes on dense inputs: 4-D, one batch size, the heads (grouped
    query attention where the kernel supports it), non-empty sequences, unit stride on the last dim."""
    if not (q.dim() == k.dim() == v.dim() == 4):
        return False
    if not (_int(q.size(0)) == _int(k.size(0)) == _int(v.size(0))):
        return False
    hq, hk, hv = _int(q.size(1)), _int(k.size(1)), _int(v.size(1))
    grouped = supports_gqa and enable_gqa and hk == hv and hk > 0 and hq % hk == 0
    if not (hq == hk == hv or grouped):
        return False
    if _int(q.size(-2)) == 0 or _int(k.size(-2)) == 0:
        return False
    strides_ok = all(_int(t.stride(-1)) == 1 for t in (q, k, v))
    if ignore_singleton_dim:
        strides_ok = strides_ok or _int(q.size(-1)) == 1
    mask_ok = attn_mask is None or _int(attn_mask.stride(-1)) == 1
    return strides_ok and mask_ok


def _attn_mask_shape_ok(q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None) -> bool:
    """A mask cuDNN takes: no gradient, ``(L, S)`` or ``(B or 1, H or 1, L, S)``, each of L and S
    possibly broadcast from 1."""
    if attn_mask is None:
        return True
    if attn_mask.requires_grad:
        return False
    if _int(attn_mask.size(-2)) not in (_int(q.size(2)), 1) or _int(attn_mask.size(-1)) not in (_int(k.size(2)), 1):
        return False
    if attn_mask.dim() == 2:
        return True
    return attn_mask.dim() == 4 and _int(attn_mask.size(0)) in (1, _int(q.size(0))) \
        and _int(attn_mask.size(1)) in (1, _int(q.size(1)))


def _cudnn_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
              dropout_p: float, enable_gqa: bool) -> bool:
    if q.dtype not in _HALF or not (q.dtype == k.dtype == v.dtype):
        return False
    if torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled():
        return False
    if not _attn_mask_shape_ok(q, k, attn_mask):
        return False
    if not _dense_shapes_ok(q, k, v, True, enable_gqa, True, attn_mask):
        return False
    if _int(q.size(0)) > _CUDNN_MAX_BATCH_OR_HEADS or _int(q.size(1)) > _CUDNN_MAX_BATCH_OR_HEADS:
        return False
    d_qk, d_v = _int(q.size(-1)), _int(v.size(-1))
    if d_qk > _CUDNN_MAX_HEAD_DIM or d_v > _CUDNN_MAX_HEAD_DIM or d_qk % 8 or d_v % 8:
        return False
    # a key/value sequence of one, or a query of one with dropout, is no cuDNN case
    return not (_int(k.size(-2)) == 1 or (dropout_p > 0 and _int(q.size(-2)) == 1))


def _flash_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
              is_causal: bool, enable_gqa: bool) -> bool:
    if q.dtype not in _HALF or not (q.dtype == k.dtype == v.dtype) or attn_mask is not None:
        return False
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return False
    d = _int(q.size(-1))
    if not (d == _int(k.size(-1)) == _int(v.size(-1)) and d <= _FLASH_MAX_HEAD_DIM):
        return False
    if is_causal and _int(q.size(-2)) != _int(k.size(-2)):
        return False
    return _dense_shapes_ok(q, k, v, True, enable_gqa, True, attn_mask)


def _efficient_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None) -> bool:
    if q.dtype not in (torch.float32, *_HALF) or not (q.dtype == k.dtype == v.dtype):
        return False
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return False
    alignment = 8 if q.dtype in _HALF else 4  # the GEMM alignment on sm80 and newer
    d_qk, d_v = _int(q.size(-1)), _int(v.size(-1))
    if not (d_qk == _int(k.size(-1)) and d_qk > 0 and d_v > 0 and d_qk % alignment == 0 and d_v % alignment == 0):
        return False
    # PyTorch 2.11 runs grouped query attention (fewer key/value heads) through math, not this kernel
    return _dense_shapes_ok(q, k, v, False, False, False, attn_mask)


def sdpa_backend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
                 dropout_p: float = 0.0, is_causal: bool = False, enable_gqa: bool = False) -> str:
    """The kernel a CUDA GPU (sm90) runs ``scaled_dot_product_attention`` with for these inputs:
    ``"cudnn"``, ``"flash"``, ``"efficient"`` or ``"math"``. Only shapes, strides and dtypes are read,
    so fake CPU or meta tensors answer for the GPU.

    Raises ValueError when every kernel that fits is disabled (the GPU would fail the same way)."""
    enabled = _enabled_backends()
    checks: dict[str, Callable[[], bool]] = {
        CUDNN: lambda: _cudnn_ok(query, key, value, attn_mask, dropout_p, enable_gqa),
        FLASH: lambda: _flash_ok(query, key, value, attn_mask, is_causal, enable_gqa),
        EFFICIENT: lambda: _efficient_ok(query, key, value, attn_mask),
        MATH: lambda: True,
    }
    for backend in sdpa_priority_order():
        if enabled[backend] and checks[backend]():
            return backend
    raise ValueError(
        f"no enabled scaled_dot_product_attention kernel fits query {tuple(query.shape)} {query.dtype}, "
        f"key {tuple(key.shape)}, value {tuple(value.shape)} on a CUDA GPU (enabled: "
        f"{sorted(b for b, on in enabled.items() if on)}); enable the math kernel "
        "(torch.backends.cuda.enable_math_sdp(True)) or another one that fits"
    )


# --------------------------------------------------------------------------------------------------
# The CUDA branch of the composites
# --------------------------------------------------------------------------------------------------


def _additive_mask(attn_mask: torch.Tensor | None, dtype: torch.dtype, fill: float) -> torch.Tensor | None:
    """A boolean mask as the additive one the kernels take (0 where attended, ``fill`` elsewhere)."""
    if attn_mask is None or attn_mask.dtype != torch.bool:
        return attn_mask
    zero = torch.scalar_tensor(0.0, dtype=dtype, device=attn_mask.device)
    masked = torch.scalar_tensor(fill, dtype=dtype, device=attn_mask.device)
    return torch.where(attn_mask, zero, masked)


def _aligned(t: torch.Tensor, alignment: int) -> bool:
    return all(_int(s) % alignment == 0 for s in t.stride()[:-1]) and _int(t.stride(-1)) == 1


def _preprocess_mask(mask: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Memory-efficient attention's mask: strides aligned to 8 elements (padded, then sliced back, if
    not), expanded to ``(B, H, L, S)``."""
    if not _aligned(mask, 8):
        size = _int(mask.size(-1))
        mask = aten.constant_pad_nd.default(mask, [0, 8 - size % 8])[..., :size]
    return mask.expand(query.size(0), query.size(1), query.size(2), key.size(2))


def _compute_logsumexp(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def sdpa_as_on_cuda(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    dropout_p: float = 0.0, is_causal: bool = False, *, scale: float | None = None,
                    enable_gqa: bool = False) -> torch.Tensor:
    """``aten::scaled_dot_product_attention`` as its CUDA branch computes it: the kernel
    :func:`sdpa_backend` picks, with the padding and mask conversion ATen's composite adds."""
    backend = sdpa_backend(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    _record(f"aten.scaled_dot_product_attention -> {backend}")
    if backend == CUDNN:
        mask = _additive_mask(attn_mask, query.dtype, -65504.0)
        return aten._scaled_dot_product_cudnn_attention.default(
            query, key, value, mask, _compute_logsumexp(query, key, value), dropout_p, is_causal, False,
            scale=scale)[0]
    if backend == FLASH:
        head_dim = _int(query.size(-1))
        pad = (8 - head_dim % 8) % 8
        if pad:
            query, key, value = (aten.constant_pad_nd.default(t, [0, pad]) for t in (query, key, value))
        og_scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
        out = aten._scaled_dot_product_flash_attention.default(
            query, key, value, dropout_p, is_causal, False, scale=og_scale)[0]
        return out[..., :head_dim] if pad else out
    mask = _additive_mask(attn_mask, query.dtype, -math.inf)
    if backend == EFFICIENT:
        if mask is not None:
            mask = _preprocess_mask(mask, query, key)
        return aten._scaled_dot_product_efficient_attention.default(
            query, key, value, mask, _compute_logsumexp(query, key, value), dropout_p, is_causal, scale=scale)[0]
    return aten._scaled_dot_product_attention_math.default(
        query, key, value, mask, dropout_p, is_causal, None, scale=scale, enable_gqa=enable_gqa)[0]


def _stat_shape(input: torch.Tensor, normalized_shape: Sequence[int]) -> list[Any]:
    axis = input.dim() - len(normalized_shape)
    return [*input.shape[:axis], *([1] * len(normalized_shape))]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op(f"{_NAMESPACE}::fused_rms_norm", mutates_args=())
def _fused_rms_norm(input: torch.Tensor, normalized_shape: list[int], weight: torch.Tensor | None,
                    eps: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stands in for ``aten::_fused_rms_norm`` while tracing on CPU or meta, where that op decomposes
    (it has no CPU kernel); :func:`restore_aten_ops` renames it back. Never computes anything."""
    raise RuntimeError(
        f"{_NAMESPACE}::fused_rms_norm only stands in for aten._fused_rms_norm during a capture for a CUDA "
        "target; it has no kernel: call torch.ops.aten._fused_rms_norm instead"
    )


@_fused_rms_norm.register_fake
def _(input: torch.Tensor, normalized_shape: list[int], weight: torch.Tensor | None,
      eps: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    # the CUDA kernel's outputs: a contiguous result and one accumulator-precision rstd per row
    out = torch.empty_like(input, memory_format=torch.contiguous_format)
    rstd = input.new_empty(_stat_shape(input, normalized_shape), dtype=_acc_dtype(input.dtype))
    return out, rstd


def _fused_rms_norm_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    input, normalized_shape, weight, _eps = inputs
    ctx.normalized_shape = list(normalized_shape)
    ctx.mask = [input.requires_grad, weight is not None and weight.requires_grad]
    ctx.save_for_backward(input, output[1], weight)


def _fused_rms_norm_backward(ctx: Any, grad_out: torch.Tensor, _grad_rstd: torch.Tensor | None) -> tuple[Any, ...]:
    input, rstd, weight = ctx.saved_tensors
    grad_input, grad_weight = aten._fused_rms_norm_backward.default(
        grad_out, input, ctx.normalized_shape, rstd, weight, ctx.mask)
    return (grad_input if ctx.mask[0] else None), None, (grad_weight if ctx.mask[1] else None), None


_fused_rms_norm.register_autograd(_fused_rms_norm_backward, setup_context=_fused_rms_norm_setup)

# what the stand-ins are, once the graph is traced
_STAND_INS: dict[Any, torch._ops.OpOverload] = {
    torch.ops.sac_gpu_lowering.fused_rms_norm.default: aten._fused_rms_norm.default,
}


def _rms_norm_composite(input: torch.Tensor, normalized_shape: Sequence[int], weight: torch.Tensor | None,
                        eps: float | None) -> torch.Tensor:
    """ATen's ``rms_norm_composite``: computed in the accumulator dtype, cast back at the end."""
    dims = [input.dim() - 1 - i for i in range(len(normalized_shape))]
    acc = input.to(_acc_dtype(input.dtype)) if input.dtype in _HALF else input
    eps_val = eps if eps is not None else torch.finfo(acc.real.dtype if acc.is_complex() else acc.dtype).eps
    rstd = torch.rsqrt(acc.pow(2).mean(dims, keepdim=True).add(eps_val))
    out = acc.mul(rstd)
    if weight is not None:
        out = out.mul(weight)
    return out.contiguous().type_as(input)


def rms_norm_as_on_cuda(input: torch.Tensor, normalized_shape: Sequence[int], weight: torch.Tensor | None = None,
                        eps: float | None = None) -> torch.Tensor:
    """``aten::rms_norm`` as its CUDA branch computes it: ``_fused_rms_norm``, except for channels-last
    or complex inputs and a weight of another dtype, which take the composite."""
    channels_last = input.dim() in (4, 5) and (
        input.is_contiguous(memory_format=torch.channels_last if input.dim() == 4 else torch.channels_last_3d)
        and not input.is_contiguous())
    if channels_last or input.is_complex() or (weight is not None and weight.dtype != input.dtype):
        _record("aten.rms_norm -> composite")
        return _rms_norm_composite(input, normalized_shape, weight, eps)
    _record("aten.rms_norm -> _fused_rms_norm")
    return torch.ops.sac_gpu_lowering.fused_rms_norm(input, list(normalized_shape), weight, eps)[0]


# the composites replaced for a CUDA target, and by what
_CUDA_COMPOSITES: dict[torch._ops.OpOverload, Callable[..., Any]] = {
    aten.scaled_dot_product_attention.default: sdpa_as_on_cuda,
    aten.rms_norm.default: rms_norm_as_on_cuda,
}


# --------------------------------------------------------------------------------------------------
# Installing the kernels for one capture
# --------------------------------------------------------------------------------------------------


@dataclass
class Lowering:
    """What one capture lowered: ``counts`` maps ``"aten.op -> kernel"`` to how often it was traced
    (AOTAutograd traces the forward more than once, so counts are per trace, not per call site)."""

    trace_device: torch.device
    target_device: torch.device
    cuda_composites: bool
    meta_autograd: bool
    counts: Counter = field(default_factory=Counter)


_active: threading.local = threading.local()
_install_lock = threading.Lock()


def _record(what: str) -> None:
    lowering = getattr(_active, "lowering", None)
    if lowering is not None:
        lowering.counts[what] += 1


def _has_autograd_kernel(op: torch._ops.OpOverload) -> bool:
    keys = (DispatchKey.Autograd, DispatchKey.AutogradMeta)
    return any(k in op.py_kernels for k in keys) or torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "Autograd")


def meta_autograd_gaps() -> list[torch._ops.OpOverload]:
    """Composite ops whose autograd key, on ``meta`` tensors under the Python dispatcher, resolves to
    their Python meta kernel (it has no derivative) instead of their composite."""
    import torch._decomp

    gaps = []
    seen: set[Any] = set()
    for table in torch._decomp.global_decomposition_table.values():
        for op in table:
            if op in seen or not isinstance(op, torch._ops.OpOverload):
                continue
            seen.add(op)
            if DispatchKey.Meta not in op.py_kernels or _has_autograd_kernel(op):
                continue
            if DispatchKey.CompositeImplicitAutograd in op.py_kernels or \
                    torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeImplicitAutograd"):
                gaps.append(op)
    return gaps


def _decomposing(op: torch._ops.OpOverload) -> Callable[..., Any]:
    def run_composite(*args: Any, **kwargs: Any) -> Any:
        return op.decompose(*args, **kwargs)

    return run_composite


def _install(op: torch._ops.OpOverload, key: DispatchKey, fn: Callable[..., Any],
             installed: list[tuple[torch._ops.OpOverload, DispatchKey, Any]]) -> None:
    installed.append((op, key, op.py_kernels.get(key)))
    op.py_kernels[key] = fn
    op._dispatch_cache.clear()


@contextlib.contextmanager
def lowered_as_on(trace_device: torch.device | str, target_device: torch.device | str) -> Iterator[Lowering]:
    """While active, composites traced on ``trace_device`` lower as they will on ``target_device``.

    With a CUDA target and a CPU or meta trace the CUDA branch of ``scaled_dot_product_attention``
    and ``rms_norm`` is traced; on meta, composites whose autograd would stop at a meta kernel run
    their composite. The kernels are process-wide while installed (AOTAutograd's Python dispatcher
    reads them from the ops), so captures that lower take turns."""
    trace_device, target_device = torch.device(trace_device), torch.device(target_device)
    lowering = Lowering(trace_device, target_device,
                        cuda_composites=is_lowered_target(trace_device, target_device),
                        meta_autograd=trace_device.type == "meta")
    if not (lowering.cuda_composites or lowering.meta_autograd):
        yield lowering
        return
    with _install_lock:
        installed: list[tuple[torch._ops.OpOverload, DispatchKey, Any]] = []
        _active.lowering = lowering
        try:
            if lowering.cuda_composites:
                for op, fn in _CUDA_COMPOSITES.items():
                    _install(op, DispatchKey.CompositeImplicitAutograd, fn, installed)
            if lowering.meta_autograd:
                for op in meta_autograd_gaps():
                    _install(op, DispatchKey.AutogradMeta, _decomposing(op), installed)
            yield lowering
        finally:
            for op, key, previous in reversed(installed):
                if previous is None:
                    op.py_kernels.pop(key, None)
                else:
                    op.py_kernels[key] = previous
                op._dispatch_cache.clear()
            _active.lowering = None


def restore_aten_ops(gm: fx.GraphModule) -> int:
    """Rename the stand-in ops of a traced graph to the ATen ops the GPU runs; return how many."""
    renamed = 0
    for module in gm.modules():
        if not isinstance(module, fx.GraphModule):
            continue
        changed = False
        for node in module.graph.nodes:
            if node.op == "call_function" and node.target in _STAND_INS:
                node.target = _STAND_INS[node.target]
                if "original_aten" in node.meta:
                    node.meta["original_aten"] = node.target
                renamed += 1
                changed = True
        if changed:
            module.recompile()
    return renamed
