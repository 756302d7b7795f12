import pytest
import torch
import torch.nn as nn
from sac_compiler.passes import annotate_ops, annotate_runtime, get_record
from sac_compiler.passes.annotate_runtime import BANDWIDTH_EFFICIENCY, MATMUL_EFFICIENCY

from sac_compiler import capture_joint
from sac_compiler.device_specs import get_device_spec


def test_roofline_per_node():
    spec = get_device_spec("H100-SXM")
    graph = capture_joint(nn.Linear(1024, 1024, bias=False), torch.randn(512, 1024))
    annotate_ops(graph.gm)
    total = annotate_runtime(graph.gm, spec)
    mm = [n for n in graph.gm.graph.nodes if n.target == torch.ops.aten.mm.default]
    fw = mm[0]
    rec = get_record(fw)
    assert rec.flops == 2 * 512 * 1024 * 1024
    assert rec.bytes_accessed == 4 * (512 * 1024 + 1024 * 1024 + 512 * 1024)
    # the datasheet roofline, at the fractions of it that kernels achieve
    expected = 1e3 * max(rec.flops / (spec.peak_flops_for(torch.float32) * MATMUL_EFFICIENCY),
                         rec.bytes_accessed / (spec.hbm_bandwidth * BANDWIDTH_EFFICIENCY))
    assert rec.runtime_ms == pytest.approx(expected)
    assert rec.runtime_source == "cost-model"
    views = [n for n in graph.gm.graph.nodes if n.target == torch.ops.aten.t.default]
    assert views and all(get_record(v).runtime_ms == 0 for v in views)
    assert total == pytest.approx(sum(get_record(n).runtime_ms for n in graph.gm.graph.nodes if n.op == "call_function"))


def test_faster_device_is_faster():
    graph = capture_joint(nn.Linear(256, 256), torch.randn(64, 256))
    annotate_ops(graph.gm)
    slow = annotate_runtime(graph.gm, get_device_spec("A100-40GB"))
    fast = annotate_runtime(graph.gm, get_device_spec("H200"))
    assert fast < slow


def test_bad_mode_and_benchmark_without_cuda():
    graph = capture_joint(nn.Linear(4, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="mode must be one of"):
        annotate_runtime(graph.gm, get_device_spec("H100-SXM"), mode="fast")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA"):
            annotate_runtime(graph.gm, get_device_spec("H100-SXM"), mode="benchmark")


def test_benchmark_inputs_keep_the_layout_of_expanded_and_offset_values():
    """Benchmark mode runs each op on real inputs of the fake values' layout: an expanded value
    (stride 0, as the tangent of a ``sum``) cannot be filled in place, so its storage is filled first."""
    from sac_compiler.passes.annotate_runtime import _materialize
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        expanded = torch.ones(()).expand(64, 32)
        offset = torch.empty(10, 8)[2:, 1:]
    for val in (expanded, offset):
        real = _materialize(val, torch.device("cpu"))
        assert type(real) is torch.Tensor
        assert (real.shape, real.stride(), real.storage_offset()) == (val.shape, val.stride(), val.storage_offset())
        assert torch.isfinite(real).all()
    assert real.std() > 0  # random data, not an empty buffer (the expanded one holds a single value)


def test_benchmark_mode_leaves_attention_backward_with_dropout_to_the_cost_model():
    from sac_compiler.passes.annotate_runtime import _reads_rng_state

    graph = capture_joint(nn.Linear(8, 8), torch.randn(4, 8))
    node = next(n for n in graph.gm.graph.nodes if n.op == "call_function")
    efficient = torch.ops.aten._scaled_dot_product_efficient_attention_backward.default
    args = [None] * 9
    node.target, node.args = efficient, (*args, 0.1, [True, True, True, False], True)
    assert _reads_rng_state(node)
    node.args = (*args, 0.0, [True, True, True, False], True)
    assert not _reads_rng_state(node)  # without dropout the inputs carry no RNG state
    node.target = torch.ops.aten.mm.default
    assert not _reads_rng_state(node)


def test_grouped_query_attention_counts_the_query_heads():
    """Each key/value head serves several query heads: the flops are those of the query's heads (some
    torch versions' formulas assert equal head counts and failed on grouped-query attention)."""
    import torch.nn.functional as F
    from sac_compiler.passes.annotate_runtime import node_flops

    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    q, k = torch.randn(2, 8, 64, 16), torch.randn(2, 2, 64, 16)
    gm = torch.fx.experimental.proxy_tensor.make_fx(attend, tracing_mode="fake")(q, k, k)
    sdpa = [n for n in gm.graph.nodes if "attention" in str(n.target)]
    full = torch.fx.experimental.proxy_tensor.make_fx(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), tracing_mode="fake")(q, q, q)
    reference = [n for n in full.graph.nodes if "attention" in str(n.target)]
    assert sdpa and reference, "the fused attention ops are traced"
    assert node_flops(sdpa[0]) == node_flops(reference[0]) > 0
