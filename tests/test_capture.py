import pytest
import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from sac_compiler import CaptureError, InputKind, capture_joint
from tests.models import Foo, TiedLinear


def test_joint_graph_inputs_and_outputs():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    graph = capture_joint(model, torch.randn(4, 8))
    assert graph.has_backward and graph.num_fwd_outputs == 1
    kinds = [(i.kind, i.fqn) for i in graph.inputs]
    assert kinds == [
        (InputKind.PARAMETER, "Sequential.0.weight"),
        (InputKind.PARAMETER, "Sequential.0.bias"),
        (InputKind.USER_INPUT, None),
        (InputKind.PARAMETER, "Sequential.2.weight"),
        (InputKind.PARAMETER, "Sequential.2.bias"),
        (InputKind.TANGENT, None),
    ]
    # Traced on fake tensors: every value is fake, nothing was computed.
    for node in graph.gm.graph.nodes:
        if isinstance(node.meta.get("val"), torch.Tensor):
            assert isinstance(node.meta["val"], FakeTensor), node
    tags = {n.meta.get("partitioner_tag") for n in graph.gm.graph.nodes if n.op == "call_function"}
    assert tags == {"is_forward", "is_backward"}


def test_buffers_and_shared_parameters():
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
    graph = capture_joint(model, torch.randn(4, 8))
    buffers = [i.fqn for i in graph.inputs if i.kind == InputKind.BUFFER]
    assert "Sequential.1.running_mean" in buffers and "Sequential.1.running_var" in buffers

    tied = capture_joint(TiedLinear(), torch.randn(4, 16))
    params = [i.fqn for i in tied.inputs if i.kind == InputKind.PARAMETER]
    assert params.count("TiedLinear.fc.weight") == 1 and "TiedLinear.proj.weight" not in params


def test_forward_only_capture():
    graph = capture_joint(Foo(), torch.rand(10, 5), backward=False)
    assert not graph.has_backward
    assert not any("tangents" in n.name for n in graph.gm.graph.nodes)


def test_meta_and_fake_models_use_no_memory():
    with torch.device("meta"):
        model = nn.Linear(4096, 4096)
    graph = capture_joint(model, torch.randn(64, 4096, device="meta"), target_device="cuda")
    assert graph.trace_device == torch.device("meta")
    assert graph.target_device == torch.device("cuda")

    with FakeTensorMode():
        fake_model = nn.Linear(32, 32)
        graph = capture_joint(fake_model, torch.randn(4, 32))
    assert graph.has_backward


def test_bad_model_is_a_clear_error():
    with pytest.raises(ValueError, match="must be a torch.nn.Module or a callable, got int"):
        capture_joint(3, torch.randn(2))


def test_mismatched_inputs_are_a_clear_error():
    with pytest.raises(ValueError, match=r"example inputs \[\(10, 6\)\] do not fit Linear.*same reduction dim"):
        capture_joint(nn.Linear(5, 10), torch.rand(10, 6))


def test_missing_inputs_are_a_clear_error():
    with pytest.raises(ValueError, match="needs example inputs"):
        capture_joint(nn.Linear(5, 10))


def test_graph_break_is_a_capture_error():
    class Breaks(nn.Module):
        def forward(self, x):
            torch._dynamo.graph_break()
            return x * 2

    with pytest.raises(CaptureError, match="cannot be traced as one graph"):
        capture_joint(Breaks(), torch.randn(3, requires_grad=True))
