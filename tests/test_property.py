"""Property-based: generated small models train as they do eagerly under ``backend="sac"``, at any
memory budget, and every plan the backend makes keeps within its budget.

Each example builds a model from a drawn list of blocks (``tests/property_models.py``: linear,
conv, norms, attention with and without dropout, activations, in-place ops, views, dropout, shared
and tied weights, parametrizations, buffers and parameters mutated in forward, tuple and dict
outputs, graph breaks), a deep copy of it as the eager reference, and compiles it with
``compiler="eager"`` at a drawn budget (none, a fraction, absolute bytes). Both train two SGD steps
on the same inputs, the RNG seeded alike before each step, with the loss computed outside the
compiled model from its outputs. The eager route runs the same ATen ops as eager autograd (dropout
draws from the same generator), so outputs, loss, gradients, parameters and buffers must match
exactly. An absolute budget may be out of reach (a ``BudgetError`` that names the smallest
feasible peak); a fraction must always plan.

The generated examples are fixed (``derandomize``) and not shrunk, to keep the run within a few
minutes on 2 CPU cores; set ``SAC_PROPERTY_SHRINK=1`` to let hypothesis shrink a failure. Each
failure the suite found is kept below as an explicit regression test at its minimal form.
"""

from __future__ import annotations

import copy
import functools
import logging
import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from sac_compiler.backend import SACPartitioner, compile_graph
from sac_compiler.config import SACConfig
from sac_compiler.plan_graph import BudgetError
from tests.property_models import (
    BATCHES,
    BLOCKS,
    DIMS,
    OUTPUT_KINDS,
    RANDOM_BLOCKS,
    build,
    leaves,
    loss_of,
)

STEPS = 2
LR = 0.05
EXACT = {"rtol": 0.0, "atol": 0.0}
# What plain torch.compile (Inductor) needs against eager on these models (float32, fused kernels
# reorder reductions): the Inductor sample holds the sac backend to the same against plain.
INDUCTOR_TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


def recording_backend(**options):
    """What ``backend="sac", options=options`` runs, recording each graph's plan result."""
    records = []

    class Recording(SACPartitioner):
        def __call__(self, gm, joint_inputs, **kwargs):
            fw, bw = super().__call__(gm, joint_inputs, **kwargs)
            records.append(self.last_result)
            return fw, bw

    backend = functools.partial(compile_graph, config=SACConfig.from_options(options), partitioner_cls=Recording)
    return backend, records


def budget_error(exc: BaseException | None) -> BudgetError | None:
    """The BudgetError behind an exception (Dynamo wraps what a backend raises), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, BudgetError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


class OverBudgetWarnings(logging.Handler):
    """Counts the backend's warnings that partitioned graphs are over their budget."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "over the budget" in record.getMessage():
            self.count += 1

    def __enter__(self):
        logging.getLogger("sac_compiler.backend").addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("sac_compiler.backend").removeHandler(self)


def train(model, fn, xs, input_grad=False):
    """SGD steps of ``model`` (run through ``fn``) on each input, the RNG seeded alike before each;
    per step: outputs, loss, gradients (the input's too with ``input_grad``), parameters and
    buffers after the step."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    steps = []
    for i, x in enumerate(xs):
        opt.zero_grad(set_to_none=True)
        torch.manual_seed(100 + i)
        x = x.clone().requires_grad_(input_grad)
        out = fn(x)
        loss = loss_of(out)  # outside the compiled model
        loss.backward()
        grads = {k: None if p.grad is None else p.grad.detach().clone() for k, p in model.named_parameters()}
        grads["<input>"] = None if x.grad is None else x.grad.clone()
        opt.step()
        steps.append({
            "outputs": [t.detach().clone() for t in leaves(out)],
            "loss": loss.detach(),
            "gradient": grads,
            "parameter": {k: p.detach().clone() for k, p in model.named_parameters()},
            "buffer": {k: b.detach().clone() for k, b in model.named_buffers()},
        })
    return steps


def assert_same(actual, expected, what="", **tol):
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys(), what
        for k in expected:
            assert_same(actual[k], expected[k], f"{what} {k}", **tol)
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), what
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{what}[{i}]" if isinstance(e, torch.Tensor) else f"{what} step {i}", **tol)
    elif expected is None:
        assert actual is None, f"{what}: no gradient in the reference, one compiled"
    else:
        torch.testing.assert_close(actual, expected, msg=lambda m: f"{what.strip()}: {m}", **tol)


def check_plans(records, warnings: OverBudgetWarnings) -> None:
    """Every plan made keeps within its budget: the partitioned graphs (what runs) unless the backend
    warned, and the plan's joint-graph simulation too, except for a plan taken for the room the
    partitioned graphs left (the backend plans those for more than the budget on purpose, the
    joint-graph simulation being pessimistic there, and takes them on the partitioned peak)."""
    for result in records:
        if result is None or result.plan is None:  # no budget: no plan
            continue
        if result.partitioned.peak_bytes > result.budget_bytes:
            assert warnings.count, (
                f"the partitioned graphs peak at {result.partitioned.peak_bytes} bytes, over the budget "
                f"{result.budget_bytes}, and the backend did not warn")
        if result.slack_taken:
            assert result.partitioned.peak_bytes <= result.budget_bytes
        else:
            assert result.predicted_peak <= result.budget_bytes, (
                f"plan predicted at {result.predicted_peak} bytes, over its budget {result.budget_bytes}")


def inputs(dim, batch, seed):
    torch.manual_seed(seed + 1)
    return [torch.randn(batch, dim) for _ in range(STEPS)]


def check_training(blocks, dim, output, budget, seed=0, batch=4, input_grad=False):
    """Two training steps eagerly and under ``backend="sac"`` (``compiler="eager"``) at ``budget``
    must agree exactly, and the plans must keep within the budget. Returns the recorded plan
    results and the BudgetError that refused an absolute budget (None if it planned)."""
    torch._dynamo.reset()
    model = build(blocks, dim, output, seed)
    ref = copy.deepcopy(model)
    xs = inputs(dim, batch, seed)
    expected = train(ref, ref, xs, input_grad)

    options = {"compiler": "eager"}
    if budget is not None:
        options["memory_budget"] = budget
    backend, records = recording_backend(**options)
    try:
        with OverBudgetWarnings() as warnings:
            actual = train(model, torch.compile(model, backend=backend), xs, input_grad)
    except Exception as exc:
        error = budget_error(exc)
        if error is None:
            raise
        assert not isinstance(budget, float), f"memory_budget={budget!r} (a fraction) refused: {error}"
        assert "smallest feasible peak" in str(error), str(error)
        return records, error
    finally:
        torch._dynamo.reset()
    assert_same(actual, expected, **EXACT)
    check_plans(records, warnings)
    return records, None


BLOCK_NAMES = sorted(BLOCKS)
# No budget (1 draw in 6); a fraction of the activation memory (3 in 6, mostly low: these small
# models recompute little above 0.5); absolute bytes, as an int or a size string (2 in 6; the
# models peak at one to a hundred KiB, so some absolute budgets are out of reach).
budgets = st.sampled_from(["none", "fraction", "low fraction", "low fraction", "bytes", "size"]).flatmap(
    lambda kind: {
        "none": st.none(),
        "fraction": st.floats(0.05, 1.0),
        "low fraction": st.floats(0.05, 0.5),
        "bytes": st.integers(2**12, 2**17),
        "size": st.integers(2, 128).map(lambda k: f"{k}KiB"),
    }[kind])
models = st.fixed_dictionaries({
    "blocks": st.lists(st.sampled_from(BLOCK_NAMES), min_size=2, max_size=6),
    "dim": st.sampled_from(DIMS),
    "output": st.sampled_from(OUTPUT_KINDS),
    "seed": st.integers(0, 2**16),
    # at a batch of 4 the weights and their gradients are most of the peak; at 64 the activations
    # are, and a budget has the planner recompute
    "batch": st.sampled_from(BATCHES),
    "input_grad": st.booleans(),  # the input's gradient too (the backward returns one more)
})

PHASES = (Phase.explicit, Phase.generate) + ((Phase.shrink,) if os.environ.get("SAC_PROPERTY_SHRINK") == "1" else ())
SETTINGS = {"deadline": None, "derandomize": True, "database": None, "phases": PHASES,
            "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}


@settings(max_examples=250, **SETTINGS)
@given(case=models, budget=budgets)
def test_generated_models_train_like_eager(case, budget):
    check_training(budget=budget, **case)


# --- Explicit examples ------------------------------------------------------------------------------
# The failures this property found on commit 1aec269 (fixed since), each at its minimal form, and
# one path worth pinning. (blocks, dim, output, budget, seed, batch)
REGRESSIONS = {
    # A parameter mutated in place under no_grad at the start of forward, in two blocks in a row:
    # the plan recomputed from the mutated parameter, and the backward crashed ("one of the variables
    # needed for gradient computation has been modified by an inplace operation:
    # [torch.FloatTensor [8, 8]] is at version 2; expected version 1 instead"). With the parameter
    # scaled (mul_) the plan varied from one process to the next there: most runs crashed.
    "clamped-parameter-twice": (["clamped_param", "clamped_param"], 8, "tensor", 0.75, 0, 4),
    "scaled-parameter-twice": (["decayed_param", "decayed_param"], 8, "tensor", 0.75, 0, 4),
    # Fractions refused: the stem and one Linear at 0.5 raised "memory budget 0.5 of the saved
    # activations (1.31 KiB) is below the smallest feasible peak found, 1.38 KiB (every layer
    # checkpointed; random ops kept): raise memory_budget to at least 1 (or 1408 bytes)", and a
    # Linear and a ReLU at batch 64 and 0.05 "... (6.38 KiB) is below the smallest feasible peak
    # found, 8.28 KiB ...: raise memory_budget to at least 1": every fraction below 1 was refused.
    "fraction-one-linear": (["linear"], 8, "tensor", 0.5, 0, 4),
    "fraction-one-relu-batch-64": (["relu"], 8, "tensor", 0.05, 0, 64),
    # Not a failure: a plan taken for the room the partitioned graphs left. It recomputes nothing;
    # its joint-graph simulation (3996 bytes) is over the budget (3966), the partitioned graphs
    # (3616) are within it (see check_plans).
    "slack-plan-over-in-joint-simulation": (["attention", "conv1d", "spectral_norm"], 8, "tensor", 0.5, 0, 4),
}


@pytest.mark.parametrize("name", sorted(REGRESSIONS))
def test_regression(name):
    blocks, dim, output, budget, seed, batch = REGRESSIONS[name]
    check_training(blocks, dim, output, budget, seed=seed, batch=batch)


# --- A sample under Inductor ---------------------------------------------------------------------------
# Plain torch.compile's random ops do not draw eager's masks, and graph breaks add compiles: the
# sample leaves those blocks out, so that plain torch.compile can be held to eager too.
inductor_models = st.fixed_dictionaries({
    "blocks": st.lists(st.sampled_from(sorted(set(BLOCKS) - RANDOM_BLOCKS - {"graph_break"})),
                       min_size=2, max_size=4),
    "dim": st.sampled_from(DIMS),
    "output": st.sampled_from(OUTPUT_KINDS),
    "seed": st.integers(0, 2**16),
    "batch": st.just(64),
    "input_grad": st.booleans(),
})


@pytest.mark.inductor
@settings(max_examples=2, **SETTINGS)
@given(case=inductor_models, budget=st.floats(0.05, 1.0))
def test_generated_models_under_inductor_match_plain_torch_compile(case, budget):
    torch._dynamo.reset()
    model = build(case["blocks"], case["dim"], case["output"], case["seed"])
    ref, plain_model = copy.deepcopy(model), copy.deepcopy(model)
    xs = inputs(case["dim"], case["batch"], case["seed"])
    expected = train(ref, ref, xs, case["input_grad"])
    try:
        plain = train(plain_model, torch.compile(plain_model), xs, case["input_grad"])
        torch._dynamo.reset()
        backend, records = recording_backend(memory_budget=budget)  # compiler="inductor"
        with OverBudgetWarnings() as warnings:
            actual = train(model, torch.compile(model, backend=backend), xs, case["input_grad"])
    finally:
        torch._dynamo.reset()
    assert_same(plain, expected, "plain torch.compile against eager:", **INDUCTOR_TOLERANCE)
    assert_same(actual, plain, **INDUCTOR_TOLERANCE)
    assert any(r is not None and r.plan is not None for r in records)
    check_plans(records, warnings)
