"""GPU-only checks (skipped without CUDA): CUDA fake capture, benchmark mode, predicted vs real peak."""

import pytest
import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode

from tests.conftest import requires_cuda
from tests.models import CheckpointedMLP, LinearReLUStack

pytestmark = [requires_cuda, pytest.mark.gpu]


def _seed002_dummy():
    model = LinearReLUStack(4, 512, torch.bfloat16).cuda()
    return model, (torch.randn(16, 512, device="cuda", dtype=torch.bfloat16),), torch.optim.Adam(model.parameters(), foreach=True)


def _seed002_ac():
    model = CheckpointedMLP(4, 1024, torch.float16, use_ac=True).cuda()
    x = torch.randn(128, 1024, 1024, device="cuda", dtype=torch.float16)
    return model, (x,), torch.optim.Adam(model.parameters(), foreach=True)


def _seed000_transformer():
    from torch.testing._internal.distributed._tensor.common_dtensor import (
        ModelArgs,
        Transformer,
    )

    args = ModelArgs(n_layers=4, n_heads=12, vocab_size=8192, max_seq_len=1024, dim=768, dropout_p=0.1)
    model = Transformer(args).cuda()
    tokens = torch.randint(0, args.vocab_size, (8, args.max_seq_len), device="cuda")
    return model, (tokens,), torch.optim.Adam(model.parameters(), lr=1e-2, foreach=True)


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
@pytest.mark.parametrize("build", [_seed002_dummy, _seed002_ac, _seed000_transformer],
                         ids=["seed002-dummy-bf16", "seed002-ac-fp16", "seed000-transformer"])
def test_predicted_peak_within_10_percent(build, compiler):
    from sac_compiler.validate import measure_training_peak

    predicted, measured = measure_training_peak(build, compiler=compiler)
    print(f"\n{build.__name__} [{compiler}] {torch.cuda.get_device_name()} torch {torch.__version__}: "
          f"predicted {predicted / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB, ratio {predicted / measured:.3f}")
    assert predicted / measured == pytest.approx(1.0, abs=0.10)


def test_cuda_fake_capture_seed_style():
    from sac_compiler import capture_joint

    with FakeTensorMode():
        with torch.device("cuda"):
            model = nn.Sequential(nn.Linear(4096, 4096), nn.GELU(), nn.Linear(4096, 4096))
        x = torch.randn(8192, 4096, device="cuda")
        before = torch.cuda.memory_allocated()
        graph = capture_joint(model, x)
    assert torch.cuda.memory_allocated() == before  # nothing real was allocated
    assert graph.trace_device.type == "cuda" and graph.target_device.type == "cuda"


def test_benchmark_mode_times_ops():
    from sac_compiler.passes import annotate_ops, annotate_runtime, get_record

    from sac_compiler import capture_joint
    from sac_compiler.analysis import resolve_device_spec

    model = nn.Linear(4096, 4096, device="cuda", dtype=torch.bfloat16)
    graph = capture_joint(model, torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16))
    annotate_ops(graph.gm)
    spec = resolve_device_spec("auto")
    annotate_runtime(graph.gm, spec, mode="benchmark")
    mm = next(n for n in graph.gm.graph.nodes if n.target == torch.ops.aten.addmm.default)
    measured = get_record(mm).runtime_ms
    annotate_runtime(graph.gm, spec, mode="cost-model")
    rec = get_record(mm)
    estimated = rec.runtime_ms
    roofline = 1e3 * spec.seconds_for(rec.flops, rec.bytes_accessed, torch.bfloat16)  # the datasheet's bound
    print(f"\naddmm 4096^3 bf16 on {torch.cuda.get_device_name()}: benchmark {measured:.4f} ms, "
          f"cost model {estimated:.4f} ms, datasheet roofline {roofline:.4f} ms")
    assert roofline <= measured
    assert 0.75 * measured < estimated < 1.33 * measured  # at the achieved fraction of the peak


def _seed_estimate(mode):
    from torch.testing._internal.distributed._tensor.common_dtensor import (
        ModelArgs,
        Transformer,
    )

    from sac_compiler.estimator import estimate

    with FakeTensorMode():
        with torch.device("cuda"):
            args = ModelArgs(n_layers=4, n_heads=12, vocab_size=8192, max_seq_len=1024, dim=768, dropout_p=0.1)
            model = Transformer(args)
        tokens = torch.randint(0, args.vocab_size, (8, args.max_seq_len), device="cuda")
        return estimate(model, tokens, mode=mode)


@pytest.mark.parametrize("mode", ["operator-level-benchmark", "operator-level-cost-model"])
def test_seed_000_transformer_estimation_on_cuda(mode):
    est = _seed_estimate(mode)
    est.pwlf_sac_tradeoff_curve(n_segments=2, save_tradeoff_graphs=False)
    stats = est.sac_mod_stats["Transformer.layers.0"]
    assert any("flash" in name or "efficient" in name for name in stats.func_names), stats.func_names
    assert stats.rand_ops  # dropout (and attention dropout) are random
    assert sum(stats.runtimes) > 0
    print(f"\n{mode}: layer 0 fw {sum(stats.runtimes):.3f} ms, {len(stats.func_names)} ops")


def test_seed_001_sac_milp_cases_on_cuda():
    from sac_compiler.module_info import (
        get_peak_memory_runtime_baseline,
        parse_module_info,
    )
    from sac_compiler.solvers import sac_milp

    graph = parse_module_info(_seed_estimate("operator-level-cost-model").module_info())
    peak, compute_ms = get_peak_memory_runtime_baseline(graph)
    print(f"\nbaseline peak {peak} bytes (seed, eager tools on an A100: 2583888896), compute {compute_ms:.2f} ms")
    decisions, recompute_ms, _ = sac_milp(graph, memory_budget=1.6, world_size=4)
    print(f"1.6 GiB: {decisions}, recompute {recompute_ms} ms ({recompute_ms / compute_ms:.3f} of compute)")
    assert set(decisions) == {f"Transformer.layers.{i}" for i in range(4)}
    loose = sac_milp(graph, memory_budget=2.4, world_size=4)
    print(f"2.4 GiB: {loose}")
    assert loose[0] == {} and loose[1] == 0 and loose[2] > 1
    # The seed's 0.8 GiB is impossible against its 2.58 GB eager baseline; this project's baseline is
    # lower (see benchmarks/seed_baseline.py), so "impossible" is asked below everything-discarded.
    print(f"0.8 GiB: {sac_milp(graph, memory_budget=0.8, world_size=4)}")
    assert sac_milp(graph, memory_budget=0.2 * peak / 2**30, world_size=4) == ({}, 0, -1)


def _seed_transformer_loss():
    from torch.testing._internal.distributed._tensor.common_dtensor import (
        ModelArgs,
        Transformer,
    )

    torch.manual_seed(0)
    args = ModelArgs(n_layers=4, n_heads=12, vocab_size=8192, max_seq_len=1024, dim=768, dropout_p=0.1)
    model = Transformer(args).cuda()
    tokens = torch.randint(0, args.vocab_size, (8, args.max_seq_len), device="cuda")

    def loss(t):
        return model(t).float().sum()

    return model, loss, tokens


def _measured_extra(model, compiled, tokens):
    """Peak bytes of one step over what was allocated before it (the step after the compiling one)."""
    compiled(tokens).backward()
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    compiled(tokens).backward()
    torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    return torch.cuda.max_memory_allocated() - before


@pytest.mark.parametrize("fraction", [0.75, 0.5, 0.25])
def test_planned_step_fits_the_budget_on_cuda(fraction):
    """A planned Inductor step stays under a budget that is a fraction of plain torch.compile's extra
    peak, and the backend predicts it within 5%; a budget it cannot meet is refused before running."""
    from sac_compiler.plan_graph import BudgetError
    from tests.test_plan import recording_backend

    model, loss, tokens = _seed_transformer_loss()
    torch._dynamo.reset()
    plain_extra = _measured_extra(model, torch.compile(loss), tokens)
    static = torch.cuda.memory_allocated()
    budget = int(static + fraction * plain_extra)
    torch._dynamo.reset()
    backend, records = recording_backend(memory_budget=budget, enforce_budget=False)  # the first plan's peak
    try:
        measured_extra = _measured_extra(model, torch.compile(loss, backend=backend), tokens)
    except Exception as error:  # Dynamo wraps the backend's error
        assert isinstance(error.__cause__ or error, BudgetError) or "BudgetError" in str(error)
        assert "smallest feasible peak" in str(error)
        print(f"\nfraction {fraction}: budget {budget / 2**30:.3f} GiB refused: {str(error)[-300:]}")
        assert fraction < 0.5, "budgets of half of plain torch.compile's extra peak and more must be met"
        return
    (result, _fw, _bw), = records
    predicted_extra = result.partitioned.peak_bytes - result.analysis.memory.static_bytes - result.outside_bytes
    print(f"\nfraction {fraction}: budget extra {(budget - static) / 2**30:.3f} GiB, measured {measured_extra / 2**30:.3f}, "
          f"predicted {predicted_extra / 2**30:.3f}, plain compile {plain_extra / 2**30:.3f}, "
          f"{len(result.plan.recompute)} values recomputed ({result.plan.status})")
    assert measured_extra <= budget - static
    assert predicted_extra == pytest.approx(measured_extra, rel=0.05)


def test_auto_checks_the_plan_on_the_schedule_its_compile_makes_on_cuda(monkeypatch):
    """``partition_order="auto"`` on a GPU: the compile of the graphs reads Inductor's CUDA
    schedule of the backward it compiles (no lowering apart), the plan checked there is the one
    that runs, under its budget and predicted within 5%."""
    import functools

    from sac_compiler.backend import compile_graph
    from sac_compiler.config import SACConfig
    from tests.test_inductor_order import recording_compiles

    lowerings, ran, Recording = recording_compiles(monkeypatch)
    model, loss, tokens = _seed_transformer_loss()
    torch._dynamo.reset()
    plain_extra = _measured_extra(model, torch.compile(loss), tokens)
    static = torch.cuda.memory_allocated()
    budget = int(static + 0.5 * plain_extra)
    torch._dynamo.reset()
    config = SACConfig.from_options({"memory_budget": budget, "enforce_budget": False, "partition_order": "auto"})
    backend = functools.partial(compile_graph, config=config, partitioner_cls=Recording)
    measured_extra = _measured_extra(model, torch.compile(loss, backend=backend), tokens)
    partitioner = ran[-1]
    result = partitioner.last_result
    predicted_extra = result.partitioned.peak_bytes - result.analysis.memory.static_bytes - result.outside_bytes
    print(f"\nauto at 0.5: budget extra {(budget - static) / 2**30:.3f} GiB, measured {measured_extra / 2**30:.3f}, "
          f"predicted {predicted_extra / 2**30:.3f}, compiles {len(ran)}, lowerings apart {len(lowerings)}")
    if len(ran) == 1:  # the compile's schedule confirmed the plan
        assert lowerings == [] and len(partitioner.recorder.found) == 1
    else:  # it did not: compiled again, every plan checked in Inductor's order
        assert ran[0].over_in_inductor_order and partitioner.config.partition_order == "inductor"
    assert measured_extra <= budget - static
    assert predicted_extra == pytest.approx(measured_extra, rel=0.05)


def test_backend_with_benchmark_mode_times_ops_inside_the_compile():
    """estimate_mode="benchmark": the backend times the joint graph's ops on the GPU while
    AOTAutograd's fake mode is active (the timing runs on real tensors), and the planned step's
    gradients equal plain torch.compile's."""
    from sac_compiler.passes import get_record

    from tests.test_plan import recording_backend

    model, loss, tokens = _seed_transformer_loss()
    model.train(False)  # no dropout: the two compiles are compared exactly up to fp32 rounding
    torch._dynamo.reset()
    loss_ref = torch.compile(loss)
    loss_ref(tokens).backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    backend, records = recording_backend(memory_budget=0.5, estimate_mode="benchmark", compiler="eager")
    torch.compile(loss, backend=backend)(tokens).backward()
    (result, _fw, _bw), = records
    mms = [n for n in result.analysis.graph.gm.graph.nodes if n.target == torch.ops.aten.mm.default]
    assert mms and all(get_record(n).runtime_source == "benchmark" for n in mms)
    assert all(get_record(n).runtime_ms > 0 for n in mms)  # real kernels were timed
    assert result.plan is not None
    # fp32 sums in another order: the benchmark's sac-against-compile check differs by 5e-8 of the largest gradient
    scale = max(ref.abs().max().item() for ref in reference)
    for p, ref in zip(model.parameters(), reference):
        torch.testing.assert_close(p.grad, ref, rtol=1e-4, atol=1e-6 * scale)


def test_outside_bytes_counts_memory_beyond_the_graph_inputs():
    from sac_compiler.backend import outside_bytes

    weight = torch.empty(1024, 1024, device="cuda")
    held = torch.empty(16 * 2**20, dtype=torch.uint8, device="cuda")  # 16 MiB the graph never sees
    measured = outside_bytes([weight, weight.t()])  # a view shares its base's storage: counted once
    assert measured >= held.numel()
    assert measured == torch.cuda.memory_allocated() - weight.untyped_storage().nbytes()
    assert outside_bytes([torch.empty(4)]) == 0  # CPU inputs: nothing to account for


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_efficient_attention_backward_workspace_as_measured(dtype):
    """The rule's bytes against the op's own peak: what the memory-efficient attention backward
    allocates above its three gradients while it runs."""
    from sac_compiler.passes.annotate_memory import _attention_backward_workspace

    from tests.test_annotate_memory import _attention_backward_graph

    batch, heads, seq, dim = 8, 12, 1024, 64
    _, bw, shape = _attention_backward_graph(dtype, batch, heads, seq, dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    out, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, None, True, 0.0, True)
    grad = torch.randn_like(out)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    grads = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        grad, q, k, v, None, out, lse, seed, offset, 0.0, [True, True, True, False], True)
    torch.cuda.synchronize()
    above_outputs = torch.cuda.max_memory_allocated() - before - sum(
        g.untyped_storage().nbytes() for g in grads if g is not None and g.numel())
    predicted = _attention_backward_workspace(bw, "cuda")
    print(f"\n{dtype} {torch.cuda.get_device_name()} torch {torch.__version__}: "
          f"measured {above_outputs} bytes above the gradients, predicted {predicted}")
    assert predicted == pytest.approx(above_outputs, rel=0.02)


def test_an_enforced_budget_holds_with_a_criterion_outside():
    """The user's loop: the model compiled alone, its fp32 logits kept in a variable and a
    cross-entropy outside (which saves its own log-softmax for backward): the simulation does not
    see what the caller adds, the measured step is planned again, and the step then holds its budget."""
    from sac_compiler.enforce import BudgetEnforcer

    torch.manual_seed(0)
    vocab, dim, batch, seq = 32768, 1024, 4, 1024
    model = nn.Sequential(nn.Embedding(vocab, dim), *[nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(),
                                                                    nn.Linear(4 * dim, dim)) for _ in range(4)],
                          nn.Linear(dim, vocab)).cuda()
    tokens = torch.randint(0, vocab, (batch, seq), device="cuda")
    targets = torch.randint(0, vocab, (batch * seq,), device="cuda")

    def step(compiled):
        logits = compiled(tokens)
        loss = nn.functional.cross_entropy(logits.view(-1, vocab), targets)
        loss.backward()
        model.zero_grad(set_to_none=True)

    torch._dynamo.reset()
    plain = torch.compile(model)
    for _ in range(2):
        step(plain)
    torch.cuda.synchronize()
    static = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(plain)
    plain_extra = torch.cuda.max_memory_allocated() - static
    # lower fractions are out of reach once the caller's part is counted (docs/results.md)
    budget = int(static + 0.85 * plain_extra)
    torch._dynamo.reset()
    torch.cuda.reset_peak_memory_stats()  # the plain run's mark is the test's own, not the user's
    enforcers = []

    def backend(gm, inputs):
        from sac_compiler.backend import compile_graph
        from sac_compiler.config import SACConfig

        enforcers.append(compile_graph(gm, inputs, SACConfig.from_options({"memory_budget": budget})))
        return enforcers[-1]

    compiled = torch.compile(model, backend=backend)
    for _ in range(6):
        step(compiled)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step(compiled)
    measured = torch.cuda.max_memory_allocated()
    (enforcer,) = enforcers
    assert isinstance(enforcer, BudgetEnforcer)
    print(f"\n{torch.cuda.get_device_name()} torch {torch.__version__}: budget {budget / 2**30:.3f} GiB, "
          f"first plan measured {(enforcer.measured[0] or 0) / 2**30:.3f}, replans {enforcer.replans}, "
          f"held by the caller {(enforcer.result.caller_held_bytes or 0) / 2**30:.3f}, "
          f"after enforcement {measured / 2**30:.3f} GiB")
    assert measured <= budget


def test_the_allocators_record_of_a_step_sums_to_what_it_allocated():
    """The measured memory timeline (``sac_compiler.plots.measured_timeline_panel``) of a compiled
    step: its last point is the bytes allocated after backward and its peak is the allocator's own
    high-water mark over the step; the simulation of the same graph is drawn beside it."""
    from sac_compiler import plots
    from sac_compiler.backend import compile_graph
    from sac_compiler.config import SACConfig

    torch.manual_seed(0)
    model = LinearReLUStack(4, 1024, torch.float32).cuda()
    x = torch.randn(4096, 1024, device="cuda")
    graphs = []

    def backend(gm, inputs):
        graphs.append(compile_graph(gm, inputs, SACConfig.from_options({"memory_budget": 0.5, "compiler": "eager"})))
        return graphs[-1]

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    for _ in range(2):
        compiled(x).sum().backward()
        model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(enabled="all", context=None, stacks="python")
    try:
        loss = compiled(x).sum()
        torch.cuda.synchronize()
        forward_events = len(plots.allocator_events(torch.cuda.memory._snapshot(), torch.cuda.current_device()))
        loss.backward()
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    panel = plots.measured_timeline_panel(plots.allocator_events(snapshot, torch.cuda.current_device()), base,
                                          "measured", forward_events)
    assert 0 < forward_events < len(panel.steps)
    assert panel.totals[-1] == torch.cuda.memory_allocated()
    assert max(panel.totals) == torch.cuda.max_memory_allocated()


def test_recomputed_attention_dropout_replays_its_forward_rng_state_on_cuda(monkeypatch):
    """A plan that recomputes SDPA with dropout (every GPT-2 block checkpointed whole) runs as
    PyTorch's own full checkpointing does under compile: the partitioner gives each recomputed
    attention its own generator state, replayed in backward. Same seed, same outputs and gradients
    as ``torch.utils.checkpoint`` around every block under plain ``torch.compile``; a backward that
    drew new masks would differ by whole dropped entries."""
    from torch.testing import FileCheck
    from torch.utils.checkpoint import checkpoint

    from benchmarks.zoo import ZOO
    from sac_compiler import plan_graph
    from tests.test_plan import recording_backend

    entry = ZOO["gpt2"]
    batch = entry.batch("small", device="cuda")

    def run(model, compiled):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        loss = compiled(*batch.inputs, batch.target)
        loss.backward()
        return loss.detach(), [p.grad.detach().clone() for p in model.parameters()]

    reference = entry.model("small", device="cuda")

    class Checkpointed(nn.Module):
        def __init__(self, block):
            super().__init__()
            self.block = block

        def forward(self, *args):
            return checkpoint(self.block, *args, use_reentrant=False)

    for blocks, i in entry.block_slots(reference):
        blocks[i] = Checkpointed(blocks[i])
    ref_loss, ref_grads = run(reference, torch.compile(reference))
    torch._dynamo.reset()

    def every_layer_checkpointed(problem, analysis, config, *args, **kwargs):
        plan = plan_graph.layer_checkpoint_plan(problem, analysis)
        return plan_graph._Rounds(plan, plan_graph._simulate(analysis, config, plan.recompute))

    monkeypatch.setattr(plan_graph, "_solve_rounds", every_layer_checkpointed)
    monkeypatch.setattr(plan_graph, "_layer_hybrid", lambda *args, **kwargs: None)
    monkeypatch.setattr(plan_graph, "_plan_in_hand", lambda *args, **kwargs: None)
    model = entry.model("small", device="cuda")
    backend, records = recording_backend(memory_budget=0.5)
    loss, grads = run(model, torch.compile(model, backend=backend))
    (result, _fw, bw), = records
    assert result.kept_random == ["inductor_seeds_default"]
    FileCheck().check("graphsafe_run_with_rng_state").check("scaled_dot_product").run(bw.code)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_the_matmul_workspaces_a_step_makes_are_made_and_counted_before_it():
    """cuBLAS makes a workspace per thread and stream at its first matmul there, a training step
    two (the caller's thread for forward, autograd's device thread for backward): the backend makes
    them before it measures what the process holds, so the step adds nothing it did not count."""
    from sac_compiler.backend import make_matmul_workspaces

    device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.synchronize()
    torch._C._cuda_clearCublasWorkspaces()
    base = torch.cuda.memory_allocated(device)
    made = make_matmul_workspaces(device, biased=False)
    assert made > 0 and torch.cuda.memory_allocated(device) - base == made
    assert make_matmul_workspaces(device, biased=False) == 0  # made once
    x = torch.randn(64, 256, device=device, requires_grad=True)
    for bias in (False, True):  # a model without a bias, then one with (the workspaces for it made first)
        lt = make_matmul_workspaces(device) if bias else 0
        lin = nn.Linear(256, 256, bias=bias, device=device)
        x.grad = None
        before = torch.cuda.memory_allocated(device)
        lin(x).sum().backward()
        torch.cuda.synchronize()
        grads = sum(t.grad.untyped_storage().nbytes() for t in (x, *lin.parameters()))
        assert torch.cuda.memory_allocated(device) - before == grads
    print(f"\n{torch.cuda.get_device_name()} torch {torch.__version__}: cuBLAS workspaces {made} bytes, "
          f"for a linear with a bias {lt} more")


def test_a_repeated_draw_is_the_same_numbers_on_cuda():
    """``repeat_recomputed_draws`` relies on Inductor drawing ``inductor_random`` by seed and
    element index: compiled for CUDA, the backward's own draw gives what it read before."""
    from torch._inductor import compile as inductor_compile

    from sac_compiler.backend import repeat_recomputed_draws
    from tests.test_memory_rules import _draw_read_twice

    gm, _, is_backward = _draw_read_twice("cuda")
    torch.manual_seed(0)
    args = [torch.randint(0, 2**31, (2,), dtype=torch.int64, device="cuda"),
            torch.randn(256, 256, device="cuda"), torch.randn(256, 256, device="cuda")]
    want = inductor_compile(gm, args)(*args)
    assert repeat_recomputed_draws(gm, is_backward) == ["inductor_random"]
    got = inductor_compile(gm, args)(*args)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_the_log_softmax_takes_the_logits_buffer_on_cuda():
    """The ``inplace_pointwise`` rule writes the log-softmax a cross-entropy keeps into the
    logits' buffer once the reductions over them (its ancestors) have run, as Inductor's
    in-place update does; on CUDA those reductions are kernels of their own. Compiled for CUDA,
    the call's peak holds one logits-sized buffer, not two."""
    from tests.test_memory_rules import _cross_entropy_returning_log_softmax

    torch.manual_seed(0)
    x, w = torch.randn(4096, 256, device="cuda"), torch.randn(256, 32000, device="cuda")
    y = torch.randint(0, 32000, (4096,), device="cuda")
    compiled = torch.compile(_cross_entropy_returning_log_softmax)
    with torch.no_grad():
        compiled(x, w, y)  # compiles (and autotunes) outside the measured call
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss, log_softmax = compiled(x, w, y)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    tile = 4096 * 32000 * 4
    expected = torch.log_softmax(x @ w, -1)
    torch.testing.assert_close(log_softmax, expected, rtol=1e-4, atol=1e-4)
    print(f"\n{torch.cuda.get_device_name()} torch {torch.__version__}: peak {peak} bytes, logits {tile}")
    assert tile <= peak < 1.05 * tile


def test_convolution_workspaces_are_measured_without_touching_the_users_statistics(monkeypatch):
    """Each convolution call of a joint graph is run once on the GPU, in the layout Inductor will run
    it in (channels-last where it optimizes the forward's layout: the wide network; contiguous for
    the narrow one), and what cuDNN held inside it beyond its outputs recorded from the allocator's
    trace: the peak statistic is not reset, the allocator's history is off again afterwards, and a
    user's own recording is left alone (then nothing is measured)."""
    from sac_compiler.passes import memory_rules

    from sac_compiler import capture_joint

    monkeypatch.setattr(memory_rules, "_MEASURED_CONV_WORKSPACES", {})
    device = torch.device("cuda", torch.cuda.current_device())
    for width, channels_last in ((64, False), (128, True)):
        model = nn.Sequential(nn.Conv2d(16, width, 3, padding=1), nn.ReLU(),
                              nn.Conv2d(width, width, 3, padding=1)).cuda()
        graph = capture_joint(lambda x: model(x).sum(), torch.randn(32, 16, 64, 64, device="cuda"))
        nodes = list(graph.gm.graph.nodes)
        assert memory_rules.layout_optimized(memory_rules.forward_part(nodes), device) is channels_last
        torch.cuda.memory._record_memory_history(enabled="all")
        try:
            assert memory_rules.measure_convolution_workspaces(graph.gm, device) == 0
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
        big = torch.empty(2**28, dtype=torch.uint8, device=device)
        del big
        mark = torch.cuda.max_memory_allocated(device)
        measured = memory_rules.measure_convolution_workspaces(graph.gm, device)
        keys = {(memory_rules.conv_signature(n), channels_last) for n in nodes} - {(None, channels_last)}
        assert measured == len(keys) > 0 and keys <= set(memory_rules._MEASURED_CONV_WORKSPACES)
        assert torch.cuda.max_memory_allocated(device) >= mark  # not reset
        assert not torch._C._cuda_isHistoryEnabled()
        assert memory_rules.measure_convolution_workspaces(graph.gm, device) == 0  # measured once
    print(f"\n{torch.cuda.get_device_name()} torch {torch.__version__}: cuDNN workspaces "
          f"{sorted(memory_rules._MEASURED_CONV_WORKSPACES.items(), key=lambda kv: kv[1])} bytes")
