"""annotate_runtime: estimated runtime per node on a target device.

Writes ``flops``, ``bytes_accessed``, ``runtime_ms`` and ``runtime_source`` into ``node.meta["sac"]``.

* ``mode="cost-model"``: a roofline on a :class:`~sac_compiler.device_specs.DeviceSpec`: FLOPs from
  PyTorch's FlopCounterMode formulas (computed from shapes, nothing runs) at the achieved fraction
  of the datasheet peak, bytes read and written at the achieved fraction of the HBM bandwidth, and
  the larger of the two. Views and other aliases cost nothing.
* ``mode="benchmark"``: each distinct (op, shapes, dtypes, strides) is run on the real GPU with random
  inputs: warm-up, then the median of several CUDA-event timings. Needs CUDA.
"""

from __future__ import annotations

import logging
import operator
import statistics
from typing import Any

import torch
import torch.fx as fx
from sac_compiler.passes.annotate_ops import is_alias_op
from sac_compiler.passes.record import (
    call_functions,
    graph_results,
    size_hint,
    tensor_values,
    update_record,
)
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.utils._pytree import tree_map

log = logging.getLogger(__name__)

MODES = ("cost-model", "benchmark")

# What kernels reach of the datasheet rates, measured on an NVIDIA H200 (torch 2.11.0+cu130) over a
# compiled training step of a 16-layer Llama (d=2048, bf16, 8192 tokens): its GEMMs ran 43.6 TFLOP
# in 60.5 ms (721 TFLOP/s, 73% of the 989.4 dense bf16 peak), and Inductor's pointwise kernels
# moved 4.39 TB/s (91% of 4.8 TB/s). The same fractions are assumed on the other devices.
MATMUL_EFFICIENCY = 0.73
BANDWIDTH_EFFICIENCY = 0.91


def achieved_seconds(device_spec: Any, flops: float, bytes_moved: float, dtype: torch.dtype) -> float:
    """Roofline time at the achieved fractions of the device's peak rates."""
    return max(device_spec.seconds_for(flops, 0, dtype) / MATMUL_EFFICIENCY,
               device_spec.seconds_for(0, bytes_moved, dtype) / BANDWIDTH_EFFICIENCY)


def _val(arg: Any) -> Any:
    return arg.meta.get("val") if isinstance(arg, fx.Node) else arg


def _nbytes(t: torch.Tensor) -> int:
    return size_hint(t.numel()) * t.element_size()


def node_flops(node: fx.Node) -> int:
    """FLOPs of one ATen node from PyTorch's flop formulas (0 for ops without one)."""
    from torch.utils.flop_counter import (
        flop_registry,
        sdpa_backward_flop_count,
        sdpa_flop_count,
    )

    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return 0
    args = tree_map(_val, node.args)
    kwargs = tree_map(_val, node.kwargs)
    out = node.meta.get("val")
    packet = target.overloadpacket
    # size_hint, not int(): int() of a symbolic count would specialise the graph to its sizes
    if packet in flop_registry:
        return size_hint(flop_registry[packet](*args, **kwargs, out_val=out))
    name = target._schema.name
    if "scaled_dot_product" in name or "flash_attention" in name:
        if name.endswith("_backward"):
            grad_out, q, k, v = args[:4]
            k_shape, v_shape = _query_heads(q.shape, k.shape), _query_heads(q.shape, v.shape)
            return size_hint(sdpa_backward_flop_count(grad_out.shape, q.shape, k_shape, v_shape))
        q, k, v = args[:3]
        return size_hint(sdpa_flop_count(q.shape, _query_heads(q.shape, k.shape), _query_heads(q.shape, v.shape)))
    return 0


def _query_heads(q_shape: Any, kv_shape: Any) -> tuple[Any, ...]:
    """Grouped-query attention's key or value shape with the query's head count: each key/value
    head serves several query heads, so the work is that of as many heads as the query has (the
    flop formulas of some torch versions assert equal head counts)."""
    if len(q_shape) == 4 and len(kv_shape) == 4 and kv_shape[1] != q_shape[1]:
        return (kv_shape[0], q_shape[1], kv_shape[2], kv_shape[3])
    return tuple(kv_shape)


def node_bytes(node: fx.Node) -> int:
    """Bytes an op reads and writes (inputs plus new outputs; aliases move nothing)."""
    if is_alias_op(node) or node.target is operator.getitem:
        return 0
    read = sum(_nbytes(v) for a in node.all_input_nodes for v in tensor_values(a))
    written = sum(_nbytes(v) for v in tensor_values(node))
    return read + written


def _dtype(node: fx.Node) -> torch.dtype:
    vals = [v for a in node.all_input_nodes for v in tensor_values(a) if v.is_floating_point()]
    vals = vals or tensor_values(node)
    return vals[0].dtype if vals else torch.float32


def annotate_runtime(
    gm: fx.GraphModule,
    device_spec: Any,
    mode: str = "cost-model",
    warmup: int = 3,
    repeats: int = 10,
) -> float:
    """Annotate every call_function node with its runtime; return the graph's total in ms."""
    if mode not in MODES:
        raise ValueError(f"annotate_runtime mode must be one of {MODES}, got {mode!r}")
    if mode == "benchmark" and not torch.cuda.is_available():
        raise ValueError("mode='benchmark' times ops on a GPU and needs CUDA; use mode='cost-model' here")
    cache: dict[Any, float] = {}
    total = 0.0
    for node in call_functions(gm):
        flops = node_flops(node)
        moved = node_bytes(node)
        source = mode
        if is_alias_op(node) or node.target is operator.getitem or (flops == 0 and moved == 0):
            ms = 0.0
        elif mode == "cost-model" or _reads_rng_state(node):
            source = "cost-model"
            ms = 1e3 * achieved_seconds(device_spec, flops, moved, _dtype(node))
        else:
            ms = _benchmark(node, cache, warmup, repeats)
        total += ms
        update_record(node, "annotate_runtime", flops=flops, bytes_accessed=moved, runtime_ms=ms,
                      runtime_source=source)
    graph_results(gm)["annotate_runtime"] = total
    return total


def _reads_rng_state(node: fx.Node) -> bool:
    """An attention backward with dropout: it reads the RNG seed and offset its forward drew, which
    random inputs cannot stand in for (on an H200 with torch 2.11 the efficient-attention backward
    crashed the process on them), so benchmark mode costs it with the cost model."""
    schema = getattr(node.target, "_schema", None)
    if schema is None or "attention_backward" not in schema.name:
        return False
    names = [a.name for a in schema.arguments]
    if "dropout_p" not in names:
        return False
    i = names.index("dropout_p")
    p = node.args[i] if i < len(node.args) else node.kwargs.get("dropout_p", 0.0)
    return isinstance(p, (int, float)) and p > 0


def _materialize(val: Any, device: torch.device) -> Any:
    """A real tensor with ``val``'s shape, strides, offset and dtype, filled with data.

    The data fills a flat storage that the strided view is taken of, so overlapping layouts (an
    expanded tangent, stride 0) can be made: filling them in place would be an overlapping write.
    A value on the CPU stays there (attention kernels may read their RNG seed and offset on the
    host); the others go to ``device``.
    """
    if not isinstance(val, torch.Tensor):
        return val
    if val.device.type == "cpu":
        device = val.device
    shape = [size_hint(s) for s in val.shape]
    stride = [size_hint(s) for s in val.stride()]
    offset = size_hint(val.storage_offset())
    numel = 0 if any(s == 0 for s in shape) else offset + 1 + sum((n - 1) * st for n, st in zip(shape, stride))
    flat = torch.empty(numel, dtype=val.dtype, device=device)
    if val.dtype.is_floating_point or val.dtype.is_complex:
        flat.normal_()
    elif val.dtype == torch.bool:
        flat.fill_(True)
    else:
        flat.zero_()
    return flat.as_strided(shape, stride, offset)


def _signature(node: fx.Node) -> Any:
    def sig(a: Any) -> Any:
        v = _val(a)
        if isinstance(v, torch.Tensor):
            return (tuple(size_hint(s) for s in v.shape), tuple(size_hint(s) for s in v.stride()), v.dtype)
        return repr(v)

    return (node.target, tuple(tree_map(sig, list(node.args))), tuple(sorted((k, repr(tree_map(sig, v))) for k, v in node.kwargs.items())))


def _benchmark(node: fx.Node, cache: dict[Any, float], warmup: int, repeats: int) -> float:
    key = _signature(node)
    if key in cache:
        return cache[key]
    # The backend plans inside AOTAutograd, under its fake mode: the ops must run on real tensors.
    with unset_fake_temporarily():
        ms = _time_op(node, warmup, repeats)
    cache[key] = ms
    return ms


def _time_op(node: fx.Node, warmup: int, repeats: int) -> float:
    """Median CUDA-event milliseconds of ``node``'s op on random inputs of its shapes."""
    log.debug("benchmarking %s", node.format_node())
    device = torch.device("cuda", torch.cuda.current_device())
    args = tree_map(lambda a: _materialize(_val(a), device), node.args)
    kwargs = tree_map(lambda a: _materialize(_val(a), device), node.kwargs)
    kwargs = {k: (device if isinstance(v, torch.device) else v) for k, v in kwargs.items()}
    fn = node.target
    try:
        for _ in range(warmup):
            fn(*args, **kwargs)
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args, **kwargs)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    except RuntimeError as e:
        raise RuntimeError(f"benchmarking {node.format_node()} failed: {e}") from e
    return statistics.median(times)
