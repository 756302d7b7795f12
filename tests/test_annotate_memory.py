import operator

import pytest
import torch
import torch.nn as nn
from sac_compiler.passes import (
    MemoryCategory,
    annotate_memory,
    annotate_modules,
    annotate_ops,
    get_record,
)
from sac_compiler.passes.annotate_memory import round_allocation

from sac_compiler import capture_joint
from tests.models import Nested, TiedLinear


def _annotated(model, *inputs, **kwargs):
    graph = capture_joint(model, *inputs, **{k: v for k, v in kwargs.items() if k == "target_device"})
    annotate_modules(graph.gm)
    annotate_ops(graph.gm)
    sim = annotate_memory(graph.gm, **{k: v for k, v in kwargs.items() if k != "target_device"})
    return graph, sim


def test_bytes_views_and_categories():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    graph, _ = _annotated(model, torch.randn(16, 64))
    by_name = {n.name: n for n in graph.gm.graph.nodes}
    rec = {name: get_record(n) for name, n in by_name.items() if n.op != "output"}
    assert rec["primals_1"].nbytes == 64 * 32 * 4 and rec["primals_1"].category == MemoryCategory.PARAMETER
    assert rec["primals_3"].category == MemoryCategory.INPUT
    assert rec["addmm"].nbytes == 16 * 32 * 4
    assert rec["t"].nbytes == 0 and rec["t"].storage_owner == "primals_1"  # a view of the weight
    assert rec["relu"].category == MemoryCategory.ACTIVATION  # alive into backward
    grads = [r for r in rec.values() if r.category == MemoryCategory.GRADIENT and r.nbytes]
    assert sum(r.nbytes for r in grads) == sum(p.numel() * 4 for p in model.parameters())


def test_peak_by_hand():
    # Linear(4096 -> 4096, no bias) on a [1024, 4096] fp32 input, output summed by the caller.
    model = nn.Linear(4096, 4096, bias=False)
    graph, sim = _annotated(model, torch.randn(1024, 4096))
    mib = 2**20
    weight, x, out = 64 * mib, 16 * mib, 16 * mib
    # forward: weight + x + out; the caller drops the output (model(x).sum().backward()), then
    # backward adds the tangent (16 MiB) and the weight grad (64 MiB); x is saved for the weight grad.
    assert sim.end_of_forward_bytes == weight + x + out
    assert sim.peak_bytes == weight + x + 16 * mib + 64 * mib
    assert sim.static_bytes == weight + x


def test_cuda_allocator_rounding():
    assert round_allocation(1, "cuda") == 512
    assert round_allocation(513, "cuda") == 1024
    assert round_allocation(513, "cpu") == 513
    assert round_allocation(0, "cuda") == 0
    graph, sim_cuda = _annotated(nn.Linear(3, 3), torch.randn(1, 3), target_device="cuda")
    bias = next(n for n in graph.gm.graph.nodes if n.name == "primals_2")
    assert get_record(bias).nbytes == 12 and get_record(bias).alloc_bytes == 512


def test_shared_parameters_counted_once():
    model = TiedLinear(64)
    graph, sim = _annotated(model, torch.randn(8, 64))
    param_bytes = sum(p.numel() * 4 for p in model.parameters())  # parameters() yields the tied weight once
    assert sim.peak_by_category[MemoryCategory.PARAMETER] == param_bytes


def test_module_snapshots_and_optimizer_state():
    model = Nested(dim=32, n_layers=2)
    opt = torch.optim.Adam(model.parameters())
    graph, sim = _annotated(model, torch.randn(64, 32), optimizer=opt)
    param_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert sim.optimizer_state_bytes == 2 * param_bytes
    assert sim.optimizer_step_peak_bytes >= sim.static_bytes + param_bytes  # + gradients
    layer0 = sim.module_memory["Nested.layers.0"]
    assert layer0.post_fw > layer0.pre_fw  # the block leaves activations behind for backward
    assert layer0.peak_fw >= layer0.post_fw and layer0.peak_bw > 0
    assert sim.snapshot("peak")["Total"] == sim.peak_bytes
    with pytest.raises(ValueError, match="'peak' or 'current'"):
        sim.snapshot("max")


def test_optimizer_state_explicit_and_unknown():
    graph = capture_joint(nn.Linear(8, 8), torch.randn(2, 8))
    annotate_ops(graph.gm)
    assert annotate_memory(graph.gm, optimizer_state_bytes=1000).optimizer_state_bytes == 1000

    class Custom(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {})

    with pytest.raises(ValueError, match="cannot estimate the state of Custom"):
        annotate_memory(graph.gm, optimizer=Custom(nn.Linear(8, 8).parameters()))


def test_fused_pointwise_drops_intermediate_buffers():
    class Chain(nn.Module):
        def forward(self, x):
            # backward reads only exp's output: the scaled and shifted intermediates are fused away
            return ((x * 2 + 1) * 3).exp()

    x = torch.randn(256, 256, requires_grad=True)
    graph, plain = _annotated(Chain(), x)
    fused = annotate_memory(graph.gm, fused_pointwise=True)

    def forward_peak(sim):
        return max(sim.step_peaks[: sim.first_backward])

    # plain: x, and two intermediates at once; fused: x and exp's output only
    assert forward_peak(plain) == 3 * 256 * 1024
    assert forward_peak(fused) == 2 * 256 * 1024
    assert fused.peak_bytes <= plain.peak_bytes


def test_user_checkpoint_frees_activations_until_backward():
    from tests.models import CheckpointedMLP

    x = torch.randn(256, 128)
    _, plain = _annotated(CheckpointedMLP(4, 128, use_ac=False), x)
    _, ac = _annotated(CheckpointedMLP(4, 128, use_ac=True), x)
    # Three of four blocks are checkpointed: the ReLU output inside each (256 x 256 fp32 = 256 KiB)
    # is not kept through the forward but rematerialised in backward. At the last forward step the
    # last block's own values are still being computed, so two blocks' worth are gone by then.
    assert plain.end_of_forward_bytes - ac.end_of_forward_bytes == 2 * 256 * 256 * 4
    assert ac.peak_bytes < plain.peak_bytes


def test_partitioned_peak_keeps_saved_views_and_never_frees_a_parameter():
    """A saved view keeps its allocation alive; a saved view of a parameter frees nothing in backward."""
    import torch.fx as fx
    from sac_compiler.passes.annotate_memory import simulate_partitioned

    def val(*shape):
        return torch.empty(*shape)

    fw = fx.Graph()
    w = fw.placeholder("primals_1")
    w.meta["val"] = val(256, 256)  # 256 KiB
    x = fw.placeholder("primals_2")
    x.meta["val"] = val(256, 256)
    h = fw.call_function(torch.ops.aten.mm.default, (x, w))
    h.meta["val"] = val(256, 256)
    hv = fw.call_function(torch.ops.aten.view.default, (h, [65536]))
    hv.meta["val"] = val(65536)
    wt = fw.call_function(torch.ops.aten.t.default, (w,))
    wt.meta["val"] = val(256, 256)
    s = fw.call_function(torch.ops.aten.sum.default, (h,))
    s.meta["val"] = val(())
    fw.output((s, hv, wt))

    bw = fx.Graph()
    hv_in = bw.placeholder("view")
    hv_in.meta["val"] = val(65536)
    wt_in = bw.placeholder("t")
    wt_in.meta["val"] = val(256, 256)
    tangent = bw.placeholder("tangents_1")
    tangent.meta["val"] = val(())
    g = bw.call_function(torch.ops.aten.mul.Tensor, (hv_in, tangent))
    g.meta["val"] = val(65536)
    gw = bw.call_function(torch.ops.aten.mm.default, (wt_in, wt_in))
    gw.meta["val"] = val(256, 256)
    big = bw.call_function(torch.ops.aten.repeat.default, (gw, [2, 2]))
    big.meta["val"] = val(512, 512)  # 1 MiB, after the saved t's last use
    bw.output((g, gw, big))
    fw_gm, bw_gm = fx.GraphModule({}, fw), fx.GraphModule({}, bw)
    # names as the partitioner gives them: backward placeholders carry the saved forward nodes' names
    hv.name, wt.name = "view", "t"
    fw_gm.recompile()

    peak = simulate_partitioned(fw_gm, bw_gm, 1, static_names={"primals_1", "primals_2"}, target_device="cpu")
    kib = 1024
    # forward: w, x, h (256 KiB each) and the scalar; h stays for backward through its saved view
    assert peak.saved_bytes == 256 * kib
    # backward: w, x, h and the scalar tangent; g (256 KiB, kept: a gradient); h and the tangent
    # freed after g (their last use); gw (256 KiB); big (1 MiB). At big: w, x, g, gw, big.
    # Freeing the saved t (a view of w) after gw would wrongly drop 256 KiB of w before big. (The
    # backward's mm is named like the forward's: allocations are matched by graph, not by name.)
    assert peak.peak_graph == "backward" and peak.peak_node == "repeat_default"
    assert peak.peak_bytes == (2 + 1 + 1 + 4) * 256 * kib
    # the live set at the peak names those allocations and sums to the peak
    live = peak.live_at_peak()
    assert sum(row[3] for row in live) == peak.peak_bytes
    assert (live[0][0], live[0][3]) == ("repeat_default", 4 * 256 * kib)
    assert "view" not in {row[0] for row in live}  # the saved view is freed by then (after gw)


def test_inductor_stores_a_fused_value_that_would_read_too_many_buffers():
    from sac_compiler.passes.annotate_memory import _inductor_inlined

    def chain_graph(length, readers_of_last):
        graph = torch.fx.Graph()
        inputs = []
        for i in range(length + 1):
            p = graph.placeholder(f"a{i}")
            p.meta["val"] = torch.empty(8, 8)
            inputs.append(p)
        chain = [inputs[0]]
        for i in range(1, length + 1):  # s_k = s_k-1 + a_k: folded, s_k reads a_0 .. a_k
            chain.append(graph.call_function(torch.ops.aten.add.Tensor, (chain[-1], inputs[i])))
        graph.output(tuple(graph.call_function(torch.ops.aten.mul.Tensor, (chain[-1], 2.0))
                           for _ in range(readers_of_last)))
        return chain[1:]

    # one reader each: folded while the accumulated reads stay at most 8; s_8 (9 reads) is stored
    chain = chain_graph(9, 1)
    inlined = _inductor_inlined(chain, lambda n: list(n.users), {})
    assert [n in inlined for n in chain] == [True] * 7 + [False, True]
    # several readers: stored past 4 reads
    for length, folded in ((3, True), (4, False)):
        chain = chain_graph(length, 2)
        assert (chain[-1] in _inductor_inlined(chain, lambda n: list(n.users), {})) == folded


def test_a_dropout_mask_drawn_again_inside_a_fused_chain_is_not_stored():
    import torch._inductor.inductor_prims  # noqa: F401  (registers prims.inductor_random)
    from sac_compiler.passes.annotate_memory import (
        _drawn_in_kernel,
        _fused_recompute_groups,
    )

    # rebuilt in backward: r = inductor_random(seed); keep = r > p; h = x + keep * y; g = h * 2
    graph = torch.fx.Graph()
    x, y, seed = graph.placeholder("x"), graph.placeholder("y"), graph.placeholder("seed")
    r = graph.call_function(torch.ops.prims.inductor_random.default, ([8, 8], seed, "rand"))
    keep = graph.call_function(torch.ops.aten.gt.Scalar, (r, 0.1))
    h = graph.call_function(torch.ops.aten.add.Tensor, (x, graph.call_function(torch.ops.aten.mul.Tensor, (keep, y))))
    g = graph.call_function(torch.ops.aten.mul.Tensor, (h, 2.0))
    graph.output((g, graph.call_function(torch.ops.aten.mm.default, (h, y))))
    members = {n for n in graph.nodes if n.op == "call_function" and n.target is not torch.ops.aten.mm.default}
    (group,) = _fused_recompute_groups(list(graph.nodes), members, {})
    assert r not in group and keep in group  # the draw is not pointwise: pulled in as an input
    assert _drawn_in_kernel(r, group, r.users)
    # a mask that a backward op also reads (dropout's backward) is stored
    later = graph.call_function(torch.ops.aten.mul.Tensor, (r, 3.0))
    assert not _drawn_in_kernel(r, group, r.users)
    assert not _drawn_in_kernel(keep, group, keep.users) and later in r.users  # only random draws


def test_the_partitioned_simulation_stores_no_mask_drawn_inside_a_fused_chain():
    import torch._inductor.inductor_prims  # noqa: F401  (registers prims.inductor_random)
    from sac_compiler.passes.annotate_memory import _graph_liveness

    def backward(mask_read_by_backward):
        graph = torch.fx.Graph()
        x, y = graph.placeholder("x"), graph.placeholder("y")
        seed = graph.placeholder("seed")
        x.meta["val"] = y.meta["val"] = torch.empty(64, 64)
        seed.meta["val"] = torch.empty((), dtype=torch.int64)

        def op(target, *args, val):
            node = graph.call_function(target, args)
            node.meta["val"] = val
            return node

        r = op(torch.ops.prims.inductor_random.default, [64, 64], seed, "rand", val=torch.empty(64, 64))
        keep = op(torch.ops.aten.gt.Scalar, r, 0.1, val=torch.empty(64, 64, dtype=torch.bool))
        h = op(torch.ops.aten.add.Tensor, x, op(torch.ops.aten.mul.Tensor, keep, y, val=torch.empty(64, 64)),
               val=torch.empty(64, 64))
        outs = [op(torch.ops.aten.mm.default, op(torch.ops.aten.mul.Tensor, h, 2.0, val=torch.empty(64, 64)), y,
                   val=torch.empty(64, 64)), op(torch.ops.aten.mm.default, h, y, val=torch.empty(64, 64))]
        if mask_read_by_backward:
            outs.append(op(torch.ops.aten.mm.default, r, y, val=torch.empty(64, 64)))
        graph.output(tuple(outs))
        gm = torch.fx.GraphModule(torch.nn.Module(), graph)
        recomputed = frozenset(n.name for n in graph.nodes
                               if n.op == "call_function" and n.target is not torch.ops.aten.mm.default)
        _, _, _, sizes, _ = _graph_liveness(gm, 0, set(), "cuda", True, recomputed=recomputed)
        return sizes[r.name]

    assert backward(mask_read_by_backward=False) == 0
    assert backward(mask_read_by_backward=True) == 64 * 64 * 4


def test_inductor_fills_a_16_bit_embedding_gradient_accumulator_as_backward_starts():
    # Inductor lowers embedding_dense_backward to a zero-filled fp32 accumulator that reads
    # nothing, so it is filled (and held) from the start of backward to the gradient's cast
    class Embed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(4096, 64, dtype=torch.bfloat16)
            self.proj = nn.Linear(64, 64, dtype=torch.bfloat16)

        def forward(self, tokens):
            return self.proj(self.emb(tokens))

    accumulator = 4096 * 64 * 4
    for fused in (False, True):
        graph, sim = _annotated(Embed(), torch.randint(0, 4096, (8, 32)), fused_pointwise=fused)
        nodes = list(graph.gm.graph.nodes)
        at = next(i for i, n in enumerate(nodes) if n.target == torch.ops.aten.embedding_dense_backward.default)
        fb = sim.first_backward
        rise = sim.step_peaks[fb] - sim.step_peaks[fb - 1]
        # held through the backward up to the gradient, which is made next to it
        assert (rise >= accumulator) == fused
        assert (min(sim.step_peaks[fb:at]) >= accumulator) == fused


def test_inductor_holds_a_freed_buffer_for_a_later_one_of_its_size():
    """Inductor's generated code hands a freed buffer to a later one of the same size instead of
    freeing it; in between it stays allocated (a graph run op by op frees it at once)."""
    from sac_compiler.passes.annotate_memory import _graph_liveness

    graph = torch.fx.Graph()
    x, w, big_w = graph.placeholder("x"), graph.placeholder("w"), graph.placeholder("big_w")
    x.meta["val"] = w.meta["val"] = torch.empty(64, 64)
    big_w.meta["val"] = torch.empty(64, 256)

    def mm(a, b, cols):
        node = graph.call_function(torch.ops.aten.mm.default, (a, b))
        node.meta["val"] = torch.empty(64, cols)
        return node

    first = mm(x, w, 64)  # 16 KiB, last read by `small`
    small = graph.call_function(torch.ops.aten.sum.default, (first,))
    small.meta["val"] = torch.empty(())
    big = mm(x, big_w, 256)  # 64 KiB, allocated while `first` is dead
    wide = graph.call_function(torch.ops.aten.sum.default, (big,))
    wide.meta["val"] = torch.empty(())
    later = mm(x, w, 64)  # 16 KiB: takes over `first`'s buffer under Inductor
    graph.output((small, wide, later))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    outputs = {small.name, wide.name, later.name}  # stay allocated: only `first` is freed
    peaks = {fused: _graph_liveness(gm, 0, outputs, "cuda", fused)[0] for fused in (False, True)}
    assert peaks[False] == 64 * 256 * 4 + 512  # `big` and the scalar `small`: `first` is freed
    assert peaks[True] == peaks[False] + 64 * 64 * 4  # `first` held for `later`


def test_inductor_frees_a_graph_input_without_reusing_it():
    """A graph input is deleted, never handed to a later buffer of its size (Inductor's wrapper
    keeps inputs out of its reuse pool): the partitioned simulation frees a saved value at its
    last use, and so does the joint simulation for a value forward saved for backward."""
    from sac_compiler.passes.annotate_memory import _graph_liveness

    graph, op, placeholder = _graph_builder()
    saved, w, big_w = (placeholder("saved", torch.empty(64, 64)), placeholder("w", torch.empty(64, 64)),
                       placeholder("big_w", torch.empty(64, 256)))
    small = op(torch.ops.aten.sum.default, saved, val=torch.empty(()))  # the saved value's last read
    big = op(torch.ops.aten.mm.default, w, big_w, val=torch.empty(64, 256))
    wide = op(torch.ops.aten.sum.default, big, val=torch.empty(()))
    later = op(torch.ops.aten.mm.default, w, w, val=torch.empty(64, 64))  # the saved value's size
    graph.output((small, wide, later))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    tile, inputs = 64 * 64 * 4, 64 * 64 * 4 * 2 + 64 * 256 * 4
    keep = {small.name, wide.name, later.name}
    peaks = {fused: _graph_liveness(gm, inputs, keep, "cuda", fused, static_storage=frozenset({"w", "big_w"}))[0]
             for fused in (False, True)}
    # at `wide`: the weights, `big` and the two scalars; the saved value is gone, under Inductor too
    assert peaks[True] == peaks[False] == inputs - tile + 64 * 256 * 4 + 2 * 512


def test_the_joint_simulation_frees_a_value_saved_for_backward_without_reusing_it():
    graph, op, placeholder = _graph_builder()
    x, w, big_w = (placeholder("x", torch.empty(64, 64)), placeholder("w", torch.empty(64, 64)),
                   placeholder("big_w", torch.empty(64, 256)))
    tangent = placeholder("tangents_1", torch.empty(()))
    saved = op(torch.ops.aten.mm.default, x, w, val=torch.empty(64, 64))  # forward, read in backward
    loss = op(torch.ops.aten.sum.default, saved, val=torch.empty(()))
    backward = [
        op(torch.ops.aten.mul.Tensor, saved, tangent, val=torch.empty(64, 64)),  # the saved value's last read
    ]
    backward.append(op(torch.ops.aten.sum.default, backward[0], val=torch.empty(())))
    backward.append(op(torch.ops.aten.mm.default, w, big_w, val=torch.empty(64, 256)))
    backward.append(op(torch.ops.aten.sum.default, backward[2], val=torch.empty(())))
    backward.append(op(torch.ops.aten.mm.default, w, w, val=torch.empty(64, 64)))  # the saved value's size
    for node in backward:
        node.meta["partitioner_tag"] = "is_backward"
    graph.output((loss, backward[1], backward[3], backward[4]))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    sims = {fused: annotate_memory(gm, num_fwd_outputs=1, fused_pointwise=fused, annotate=False)
            for fused in (False, True)}
    weights = 64 * 64 * 4 * 2 + 64 * 256 * 4
    # at the wide matmul's sum: the inputs, the two scalar gradients and the wide product; the
    # saved value is gone (deleted as an input of the backward graph, not held for `later`)
    assert sims[True].peak_bytes == sims[False].peak_bytes == weights + 4 + 4 + 64 * 256 * 4


def _graph_builder():
    graph = torch.fx.Graph()

    def op(target, *args, val):
        node = graph.call_function(target, args)
        node.meta["val"] = val
        return node

    def placeholder(name, val):
        node = graph.placeholder(name)
        node.meta["val"] = val
        return node

    return graph, op, placeholder


def test_eager_matmul_copies_a_broadcast_operand():
    """The platform fact behind the broadcast rule: ATen clones a stride-0 matmul operand inside
    the op (Inductor fills a dense buffer before its extern matmul instead)."""
    from torch.profiler import ProfilerActivity, profile

    ones = torch.ones(()).expand(512, 512)  # the expanded tangent of loss.sum()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.mm(ones, torch.randn(512, 16))
    cloned = sum(e.cpu_memory_usage for e in prof.key_averages() if e.key == "aten::clone")
    assert cloned >= 512 * 512 * 4


def test_a_matmul_reading_a_broadcast_operand_holds_a_dense_copy_while_it_runs():
    from sac_compiler.passes.annotate_memory import _broadcast_copies, _graph_liveness

    graph, op, placeholder = _graph_builder()
    tangent = placeholder("tangents_1", torch.empty(()))
    w = placeholder("w", torch.empty(256, 32))
    grad = op(torch.ops.aten.expand.default, tangent, [128, 256], val=torch.empty(()).expand(128, 256))
    dense = op(torch.ops.aten.mul.Tensor, w, 2.0, val=torch.empty(256, 32))
    out = op(torch.ops.aten.mm.default, grad, dense, val=torch.empty(128, 32))
    graph.output((out,))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    copy = 128 * 256 * 4
    assert _broadcast_copies(out, "cpu") == copy and _broadcast_copies(dense, "cpu") == 0
    weight, scaled, product = 256 * 32 * 4, 256 * 32 * 4, 128 * 32 * 4
    for fused in (False, True):
        peak, peak_node, end, _, _ = _graph_liveness(gm, weight + 4, {out.name}, "cpu", fused,
                                                     static_storage=frozenset({"w"}))
        # the scaled weight and the product live at the matmul, with the copy of the broadcast grad
        assert (peak, peak_node) == (weight + 4 + scaled + product + copy, out.name)
        assert end == weight + product  # the copy is gone after it, and the tangent with it
    # the joint simulation counts it too
    sim = annotate_memory(gm, num_fwd_outputs=1, fused_pointwise=False, annotate=False)
    assert sim.peak_bytes - sim.static_bytes >= copy


def _attention_backward_graph(dtype, batch=2, heads=4, seq=256, dim=64, scaled_grad=False, mask=None):
    """One memory-efficient attention backward; ``mask``: its additive mask, "folded" (a padding
    mask made additive in the graph, then expanded) or "stored" (a graph input, expanded)."""
    graph, op, placeholder = _graph_builder()
    shape = (batch, heads, seq, dim)
    grad, q, k, v, out = (placeholder(n, torch.empty(shape, dtype=dtype)) for n in ("g", "q", "k", "v", "o"))
    if scaled_grad:  # a gradient made in the graph, dying in the attention backward
        grad = op(torch.ops.aten.mul.Tensor, grad, 2.0, val=torch.empty(shape, dtype=dtype))
    bias = None
    if mask is not None:
        padding = placeholder("padding", torch.empty(batch, 1, 1, seq, dtype=torch.bool))
        small = torch.empty(batch, 1, 1, seq, dtype=dtype)
        if mask == "folded":
            small_node = op(torch.ops.aten.where.self, padding, 0.0, float("-inf"), val=small)
        else:
            small_node = placeholder("additive", small)
        bias = op(torch.ops.aten.expand.default, small_node, [batch, heads, seq, seq],
                  val=small.expand(batch, heads, seq, seq))
    lse = placeholder("lse", torch.empty(batch, heads, seq))
    seed, offset = placeholder("seed", torch.empty((), dtype=torch.int64)), placeholder("off", torch.empty((), dtype=torch.int64))
    target = torch.ops.aten._scaled_dot_product_efficient_attention_backward.default
    grads = tuple(torch.empty(shape, dtype=dtype) for _ in range(3)) + (torch.empty(0),)
    bw = graph.call_function(target, (grad, q, k, v, bias, out, lse, seed, offset, 0.0, [True, True, True, False]))
    bw.meta["val"] = grads
    items = [op(operator.getitem, bw, i, val=grads[i]) for i in range(3)]
    graph.output(tuple(items))
    return torch.fx.GraphModule(torch.nn.Module(), graph), bw, shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_efficient_attention_backward_holds_a_workspace_while_it_runs(dtype):
    from sac_compiler.passes.annotate_memory import (
        _attention_backward_workspace,
        _graph_liveness,
    )

    gm, bw, shape = _attention_backward_graph(dtype)
    numel = torch.Size(shape).numel()
    delta = numel // shape[-1] * 4
    # the fp32 accumulator of the query's gradient with one delta, or for fp32 inputs first the
    # product grad_out * out and two deltas: whichever is larger
    expected = numel * 4 + (2 * delta if dtype == torch.float32 else delta)
    assert _attention_backward_workspace(bw, "cpu") == expected
    assert _attention_backward_workspace(next(iter(bw.users)), "cpu") == 0
    inputs = 5 * numel * torch.tensor([], dtype=dtype).element_size() + numel // shape[-1] * 4 + 16
    outputs = 3 * numel * torch.tensor([], dtype=dtype).element_size()
    for fused in (False, True):
        peak, peak_node, _, _, _ = _graph_liveness(gm, inputs, {n.name for n in bw.users}, "cpu", fused)
        assert (peak, peak_node) == (inputs + outputs + expected, bw.name)


def test_a_multi_output_op_writes_its_outputs_while_its_inputs_live():
    """Its outputs exist as it runs, before what dies in it is freed: both simulations allocate
    them at the op's step, not at their getitems' (which come after the inputs are freed)."""
    from sac_compiler.passes.annotate_memory import (
        _attention_backward_workspace,
        _graph_liveness,
    )

    gm, bw, shape = _attention_backward_graph(torch.float32, scaled_grad=True)
    tensor = torch.Size(shape).numel() * 4
    workspace = _attention_backward_workspace(bw, "cpu")
    placeholders = sum(n.meta["val"].numel() * n.meta["val"].element_size()
                       for n in gm.graph.nodes if n.op == "placeholder")
    # the scaled gradient dies in the op: it, the three gradients and the workspace live at once
    expected = tensor + 3 * tensor + workspace
    for fused in (False, True):
        peak, peak_node, _, _, _ = _graph_liveness(gm, placeholders, {n.name for n in bw.users}, "cpu", fused,
                                                   static_storage=frozenset(n.name for n in gm.graph.nodes
                                                                            if n.op == "placeholder"))
        assert (peak - placeholders, peak_node) == (expected, bw.name)
    sim = annotate_memory(gm, num_fwd_outputs=0, fused_pointwise=False, annotate=False)
    assert sim.peak_bytes - sim.static_bytes == expected


def _gelu_backward_graph(n=1024, d=2048, h=256, e=64):
    """A backward graph as partitioned for an FFN whose erf GELU is recomputed: the gradient of
    the FC2 output ``g``, the saved FC1 output ``a``; the GELU is rebuilt for FC2's weight
    gradient, and the GELU backward reads ``a`` too."""
    graph, op, placeholder = _graph_builder()
    aten = torch.ops.aten
    g, w2 = placeholder("g", torch.empty(n, d)), placeholder("w2", torch.empty(d, h))
    a, w1 = placeholder("a", torch.empty(n, h)), placeholder("w1", torch.empty(h, e))

    def big(target, *args):
        return op(target, *args, val=torch.empty(n, h))

    dgelu = big(aten.mm.default, g, w2)
    half, scaled = big(aten.mul.Tensor, a, 0.5), big(aten.mul.Tensor, a, 0.7071)
    erf = big(aten.erf.default, scaled)
    one_plus = big(aten.add.Tensor, erf, 1)
    gelu = big(aten.mul.Tensor, half, one_plus)
    weight_grad = op(aten.mm.default, op(aten.permute.default, g, [1, 0], val=torch.empty(d, n)), gelu,
                     val=torch.empty(d, h))
    b1, sq = big(aten.mul.Tensor, one_plus, 0.5), big(aten.mul.Tensor, a, a)
    b2 = big(aten.mul.Tensor, a, big(aten.exp.default, sq))
    grad_a = big(aten.mul.Tensor, dgelu, big(aten.add.Tensor, b1, b2))
    grad_x = op(aten.mm.default, grad_a, w1, val=torch.empty(n, e))
    graph.output((weight_grad, grad_x))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    return gm, frozenset(x.name for x in (half, scaled, erf, one_plus, gelu)), (dgelu, gelu, weight_grad, grad_a, half)


def test_inductor_runs_a_backward_kernel_sharing_a_rebuild_kernels_reads_inside_it():
    from sac_compiler.passes.annotate_memory import _graph_liveness

    gm, recomputed, (dgelu, gelu, weight_grad, grad_a, half) = _gelu_backward_graph()
    out = next(iter(gm.graph.find_nodes(op="output")))
    keep, static = {n.name for n in out.args[0]}, frozenset({"g", "w2", "w1"})
    placeholders = sum(p.meta["val"].numel() * 4 for p in gm.graph.nodes if p.op == "placeholder")
    buffer, wgrad, grad_x = 1024 * 256 * 4, 2048 * 256 * 4, 1024 * 64 * 4
    # the GELU backward runs in the kernel rebuilding the GELU and writes into the dying dgelu;
    # the FC1 output dies there too, so the weight gradient's matmul finds the gradient and the
    # rebuilt GELU only
    peak, peak_node, end, _, _ = _graph_liveness(gm, placeholders, keep, "cpu", True, static_storage=static,
                                                 recomputed=recomputed)
    assert (peak, peak_node) == (placeholders - buffer + 2 * buffer + wgrad, weight_grad.name)
    assert end == placeholders - buffer + wgrad + grad_x
    # in graph order (the same graph without the rebuild) the FC1 output and dgelu live until
    # the GELU backward, after the weight gradient's matmul
    peak, peak_node, _, _, _ = _graph_liveness(gm, placeholders, keep, "cpu", True, static_storage=static)
    assert (peak, peak_node) == (placeholders + 2 * buffer + wgrad, weight_grad.name)


def test_a_rebuild_kernel_does_not_write_into_an_input_a_later_kernel_rebuilds_from():
    """An input of a rebuild kernel that a later kernel reads again (through a value the rebuild
    computes without storing, which the later kernel computes anew) does not die in the rebuild:
    no output takes its buffer, and it lives until that later kernel."""
    from sac_compiler.passes.annotate_memory import _graph_liveness

    graph, op, placeholder = _graph_builder()
    aten, shape = torch.ops.aten, (256, 256)
    a, w = placeholder("a", torch.empty(shape)), placeholder("w", torch.empty(shape))
    half = op(aten.mul.Tensor, a, 0.5, val=torch.empty(shape))  # rebuilt, not stored
    rebuilt = op(aten.mul.Tensor, half, 3.0, val=torch.empty(shape))  # rebuilt, stored for the matmul
    product = op(aten.mm.default, rebuilt, w, val=torch.empty(shape))
    late = op(aten.mul.Tensor, half, product, val=torch.empty(shape))  # reads `half` again: needs `a`
    out = op(aten.mm.default, late, w, val=torch.empty(shape))
    graph.output((out,))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    tile = 256 * 256 * 4
    peak, _, _, _, _ = _graph_liveness(gm, 2 * tile, {out.name}, "cpu", True, static_storage=frozenset({"w"}),
                                       recomputed=frozenset({half.name, rebuilt.name}))
    # at the first matmul: w, a (still needed), the rebuilt value and the product
    assert peak == 4 * tile


def _mm_then_add(user_pointwise, dtype=torch.float32):
    graph, op, placeholder = _graph_builder()
    a, b = placeholder("a", torch.empty(64, 512)), placeholder("b", torch.empty(512, 64))
    c = placeholder("c", torch.empty(64, 64, dtype=dtype))
    mm = op(torch.ops.aten.mm.default, a, b, val=torch.empty(64, 64))
    d = placeholder("d", torch.empty(512, 512))
    big = op(torch.ops.aten.mm.default, a, d, val=torch.empty(64, 512))  # runs between the two
    small = op(torch.ops.aten.sum.default, big, val=torch.empty(()))
    add = op(torch.ops.aten.add.Tensor, mm, c, val=torch.empty(64, 64))
    result = op(torch.ops.aten.relu.default, add, val=torch.empty(64, 64)) if user_pointwise else add
    graph.output((result, small))
    return torch.fx.GraphModule(torch.nn.Module(), graph), mm, add


def test_inductor_folds_a_matmul_into_a_later_add():
    from sac_compiler.passes.annotate_memory import _graph_liveness, inductor_addmm

    gm, mm, add = _mm_then_add(user_pointwise=False)
    nodes = list(gm.graph.nodes)
    assert inductor_addmm(nodes, "cuda") == {mm: add}
    # on a GPU Inductor keeps the sum separate when only pointwise ops read it
    pointwise = list(_mm_then_add(user_pointwise=True)[0].graph.nodes)
    assert inductor_addmm(pointwise, "cuda") == {} and len(inductor_addmm(pointwise, "cpu")) == 1
    assert inductor_addmm(list(_mm_then_add(False, torch.float64)[0].graph.nodes), "cpu") == {}  # dtypes differ
    # folded, the product has no buffer of its own and is not alive while `big` is
    outputs = {n.name for n in nodes[-1].all_input_nodes}
    inputs = frozenset(n.name for n in nodes if n.op == "placeholder")
    eager_peak, eager_at = _graph_liveness(gm, 0, outputs, "cpu", False, static_storage=inputs)[:2]
    folded_peak, folded_at = _graph_liveness(gm, 0, outputs, "cpu", True, static_storage=inputs)[:2]
    assert eager_peak - folded_peak == 64 * 64 * 4  # the product, alive with `big` unfolded
    assert folded_peak == 64 * 512 * 4 + 4  # `big` and the scalar sum


def test_inductor_writes_a_matmul_and_a_later_add_as_one_addmm():
    """The platform fact behind the fold (CPU Inductor; on a GPU too when a non-pointwise op reads
    the sum)."""
    from torch._inductor.utils import run_and_get_code

    def f(a, b, c):
        return torch.mm(a, b) + c

    torch._dynamo.reset()
    args = (torch.randn(32, 16), torch.randn(16, 8), torch.randn(32, 8))
    out, (code,) = run_and_get_code(torch.compile(f), *args)
    assert "addmm" in code
    torch.testing.assert_close(out, f(*args))


def test_a_fused_rebuild_kernel_writes_an_output_into_a_dying_input():
    """A recomputed chain rebuilt in one kernel is the last reader of a saved value only it reads:
    the value dies there and the kernel writes an output of its size into its buffer."""
    from sac_compiler.passes.annotate_memory import _graph_liveness

    value, row = 64 * 64 * 4, 64 * 4

    def backward(saved_read_later):
        graph, op, placeholder = _graph_builder()
        h = placeholder("h", torch.empty(64, 64))  # saved: a matmul output only the chain reads
        w = placeholder("w", torch.empty(64, 64))
        g = placeholder("tangents_1", torch.empty(1, 64))
        rebuilt = op(torch.ops.aten.add.Tensor, h, 1.0, val=torch.empty(64, 64))
        normed = op(torch.ops.aten.mul.Tensor, rebuilt, 3.0, val=torch.empty(64, 64))
        grad_w = op(torch.ops.aten.mm.default, g, normed, val=torch.empty(1, 64))
        grad_x = op(torch.ops.aten.mm.default, g, w, val=torch.empty(1, 64))
        outs = [grad_w, grad_x]
        if saved_read_later:
            outs.append(op(torch.ops.aten.mm.default, grad_x, h, val=torch.empty(1, 64)))
        graph.output(tuple(outs))
        gm = torch.fx.GraphModule(torch.nn.Module(), graph)
        keep = {n.name for n in outs}
        storage = {"h": ("h", value)}
        return _graph_liveness(gm, value + row, keep, "cpu", True, storage, frozenset({"w"}),
                               frozenset({rebuilt.name, normed.name}))[0]

    # dying, h's buffer holds the rebuilt value: the peak is h, the tangent and grad_w
    assert backward(saved_read_later=False) == value + row + row
    # read later, h lives beside the rebuilt value
    assert backward(saved_read_later=True) == 2 * value + 2 * row  # and grad_w, made next


def test_rebuilding_one_output_of_a_multi_output_op_needs_the_ops_inputs_then():
    """Recomputing attention's output reruns the attention, which reads q, k and v: recomputed too,
    they must exist when the output is rebuilt (its first backward reader), not only at their own
    first backward read, as PyTorch's partitioner places them."""
    from sac_compiler.passes.annotate_memory import _backward_needs

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    q = graph.call_function(torch.ops.aten.mul.Tensor, (x, 2.0))  # forward, recomputed
    pair = graph.call_function(torch.ops.aten.var_mean.correction, (q,))  # a multi-output op
    out = graph.call_function(operator.getitem, (pair, 0))  # recomputed
    early = graph.call_function(torch.ops.aten.mul.Tensor, (out, 3.0))  # backward: reads out
    late = graph.call_function(torch.ops.aten.mul.Tensor, (q, 4.0))  # backward: reads q, later
    for node in (early, late):
        node.meta["partitioner_tag"] = "is_backward"
    graph.output((early, late))
    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    owner = {n: n for n in nodes}
    uses_of = {}
    for node in nodes:
        for arg in node.all_input_nodes:
            uses_of.setdefault(arg, set()).add(index[node])
    needs = _backward_needs(nodes, owner, index, uses_of, {q.name, out.name}, index[early])
    assert needs[out] == {index[early]}
    assert needs[q] == {index[early], index[late]}  # rebuilt for the rerun of var_mean, kept to its read


def test_a_tight_eager_budget_is_met_or_refused():
    """At 30% of a 3-layer Llama's activations (cross-entropy loss, eager route) plans recomputing
    attention outputs peaked 9% over the budget in the partitioned graphs while the joint
    simulation said they fit; the budget is now met or refused before anything runs."""
    import torch.nn.functional as F

    from benchmarks.compare_strategies import Llama, LlamaArgs
    from sac_compiler.plan_graph import BudgetError
    from tests.test_plan import recording_backend

    args = LlamaArgs(layers=3, dim=64, heads=4, ffn=176, vocab=256, batch=4, seq=64)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Llama(args)
    tokens, targets = torch.randint(0, 256, (4, 64)), torch.randint(0, 256, (4, 64))

    def loss(t, y):
        return F.cross_entropy(model(t).flatten(0, 1).float(), y.flatten())

    backend, records = recording_backend(memory_budget=0.3, compiler="eager")
    try:
        torch.compile(loss, backend=backend)(tokens, targets).backward()
    except Exception as error:  # Dynamo wraps the backend's error
        assert isinstance(error.__cause__ or error, BudgetError) or "BudgetError" in str(error)
        assert "raise memory_budget to at least" in str(error)
        return
    result, _fw, _bw = records[-1]
    assert result.partitioned.peak_bytes <= result.budget_bytes


def test_the_joint_simulation_writes_a_rebuilt_value_into_a_kept_one_dying_in_its_kernel():
    """``mm`` is kept only to rebuild ``(mm + 1) * 3`` for the weight gradient; rebuilt in one
    fused kernel, the product takes over ``mm``'s buffer instead of a new one."""

    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(64, 64))
            self.w2 = nn.Parameter(torch.randn(64, 64))

        def forward(self, x):
            return ((x @ self.w + 1) * 3) @ self.w2

    graph, _ = _annotated(Chain(), torch.randn(128, 64))
    sim = annotate_memory(graph.gm, fused_pointwise=True, recomputed={"add", "mul"}, annotate=False)
    names = [n for n, _ in sim.timeline]
    at = names.index("mm_2")  # the weight gradient: the chain's first backward reader
    rise = sim.step_peaks[at] - sim.timeline[at - 1][1]
    assert rise == 64 * 64 * 4  # the gradient only: the rebuilt product lives in mm's buffer


def _column_reductions_graph(shared: bool):
    """Two norm-like weight gradients (column sums) with a weight-gradient matmul between them; the
    second reads the first's saved base ``x`` when ``shared``, else a buffer of its own."""
    graph, op, placeholder = _graph_builder()
    aten = torch.ops.aten
    n, d, k = 1024, 256, 512
    x, m, y = (placeholder(name, torch.empty(n, d)) for name in ("x", "m", "y"))
    g1, big, gk = placeholder("g1", torch.empty(n, d)), placeholder("big", torch.empty(n, k)), placeholder("gk", torch.empty(n, k))
    w = placeholder("w", torch.empty(k, d))
    t = op(aten.mul.Tensor, big, 2.0, val=torch.empty(n, k))  # a matmul's input: stored
    rebuilt = op(aten.add.Tensor, x, m, val=torch.empty(n, d))  # a residual rebuilt inline
    c1 = op(aten.sum.dim_IntList, op(aten.mul.Tensor, g1, rebuilt, val=torch.empty(n, d)), [0], val=torch.empty(d))
    wgrad = op(aten.mm.default, op(aten.permute.default, t, [1, 0], val=torch.empty(k, n)), g1, val=torch.empty(k, d))
    g2 = op(aten.mm.default, gk, w, val=torch.empty(n, d))
    c2 = op(aten.sum.dim_IntList, op(aten.mul.Tensor, g2, x if shared else y, val=torch.empty(n, d)), [0],
            val=torch.empty(d))
    graph.output((c1, wgrad, c2))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    return gm, (wgrad, c2), (n, d, k)


def test_inductor_runs_column_reductions_reading_a_common_buffer_as_one_kernel():
    from sac_compiler.passes.annotate_memory import _graph_liveness

    static = frozenset({"x", "m", "y", "g1", "big", "gk", "w"})
    for shared in (False, True):
        gm, (wgrad, c2), (n, d, k) = _column_reductions_graph(shared)
        placeholders = sum(p.meta["val"].numel() * 4 for p in gm.graph.nodes if p.op == "placeholder")
        out = next(iter(gm.graph.find_nodes(op="output")))
        keep = {a.name for a in out.args[0]}
        peak, peak_node, _, _, _ = _graph_liveness(gm, placeholders, keep, "cpu", True, static_storage=static)
        if shared:
            # one kernel for both sums: the second's matmul is pulled ahead of the weight-gradient
            # matmul, whose input t lives through it
            assert (peak, peak_node) == (placeholders + 4 * (n * k + n * d + 2 * d), c2.name)
        else:
            # graph order: t dies in the weight-gradient matmul (the first sum is made), before
            # the second matmul runs
            assert (peak, peak_node) == (placeholders + 4 * (n * k + k * d + d), wgrad.name)


def test_a_recomputed_value_only_backward_reads_is_not_made_in_forward():
    """A forward value that only backward reads (Inductor's joint passes compute the one-hot of a
    cross-entropy's targets apart, beside the backward) is, once recomputed, left out of the
    forward graph by the partitioner and folded into the backward kernel that reads it: no
    allocation at all, where it was counted twice (at its own step and rebuilt in backward)."""
    from sac_compiler.passes.record import Side

    aten = torch.ops.aten
    graph, op, placeholder = _graph_builder()
    x, w = placeholder("x", torch.empty(64, 1000)), placeholder("w", torch.empty(1000, 1000))
    g = placeholder("tangents_1", torch.empty(64, 1000))
    out = op(aten.mm.default, x, w, val=torch.empty(64, 1000))
    grad0 = op(aten.mul.Tensor, g, 3.0, val=torch.empty(64, 1000))
    onehot = op(aten.mul.Tensor, x, 2.0, val=torch.empty(64, 1000))  # forward side: reads no tangent
    grad = op(aten.mul.Tensor, grad0, onehot, val=torch.empty(64, 1000))
    gsum = op(aten.sum.dim_IntList, grad, [0], val=torch.empty(1000))
    graph.output((out, gsum))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    annotate_modules(gm, "")
    annotate_ops(gm)
    assert get_record(onehot).side == Side.FORWARD
    kept = annotate_memory(gm, fused_pointwise=True, annotate=False, num_fwd_outputs=1, recomputed=set())
    rebuilt = annotate_memory(gm, fused_pointwise=True, annotate=False, num_fwd_outputs=1, recomputed={onehot.name})
    value = 64 * 1000 * 4
    assert [life.nbytes for life in kept.lifetimes if life.name == onehot.name] == [value]
    assert sum(life.nbytes for life in rebuilt.lifetimes if life.name == onehot.name) == 0
    assert kept.peak_bytes - rebuilt.peak_bytes == value


def test_gradients_made_before_the_graphs_backward_are_counted_from_it_to_the_optimizer_step():
    """``gradients_held``: gradients of parameters the graph does not read that the step's backward
    made before the graph's own (a graph before a graph break). The joint simulation counts them
    from the first backward node through the optimizer step, the partitioned one as its backward
    starts; forward is unchanged."""
    from sac_compiler.passes.annotate_memory import simulate_partitioned
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    held = 3 * 2**20
    model = Nested(dim=64, n_layers=2)
    x = torch.randn(128, 64)
    optimizer = torch.optim.AdamW(model.parameters())
    graph, without = _annotated(model, x, optimizer=optimizer)
    with_held = annotate_memory(graph.gm, optimizer=optimizer, gradients_held=held, annotate=False)
    fb = without.first_backward
    assert with_held.step_peaks[:fb] == without.step_peaks[:fb]
    assert all(b - a == held for a, b in zip(without.step_peaks[fb:], with_held.step_peaks[fb:]))
    assert with_held.optimizer_step_peak_bytes - without.optimizer_step_peak_bytes == held
    fw, bw = min_cut_rematerialization_partition(graph.gm, [], num_fwd_outputs=graph.num_fwd_outputs)
    static = {n.name for n in fw.graph.nodes if n.op == "placeholder"}
    timelines = [{}, {}]
    apart = [simulate_partitioned(fw, bw, graph.num_fwd_outputs, static, target_device="cpu", gradients_held=h,
                                  timelines=t) for h, t in zip((0, held), timelines)]
    assert apart[1].peak_graph == "backward" and apart[1].peak_bytes - apart[0].peak_bytes == held
    assert timelines[1]["forward"] == timelines[0]["forward"]
    assert all(b - a == held for (_, a), (_, b) in zip(timelines[0]["backward"], timelines[1]["backward"]))
