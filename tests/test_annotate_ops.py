import torch
import torch.nn as nn
from sac_compiler.passes import annotate_modules, annotate_ops, get_record
from sac_compiler.passes.annotate_modules import nodes_of_module
from sac_compiler.passes.annotate_ops import forward_ops
from torch.testing import FileCheck

from sac_compiler import capture_joint
from tests.models import DropoutMLP, Foo, InplaceMLP


def _annotated(model, *inputs, backward=True):
    graph = capture_joint(model, *inputs, backward=backward)
    annotate_modules(graph.gm)
    annotate_ops(graph.gm)
    return graph


def _by_name(graph):
    return {n.name: n for n in graph.gm.graph.nodes}


def test_seed_000_foo_indices():
    # Seed 000 asserts these through SACEstimator; the forward graph is enough here (the Foo model's
    # cos_ overwrites the value relu saved for backward, so eager autograd cannot differentiate it).
    graph = _annotated(Foo(), torch.rand(10, 5), backward=False)
    ops = forward_ops(nodes_of_module(graph.gm, "Foo"))
    index = {n.name: i for i, n in enumerate(ops)}
    records = [get_record(n) for n in ops]
    assert [r.op_name for r in records] == ["aten.t", "aten.addmm", "aten.relu", "aten.cos", "aten.sin"]
    assert [i for i, r in enumerate(records) if r.is_view] == [0]
    assert [i for i, r in enumerate(records) if r.is_random] == []
    assert [(i, index[r.inplace_parent]) for i, r in enumerate(records) if r.is_inplace] == [(2, 1), (3, 1), (4, 1)]


def test_inplace_chains_views_and_parents():
    graph = _annotated(InplaceMLP(), torch.randn(4, 16))
    nodes = _by_name(graph)
    parents = {n: get_record(nodes[n]).inplace_parent for n in nodes if get_record(nodes[n]).is_inplace}
    # relu_ mutates addmm's output; add_ mutates mul's; v.mul_ mutates mul's storage through the view t.
    assert parents == {"relu": "addmm", "add": "mul", "mul_1": "mul"}
    views = sorted(get_record(n).op_name for n in graph.gm.graph.nodes if get_record(n).is_view)
    assert "aten.t" in views
    backward = [n for n in graph.gm.graph.nodes if n.op == "call_function" and get_record(n).side.value == "backward"]
    assert backward and not any(get_record(n).is_inplace for n in backward)
    text = graph.gm.print_readable(print_output=False)
    FileCheck().check("aten.relu.default").check("aten.mul.Tensor").check("aten.add.Tensor").run(text)
    FileCheck().check_not("aten.relu_").run(text)  # the joint graph is functional


def test_dropout_is_random_and_saved_mask():
    graph = _annotated(DropoutMLP(), torch.randn(4, 16))
    random = [get_record(n).op_name for n in graph.gm.graph.nodes if get_record(n).is_random]
    assert random == ["aten.native_dropout"]
    saved = {n.name for n in graph.gm.graph.nodes if get_record(n).saved_for_backward}
    # the default partition keeps the mask, not the dropout's output
    dropout = next(n for n in graph.gm.graph.nodes if n.target == torch.ops.aten.native_dropout.default)
    mask = next(u for u in dropout.users if u.args[1] == 1)
    assert mask.name in saved


def test_sdpa_is_random_only_with_dropout():
    import torch.fx as fx
    from sac_compiler.passes.annotate_ops import is_random_op

    for target in (torch.ops.aten._scaled_dot_product_flash_attention.default,
                   torch.ops.aten._scaled_dot_product_efficient_attention.default):
        for p, expect_random in ((0.0, False), (0.2, True)):
            graph = fx.Graph()
            q, k, v = (graph.placeholder(name) for name in "qkv")
            if "efficient" in target.name():
                node = graph.call_function(target, (q, k, v, None, True), {"dropout_p": p})
            else:
                node = graph.call_function(target, (q, k, v, p))
            graph.output(node)
            gm = fx.GraphModule(torch.nn.Module(), graph)
            assert is_random_op(node) == expect_random, (target, p)
            annotate_ops(gm)
            assert get_record(node).is_random == expect_random
    # without dropout, the graph of an attention module has no random op at all
    attn = nn.MultiheadAttention(16, 2, dropout=0.0, batch_first=True)
    x = torch.randn(2, 4, 16)
    graph = _annotated(attn, x, x, x)
    assert not any(get_record(n).is_random for n in graph.gm.graph.nodes if n.op == "call_function")


def test_saved_for_backward_matches_default_partition():
    graph = _annotated(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), torch.randn(2, 8))
    saved = {get_record(n).op_name for n in graph.gm.graph.nodes
             if n.op == "call_function" and get_record(n).saved_for_backward}
    # relu's output feeds threshold_backward and the second weight's gradient; the rest saved are
    # aliases (the second weight's transpose, relu's detach), which cost no bytes
    assert "aten.relu" in saved
    assert saved - {"aten.relu"} <= {"aten.t", "aten.detach"}
    inputs_saved = {n.name for n in graph.gm.graph.nodes if n.op == "placeholder" and get_record(n).saved_for_backward}
    assert inputs_saved  # the first linear's input is needed for its weight gradient


def test_forward_graph_only():
    graph = _annotated(nn.Linear(4, 4), torch.randn(2, 4), backward=False)
    assert not any(get_record(n).saved_for_backward for n in graph.gm.graph.nodes if n.op != "output")
