"""Each rule of the memory model (``sac_compiler.passes.memory_model.RULES``) changes a simulated
peak by a known amount on a small graph: every test asserts the figure with the rule and without it.
Also: the lifetime record and the sweep every simulation measures with."""

from __future__ import annotations

import operator

import pytest
import torch
from sac_compiler.passes import (
    MemoryCategory,
    annotate_memory,
    annotate_modules,
    annotate_ops,
)
from sac_compiler.passes.memory_model import (
    RULES,
    Freed,
    Lifetime,
    enabled_rules,
    live_by,
    peak_sweep,
    rules_disabled,
)
from sac_compiler.passes.memory_rules import attention_backward_workspace
from sac_compiler.passes.partitioned_memory import _graph_liveness, simulate_partitioned
from torch import nn
from torch._functorch.partitioners import min_cut_rematerialization_partition

from sac_compiler import capture_joint
from tests.test_annotate_memory import (
    _attention_backward_graph,
    _column_reductions_graph,
    _gelu_backward_graph,
    _graph_builder,
    _mm_then_add,
)

aten = torch.ops.aten
KIB = 1024


def _peak(gm, live_at_start, keep, device="cpu", fused=True, off=(), **kwargs):
    """(peak, its node) of the partitioned simulation of one graph, with the rules ``off`` left out."""
    return _graph_liveness(gm, live_at_start, keep, device, fused, disabled_rules=off, **kwargs)[:2]


def _outputs(gm):
    return {n.name for n in next(iter(gm.graph.find_nodes(op="output"))).all_input_nodes}


def _placeholder_bytes(gm):
    return sum(n.meta["val"].numel() * n.meta["val"].element_size() for n in gm.graph.nodes if n.op == "placeholder")


def _joint(model, *inputs, target_device="cpu"):
    graph = capture_joint(model, *inputs, target_device=target_device)
    annotate_modules(graph.gm, graph.root_name)
    annotate_ops(graph.gm)
    return graph


def _partitioned(graph, **kwargs):
    fw, bw = min_cut_rematerialization_partition(graph.gm, [], num_fwd_outputs=graph.num_fwd_outputs)
    static = {n.name for n in fw.graph.nodes if n.op == "placeholder"}
    return simulate_partitioned(fw, bw, graph.num_fwd_outputs, static, target_device=graph.target_device,
                                       **kwargs)


# --- the record and the sweep ---------------------------------------------------------------------


def test_the_sweep_counts_each_lifetime_from_its_step_to_where_it_is_freed():
    temp = MemoryCategory.TEMPORARY
    lifetimes = [
        Lifetime("w", 100, -1, None, MemoryCategory.PARAMETER),
        Lifetime("a", 10, 0, 1, temp),  # freed after step 1
        Lifetime("b", 20, 1, 1, temp, phase="temp"),  # lives while step 1 runs only
        Lifetime("c", 30, 2, 2, temp, freed=Freed.RELEASED),  # until step 3 begins
        Lifetime("d", 40, 2, 2, temp, freed=Freed.HANDED_OVER),  # until step 3 allocates
        Lifetime("e", 40, 3, None, temp),  # takes over d's bytes
    ]
    sweep = peak_sweep(lifetimes, 4)
    assert sweep.start_bytes == 100
    assert sweep.timeline == [(100, 110, 110), (110, 130, 100), (100, 170, 170), (140, 140, 140)]
    assert (sweep.peak_bytes, sweep.peak_step) == (170, 2)
    by_phase = peak_sweep(lifetimes, 4, key=lambda life: life.phase).by_key
    assert by_phase[1] == ({"": 110}, {"": 110, "temp": 20}, {"": 100, "temp": 0})
    assert live_by(lifetimes, 3 * 2 + 1, lambda life: life.name) == {"w": 100, "c": 30, "d": 40}
    # nothing ever exceeds what lives at the start: the peak is the start's
    assert peak_sweep(lifetimes[:1], 2).peak_step == -1


def test_the_joint_simulation_is_its_lifetimes_swept():
    graph = _joint(nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 8)), torch.randn(32, 64))
    sim = annotate_memory(graph.gm, fused_pointwise=True)
    sweep = peak_sweep(sim.lifetimes, len(sim.timeline))
    assert sweep.peak_bytes == sim.peak_bytes
    assert [during for _, during, _ in sweep.timeline] == sim.step_peaks
    timeline = sim.category_timeline()
    assert [name for _, name, _ in timeline] == [name for name, _ in sim.timeline]
    assert [sum(cats.values()) for _, _, cats in timeline] == sim.step_peaks
    step = sim.step_peaks.index(sim.peak_bytes)
    assert timeline[step][2] == sim.peak_by_category


def test_the_partitioned_simulation_gives_its_timeline_by_category_forward_then_backward():
    graph = _joint(nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 8)), torch.randn(32, 64))
    timelines = {}
    peak = _partitioned(graph, timelines=timelines, extra_static_bytes=1000)
    timeline = peak.category_timeline()
    assert [name for _, name, _ in timeline] == [name for name, _ in timelines["forward"] + timelines["backward"]]
    assert [sum(c.values()) for _, _, c in timeline] == [b for _, b in timelines["forward"] + timelines["backward"]]
    assert [step for step, _, _ in timeline] == list(range(len(timeline)))
    _, _, first = timeline[0]
    assert first[MemoryCategory.OPTIMIZER_STATE] == 1000
    # the backward starts with what forward saved (activations) and the tangent (a temporary)
    _, _, backward_start = timeline[len(timelines["forward"])]
    assert backward_start[MemoryCategory.ACTIVATION] >= peak.saved_bytes


def test_rules_are_switched_off_by_name_and_unknown_names_refused():
    assert all(rule.applies_to <= {"joint", "partitioned"} and rule.imitates for rule in RULES.values())
    assert "pointwise_fusion" in enabled_rules("joint", fused_pointwise=True)
    assert "pointwise_fusion" not in enabled_rules("joint", fused_pointwise=False)  # Inductor's only
    assert "rebuild_fusion" not in enabled_rules("joint", fused_pointwise=True)  # partitioned only
    with rules_disabled("buffer_reuse"):
        assert "buffer_reuse" not in enabled_rules("partitioned", True)
        assert "inputs_deleted" not in enabled_rules("partitioned", True, ["inputs_deleted"])
    assert "buffer_reuse" in enabled_rules("partitioned", True)
    with pytest.raises(ValueError, match="unknown memory rule"), rules_disabled("no_such_rule"):
        pass


def test_every_rule_has_its_test():
    tested = {name for name in RULES if f"test_rule_{name}" in globals()}
    assert tested == set(RULES)


# --- one test per rule -----------------------------------------------------------------------------


def test_rule_cuda_rounding():
    graph, op, placeholder = _graph_builder()
    x = placeholder("x", torch.empty(3))  # 12 bytes
    y = op(aten.mul.Tensor, x, 2.0, val=torch.empty(3))
    graph.output((y,))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    assert _peak(gm, 512, {y.name}, "cuda") == (1024, y.name)
    assert _peak(gm, 512, {y.name}, "cuda", off={"cuda_rounding"}) == (512 + 12, y.name)
    joint = {off: annotate_memory(gm, "cuda", num_fwd_outputs=1, annotate=False, disabled_rules=off).peak_bytes
             for off in ((), ("cuda_rounding",))}
    assert joint == {(): 1024, ("cuda_rounding",): 24}


def test_rule_multi_output_at_op():
    gm, bw, shape = _attention_backward_graph(torch.float32, scaled_grad=True)
    tensor = torch.Size(shape).numel() * 4
    workspace = attention_backward_workspace(bw, "cpu")
    inputs = _placeholder_bytes(gm)
    static = frozenset(n.name for n in gm.graph.nodes if n.op == "placeholder")
    keep = {n.name for n in bw.users}
    # the outputs are written while the scaled gradient they are made from still lives
    assert _peak(gm, inputs, keep, static_storage=static) == (inputs + 4 * tensor + workspace, bw.name)
    # allocated at their getitems, after it is freed: the three gradients make the peak at the last
    last = max(bw.users, key=lambda n: list(gm.graph.nodes).index(n))
    assert _peak(gm, inputs, keep, static_storage=static, off={"multi_output_at_op"}) == (inputs + 3 * tensor,
                                                                                          last.name)
    joint = {off: annotate_memory(gm, num_fwd_outputs=0, annotate=False, disabled_rules=off)
             for off in ((), ("multi_output_at_op",))}
    assert joint[()].peak_bytes - joint[()].static_bytes == 4 * tensor + workspace
    assert joint[("multi_output_at_op",)].peak_bytes - joint[()].static_bytes == 3 * tensor


def test_rule_broadcast_copy():
    graph, op, placeholder = _graph_builder()
    tangent = placeholder("tangents_1", torch.empty(()))
    w = placeholder("w", torch.empty(256, 32))
    grad = op(aten.expand.default, tangent, [128, 256], val=torch.empty(()).expand(128, 256))
    dense = op(aten.mul.Tensor, w, 2.0, val=torch.empty(256, 32))
    out = op(aten.mm.default, grad, dense, val=torch.empty(128, 32))
    graph.output((out,))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    weight, copy, product = 256 * 32 * 4, 128 * 256 * 4, 128 * 32 * 4
    static = frozenset({"w"})
    for fused in (False, True):
        assert _peak(gm, weight + 4, {out.name}, fused=fused, static_storage=static) == (
            weight + 4 + weight + product + copy, out.name)
        assert _peak(gm, weight + 4, {out.name}, fused=fused, static_storage=static, off={"broadcast_copy"}) == (
            weight + 4 + weight + product, out.name)
    joint = {off: annotate_memory(gm, num_fwd_outputs=1, annotate=False, disabled_rules=off).peak_bytes
             for off in ((), ("broadcast_copy",))}
    assert joint[()] - joint[("broadcast_copy",)] == copy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rule_attention_workspace(dtype):
    gm, bw, shape = _attention_backward_graph(dtype)
    numel = torch.Size(shape).numel()
    delta = numel // shape[-1] * 4
    workspace = numel * 4 + (2 * delta if dtype == torch.float32 else delta)
    inputs = _placeholder_bytes(gm)
    outputs = 3 * numel * torch.tensor([], dtype=dtype).element_size()
    keep = {n.name for n in bw.users}
    assert _peak(gm, inputs, keep) == (inputs + outputs + workspace, bw.name)
    assert _peak(gm, inputs, keep, off={"attention_workspace"})[0] == inputs + outputs
    joint = {off: annotate_memory(gm, num_fwd_outputs=0, annotate=False, disabled_rules=off).peak_bytes
             for off in ((), ("attention_workspace",))}
    assert joint[()] - joint[("attention_workspace",)] == workspace


def test_rule_attention_bias_copy():
    """A padding mask made additive in the graph and expanded reaches the attention backward as a
    dense (B, H, L, S) copy under Inductor, for the op's duration; a stored, aligned mask does not."""
    from sac_compiler.passes.memory_rules import attention_bias_copy

    gm, bw, shape = _attention_backward_graph(torch.float32, mask="folded")
    batch, heads, seq, _ = shape
    copy = batch * heads * seq * seq * 4
    assert attention_bias_copy(bw, "cpu") == copy
    stored_gm, stored_bw, _ = _attention_backward_graph(torch.float32, mask="stored")
    assert attention_bias_copy(stored_bw, "cpu") == 0
    inputs = _placeholder_bytes(gm)
    keep = {n.name for n in bw.users}
    with_rule = _peak(gm, inputs, keep)
    without = _peak(gm, inputs, keep, off={"attention_bias_copy"})
    assert with_rule[0] - without[0] == copy and with_rule[1] == bw.name
    assert _peak(gm, inputs, keep, fused=False) == without  # an Inductor behaviour: not on the eager route
    joint = {off: annotate_memory(gm, num_fwd_outputs=0, annotate=False, fused_pointwise=True,
                                  disabled_rules=off).peak_bytes
             for off in ((), ("attention_bias_copy",))}
    assert joint[()] - joint[("attention_bias_copy",)] == copy


def test_rule_outputs_dropped():
    # Linear(256 -> 256, no bias) on a [64, 256] input: the caller drops the 64 KiB output before
    # backward, which then holds the weight, the input, the output's gradient and the weight's
    graph = _joint(nn.Linear(256, 256, bias=False), torch.randn(64, 256))
    weight, x, out = 256 * KIB, 64 * KIB, 64 * KIB
    dropped = weight + x + out + weight
    joint = {off: annotate_memory(graph.gm, annotate=False, disabled_rules=off).peak_bytes
             for off in ((), ("outputs_dropped",))}
    assert joint == {(): dropped, ("outputs_dropped",): dropped + out}
    assert annotate_memory(graph.gm, annotate=False, hold_outputs=True).peak_bytes == dropped + out
    assert _partitioned(graph).peak_bytes == dropped
    assert _partitioned(graph, disabled_rules={"outputs_dropped"}).peak_bytes == dropped + out


def test_the_callers_loss_memory_includes_the_tangent_it_hands_to_backward():
    """``loss_memory`` is measured from what forward left to the high-water mark as backward
    reaches the graph, so the gradient the caller's loss hands over (the tangent) is part of it:
    as backward starts, both simulations count what forward left plus the loss, not the tangent
    beside it."""
    graph = _joint(nn.Linear(256, 256, bias=False), torch.randn(64, 256))
    loss = 1 << 20  # the caller's loss at its peak, far above the 64 KiB tangent
    weight, x, out = 256 * KIB, 64 * KIB, 64 * KIB
    left = weight + x + out  # the output held by the caller; x saved (an input)
    partitioned = _partitioned(graph, hold_outputs=True, loss_memory=loss)
    assert partitioned.end_of_forward_bytes == left
    assert partitioned.peak_bytes == left + loss
    joint = annotate_memory(graph.gm, annotate=False, hold_outputs=True, loss_memory=loss)
    assert joint.peak_bytes == partitioned.peak_bytes


def test_rule_multi_output_rerun():
    """Rebuilding the layer norm's output for ``early`` reruns the layer norm, which reads the
    recomputed ``q``: with the rule ``q`` lives from there, through ``big``, to ``late``."""
    graph, op, placeholder = _graph_builder()
    tile = torch.empty(64, 1024)
    x = placeholder("x", tile)
    q = op(aten.mul.Tensor, x, 2.0, val=torch.empty_like(tile))
    stats = torch.empty(64, 1)
    norm = op(aten.native_layer_norm.default, q, [1024], None, None, 1e-5,
              val=(torch.empty_like(tile), stats, torch.empty_like(stats)))
    y, mean, rstd = (op(operator.getitem, norm, i, val=v) for i, v in enumerate(norm.meta["val"]))
    loss = op(aten.sum.default, y, val=torch.empty(()))
    backward = [op(aten.mul.Tensor, y, 3.0, val=torch.empty_like(tile))]  # early: reads the rebuilt y
    backward.append(op(aten.mul.Tensor, backward[0], 2.0, val=torch.empty_like(tile)))  # big
    backward.append(op(aten.sum.default, backward[1], val=torch.empty(())))
    backward.append(op(aten.sum.default, q, val=torch.empty(())))  # late: reads q
    for node in backward:
        node.meta["partitioner_tag"] = "is_backward"
    graph.output((loss, mean, rstd, backward[0], backward[2], backward[3]))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    size, stats = 64 * 1024 * 4, 64 * 4
    sims = {off: annotate_memory(gm, num_fwd_outputs=3, recomputed={q.name, y.name}, annotate=False,
                                 disabled_rules=off) for off in ((), ("multi_output_rerun",))}
    static = sims[()].static_bytes  # x
    # q (rebuilt with y, for the rerun), early, big and its sum: the peak, at the sum
    assert (sims[()].peak_bytes, sims[()].peak_node) == (static + 3 * size + 4, backward[2].name)
    # rebuilt at `late` only, q is gone there: the peak is the forward's, at the layer norm (q, y
    # and the statistics)
    assert (sims[("multi_output_rerun",)].peak_bytes, sims[("multi_output_rerun",)].peak_node) == (
        static + 2 * size + 2 * stats, norm.name)


def test_rule_pointwise_fusion():
    graph, op, placeholder = _graph_builder()
    x = placeholder("x", torch.empty(256, 256))
    a = op(aten.mul.Tensor, x, 2.0, val=torch.empty(256, 256))
    b = op(aten.add.Tensor, a, 1.0, val=torch.empty(256, 256))
    c = op(aten.exp.default, b, val=torch.empty(256, 256))
    graph.output((c,))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    tile, static = 256 * KIB, frozenset({"x"})
    # (without in-place writes, which would put each unfused value in the buffer of the one before)
    kw = {"off": {"inplace_pointwise"}}
    # folded into exp's kernel, the two intermediates have no buffer: x and exp's output
    assert _peak(gm, tile, {c.name}, static_storage=static, **kw) == (2 * tile, c.name)
    assert _peak(gm, tile, {c.name}, static_storage=static, off={"pointwise_fusion", "inplace_pointwise"}) == (
        3 * tile, b.name)
    # in the joint graph (forward only: the caller keeps nothing; x is an input, c the output)
    joint = {off: annotate_memory(gm, num_fwd_outputs=1, fused_pointwise=True, annotate=False,
                                  disabled_rules=("inplace_pointwise", *off)).peak_bytes
             for off in ((), ("pointwise_fusion",))}
    assert joint == {(): 2 * tile, ("pointwise_fusion",): 3 * tile}


def test_rule_realize_thresholds():
    # s_k = s_k-1 + a_k, folded: s_8 would read 9 buffers, so Inductor stores it
    graph, op, placeholder = _graph_builder()
    inputs = [placeholder(f"a{i}", torch.empty(64, 64)) for i in range(10)]
    s = inputs[0]
    for a in inputs[1:]:
        s = op(aten.add.Tensor, s, a, val=torch.empty(64, 64))
    out = op(aten.mul.Tensor, s, 2.0, val=torch.empty(64, 64))
    graph.output((out,))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    tile = 64 * 64 * 4
    static = frozenset(p.name for p in inputs)
    # (without in-place writes, which would put the output in s_8's buffer)
    assert _peak(gm, 10 * tile, {out.name}, static_storage=static,
                 off={"inplace_pointwise"})[0] == 12 * tile  # s_8 and the output
    assert _peak(gm, 10 * tile, {out.name}, static_storage=static,
                 off={"realize_thresholds", "inplace_pointwise"})[0] == 11 * tile
    joint = {off: annotate_memory(gm, num_fwd_outputs=1, fused_pointwise=True, annotate=False,
                                  disabled_rules=("inplace_pointwise", *off)).peak_bytes
             for off in ((), ("realize_thresholds",))}
    assert joint == {(): 12 * tile, ("realize_thresholds",): 11 * tile}


def test_realize_thresholds_count_scalar_inputs_as_reads_and_constants_not():
    """A value with two readers is stored once folding would have it read more than four buffers;
    a 0-d input counts as one (the saved scalars and the loss's tangent of a cross-entropy's
    backward, whose one-hot gradient is then stored beside the saved log-softmax), a constant
    computed from no tensor does not. Checked against what Inductor itself stores, on CPU."""
    from sac_compiler.passes.memory_rules import inductor_inlined

    from sac_compiler.inductor_order import lower_to_schedule

    def graph_of(scalars, constants):
        graph, op, placeholder = _graph_builder()
        x = placeholder("x", torch.empty(64, 64))
        factors = [placeholder(f"s{i}", torch.empty(())) for i in range(scalars)]
        for i in range(constants):
            full = graph.call_function(aten.full.default, ([], float(i + 2)),
                                       {"dtype": torch.float32, "device": torch.device("cpu"), "pin_memory": False})
            full.meta["val"] = torch.empty(())
            factors.append(full)
        chain = []
        m = x
        for f in factors:  # m = x * f_0 * f_1 ...: folded, read by a row sum and a subtraction
            m = op(aten.mul.Tensor, m, f, val=torch.empty(64, 64))
            chain.append(m)
        total = op(aten.sum.dim_IntList, m, [1], True, val=torch.empty(64, 1))
        out = op(aten.sub.Tensor, m, total, val=torch.empty(64, 64))
        graph.output((out,))
        return torch.fx.GraphModule(torch.nn.Module(), graph), chain

    def inductor_stores(gm):
        stored: list[int] = []

        def read(nodes):
            stored.extend(int(buf.node.get_numel()) for node in nodes for part in node.get_nodes()
                          for buf in part.get_outputs() if int(buf.node.get_numel()) == 64 * 64)

        with torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True) as mode:
            for node in gm.graph.find_nodes(op="placeholder"):
                node.meta["val"] = mode.from_tensor(node.meta["val"])
            lower_to_schedule(gm, backward=False, read=read)
        return len(stored) > 1  # the product besides the output

    for scalars, constants, stored in ((4, 0, True), (3, 0, False), (3, 2, False)):
        lowered, _ = graph_of(scalars, constants)  # (lowering swaps its inputs for fake tensors)
        assert inductor_stores(lowered) == stored, (scalars, constants)
        _, chain = graph_of(scalars, constants)
        inlined = inductor_inlined(chain, lambda n: list(n.users), {})
        assert (chain[-1] not in inlined) == stored, (scalars, constants)


def test_rule_addmm_fold():
    gm, _mm, _add = _mm_then_add(user_pointwise=False)
    nodes = list(gm.graph.nodes)
    outputs = {n.name for n in nodes[-1].all_input_nodes}
    inputs = frozenset(n.name for n in nodes if n.op == "placeholder")
    big_and_sum = 64 * 512 * 4 + 4
    # folded into the add, the product is no buffer and is not alive while `big` is
    assert _peak(gm, 0, outputs, static_storage=inputs)[0] == big_and_sum
    assert _peak(gm, 0, outputs, static_storage=inputs, off={"addmm_fold"})[0] == big_and_sum + 64 * 64 * 4
    joint = {off: annotate_memory(gm, num_fwd_outputs=2, fused_pointwise=True, annotate=False,
                                  disabled_rules=off) for off in ((), ("addmm_fold",))}
    static = joint[()].static_bytes
    assert joint[()].peak_bytes == static + big_and_sum
    assert joint[("addmm_fold",)].peak_bytes == static + big_and_sum + 64 * 64 * 4


def _far_fold_graph(g_input=None):
    """``g`` (computed, 1 MiB) read by two matmuls; one, ``w_grad`` (256 KiB), is added to ``c`` only
    at the end, after a 1 MiB ``big``: folded into that add, it would keep ``g`` alive until then.
    ``g_input``: ``g`` is instead a graph input of that name."""
    graph, op, placeholder = _graph_builder()
    x, h, w = placeholder("x", torch.empty(256, 1024)), placeholder("h", torch.empty(256, 64)), \
        placeholder("w", torch.empty(1024, 64))
    c, d = placeholder("c", torch.empty(1024, 64)), placeholder("d", torch.empty(512, 512))
    g = (placeholder(g_input, torch.empty(256, 1024)) if g_input
         else op(aten.mul.Tensor, x, 2.0, val=torch.empty(256, 1024)))
    w_grad = op(aten.mm.default, op(aten.permute.default, g, [1, 0], val=torch.empty(1024, 256)), h,
                val=torch.empty(1024, 64))
    h_grad = op(aten.mm.default, g, w, val=torch.empty(256, 64))
    big = op(aten.mm.default, d, d, val=torch.empty(512, 512))
    small = op(aten.sum.default, big, val=torch.empty(()))
    total = op(aten.add.Tensor, w_grad, c, val=torch.empty(1024, 64))
    graph.output((total, h_grad, small))
    return torch.fx.GraphModule(torch.nn.Module(), graph), w_grad, total


def test_rule_far_addmm_apart():
    from sac_compiler.passes.memory_rules import far_addmm_folds, inductor_addmm

    gm, w_grad, total = _far_fold_graph()
    nodes = list(gm.graph.nodes)
    assert far_addmm_folds(nodes, "cpu") == {w_grad: total}
    assert inductor_addmm(nodes, "cpu") == {} and inductor_addmm(nodes, "cpu", keep_far_apart=False) == {w_grad: total}
    outputs = {n.name for n in nodes[-1].all_input_nodes}
    inputs = frozenset(n.name for n in nodes if n.op == "placeholder")
    g_bytes, product = 256 * 1024 * 4, 1024 * 64 * 4
    apart = _peak(gm, 0, outputs, static_storage=inputs)
    folded = _peak(gm, 0, outputs, static_storage=inputs, off={"far_addmm_apart"})
    # at `big`: apart, the product and h_grad live; folded, g (its gradient's operand) and h_grad
    assert folded[0] - apart[0] == g_bytes - product
    joint = {off: annotate_memory(gm, num_fwd_outputs=3, fused_pointwise=True, annotate=False,
                                  disabled_rules=off).peak_bytes for off in ((), ("far_addmm_apart",))}
    assert joint[("far_addmm_apart",)] - joint[()] == g_bytes - product
    # the loss outside: the logits' gradient is the tangent, deleted at its last use, kept apart too;
    # another input (a parameter, a saved value) is not the graph's to free: folded as Inductor does
    for name, far in (("tangents_1", True), ("primals_3", False)):
        gm, w_grad, total = _far_fold_graph(g_input=name)
        assert far_addmm_folds(list(gm.graph.nodes), "cpu") == ({w_grad: total} if far else {})


def _fake_values(gm):
    """Replace the graph's example values by fake tensors of the same layout (what Inductor and
    the partitioner read); returns the fake mode they belong to."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        for node in gm.graph.nodes:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                node.meta["val"] = torch.empty_strided(val.shape, val.stride(), dtype=val.dtype)
    return mode

def test_the_backend_writes_a_far_fold_as_an_exact_subtraction():
    """``unfold_far_addmm``: ``add(mm, c)`` becomes ``sub(c, neg(mm))``, which Inductor's addmm
    pattern does not match; the sum is the same to the bit."""
    from sac_compiler.backend import unfold_far_addmm

    gm, _, total = _far_fold_graph()
    _fake_values(gm)
    torch.manual_seed(0)
    args = [torch.randn(n.meta["val"].shape) for n in gm.graph.nodes if n.op == "placeholder"]
    want = gm(*args)
    assert unfold_far_addmm(gm, "cpu") == [total.name]
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert aten.add.Tensor not in targets and aten.sub.Tensor in targets and aten.neg.default in targets
    got = gm(*args)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert unfold_far_addmm(gm, "cpu") == []  # nothing left to keep apart


def _accumulation_graph(convert: bool = False):
    """Two layers' backward: each a computed gradient ``g_i`` (1 MiB) read by a matmul and summed
    over its rows into a shared parameter's gradient ``s_i`` (4 KiB); the sums are added up after
    the second layer, and between the layers a ``big`` temporary (1 MiB) is made. Fused into the
    add (Inductor), ``s1`` would keep ``g1`` alive through ``big``. ``convert``: each sum reaches
    the add through a dtype conversion, as autocast's backward has it."""
    graph, op, placeholder = _graph_builder()
    x1, x2 = placeholder("x1", torch.empty(256, 1024)), placeholder("x2", torch.empty(256, 1024))
    w, d = placeholder("w", torch.empty(1024, 64)), placeholder("d", torch.empty(512, 512))
    g1 = op(aten.mul.Tensor, x1, 2.0, val=torch.empty(256, 1024))
    m1 = op(aten.mm.default, g1, w, val=torch.empty(256, 64))
    s1 = op(aten.sum.dim_IntList, g1, [0], val=torch.empty(1024))
    big = op(aten.mm.default, d, d, val=torch.empty(512, 512))
    b = op(aten.sum.default, big, val=torch.empty(()))
    g2 = op(aten.mul.Tensor, x2, 2.0, val=torch.empty(256, 1024))
    m2 = op(aten.mm.default, g2, w, val=torch.empty(256, 64))
    s2 = op(aten.sum.dim_IntList, g2, [0], val=torch.empty(1024))
    a1, a2 = s1, s2
    if convert:
        a1 = op(torch.ops.prims.convert_element_type.default, s1, torch.float32, val=torch.empty(1024))
        a2 = op(torch.ops.prims.convert_element_type.default, s2, torch.float32, val=torch.empty(1024))
    total = op(aten.add.Tensor, a1, a2, val=torch.empty(1024))
    graph.output((total, m1, m2, b))
    return torch.fx.GraphModule(torch.nn.Module(), graph), (s1, s2), total, big


_G_BYTES, _SUM_BYTES = 256 * 1024 * 4, 1024 * 4


def test_rule_accumulation_fusion():
    gm, (s1, s2), total, big = _accumulation_graph()
    nodes = list(gm.graph.nodes)
    outputs = {n.name for n in nodes[-1].all_input_nodes}
    inputs = frozenset(n.name for n in nodes if n.op == "placeholder")
    # as Inductor fuses them (nothing kept apart): both sums run at the add, g1 lives through `big`
    fused = _peak(gm, 0, outputs, static_storage=inputs, off={"accumulation_apart"})
    apart = _peak(gm, 0, outputs, static_storage=inputs, off={"accumulation_apart", "accumulation_fusion"})
    assert fused[0] - apart[0] == _G_BYTES - _SUM_BYTES
    joint = {off: annotate_memory(gm, num_fwd_outputs=4, fused_pointwise=True, annotate=False,
                                  disabled_rules=off).peak_bytes
             for off in (("accumulation_apart",), ("accumulation_apart", "accumulation_fusion"))}
    assert joint[("accumulation_apart",)] - joint[("accumulation_apart", "accumulation_fusion")] == \
        _G_BYTES - _SUM_BYTES


@pytest.mark.parametrize("convert", [False, True], ids=["direct", "through_a_dtype_conversion"])
def test_rule_accumulation_apart(convert):
    from sac_compiler.passes.memory_rules import accumulated_reductions, far_accumulated_reductions

    gm, (s1, s2), total, big = _accumulation_graph(convert)
    nodes = list(gm.graph.nodes)
    # s1's input would be held through `big`; s2 runs next to the add anyway: left to Inductor
    assert far_accumulated_reductions(nodes) == {s1: total}
    assert accumulated_reductions(nodes) == {s2: total}
    assert accumulated_reductions(nodes, keep_apart=False) == {s1: total, s2: total}
    outputs = {n.name for n in nodes[-1].all_input_nodes}
    inputs = frozenset(n.name for n in nodes if n.op == "placeholder")
    apart = _peak(gm, 0, outputs, static_storage=inputs)
    fused = _peak(gm, 0, outputs, static_storage=inputs, off={"accumulation_apart"})
    # at the add: fused, g1 and g2 live; apart, g2 and s1, which the add writes over (in place)
    assert fused[0] - apart[0] == _G_BYTES
    joint = {off: annotate_memory(gm, num_fwd_outputs=4, fused_pointwise=True, annotate=False,
                                  disabled_rules=off).peak_bytes for off in ((), ("accumulation_apart",))}
    assert joint[("accumulation_apart",)] - joint[()] == _G_BYTES


def test_a_sum_whose_input_is_not_the_graphs_to_free_is_left_to_inductor():
    """A sum of a parameter or a saved value (not freed by the graph): fusing it frees nothing later."""
    from sac_compiler.passes.memory_rules import far_accumulated_reductions

    graph, op, placeholder = _graph_builder()
    p1, p2 = placeholder("primals_1", torch.empty(256, 1024)), placeholder("primals_2", torch.empty(256, 1024))
    d = placeholder("d", torch.empty(512, 512))
    s1 = op(aten.sum.dim_IntList, p1, [0], val=torch.empty(1024))
    big = op(aten.mm.default, d, d, val=torch.empty(512, 512))
    s2 = op(aten.sum.dim_IntList, p2, [0], val=torch.empty(1024))
    total = op(aten.add.Tensor, s1, s2, val=torch.empty(1024))
    graph.output((total, big))
    assert far_accumulated_reductions(list(graph.nodes)) == {}


@pytest.mark.inductor
@pytest.mark.parametrize("convert", [False, True], ids=["direct", "through_a_dtype_conversion"])
def test_the_backend_keeps_a_far_sum_in_its_own_kernel(convert):
    """``keep_reductions_apart``: Inductor fuses both sums into one kernel after the second layer
    (read off its schedule), also through a dtype conversion between each sum and the add; with
    the barrier after ``s1`` it runs in its own kernel, where the graph has it. Every value is
    unchanged, to the bit."""
    from sac_compiler.backend import keep_reductions_apart
    from sac_compiler.inductor_order import scheduled_origins

    def kernel_of(gm, name):
        return next(i for i, origins in enumerate(scheduled_origins(gm, backward=True)) if name in origins)

    gm, (s1, s2), total, big = _accumulation_graph(convert)
    mode = _fake_values(gm)
    torch.manual_seed(0)
    args = [torch.randn(n.meta["val"].shape) for n in gm.graph.nodes if n.op == "placeholder"]
    want = gm(*args)
    with mode:
        assert kernel_of(gm, s1.name) == kernel_of(gm, s2.name)  # Inductor fuses them
    assert keep_reductions_apart(gm) == [s1.name]
    barriers = [n for n in gm.graph.nodes if n.target is torch.ops.sac_compiler.fusion_barrier.default]
    assert [b.args[0] for b in barriers] == [s1] and list(s1.users) == barriers
    with mode:
        assert kernel_of(gm, s1.name) < kernel_of(gm, big.name) < kernel_of(gm, s2.name)  # s1 before `big`
    got = gm(*args)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert keep_reductions_apart(gm) == []  # nothing left to keep apart


def _draw_read_twice(device="cpu"):
    """A backward rebuilding a dropout (a draw, its mask, the mask applied) for a matmul, and the
    backward's own dropout gradient, which makes the mask again from the draw after that matmul."""
    import torch._inductor.inductor_prims  # noqa: F401 - registers prims.inductor_random
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    def backward(seeds, x, tangent):
        seed = torch.ops.prims.inductor_lookup_seed.default(seeds, 0)
        draw = torch.ops.prims.inductor_random.default([256, 256], seed, "rand")
        mask = draw > 0.1
        h = (x * mask * 1.25) @ x  # the rebuild, read by a matmul
        return h, (tangent @ h) * torch.ops.prims.convert_element_type.default(mask, torch.float32) * 1.25

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        gm = make_fx(backward)(torch.empty(2, dtype=torch.int64, device=device), torch.empty(256, 256, device=device),
                               torch.empty(256, 256, device=device))
    # the backward's own nodes: the matmul reading the tangent and the gradient's pointwise ops
    own = {"mm_1", "convert_element_type", "mul_2", "mul_3"}
    return gm, mode, lambda node: node.name in own


@pytest.mark.inductor
def test_rule_draws_repeated():
    """``repeat_recomputed_draws``: without it, Inductor's backward kernel makes the mask from the
    rebuild's draw, which is therefore stored from the rebuild until then (read off Inductor's
    schedule); with it, that kernel draws its own, and the numbers are the same."""
    from torch._inductor import compile as inductor_compile

    from sac_compiler.backend import repeat_recomputed_draws
    from sac_compiler.inductor_order import scheduled_origins

    def kernel_drawing(gm, mode, name):
        with mode:
            scheduled = scheduled_origins(gm, backward=True)
        return next(origins for origins in scheduled if name in origins)

    gm, mode, is_backward = _draw_read_twice()
    torch.manual_seed(0)
    args = [torch.randint(0, 2**31, (2,), dtype=torch.int64), torch.randn(256, 256), torch.randn(256, 256)]
    want = inductor_compile(gm, args)(*args)
    gradient = kernel_drawing(gm, mode, "mul_3")
    assert "gt" in gradient and not any(n.startswith("inductor_random") for n in gradient)  # reads the draw
    assert repeat_recomputed_draws(gm, is_backward) == ["inductor_random"]
    gradient = kernel_drawing(gm, mode, "mul_3")
    assert any(n.startswith("inductor_random") and n != "inductor_random" for n in gradient)  # draws its own
    got = inductor_compile(gm, args)(*args)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert repeat_recomputed_draws(gm, is_backward) == []  # each kernel has its own draw now


def _chain_graph():
    """A backward reading a saved ``h``: ``r1 = h + 1`` for one matmul, ``r2 = r1 * 3`` (both
    recomputed) for a later one; between them a ``big`` temporary."""
    graph, op, placeholder = _graph_builder()
    h, w = placeholder("h", torch.empty(64, 64)), placeholder("w", torch.empty(64, 64))
    g = placeholder("tangents_1", torch.empty(1, 64))
    r1 = op(aten.add.Tensor, h, 1.0, val=torch.empty(64, 64))
    mm1 = op(aten.mm.default, g, r1, val=torch.empty(1, 64))
    big = op(aten.mm.default, w, w, val=torch.empty(64, 64))
    s = op(aten.sum.default, big, val=torch.empty(()))
    r2 = op(aten.mul.Tensor, r1, 3.0, val=torch.empty(64, 64))
    mm2 = op(aten.mm.default, g, r2, val=torch.empty(1, 64))
    graph.output((mm1, s, mm2))
    return torch.fx.GraphModule(torch.nn.Module(), graph), (r1, r2, s), {mm1.name, s.name, mm2.name}


def test_rule_recompute_chain_kernel():
    gm, (r1, r2, s), keep = _chain_graph()
    tile, row = 64 * 64 * 4, 64 * 4
    start = 2 * tile + row
    kwargs = {"static_storage": frozenset({"w"}), "recomputed": frozenset({r1.name, r2.name}),
              "placeholder_storage": {"h": ("h", tile)}}
    # one kernel rebuilds r1 and r2 before r1's matmul: r2 lives through `big` (freed after its sum)
    assert _peak(gm, start, keep, off={"dying_input_reuse"}, **kwargs) == (4 * tile + 2 * row + 4, s.name)
    assert _peak(gm, start, keep, off={"dying_input_reuse", "recompute_chain_kernel"}, **kwargs) == (
        3 * tile + 2 * row + 4, s.name)


def _layers_reading_one_constant(shared="fill"):
    """A backward rebuilding two layers' recomputed ``where(mask, c, h) * 3`` chains for two
    matmuls, both reading one recomputed value ``c``, each its own mask; between the matmuls a
    ``big`` temporary; ``h2`` is read again after its layer's rebuild. ``shared="fill"``: ``c``
    is a constant fill (a masked fill's value, as T5's attention scores read one in every layer);
    ``"computed"``: ``c = bias * 2`` from a saved ``bias`` (as a T5 decoder's position bias,
    which every layer's scores read)."""
    graph, op, placeholder = _graph_builder()
    h1, h2 = placeholder("h1", torch.empty(64, 64)), placeholder("h2", torch.empty(64, 64))
    masks = [placeholder(f"mask{i}", torch.empty(64, 64, dtype=torch.bool)) for i in (1, 2)]
    w, g = placeholder("w", torch.empty(64, 64)), placeholder("tangents_1", torch.empty(1, 64))
    if shared == "fill":
        c = graph.call_function(aten.full.default, ([64, 64], -1e4),
                                {"dtype": torch.float32, "device": torch.device("cpu"), "pin_memory": False})
        c.meta["val"] = torch.empty(64, 64)
    else:
        c = op(aten.mul.Tensor, placeholder("bias", torch.empty(64, 64)), 2.0, val=torch.empty(64, 64))

    def chain(h, mask):
        masked = op(aten.where.self, mask, c, h, val=torch.empty(64, 64))
        return masked, op(aten.mul.Tensor, masked, 3.0, val=torch.empty(64, 64))

    chains = [chain(h1, masks[0])]
    mm1 = op(aten.mm.default, g, chains[0][1], val=torch.empty(1, 64))
    big = op(aten.mm.default, w, w, val=torch.empty(64, 64))
    s = op(aten.sum.default, big, val=torch.empty(()))
    chains.append(chain(h2, masks[1]))  # where PyTorch's partitioner puts a rebuild: before its first reader
    mm2 = op(aten.mm.default, g, chains[1][1], val=torch.empty(1, 64))
    mm3 = op(aten.mm.default, g, h2, val=torch.empty(1, 64))  # h2 is read after its rebuild too
    graph.output((mm1, s, mm2, mm3))
    recomputed = frozenset(n.name for n in (c, *chains[0], *chains[1]))
    keep = {mm1.name, s.name, mm2.name, mm3.name}
    return torch.fx.GraphModule(torch.nn.Module(), graph), chains, s, recomputed, keep


def test_rule_recompute_chain_kernel_is_not_linked_by_a_constant():
    """A constant fill is computed inside each kernel that reads it, as Inductor lowers ``full``:
    it links no two chains, and the second layer's chain is rebuilt at its own matmul
    (``memory_rules.computed_in_each_reader``)."""
    from sac_compiler.passes.memory_rules import fused_recompute_groups

    gm, chains, s, recomputed, keep = _layers_reading_one_constant()
    members = {n for n in gm.graph.nodes if n.name in recomputed}
    assert fused_recompute_groups(list(gm.graph.nodes), members, {}) == [list(chain) for chain in chains]
    tile, row = 64 * 64 * 4, 64 * 4
    kwargs = {"static_storage": frozenset({"w", "mask1", "mask2"}), "recomputed": recomputed,
              "placeholder_storage": {"h1": ("h1", tile), "h2": ("h2", tile)}}
    # the first layer's rebuild: h1, h2, the tangent and its product; the second layer's is not
    # made with it (linked by the constant, it was: 4 tiles there), nor fused into its kernel
    # (rebuild_fusion: the constant is no buffer the two kernels share)
    assert _peak(gm, 2 * tile + row, keep, off={"dying_input_reuse"}, **kwargs) == (3 * tile + row, chains[0][0].name)


def test_rule_inlined_value_links_none():
    """A recomputed value Inductor folds into each of its readers (``c = bias * 2``, read by two
    layers' chains) is computed in each reader's kernel: it links neither chain to the other, and
    the second layer's is rebuilt at its own matmul. Linked by it, both are rebuilt at the first
    layer's, the second's product held through ``big``."""
    from sac_compiler.passes.memory_rules import fused_recompute_groups

    gm, chains, s, recomputed, keep = _layers_reading_one_constant("computed")
    nodes = list(gm.graph.nodes)
    members = {n for n in nodes if n.name in recomputed}
    (shared,) = members - {n for chain in chains for n in chain}
    assert fused_recompute_groups(nodes, members, {}, inlined={shared}) == [list(chain) for chain in chains]
    assert fused_recompute_groups(nodes, members, {}) == [[shared, *chains[0], *chains[1]]]
    tile, row = 64 * 64 * 4, 64 * 4
    kwargs = {"static_storage": frozenset({"w", "mask1", "mask2", "bias"}), "recomputed": recomputed,
              "placeholder_storage": {"h1": ("h1", tile), "h2": ("h2", tile)}}
    # (rebuild_fusion off: the two kernels read one buffer, bias, and it would join them anyway)
    off = {"dying_input_reuse", "rebuild_fusion"}
    # the first layer's rebuild: h1, h2, the tangent and its product
    assert _peak(gm, 2 * tile + row, keep, off=off, **kwargs) == (3 * tile + row, chains[0][0].name)
    # and the second layer's product with it, through big
    assert _peak(gm, 2 * tile + row, keep, off=off | {"inlined_value_links_none"}, **kwargs) == (
        4 * tile + row, shared.name)


def test_inductor_computes_a_constant_inside_each_reader_and_fuses_no_two_layers_by_it():
    """The platform fact behind the test above, from Inductor's scheduler (CPU): no scheduled
    kernel runs both layers' chains, and the constant is no buffer of its own."""
    from sac_compiler.inductor_order import scheduled_origins

    gm, chains, _, _, _ = _layers_reading_one_constant()
    with _fake_values(gm):
        scheduled = scheduled_origins(gm, backward=True)
    layers = [{n.name for n in chain} for chain in chains]
    assert any(set(kernel) & layers[0] for kernel in scheduled) and any(set(kernel) & layers[1] for kernel in scheduled)
    assert not any(set(kernel) & layers[0] and set(kernel) & layers[1] for kernel in scheduled)
    assert not any(kernel == ["full"] for kernel in scheduled)


def test_rule_dying_input_reuse():
    # a backward: h, saved, is read only by the chain rebuilt for grad_w (its add folded into the mul)
    graph, op, placeholder = _graph_builder()
    h, w = placeholder("h", torch.empty(64, 64)), placeholder("w", torch.empty(64, 64))
    g = placeholder("tangents_1", torch.empty(1, 64))
    rebuilt = op(aten.add.Tensor, h, 1.0, val=torch.empty(64, 64))
    normed = op(aten.mul.Tensor, rebuilt, 3.0, val=torch.empty(64, 64))
    grad_w = op(aten.mm.default, g, normed, val=torch.empty(1, 64))
    grad_x = op(aten.mm.default, g, w, val=torch.empty(1, 64))
    graph.output((grad_w, grad_x))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    value, row = 64 * 64 * 4, 64 * 4
    kwargs = {"placeholder_storage": {"h": ("h", value)}, "static_storage": frozenset({"w"}),
              "recomputed": frozenset({rebuilt.name, normed.name})}
    # h dies in the kernel, which writes normed into its buffer: h's bytes, the tangent, grad_w
    assert _peak(gm, value + row, _outputs(gm), **kwargs) == (value + 2 * row, grad_w.name)
    # else normed is a buffer of its own next to h
    assert _peak(gm, value + row, _outputs(gm), off={"dying_input_reuse"}, **kwargs) == (2 * value + row,
                                                                                          rebuilt.name)
    # the joint simulation: `mm` is kept only to rebuild (mm + 1) * 3, whose product takes its buffer
    model = _TwoMatmuls()
    graph = _joint(model, torch.randn(128, 64))
    sims = {off: annotate_memory(graph.gm, fused_pointwise=True, recomputed={"add", "mul"}, annotate=False,
                                 disabled_rules=off) for off in ((), ("dying_input_reuse",))}
    at = [n for n, _ in sims[()].timeline].index("mm_2")  # the chain's first backward reader
    assert sims[("dying_input_reuse",)].step_peaks[at] - sims[()].step_peaks[at] == 128 * 64 * 4


class _TwoMatmuls(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(64, 64))
        self.w2 = nn.Parameter(torch.randn(64, 64))

    def forward(self, x):
        return ((x @ self.w + 1) * 3) @ self.w2


def test_rule_random_drawn_in_chain():
    import torch._inductor.inductor_prims  # registers prims.inductor_random

    # rebuilt in backward: r = inductor_random(seed); h = x + (r > p) * z, read by a matmul, and
    # h * 2 by another
    graph, op, placeholder = _graph_builder()
    x, z, w = placeholder("x", torch.empty(64, 64)), placeholder("z", torch.empty(64, 64)), placeholder(
        "w", torch.empty(64, 8))
    seed = placeholder("seed", torch.empty((), dtype=torch.int64))
    r = op(torch.ops.prims.inductor_random.default, [64, 64], seed, "rand", val=torch.empty(64, 64))
    keep = op(aten.gt.Scalar, r, 0.1, val=torch.empty(64, 64, dtype=torch.bool))
    h = op(aten.add.Tensor, x, op(aten.mul.Tensor, keep, z, val=torch.empty(64, 64)), val=torch.empty(64, 64))
    mm1 = op(aten.mm.default, op(aten.mul.Tensor, h, 2.0, val=torch.empty(64, 64)), w, val=torch.empty(64, 8))
    graph.output((mm1, op(aten.mm.default, h, w, val=torch.empty(64, 8))))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    recomputed = frozenset(n.name for n in graph.nodes if n.op == "call_function" and n.target is not aten.mm.default)
    tile, thin = 64 * 64 * 4, 64 * 8 * 4
    start = _placeholder_bytes(gm)
    kwargs = {"static_storage": frozenset({"x", "z", "w", "seed"}), "recomputed": recomputed}
    # drawn inside the kernel rebuilding h and h * 2: no mask stored; the peak at the first matmul
    assert _peak(gm, start, _outputs(gm), **kwargs) == (start + 2 * tile + thin, mm1.name)
    # stored, the mask lives with h and h * 2 while the kernel runs
    assert _peak(gm, start, _outputs(gm), off={"random_drawn_in_chain"}, **kwargs) == (start + 3 * tile, keep.name)


def test_rule_rebuild_fusion():
    gm, recomputed, (_, _, weight_grad, _, _) = _gelu_backward_graph()
    keep, static = _outputs(gm), frozenset({"g", "w2", "w1"})
    placeholders = _placeholder_bytes(gm)
    buffer, wgrad = 1024 * 256 * 4, 2048 * 256 * 4
    kwargs = {"static_storage": static, "recomputed": recomputed}
    # the GELU backward runs in the kernel rebuilding the GELU and writes into the dying dgelu; the
    # FC1 output dies there too, before the weight gradient's matmul
    assert _peak(gm, placeholders, keep, **kwargs) == (placeholders - buffer + 2 * buffer + wgrad, weight_grad.name)
    # in graph order the FC1 output and dgelu live through the matmul
    assert _peak(gm, placeholders, keep, off={"rebuild_fusion"}, **kwargs) == (
        placeholders + 2 * buffer + wgrad, weight_grad.name)


def test_rule_column_reduction_order():
    static = frozenset({"x", "m", "y", "g1", "big", "gk", "w"})
    gm, (wgrad, c2), (n, d, k) = _column_reductions_graph(shared=True)
    placeholders, keep = _placeholder_bytes(gm), _outputs(gm)
    # one kernel for both sums: the second's matmul runs before the weight-gradient matmul, whose
    # input t lives through it
    assert _peak(gm, placeholders, keep, static_storage=static) == (placeholders + 4 * (n * k + n * d + 2 * d),
                                                                    c2.name)
    # graph order: t dies in the weight-gradient matmul before the second matmul runs
    assert _peak(gm, placeholders, keep, static_storage=static, off={"column_reduction_order"}) == (
        placeholders + 4 * (n * k + k * d + d), wgrad.name)


def test_rule_column_reduction_order_of_batch_norms():
    """A batch norm's weight gradient sums over every dimension but the channels (dimension 1 of
    (N, C, H, W)): Inductor fuses two of them reading a common buffer, as it fuses layer norms'
    (seen on a ResNet-50's downsampling block, whose shortcut's batch norm and main branch's last
    one read the block's output gradient: docs/results.md). A sum over the last dimension of a
    matrix (a softmax's backward) is a row, not a column: not fused so."""
    b, c, h, w_ = 8, 64, 16, 16
    n, d, k = b * h * w_, c, 512
    graph, op, placeholder = _graph_builder()
    x, m = (placeholder(name, torch.empty(b, c, h, w_)) for name in ("x", "m"))
    g1 = placeholder("g1", torch.empty(b, c, h, w_))
    g1_rows = placeholder("g1_rows", torch.empty(n, d))
    big, gk, w = (placeholder("big", torch.empty(n, k)), placeholder("gk", torch.empty(n, k)),
                  placeholder("w", torch.empty(k, d)))
    t = op(aten.mul.Tensor, big, 2.0, val=torch.empty(n, k))  # a matmul's input: stored
    rebuilt = op(aten.add.Tensor, x, m, val=torch.empty(b, c, h, w_))  # rebuilt inline
    c1 = op(aten.sum.dim_IntList, op(aten.mul.Tensor, g1, rebuilt, val=torch.empty(b, c, h, w_)), [0, 2, 3],
            val=torch.empty(c))
    wgrad = op(aten.mm.default, op(aten.permute.default, t, [1, 0], val=torch.empty(k, n)), g1_rows,
               val=torch.empty(k, d))
    g2 = op(aten.view.default, op(aten.mm.default, gk, w, val=torch.empty(n, d)), [b, c, h, w_],
            val=torch.empty(b, c, h, w_))
    c2 = op(aten.sum.dim_IntList, op(aten.mul.Tensor, g2, x, val=torch.empty(b, c, h, w_)), [0, 2, 3],
            val=torch.empty(c))
    graph.output((c1, wgrad, c2))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    static = frozenset({"x", "m", "g1", "g1_rows", "big", "gk", "w"})
    placeholders, keep = _placeholder_bytes(gm), _outputs(gm)
    # one kernel for both sums: the second's matmul runs before the weight-gradient matmul, whose
    # input t lives through it
    assert _peak(gm, placeholders, keep, static_storage=static) == (placeholders + 4 * (n * k + n * d + 2 * c),
                                                                    c2.name)
    assert _peak(gm, placeholders, keep, static_storage=static, off={"column_reduction_order"}) == (
        placeholders + 4 * (n * k + k * d + c), wgrad.name)

    from sac_compiler.passes.memory_rules import _column_reduction_numel

    assert _column_reduction_numel(c1) == b * c * h * w_
    rows = op(aten.sum.dim_IntList, t, [1], val=torch.empty(n))  # over the last dimension of a matrix
    assert _column_reduction_numel(rows) is None


def test_rule_column_reduction_order_in_the_joint_graph():
    """The joint graph's simulation schedules its backward as Inductor will: the second column sum
    (sharing ``x`` with the first) and what it needs run before the weight-gradient matmul between
    them, so the recomputed ``r`` it reads is rebuilt there and lives with ``t`` (as the ResNet-50's
    shortcut chain does: docs/results.md). The forward is not reordered."""
    n, d, k = 1024, 256, 768
    graph, op, placeholder = _graph_builder()
    x, w2 = placeholder("x", torch.empty(n, d)), placeholder("w2", torch.empty(d, d))
    big, gk = placeholder("big", torch.empty(n, k)), placeholder("gk", torch.empty(n, k))
    w, g1 = placeholder("w", torch.empty(k, d)), placeholder("g1", torch.empty(n, d))
    r = op(aten.mm.default, x, w2, val=torch.empty(n, d))  # recomputed in backward
    loss = op(aten.sum.default, r, val=torch.empty(()))
    backward = [op(aten.mul.Tensor, big, 2.0, val=torch.empty(n, k))]  # t: a matmul's input, stored
    backward.append(op(aten.mul.Tensor, g1, x, val=torch.empty(n, d)))
    backward.append(c1 := op(aten.sum.dim_IntList, backward[-1], [0], val=torch.empty(d)))
    backward.append(op(aten.permute.default, backward[0], [1, 0], val=torch.empty(k, n)))
    backward.append(wgrad := op(aten.mm.default, backward[-1], g1, val=torch.empty(k, d)))
    backward.append(g2 := op(aten.mm.default, gk, w, val=torch.empty(n, d)))
    backward.append(op(aten.mul.Tensor, g2, x, val=torch.empty(n, d)))
    backward.append(rebuilt_read := op(aten.mul.Tensor, backward[-1], r, val=torch.empty(n, d)))
    backward.append(c2 := op(aten.sum.dim_IntList, rebuilt_read, [0], val=torch.empty(d)))
    for node in backward:
        node.meta["partitioner_tag"] = "is_backward"
    graph.output((loss, c1, wgrad, c2))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    sims = {off: annotate_memory(gm, num_fwd_outputs=1, recomputed={r.name}, annotate=False, fused_pointwise=True,
                                 disabled_rules=off) for off in ((), ("column_reduction_order",))}
    static = sims[()].static_bytes
    # t, g2, the rebuilt r and the first sum, before the weight-gradient matmul runs
    assert (sims[()].peak_bytes, sims[()].peak_node) == (static + 4 * (n * k + 2 * n * d + d), rebuilt_read.name)
    # graph order: r is rebuilt after the matmul, t is gone by then
    off = sims[("column_reduction_order",)]
    assert (off.peak_bytes, off.peak_node) == (static + 4 * (n * k + k * d + d), wgrad.name)


def _embedding_backward(dtype):
    """A backward: a wide temporary, then the embedding's gradient (1024 x 64) from the tangent."""
    graph, op, placeholder = _graph_builder()
    g = placeholder("tangents_1", torch.empty(8, 16, 64, dtype=dtype))
    tokens = placeholder("tokens", torch.empty(8, 16, dtype=torch.int64))
    w = placeholder("w", torch.empty(64, 512, dtype=dtype))
    wide = op(aten.mm.default, op(aten.view.default, g, [128, 64], val=torch.empty(128, 64, dtype=dtype)), w,
              val=torch.empty(128, 512, dtype=dtype))
    s = op(aten.sum.default, wide, val=torch.empty((), dtype=dtype))
    grad = op(aten.embedding_dense_backward.default, g, tokens, 1024, -1, False,
              val=torch.empty(1024, 64, dtype=dtype))
    graph.output((s, grad))
    return torch.fx.GraphModule(torch.nn.Module(), graph), s


def test_rule_embedding_grad_early():
    gm, s = _embedding_backward(torch.float32)
    start, keep = _placeholder_bytes(gm), _outputs(gm)
    static = frozenset({"w", "tokens"})
    grad, wide_bytes = 1024 * 64 * 4, 128 * 512 * 4
    # filled as backward starts, the gradient lives through the wide temporary (freed after its sum)
    assert _peak(gm, start, keep, static_storage=static) == (start + wide_bytes + grad + 4, s.name)
    assert _peak(gm, start, keep, static_storage=static, off={"embedding_grad_early"}) == (
        start + wide_bytes + 4, s.name)


def test_rule_fp32_accumulator():
    gm, s = _embedding_backward(torch.bfloat16)
    start, keep = _placeholder_bytes(gm), _outputs(gm)
    static = frozenset({"w", "tokens"})
    grad, wide_bytes = 1024 * 64 * 2, 128 * 512 * 2
    # a 16-bit gradient accumulates in fp32, from the start of backward to the gradient's cast
    assert _peak(gm, start, keep, static_storage=static) == (start + wide_bytes + 2 * grad + 2, s.name)
    # without, the gradient itself is filled from there
    assert _peak(gm, start, keep, static_storage=static, off={"fp32_accumulator"}) == (
        start + wide_bytes + grad + 2, s.name)


def _reuse_graph():
    graph = torch.fx.Graph()
    x, w, big_w = graph.placeholder("x"), graph.placeholder("w"), graph.placeholder("big_w")
    x.meta["val"] = w.meta["val"] = torch.empty(64, 64)
    big_w.meta["val"] = torch.empty(64, 256)

    def node(target, args, val):
        n = graph.call_function(target, args)
        n.meta["val"] = val
        return n

    first = node(aten.mm.default, (x, w), torch.empty(64, 64))  # last read by `small`
    small = node(aten.sum.default, (first,), torch.empty(()))
    big = node(aten.mm.default, (x, big_w), torch.empty(64, 256))  # allocated while `first` is dead
    wide = node(aten.sum.default, (big,), torch.empty(()))
    later = node(aten.mm.default, (x, w), torch.empty(64, 64))  # `first`'s size: takes its buffer
    graph.output((small, wide, later))
    return torch.fx.GraphModule(torch.nn.Module(), graph), {small.name, wide.name, later.name}


def test_rule_buffer_reuse():
    gm, outputs = _reuse_graph()
    apart = 64 * 256 * 4 + 512  # `big` and the scalar `small` (CUDA rounding): `first` is freed
    assert _peak(gm, 0, outputs, "cuda")[0] == apart + 64 * 64 * 4  # held for `later`
    assert _peak(gm, 0, outputs, "cuda", off={"buffer_reuse"})[0] == apart
    # the joint simulation (a forward graph: its inputs stay, the outputs to the end of the graph)
    joint = {off: annotate_memory(gm, "cuda", num_fwd_outputs=3, fused_pointwise=True, annotate=False,
                                  disabled_rules=off) for off in ((), ("buffer_reuse",))}
    static = joint[()].static_bytes
    assert joint[()].peak_bytes == static + 64 * 64 * 4 + 64 * 256 * 4 + 2 * 512
    assert joint[("buffer_reuse",)].peak_bytes == static + 64 * 256 * 4 + 2 * 512


def test_rule_inputs_deleted():
    graph, op, placeholder = _graph_builder()
    saved, w, big_w = (placeholder("saved", torch.empty(64, 64)), placeholder("w", torch.empty(64, 64)),
                       placeholder("big_w", torch.empty(64, 256)))
    small = op(aten.sum.default, saved, val=torch.empty(()))  # the saved value's last read
    big = op(aten.mm.default, w, big_w, val=torch.empty(64, 256))
    wide = op(aten.sum.default, big, val=torch.empty(()))
    later = op(aten.mm.default, w, w, val=torch.empty(64, 64))  # the saved value's size
    graph.output((small, wide, later))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    tile, inputs = 64 * 64 * 4, 64 * 64 * 4 * 2 + 64 * 256 * 4
    kwargs = {"static_storage": frozenset({"w", "big_w"})}
    deleted = inputs - tile + 64 * 256 * 4 + 2 * 512
    assert _peak(gm, inputs, _outputs(gm), "cuda", **kwargs)[0] == deleted
    # handed to `later` instead, the saved value would be held through `wide`
    assert _peak(gm, inputs, _outputs(gm), "cuda", off={"inputs_deleted"}, **kwargs)[0] == deleted + tile


def test_rule_inputs_deleted_in_the_joint_simulation():
    """A forward value freed in backward is an input of the backward graph: deleted, not reused."""
    graph, op, placeholder = _graph_builder()
    x, w, big_w = (placeholder("x", torch.empty(64, 64)), placeholder("w", torch.empty(64, 64)),
                   placeholder("big_w", torch.empty(64, 256)))
    tangent = placeholder("tangents_1", torch.empty(()))
    saved = op(aten.mm.default, x, w, val=torch.empty(64, 64))  # forward, read in backward
    loss = op(aten.sum.default, saved, val=torch.empty(()))
    backward = [op(aten.mul.Tensor, saved, tangent, val=torch.empty(64, 64))]  # the saved value's last read
    backward.append(op(aten.sum.default, backward[0], val=torch.empty(())))
    backward.append(op(aten.mm.default, w, big_w, val=torch.empty(64, 256)))
    backward.append(op(aten.sum.default, backward[2], val=torch.empty(())))
    backward.append(op(aten.mm.default, w, w, val=torch.empty(64, 64)))  # the saved value's size
    for node in backward:
        node.meta["partitioner_tag"] = "is_backward"
    graph.output((loss, backward[1], backward[3], backward[4]))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    sims = {off: annotate_memory(gm, num_fwd_outputs=1, fused_pointwise=True, annotate=False, disabled_rules=off)
            for off in ((), ("inputs_deleted",))}
    weights, tile, wide = 64 * 64 * 4 * 2 + 64 * 256 * 4, 64 * 64 * 4, 64 * 256 * 4
    # at the wide matmul's sum: the inputs, the two scalar gradients and the wide product
    assert sims[()].peak_bytes == weights + 4 + 4 + wide
    assert sims[("inputs_deleted",)].peak_bytes == weights + 4 + 4 + wide + tile


def test_rule_inplace_pointwise():
    # a backward: h, a saved value donated to it, is read last by a pointwise kernel (exp folded
    # into the mul) that writes its output where it reads h
    graph, op, placeholder = _graph_builder()
    h, w = placeholder("h", torch.empty(64, 64)), placeholder("w", torch.empty(64, 64))
    g = placeholder("tangents_1", torch.empty(64, 64))
    e = op(aten.exp.default, h, val=torch.empty(64, 64))
    grad = op(aten.mul.Tensor, e, g, val=torch.empty(64, 64))
    grad_x = op(aten.mm.default, grad, w, val=torch.empty(64, 64))
    graph.output((grad_x,))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    value = 64 * 64 * 4
    kwargs = {"placeholder_storage": {"h": ("h", value)}, "static_storage": frozenset({"w"})}
    start = 2 * value  # h and the tangent
    # grad takes h's buffer, and the tangent is gone when grad_x is made: nothing goes above the start
    assert _peak(gm, start, _outputs(gm), donated_storage=frozenset({"h"}), **kwargs) == (start, "start")
    # without the rule, or with h not donated (a user input, a value aliasing a forward output), grad
    # is a buffer of its own next to h
    assert _peak(gm, start, _outputs(gm), off={"inplace_pointwise"}, donated_storage=frozenset({"h"}),
                 **kwargs) == (start + value, grad.name)
    assert _peak(gm, start, _outputs(gm), **kwargs) == (start + value, grad.name)
    # the joint simulation: the sigmoid's backward writes the gradient where it reads the saved
    # sigmoid, which dies there
    model = _SigmoidBetween()
    graph = _joint(model, torch.randn(128, 64))
    sims = {off: annotate_memory(graph.gm, fused_pointwise=True, annotate=False, disabled_rules=off)
            for off in ((), ("inplace_pointwise",))}
    at = next(i for i, n in enumerate(graph.gm.graph.nodes) if n.target is aten.sigmoid_backward.default)
    assert sims[("inplace_pointwise",)].step_peaks[at] - sims[()].step_peaks[at] == 128 * 64 * 4


def test_rule_inplace_pointwise_reads_through_views():
    """The kernel reads the dying buffer through views (the cross-entropy gradient over the saved
    logits, read as a reshaped alias): a view is no reader outside the kernel, its readers are.
    A second reader of the view outside the kernel still keeps the buffer."""
    def graph_of(second_reader):
        graph, op, placeholder = _graph_builder()
        h, w = placeholder("h", torch.empty(64, 64)), placeholder("w", torch.empty(64, 64))
        g = placeholder("tangents_1", torch.empty(64, 64))
        flat = op(aten.view.default, h, [4096], val=torch.empty(4096))
        back = op(aten.view.default, flat, [64, 64], val=torch.empty(64, 64))
        e = op(aten.exp.default, back, val=torch.empty(64, 64))
        grad = op(aten.mul.Tensor, e, g, val=torch.empty(64, 64))
        grad_x = op(aten.mm.default, grad, w, val=torch.empty(64, 64))
        outs = (grad_x,)
        if second_reader:
            outs += (op(aten.mm.default, w, back, val=torch.empty(64, 64)),)
        graph.output(outs)
        return torch.fx.GraphModule(torch.nn.Module(), graph)

    value = 64 * 64 * 4
    kwargs = {"placeholder_storage": {"h": ("h", value)}, "static_storage": frozenset({"w"}),
              "donated_storage": frozenset({"h"})}
    start = 2 * value
    gm = graph_of(False)
    assert _peak(gm, start, _outputs(gm), **kwargs) == (start, "start")
    assert _peak(gm, start, _outputs(gm), off={"inplace_pointwise"}, **kwargs)[0] == start + value
    gm = graph_of(True)
    assert _peak(gm, start, _outputs(gm), **kwargs)[0] > start


def test_rule_padded_layout():
    """A saved value the compiled forward laid out with padded rows (a (tokens, vocabulary) logits
    buffer reaches the backward so on a GPU) is written over by the pointwise kernel that reads it
    last: Inductor pads that kernel's output alike. Without the rule the layouts differ and the
    output is a buffer of its own (as a BERT's MLM head was simulated on the schedule recorded from
    its compile, above the step it measured: docs/results.md)."""
    from sac_compiler.passes.memory_rules import inductor_padded_strides

    rows, cols = 8, 1030  # rows of 1030 fp32 are padded to 1056 (128 bytes), past the 1024 threshold
    graph, op, placeholder = _graph_builder()
    h = placeholder("h", torch.empty_strided((rows, cols), (1056, 1)))
    w = placeholder("w", torch.empty(cols, 64))
    g = placeholder("tangents_1", torch.empty(rows, cols))
    e = op(aten.exp.default, h, val=torch.empty(rows, cols))
    grad = op(aten.mul.Tensor, e, g, val=torch.empty(rows, cols))
    grad_x = op(aten.mm.default, grad, w, val=torch.empty(rows, 64))
    graph.output((grad_x,))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    value, padded = rows * cols * 4, rows * 1056 * 4
    kwargs = {"placeholder_storage": {"h": ("h", padded)}, "static_storage": frozenset({"w"}),
              "donated_storage": frozenset({"h"})}
    start = padded + value  # h and the tangent
    assert _peak(gm, start, _outputs(gm), **kwargs) == (start, "start")
    assert _peak(gm, start, _outputs(gm), off={"padded_layout"}, **kwargs) == (start + value, grad.name)

    # the strides, as Inductor's Layout._pad_strides gives them
    assert inductor_padded_strides(torch.empty(rows, cols)) == (1056, 1)
    assert inductor_padded_strides(torch.empty(4, rows, cols, dtype=torch.bfloat16)) == (rows * 1088, 1088, 1)
    assert inductor_padded_strides(torch.empty(rows, 1000)) == (1000, 1)  # under the threshold
    assert inductor_padded_strides(torch.empty(rows, 1056)) == (1056, 1)  # aligned already
    transposed = torch.empty(rows, cols).t()  # (cols, rows) column-major: its columns are padded
    assert inductor_padded_strides(transposed) == (1, 1056)
    channels_last = torch.empty(2, 1030, 4, 4).to(memory_format=torch.channels_last)
    assert inductor_padded_strides(channels_last) == channels_last.stride()
    from torch._inductor import config

    with config.patch(comprehensive_padding=False):
        assert inductor_padded_strides(torch.empty(rows, cols)) == (cols, 1)


def test_rule_inplace_pointwise_in_the_joint_simulation_counts_readers_on_its_own_side():
    """In the joint simulation a forward kernel writes over a dying input when every other forward
    kernel that read it is one of its ancestors (the log-softmax after the reductions over the
    logits, whose results it reads: they have run), not when a kernel it does not wait for reads it
    too; a backward kernel ignores the forward's reads of a saved value (the sigmoid's backward
    over the saved sigmoid, above)."""
    def peaks(second_reader):
        graph, op, placeholder = _graph_builder()
        x, w = placeholder("x", torch.empty(64, 32)), placeholder("w", torch.empty(32, 1000))
        logits = op(aten.mm.default, x, w, val=torch.empty(64, 1000))
        amax = op(aten.amax.default, logits, [1], True, val=torch.empty(64, 1))
        shifted = op(aten.sub.Tensor, logits, amax, val=torch.empty(64, 1000))
        total = op(aten.sum.dim_IntList, logits, [1], True, val=torch.empty(64, 1))
        out = op(aten.add.Tensor, shifted, total, val=torch.empty(64, 1000))
        outs = (out,)
        if second_reader:  # a reduction over the logits that the output does not read
            outs += (op(aten.mean.dim, logits, [1], True, val=torch.empty(64, 1)),)
        graph.output(outs)
        gm = torch.fx.GraphModule(torch.nn.Module(), graph)
        annotate_modules(gm, "")
        annotate_ops(gm)
        return {off: annotate_memory(gm, fused_pointwise=True, annotate=False, disabled_rules=off).peak_bytes
                for off in ((), ("inplace_pointwise",))}

    tile = 64 * 1000 * 4
    alone = peaks(False)
    assert alone[("inplace_pointwise",)] - alone[()] == tile  # the output in the logits' buffer
    shared = peaks(True)
    assert shared[()] == shared[("inplace_pointwise",)]  # the logits and the output both there


def _cross_entropy_returning_log_softmax(x, w, y):
    log_softmax = torch.log_softmax(x @ w, -1)
    return torch.nn.functional.nll_loss(log_softmax, y), log_softmax


def test_rule_inplace_pointwise_writes_the_log_softmax_into_the_logits():
    """The log-softmax a cross-entropy saves for backward, made after the reductions over the
    logits, is written into the logits' buffer: Inductor's in-place update discounts the
    kernel's ancestors from the buffer's remaining readers. Its CPU code for the graph allocates
    one (256, 5000) buffer, not two; the partitioned simulation counts one with the rule."""
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.utils import run_and_get_code
    from torch.fx.experimental.proxy_tensor import make_fx

    x, w, y = torch.randn(256, 64), torch.randn(64, 5000), torch.randint(0, 5000, (256,))
    torch._dynamo.reset()
    with torch.no_grad():
        _, (code, *_) = run_and_get_code(torch.compile(_cross_entropy_returning_log_softmax), x, w, y)
    assert code.count("empty_strided_cpu((256, 5000)") == 1
    gm = make_fx(_cross_entropy_returning_log_softmax, decomposition_table=select_decomp_table(),
                 tracing_mode="fake")(x, w, y)
    inputs = frozenset(n.name for n in gm.graph.nodes if n.op == "placeholder")
    start = _placeholder_bytes(gm)
    tile = 256 * 5000 * 4
    with_rule, _ = _peak(gm, start, _outputs(gm), static_storage=inputs)
    without, at = _peak(gm, start, _outputs(gm), static_storage=inputs, off={"inplace_pointwise"})
    assert with_rule - start < tile + tile // 100  # the logits, then the log-softmax in their place
    # without it, the log-softmax is a buffer of its own beside the logits (a few small ones aside)
    assert abs(without - with_rule - tile) < tile // 100
    assert at == gm.graph.find_nodes(op="call_function", target=aten.sub.Tensor)[-1].name


class _SigmoidBetween(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(64, 64))
        self.w2 = nn.Parameter(torch.randn(64, 64))

    def forward(self, x):
        return (x @ self.w).sigmoid() @ self.w2


def test_the_outputs_of_a_split_live_in_its_base():
    """q, k and v split from one projection are views of it: one allocation, in both simulations."""

    class Split(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(64, 3 * 64, bias=False)

        def forward(self, x):
            q, k, v = self.qkv(x).split(64, dim=-1)
            return (q * k * v).sum()

    graph = _joint(Split(), torch.randn(256, 64))
    sim = annotate_memory(graph.gm, fused_pointwise=False, annotate=False)
    projection = 256 * 3 * 64 * 4
    saved = [life for life in sim.lifetimes if life.category == MemoryCategory.ACTIVATION]
    split_outputs = [life for life in saved if life.name.startswith("getitem")]
    assert not split_outputs, split_outputs  # no allocation of their own
    assert any(life.nbytes == projection for life in saved)
    peak = _partitioned(graph)
    assert peak.saved_bytes <= projection + 2 * 256 * 64 * 4  # the projection once, q*k and the like


def test_cross_entropy_backward_and_gather_are_folded_as_inductor_lowers_them():
    """Traced through Inductor's decompositions, cross-entropy's log-softmax is read by a gather
    (an indirect load that computes it at the targets) and its backward scatters one value per row
    into a constant (a where over an iota): neither is a buffer of the vocabulary's size."""
    from sac_compiler.passes.annotate_ops import fuses_pointwise_inputs, is_pointwise_op

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.out = nn.Linear(32, 1000, bias=False)

        def forward(self, x, target):
            return nn.functional.cross_entropy(self.out(x), target)

    x, target = torch.randn(64, 32), torch.randint(0, 1000, (64,))
    graph = capture_joint(Head(), x, target, decompose=True)
    nodes = list(graph.gm.graph.nodes)
    scatters = [n for n in nodes if n.target is aten.scatter.value]
    gathers = [n for n in nodes if n.target is aten.gather.default]
    assert scatters and gathers
    assert all(is_pointwise_op(n) and is_pointwise_op(n.args[0]) for n in scatters)
    assert all(fuses_pointwise_inputs(n) for n in gathers)
    annotate_modules(graph.gm, graph.root_name)
    annotate_ops(graph.gm)
    sim = annotate_memory(graph.gm, fused_pointwise=True, annotate=False)
    logits = 64 * 1000 * 4
    # in backward, the log-softmax (saved) and the gradient written over it: no second
    # vocabulary-sized buffer (in forward the log-softmax is written beside the logits, which the
    # reductions before it read in kernels of their own)
    fb = sim.first_backward
    assert max(sim.step_peaks[fb:]) - sim.static_bytes < 2 * logits
    # unfused, or traced without the decompositions: the log-softmax, the scattered one-hot and the
    # gradient are three
    without = annotate_memory(graph.gm, fused_pointwise=False, annotate=False)
    assert without.peak_bytes - without.static_bytes >= 3 * logits
    plain = capture_joint(Head(), x, target)
    annotate_modules(plain.gm, plain.root_name)
    annotate_ops(plain.gm)
    plain_sim = annotate_memory(plain.gm, fused_pointwise=True, annotate=False)
    assert plain_sim.peak_bytes - plain_sim.static_bytes >= 3 * logits


def test_slice_scatters_into_zeros_and_summed_are_one_buffer_as_inductor_lowers_them():
    """A mixture-of-experts backward scatters each expert's rows into zeros (``slice_scatter``)
    and sums them: Inductor lowers ``slice_scatter`` as a pointwise kernel, so the chain is one
    kernel and one buffer (read here from Inductor's own scheduler on CPU); the simulation counts
    the same, where a buffer per scatter would be four more."""
    from sac_compiler.passes.annotate_ops import is_pointwise_op

    from sac_compiler.inductor_order import lower_to_schedule

    rows, dim, experts = 128, 64, 4
    graph, op, placeholder = _graph_builder()
    ys = [placeholder(f"y{i}", torch.empty(rows, dim)) for i in range(experts)]
    zeros = graph.call_function(aten.full.default, ([experts * rows, dim], 0.0),
                                {"dtype": torch.float32, "device": torch.device("cpu"), "pin_memory": False})
    zeros.meta["val"] = torch.empty(experts * rows, dim)
    scatters = [op(aten.slice_scatter.default, zeros, y, 0, i * rows, (i + 1) * rows,
                   val=torch.empty(experts * rows, dim)) for i, y in enumerate(ys)]
    total = scatters[0]
    for scattered in scatters[1:]:
        total = op(aten.add.Tensor, total, scattered, val=torch.empty(experts * rows, dim))
    graph.output((total,))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    assert all(is_pointwise_op(n) for n in scatters)

    realized: list[str] = []

    def read(nodes):
        realized.extend(buf.get_name() for node in nodes for part in node.get_nodes() for buf in part.get_outputs()
                        if int(buf.node.get_numel()) > 0)

    with torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True) as mode:
        for node in gm.graph.find_nodes(op="placeholder"):
            node.meta["val"] = mode.from_tensor(node.meta["val"])
        lower_to_schedule(gm, backward=False, read=read)
    assert len(realized) == 1, realized  # Inductor: the sum alone

    out = experts * rows * dim * 4
    inputs = experts * rows * dim * 4  # the four expert outputs
    static = frozenset(f"y{i}" for i in range(experts))
    peak, _ = _peak(gm, inputs, {total.name}, static_storage=static, off={"inplace_pointwise"})
    assert peak == inputs + out
    unfused, _ = _peak(gm, inputs, {total.name}, static_storage=static, off={"inplace_pointwise", "pointwise_fusion"})
    assert unfused > peak + out


def test_the_callers_loss_is_counted_between_forward_and_backward_only():
    """loss_memory: what the caller's own loss holds as forward ends and before backward begins,
    in both simulations; a loss smaller than the gap to the peak changes nothing."""
    graph = _joint(nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                 nn.Linear(256, 8)), torch.randn(512, 64))
    plain = annotate_memory(graph.gm, fused_pointwise=True, annotate=False)
    end = plain.end_of_forward_bytes
    big, small = 4 * plain.peak_bytes, 512
    with_big = annotate_memory(graph.gm, fused_pointwise=True, annotate=False, loss_memory=big)
    at_boundary = plain.timeline[plain.first_backward - 1][1]  # live after the last forward step
    assert with_big.peak_bytes == at_boundary + big > plain.peak_bytes
    assert with_big.end_of_forward_bytes == end + big  # live as forward ends ...
    first_backward = plain.first_backward
    assert with_big.step_peaks[first_backward:] == plain.step_peaks[first_backward:]  # ... gone in backward
    assert annotate_memory(graph.gm, fused_pointwise=True, annotate=False,
                           loss_memory=small).peak_bytes == plain.peak_bytes
    base = _partitioned(graph)
    loaded = _partitioned(graph, loss_memory=big)
    # as backward starts: what forward left, less the output the caller dropped, and the loss, of
    # which the tangent it hands over is part
    output = 512 * 8 * 4
    assert loaded.peak_graph == "backward" and loaded.peak_bytes == base.end_of_forward_bytes - output + big
    assert loaded.peak_bytes <= max(base.peak_bytes, base.end_of_forward_bytes + big + 3 * 512 * 256 * 4)


def test_rule_fsdp_sharding():
    """A block planned for 4 ranks: its parameters' shards count throughout, the reduce-scatter's
    input after the graph (all of it hand-counted in tests/test_fsdp.py); without the rule, the
    graph alone."""
    from sac_compiler.capture import capture_joint
    from sac_compiler.distributed import fake_process_group
    from tests.fsdp_models import Block

    with fake_process_group(4):
        graph = capture_joint(Block(16, 64), torch.randn(8, 16), target_device="cpu", world_size=4, shard_all=True)
    sharding = graph.sharding()
    shards = (16 * 16 + 16 + 4 * 64 + 4) * 4  # 64 and 16 rows in 4 shards, fp32
    assert sharding.sharded_param_bytes == shards
    on = annotate_memory(graph.gm, sharding=sharding, annotate=False)
    off = annotate_memory(graph.gm, sharding=sharding, annotate=False, disabled_rules=("fsdp_sharding",))
    assert on.static_bytes - off.static_bytes == shards
    assert on.sharded_param_bytes == on.sharded_grad_bytes == shards
    assert off.sharded_param_bytes == off.reduce_scatter_peak_bytes == 0
    assert on.peak_bytes == on.reduce_scatter_peak_bytes and on.peak_node == "reduce_scatter"


def test_rule_host_copies():
    """An offloaded value's host copy (a CPU tensor in a CUDA graph) takes no device memory; the
    device value it copied is freed at its last use."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, a, b = (torch.empty(64, 64, device="cuda") for _ in range(3))
        host = torch.empty(64, 64, device="cpu")
    graph, op, placeholder = _graph_builder()
    xs = placeholder("x", x)
    act = op(aten.mm.default, xs, xs, val=a)
    copy = op(aten._to_copy.default, act, val=host)  # the copy to the host, as ao.offload makes it
    later = op(aten.mm.default, xs, xs, val=b)
    graph.output((later, copy))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    tile = 64 * 64 * 4
    kwargs = {"static_storage": frozenset({"x"})}
    assert _peak(gm, tile, _outputs(gm), "cuda", fused=False, **kwargs)[0] == 2 * tile
    assert _peak(gm, tile, _outputs(gm), "cuda", fused=False, off={"host_copies"}, **kwargs)[0] == 3 * tile


def test_the_t5s_position_bias_sums_are_found_under_autocast_as_in_fp32():
    """The zoo's T5 (two layers a side: its relative position biases summed over the layers) under
    CPU autocast, where each layer's summed gradient reaches the accumulation through a dtype
    conversion: the accumulation rules find as many sums as in fp32 (none without the conversions)."""
    from sac_compiler.passes.memory_rules import accumulated_reductions

    from benchmarks.zoo import ZOO

    entry = ZOO["t5"]
    torch.manual_seed(0)
    model = entry.model_cls(**dict(entry.sizes["small"]["model"], n_layers=2))
    batch = entry.batch("small", seed=0)

    def autocast(*xs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(*xs)

    found = []
    for fn in (model, autocast):
        graph = capture_joint(fn, *batch.inputs, target_device="cpu", decompose=True)
        found.append(len(accumulated_reductions(list(graph.gm.graph.nodes), keep_apart=False)))
    assert found[0] > 0 and found[1] == found[0]


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x))).sum()


def test_rule_conv_workspace(monkeypatch):
    """A convolution or its backward on a GPU holds cuDNN's workspace while it runs, as measured
    for its call signature (the table ``measure_convolution_workspaces`` fills on a GPU; planted
    here): both simulations count it at the op, under Inductor, on a CUDA target only; a call not
    measured counts nothing."""
    from sac_compiler.passes import memory_rules

    graph = _joint(_ConvNet(), torch.randn(4, 3, 16, 16), target_device="cuda")
    convs = [n for n in graph.gm.graph.nodes if memory_rules.conv_signature(n) is not None]
    assert {str(n.target) for n in convs} == {"aten.convolution.default", "aten.convolution_backward.default"}
    workspace = 64 * 2**20  # larger than anything the graph holds: the peak is at a convolution

    def peak(off=(), target="cuda"):
        return annotate_memory(graph.gm, target_device=target, num_fwd_outputs=graph.num_fwd_outputs,
                               fused_pointwise=True, annotate=False, disabled_rules=off).peak_bytes

    unmeasured = peak()
    assert peak(off={"conv_workspace"}) == unmeasured  # nothing measured: nothing counted
    # (its channels are few: Inductor leaves the layout alone, and the calls run contiguous)
    assert not memory_rules.layout_optimized(memory_rules.forward_part(list(graph.gm.graph.nodes)), "cuda")
    monkeypatch.setattr(memory_rules, "_MEASURED_CONV_WORKSPACES",
                        {(memory_rules.conv_signature(n), True): 8 * workspace for n in convs})
    assert peak() == unmeasured  # measured in the other layout: not this graph's
    monkeypatch.setattr(memory_rules, "_MEASURED_CONV_WORKSPACES",
                        {(memory_rules.conv_signature(n), False): workspace for n in convs})
    counted = peak()
    assert unmeasured + workspace // 2 < counted <= unmeasured + workspace
    assert peak(off={"conv_workspace"}) == unmeasured
    assert peak(target="cpu") == peak(target="cpu", off={"conv_workspace"})  # a CPU target: no cuDNN
    partitioned = {off: _partitioned(graph, fused_pointwise=True, disabled_rules=off).peak_bytes
                   for off in ((), ("conv_workspace",))}
    assert partitioned[()] - partitioned[("conv_workspace",)] > workspace // 2


def test_convolution_inputs_are_real_tensors_of_each_calls_shapes_in_the_layout_asked():
    """The conv_workspace measurement runs each convolution call on real tensors built from the
    graph's fake values (``convolution_inputs``; on the GPU, where the measurement itself runs): each
    of its shape and dtype, 4-d ones channels-last where Inductor optimizes the layout, else
    contiguous, and the op runs on them."""
    from sac_compiler.passes import memory_rules

    graph = _joint(_ConvNet(), torch.randn(4, 3, 16, 16), target_device="cuda")
    convs = [n for n in graph.gm.graph.nodes if memory_rules.conv_signature(n) is not None]
    assert len(convs) >= 3
    for node in convs:
        for channels_last in (True, False):
            args, kwargs = memory_rules.convolution_inputs(node, torch.device("cpu"), channels_last)
            for arg, built in zip(node.args, args):
                val = arg.meta["val"] if isinstance(arg, torch.fx.Node) else arg
                if isinstance(val, torch.Tensor):
                    assert built.shape == val.shape and built.dtype == val.dtype and not built.is_meta
                    layout = torch.channels_last if channels_last and built.dim() == 4 else torch.contiguous_format
                    assert built.is_contiguous(memory_format=layout)
                    assert not built.any()
                else:
                    assert built == val
            out = node.target(*args, **kwargs)
            expected = node.meta["val"]
            outs = out if isinstance(out, (tuple, list)) else (out,)
            vals = expected if isinstance(expected, (tuple, list)) else (expected,)
            assert [tuple(o.shape) for o in outs if o is not None] == [tuple(v.shape) for v in vals if v is not None]


class _WideConvNet(nn.Module):
    """Channels enough for Inductor to optimize the layout on a GPU: a 3x3 convolution (its weight
    is copied), a 1x1 one (its weight is channels-last already)."""

    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 128, 3, padding=1)
        self.conv2 = nn.Conv2d(128, 128, 3, padding=1, groups=groups)
        self.conv3 = nn.Conv2d(128, 128, 1)

    def forward(self, x):
        return self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x))))).sum()


def test_inductor_saves_the_channels_last_copies_of_the_inputs_its_convolutions_read():
    """What the channels_last_copies rule imitates, in Inductor's generated forward (on the CPU,
    where Inductor optimizes the layout of every convolution graph): the 3x3 weights and the
    image are copied channels-last as the forward starts and the copies are returned among the
    values saved for backward; the 1x1 weight is saved itself."""
    import re

    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    model, x = _WideConvNet(), torch.randn(8, 3, 32, 32)
    compiled = torch.compile(model)
    _, (forward, *_) = run_and_get_code(lambda: compiled(x).backward())
    made = dict(re.findall(r"(buf\d+) = empty_strided_cpu\((\(\d+, \d+, \d+, \d+\), \(\d+, \d+, \d+, \d+\))",
                           forward))
    returned = set(re.findall(r"\w+", forward[forward.rindex("return ("):].splitlines()[0]))
    copies = {"(8, 3, 32, 32), (3072, 1, 96, 3)", "(128, 3, 3, 3), (27, 1, 9, 3)", "(128, 128, 3, 3), (1152, 1, 384, 128)"}
    assert copies <= set(made.values())
    assert {buf for buf, layout in made.items() if layout in copies} <= returned
    assert "(128, 128, 1, 1)" not in " ".join(made.values())


def test_rule_channels_last_copies():
    """Where Inductor optimizes the forward's layout, each graph input a convolution reads that is
    not channels-last (the image, a 3x3 kernel's weight; not a 1x1 kernel's) is copied as the
    forward starts and the copy is what the backward reads: both simulations hold it from there to
    its last backward reader. Not where Inductor leaves the layout alone (a grouped convolution)."""
    from sac_compiler.passes import memory_rules

    x = torch.randn(8, 3, 32, 32)
    graph = _joint(_WideConvNet(), x, target_device="cuda")
    placeholders = {n.name: n for n in graph.gm.graph.nodes if n.op == "placeholder"}
    forward = memory_rules.forward_part(list(graph.gm.graph.nodes))
    assert memory_rules.layout_optimized(forward, "cuda")
    copies = {n.name: b for n, b in memory_rules.channels_last_copies(forward, "cuda").items()}
    weights = {placeholders[n].meta["val"].shape: n for n in placeholders}
    image, w1, w2, w3 = (weights[s] for s in [x.shape, (128, 3, 3, 3), (128, 128, 3, 3), (128, 128, 1, 1)])
    assert copies == {image: x.numel() * 4, w1: 128 * 27 * 4, w2: 128 * 128 * 9 * 4}
    assert w3 not in copies

    def joint(off=()):
        return annotate_memory(graph.gm, target_device="cuda", num_fwd_outputs=graph.num_fwd_outputs,
                               fused_pointwise=True, annotate=False, disabled_rules=off)

    on, off = joint(), joint(("channels_last_copies",))
    held = [life for life in on.lifetimes if life.rule == "channels_last_copies"]
    assert sorted(life.nbytes for life in held) == sorted(-(-b // 512) * 512 for b in copies.values())
    assert all(life.alloc_step == 0 and life.free_step >= on.first_backward for life in held)
    assert 0 < on.peak_bytes - off.peak_bytes <= sum(life.nbytes for life in held)
    partitioned = {o: _partitioned(graph, fused_pointwise=True, disabled_rules=o) for o in ((), ("channels_last_copies",))}
    fw_lives, bw_lives = partitioned[()].lifetimes
    assert {life.name for life in fw_lives if life.rule == "channels_last_copies"} == \
        {f"{name} (channels-last copy)" for name in copies}
    assert {life.name for life in bw_lives if life.rule == "channels_last_copies"} == \
        {f"{name} (channels-last copy)" for name in copies}
    assert 0 < partitioned[()].peak_bytes - partitioned[("channels_last_copies",)].peak_bytes <= sum(
        life.nbytes for life in held)
    # a grouped convolution: Inductor keeps the layout, nothing is copied
    grouped = _joint(_WideConvNet(groups=2), x, target_device="cuda")
    assert memory_rules.channels_last_copies(memory_rules.forward_part(list(grouped.gm.graph.nodes)), "cuda") == {}

