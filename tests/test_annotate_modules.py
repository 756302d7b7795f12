import torch
from sac_compiler.passes import Side, annotate_modules, get_record
from sac_compiler.passes.annotate_modules import normalize_fqn
from torch.testing import FileCheck

from sac_compiler import capture_joint
from tests.models import CheckpointedLinears, Mod, Nested


def _mod_graph():
    return capture_joint(Mod(), {"a": torch.randn(10, 10, requires_grad=True).clone()})


def test_seed_004_module_hierarchy_orders():
    graph = _mod_graph()
    orders = annotate_modules(graph.gm)
    # Seed 004: forward Mod.c.0, Mod.a, Mod.b.nest; backward in reverse.
    assert orders.fw_pre_order == ["Mod", "Mod.c.0", "Mod.a", "Mod.b.nest"]
    assert orders.fw_post_order == ["Mod.c.0", "Mod.a", "Mod.b.nest", "Mod"]
    assert orders.bw_pre_order == ["Mod", "Mod.b.nest", "Mod.a", "Mod.c.0"]
    assert orders.bw_post_order == ["Mod.b.nest", "Mod.a", "Mod.c.0", "Mod"]
    assert orders.recomputed_modules == []


def test_every_op_has_an_owner_and_a_side():
    graph = _mod_graph()
    annotate_modules(graph.gm)
    seen = {}
    for node in graph.gm.graph.nodes:
        if node.op != "call_function":
            continue
        record = get_record(node)
        assert record.side in (Side.FORWARD, Side.BACKWARD)
        assert record.module_stack[0] == "Mod" and record.module_stack[-1] == record.module_fqn
        seen.setdefault((str(node.target), record.side), set()).add(record.module_fqn)
    # each Foo's mm runs forward and is differentiated backward inside the same module
    assert seen[("aten.mm.default", Side.FORWARD)] == {"Mod.c.0", "Mod.a", "Mod.b.nest"}
    assert {"Mod.c.0", "Mod.a", "Mod.b.nest"} <= seen[("aten.mm.default", Side.BACKWARD)]


def test_user_checkpoint_shows_the_reforwarded_module():
    graph = capture_joint(CheckpointedLinears(2, 8, use_ac=True), torch.randn(2, 8))
    orders = annotate_modules(graph.gm)
    assert orders.fw_pre_order == ["CheckpointedLinears", "CheckpointedLinears.linears.0", "CheckpointedLinears.linears.1"]
    assert orders.bw_pre_order == ["CheckpointedLinears", "CheckpointedLinears.linears.1", "CheckpointedLinears.linears.0"]
    # Seed 004 test_ac: linears.1 is run forward again inside its backward.
    assert orders.recomputed_modules == ["CheckpointedLinears.linears.1"]
    flagged = {get_record(n).module_fqn for n in graph.gm.graph.nodes if get_record(n).user_recompute}
    assert flagged == {"CheckpointedLinears.linears.1"}

    plain = capture_joint(CheckpointedLinears(2, 8, use_ac=False), torch.randn(2, 8))
    assert annotate_modules(plain.gm).recomputed_modules == []


def test_nested_modules_and_printed_graph():
    graph = capture_joint(Nested(), torch.randn(4, 16))
    orders = annotate_modules(graph.gm)
    assert orders.fw_pre_order[:5] == ["Nested", "Nested.layers.0", "Nested.layers.0.norm",
                                       "Nested.layers.0.mlp", "Nested.layers.0.mlp.0"]
    assert orders.module_types["Nested.layers.0"] == "Block"
    text = graph.gm.print_readable(print_output=False)
    FileCheck().check("aten.native_layer_norm").check("aten.addmm").check("aten.gelu").check(
        "aten.gelu_backward").run(text)
    owners = {get_record(n).module_fqn for n in graph.gm.graph.nodes if n.target == torch.ops.aten.gelu.default}
    assert owners == {"Nested.layers.0.mlp.1", "Nested.layers.1.mlp.1"}


def test_normalize_fqn():
    assert normalize_fqn("L['self'].layers[0]._modules['attn']", "M") == "M.layers.0.attn"
    assert normalize_fqn("L['self'].b['nest']", "Mod") == "Mod.b.nest"
    assert normalize_fqn("L['fn']", "T") == "T"
