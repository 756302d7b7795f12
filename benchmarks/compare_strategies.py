"""Step time and peak memory of one training step under activation-checkpointing strategies.

One step is ``loss(tokens).backward()`` with ``loss = model(tokens).float().sum()`` (no optimizer;
compiled strategies compile ``loss``, so that the fp32 copy of the logits is inside the compiled
region, where a memory budget can see it), on one CUDA GPU, for a
Llama-style decoder (RMSNorm, rotary embeddings, causal SDPA, SwiGLU, bf16 parameters) and for
PyTorch's seed Transformer (``common_dtensor.Transformer``, fp32, dropout 0.1), under:

* ``eager``; ``eager + full AC`` (``torch.utils.checkpoint`` around each block of ``model.layers``);
  ``eager + selective AC`` (torchtitan's policy: save mm/addmm/bmm/SDPA outputs, recompute the rest);
* ``compile`` (Inductor); ``compile + full AC``; ``compile, amb=B`` for
  ``torch._functorch.config.activation_memory_budget`` B in 0.8, 0.5, 0.3, 0.1, 0.0;
* ``sac, no budget`` (``backend="sac"`` partitions as ``torch.compile`` does and simulates the
  partition: its prediction against the measurement); ``sac F`` at ``memory_budget`` =
  parameter-and-input bytes + F x the extra peak that plain ``compile`` measured, F in 75%, 50%, 25%
  (the table's budget), plus what the strategies kept alive before it hold: the backend counts all
  allocated memory against an absolute budget. For the sac strategies the table also gives the
  plan's predicted extra peak.

``--sac-estimate-modes cost-model benchmark`` runs the budgeted sac strategies with each of the
backend's ``estimate_mode`` values (the second set named ``sac F (benchmark)``).
``--strategies NAME ...`` runs only the strategies whose names contain one of the given strings
(``compile`` always runs: it sets the sac budgets). "first step s" is the first warm-up step, with
Dynamo, planning and Inductor's compilation (Inductor's caches may serve the other strategies'
graphs; the sac strategies compile without them, so that their partitioner records every plan:
compare first steps from a cold cache, ``TORCHINDUCTOR_CACHE_DIR`` set to a new folder);
"planning s" is the part of it the sac backend spent on its own (analysis, plans, simulations:
all but the one partition plain ``torch.compile`` makes too), over all graphs; "longest solve s"
is the longest single call of the MILP solver in it (each call is listed in the JSON).

Each strategy gets a fresh model built from the same seed and 3 warm-up steps (the first compiles);
"before" is what its model and inputs hold just after them (parameters and inputs: gradients are set
to None after every step); then ``--steps`` timed steps, one CUDA event pair each, with
``max_memory_allocated``. The strategies stay alive, and ``--rounds`` rounds in all time every one of
them again in turn, so that the GPU's clocks drifting over the run (seen on an H200: the same
kernels 3 to 4% slower in one strategy's steps than in the one before) fall on all strategies alike.
Each round starts by freeing the allocator's cached blocks and taking one untimed step.
The step time is the median over all rounds; the extra peak is the largest peak - before of a round.
The cuBLAS workspaces are created once up front so they count in no strategy's extra peak. Once a
model's strategies are done everything is freed and Dynamo reset; memory still allocated after that
is recorded (``left_allocated_bytes``) and reported. A strategy that raises is recorded with its
error and the run goes on.

Writes ``OUT/results.json`` (after each strategy of a model's first round and after every timing
round, with ``rounds_done`` (0 while the first round runs) and ``complete``, so that a run stopped
part way keeps what it measured) and ``OUT/pareto.png`` (step
time against extra peak; needs matplotlib) and prints a table; ``--from-json`` prints the table
and draws the plot of an earlier ``results.json`` without measuring. ``--check-grads`` also compares the seed model's
gradients under ``backend="sac"`` at each budget with plain ``torch.compile``'s: after the timed
steps, each of those runs takes one more step right after ``torch.manual_seed`` (Inductor draws its
dropout seeds from it) and the largest absolute difference over all parameters is recorded.
``--dump-partitions`` writes each sac graph's partition as data to ``OUT/partitions/`` (re-simulate
them anywhere with ``benchmarks/replay_partition.py``).
Compiling dominates the run time: on an H200 with a cold Inductor cache, 150 to 165 s for the
seed model (every strategy, ``--rounds 2 --steps 5 --check-grads``) and 360 s for the Llama
(``--rounds 1 --steps 5``; 415 s with ``--rounds 2``); a Llama run at the defaults was still in its
third round after 7 minutes.
``--smoke`` runs a tiny Llama on CPU with eager, eager + full AC and ``backend="sac"``
(``compiler="eager"``, no budget), timed with ``time.perf_counter`` and no peak. Run from the
repository root::

    python benchmarks/compare_strategies.py --model both --out bench-out/strategies [--check-grads]
    python benchmarks/compare_strategies.py --smoke --out bench-out/smoke
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import os
import platform
import re
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tabulate import tabulate
from torch._dynamo.utils import counters
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

AMB_BUDGETS = (0.8, 0.5, 0.3, 0.1, 0.0)
SAC_FRACTIONS = (0.75, 0.5, 0.25)
COMPILE = "compile"  # the strategy whose extra peak sets the sac budgets


# --- models ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LlamaArgs:
    layers: int = 16
    dim: int = 2048
    heads: int = 16
    ffn: int = 5632
    vocab: int = 32000
    batch: int = 4
    seq: int = 2048


SMOKE_LLAMA = LlamaArgs(layers=2, dim=64, heads=4, ffn=176, vocab=128, batch=2, seq=32)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` (batch, seq, heads, head_dim), rotate-half layout."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = (w(x).view(b, s, self.heads, d // self.heads) for w in (self.wq, self.wk, self.wv))
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, s, d))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LlamaBlock(nn.Module):
    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(args.dim)
        self.attention = Attention(args.dim, args.heads)
        self.ffn_norm = RMSNorm(args.dim)
        self.feed_forward = SwiGLU(args.dim, args.ffn)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    def __init__(self, args: LlamaArgs, rope_theta: float = 10000.0) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(args.vocab, args.dim)
        self.layers = nn.ModuleList(LlamaBlock(args) for _ in range(args.layers))
        self.norm = RMSNorm(args.dim)
        self.output = nn.Linear(args.dim, args.vocab, bias=False)
        head_dim = args.dim // args.heads
        freqs = rope_theta ** -(torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(args.seq, dtype=torch.float32), freqs).repeat(1, 2)
        self.register_buffer("rope_cos", angles.cos()[:, None, :], persistent=False)  # (seq, 1, head_dim)
        self.register_buffer("rope_sin", angles.sin()[:, None, :], persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        seq = tokens.shape[1]
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.output(self.norm(h))


@dataclass(frozen=True)
class Workload:
    """A model family: ``build`` makes a fresh model on a device, ``tokens`` its input batch."""

    name: str
    config: dict[str, Any]
    build: Callable[[torch.device], nn.Module]
    tokens: Callable[[torch.device], torch.Tensor]


def llama_workload(args: LlamaArgs) -> Workload:
    def build(device: torch.device) -> nn.Module:
        with torch.device(device):
            return Llama(args).to(torch.bfloat16)

    def tokens(device: torch.device) -> torch.Tensor:
        return torch.randint(0, args.vocab, (args.batch, args.seq), device=device)

    return Workload("llama", {**dataclasses.asdict(args), "dtype": "bfloat16"}, build, tokens)


def seed_workload(batch: int) -> Workload:
    from torch.testing._internal.distributed._tensor.common_dtensor import (
        ModelArgs,
        Transformer,
    )

    args = ModelArgs(n_layers=4, n_heads=12, vocab_size=8192, max_seq_len=1024, dim=768, dropout_p=0.1)

    def build(device: torch.device) -> nn.Module:
        with torch.device(device):
            return Transformer(args)

    def tokens(device: torch.device) -> torch.Tensor:
        return torch.randint(0, args.vocab_size, (batch, args.max_seq_len), device=device)

    return Workload("seed", {**dataclasses.asdict(args), "batch": batch, "dtype": "float32"}, build, tokens)


# --- strategies --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Strategy:
    name: str
    checkpoint: str = "none"  # "none", "full" or "selective" around each block of model.layers
    backend: str | None = None  # None (eager), "inductor" or "sac"
    activation_memory_budget: float | None = None  # torch._functorch.config, for backend="inductor"
    sac_fraction: float | None = None  # sac budget: before + fraction * compile's extra peak
    sac_compiler: str = "inductor"
    sac_estimate_mode: str = "cost-model"  # backend="sac": how the planner costs each op


def gpu_strategies(sac_estimate_modes: Sequence[str] = ("cost-model",)) -> list[Strategy]:
    """The table's strategies; each budgeted sac strategy once per estimate mode (the first
    keeps the plain name, the others get theirs appended)."""
    budgeted = [Strategy(f"sac {f:.0%}" + ("" if i == 0 else f" ({mode})"), backend="sac", sac_fraction=f,
                         sac_estimate_mode=mode)
                for i, mode in enumerate(sac_estimate_modes) for f in SAC_FRACTIONS]
    return [
        Strategy("eager"),
        Strategy("eager + full AC", checkpoint="full"),
        Strategy("eager + selective AC", checkpoint="selective"),
        Strategy(COMPILE, backend="inductor"),
        Strategy("compile + full AC", checkpoint="full", backend="inductor"),
        *(Strategy(f"compile, amb={b}", backend="inductor", activation_memory_budget=b) for b in AMB_BUDGETS),
        # no budget: PyTorch's own partition, which the backend simulates (its prediction against the measurement)
        Strategy("sac, no budget", backend="sac"),
        *budgeted,
    ]


SMOKE_STRATEGIES = (
    Strategy("eager"),
    Strategy("eager + full AC", checkpoint="full"),
    Strategy("sac (compiler=eager, no budget)", backend="sac", sac_compiler="eager"),
)

_SAVED_MATMULS = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm}


def save_matmuls_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """torchtitan-style selective AC: keep matmul and attention outputs, recompute everything else."""
    packet = op.overloadpacket
    if packet in _SAVED_MATMULS or packet.__name__.startswith("_scaled_dot_product_"):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


class Checkpointed(nn.Module):
    """``block`` under ``torch.utils.checkpoint`` (non-reentrant), optionally with a ``context_fn``."""

    def __init__(self, block: nn.Module, context_fn: Callable[[], Any] | None = None) -> None:
        super().__init__()
        self.block = block
        self.context_fn = context_fn

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        if self.context_fn is None:
            return checkpoint(self.block, *args, use_reentrant=False)
        return checkpoint(self.block, *args, use_reentrant=False, context_fn=self.context_fn)


def apply_checkpointing(model: nn.Module, kind: str) -> None:
    if kind == "none":
        return
    context_fn = None
    if kind == "selective":
        context_fn = functools.partial(create_selective_checkpoint_contexts, save_matmuls_policy)
    for i, block in enumerate(model.layers):
        model.layers[i] = Checkpointed(block, context_fn)


def loss_of(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def loss(tokens: torch.Tensor) -> torch.Tensor:
        return model(tokens).float().sum()

    return loss


def compile_for(model: nn.Module, strategy: Strategy, budget_bytes: int | None,
                plans: list[Any] | None = None, records: list[dict[str, Any]] | None = None,
                ) -> Callable[..., torch.Tensor]:
    """The strategy's loss function; for backend="sac", ``plans`` receives each graph's plan result
    and ``records`` each graph's partition as data (``sac_compiler.partition_record``)."""
    loss = loss_of(model)
    if strategy.backend is None:
        return loss
    # Dynamo keeps compiled graphs on the code object and, with the modules' parameters as graph
    # inputs, guards on a model's structure rather than its identity: the strategies kept alive for
    # the timing rounds would run the first one's graph. Each compiled strategy gets its own code.
    loss.__code__ = loss.__code__.replace()
    if strategy.backend == "inductor":
        return torch.compile(loss)
    options: dict[str, Any] = {"compiler": strategy.sac_compiler, "estimate_mode": strategy.sac_estimate_mode}
    if budget_bytes is not None:
        # the first plan is what is measured against its prediction: no replanning at run time
        options.update(memory_budget=budget_bytes, enforce_budget=False)
    elif plans is not None:
        options["report"] = os.devnull  # without a budget the backend simulates the partition only when reporting
    if plans is None:
        return torch.compile(loss, backend="sac", options=options)
    # the same backend as backend="sac", with a partitioner that also hands over its plan
    from sac_compiler.backend import SACPartitioner, compile_graph
    from sac_compiler.config import SACConfig

    class Recording(SACPartitioner):
        def __call__(self, gm: Any, joint_inputs: Any, **kwargs: Any) -> Any:
            out = super().__call__(gm, joint_inputs, **kwargs)
            plans.append(self.last_result)
            if records is not None and self.last_result is not None:
                from sac_compiler.partition_record import record_partition

                records.append(record_partition(self.last_result, *out))
            return out

    config = SACConfig.from_options(options)

    def recording_backend(gm: Any, example_inputs: Any) -> Any:
        # Uncached: a cache hit would skip the partitioner and with it the plan and the record (and
        # the local class above makes the caches' keys unpicklable: they would warn, then bypass).
        with torch._inductor.config.patch(fx_graph_cache=False), \
                torch._functorch.config.patch(enable_autograd_cache=False):
            return compile_graph(gm, example_inputs, config=config, partitioner_cls=Recording)

    return torch.compile(loss, backend=recording_backend)


# --- measurement -------------------------------------------------------------------------------


@dataclass(frozen=True)
class StrategyResult:
    model: str
    strategy: str
    status: str  # "ok", "error" (the strategy raised) or "skipped" (no budget to give it)
    step_ms: float | None = None  # median over the timed steps of all rounds
    step_ms_all: tuple[float, ...] = ()
    built_bytes: int | None = None  # the strategy's own bytes once its model and inputs exist, before any step
    before_bytes: int | None = None  # the strategy's own bytes after the warm-up (parameters, inputs, no gradients)
    peak_bytes: int | None = None  # before_bytes + its largest extra peak over the rounds; None on CPU
    extra_peak_gib: float | None = None  # (peak - before) / 2**30
    budget_bytes: int | None = None  # backend="sac": its own budget (memory_budget less what others held)
    budget_gib: float | None = None
    activation_memory_budget: float | None = None
    first_step_s: float | None = None  # the first warm-up step, with Dynamo, planning and compilation
    predicted_extra_gib: float | None = None  # backend="sac": the plan's simulated extra peak
    planning_s: float | None = None  # backend="sac": the backend's own time in the first step (all graphs)
    solves_s: tuple[float, ...] | None = None  # backend="sac": each solver call within planning_s
    left_allocated_bytes: int | None = None  # still allocated after the strategy was released (0 expected)
    error: str | None = None  # type and full message of what the strategy raised
    error_summary: str | None = None  # one line: the outer type and the innermost "...Error: ..." line
    traceback: str | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device: torch.device, reset: bool = True) -> None:
    """Free what is unreferenced; ``reset`` also drops Dynamo's compiled code (of every strategy)."""
    gc.collect()
    if reset:
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _allocated(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device)


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Failed): \S")


def error_summary(error: BaseException) -> str:
    """``Outer: Inner: message`` from the innermost exception line of a wrapped error's message.

    Dynamo and Inductor wrap what a backend or a compile worker raised into their own message
    (``BackendCompilerFailed: backend='sac' raised:`` and the original below it); the table shows
    the original.
    """
    outer = type(error).__name__
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    inner = [line for line in lines if _EXCEPTION_LINE.match(line)]
    message = inner[-1] if inner else (lines[0] if lines else "(no message)")
    return message if message.startswith(outer + ":") else f"{outer}: {message}"


def _train_step(loss: Callable[..., torch.Tensor], tokens: torch.Tensor) -> None:
    loss(tokens).backward()


def timed_steps(fn: Callable[..., torch.Tensor], model: nn.Module, tokens: torch.Tensor, steps: int,
                device: torch.device) -> tuple[list[float], int | None]:
    """Milliseconds of each step (CUDA events, or perf_counter on CPU) and the peak bytes (None on CPU)."""
    if device.type != "cuda":
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            _train_step(fn, tokens)
            times.append((time.perf_counter() - start) * 1e3)
            model.zero_grad(set_to_none=True)
        return times, None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
    for start, end in events:
        start.record()
        _train_step(fn, tokens)
        end.record()
        model.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events], torch.cuda.max_memory_allocated(device)


Grads = dict[str, torch.Tensor]


@dataclass
class _Prepared:
    """A strategy built, compiled and warmed up, kept alive for its timing rounds."""

    strategy: Strategy
    base: dict[str, Any]
    model: nn.Module
    fn: Callable[..., torch.Tensor]
    tokens: torch.Tensor
    built: int | None  # this strategy's own bytes once its model and inputs exist
    before: int | None  # its own bytes after the warm-up (parameters, inputs, no gradients)
    first_step_s: float
    plans: list[Any]
    times: list[float] = dataclasses.field(default_factory=list)
    extra: int | None = None  # the largest (peak - allocated just before) over its rounds

    def time_round(self, steps: int, device: torch.device) -> None:
        # The caching allocator still holds the blocks of the strategies timed before this one: with
        # them all alive, near the GPU's capacity, steps would wait on the allocator freeing them.
        # Hand them back, and let one untimed step cache this strategy's own.
        _release(device, reset=False)
        _train_step(self.fn, self.tokens)
        self.model.zero_grad(set_to_none=True)
        before = _allocated(device)
        times, peak = timed_steps(self.fn, self.model, self.tokens, steps, device)
        self.times += times
        if peak is not None and before is not None:
            self.extra = max(self.extra or 0, peak - before)

    def result(self) -> StrategyResult:
        extra = None if self.extra is None else self.extra / 2**30
        peak = None if self.extra is None or self.before is None else self.before + self.extra
        predicted = planning = solves = None
        plans = self.plans
        if plans and all(p is not None and p.partitioned is not None for p in plans):
            # the simulated peak of the partitioned graphs, over the parameters and inputs
            predicted = max(p.partitioned.peak_bytes - p.analysis.memory.static_bytes - p.outside_bytes
                            for p in plans) / 2**30
            planning = sum(p.planning_s for p in plans)
            solves = tuple(t for p in plans for t in p.solve_times_s)
        return StrategyResult(**self.base, status="ok", step_ms=statistics.median(self.times),
                              step_ms_all=tuple(self.times), built_bytes=self.built, before_bytes=self.before,
                              peak_bytes=peak, extra_peak_gib=extra, first_step_s=self.first_step_s,
                              predicted_extra_gib=predicted, planning_s=planning, solves_s=solves)

    def seeded_grads(self, seed: int) -> Grads:
        """One more step right after ``torch.manual_seed(seed)``; the gradients, copied to the CPU."""
        torch.manual_seed(seed)
        _train_step(self.fn, self.tokens)
        grads = {name: p.grad.detach().to("cpu", copy=True)
                 for name, p in self.model.named_parameters() if p.grad is not None}
        self.model.zero_grad(set_to_none=True)
        return grads


def _dump_partitions(dump_dir: Path, model: str, strategy: str, records: Sequence[dict[str, Any]]) -> None:
    dump_dir.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9]+", "-", f"{model} {strategy}").strip("-")
    for i, record in enumerate(records):
        (dump_dir / f"{stem}-graph{i}.json").write_text(json.dumps(record) + "\n")


def _error_result(base: dict[str, Any], error: BaseException) -> StrategyResult:
    return StrategyResult(**base, status="error", error=f"{type(error).__name__}: {error}",
                          error_summary=error_summary(error), traceback=traceback.format_exc())


def prepare_strategy(workload: Workload, strategy: Strategy, device: torch.device, steps: int, warmup: int,
                     seed: int, budget_bytes: int | None = None,
                     dump_dir: Path | None = None) -> _Prepared | StrategyResult:
    """Build, (compile,) warm up and time one round of one strategy; an exception becomes an "error" result."""
    base = dict(model=workload.name, strategy=strategy.name, budget_bytes=budget_bytes,
                budget_gib=None if budget_bytes is None else budget_bytes / 2**30,
                activation_memory_budget=strategy.activation_memory_budget)
    amb = strategy.activation_memory_budget
    start = _allocated(device)  # the strategies kept alive so far: the backend sees them as outside the graph
    graphs = counters["stats"]["unique_graphs"]
    try:
        torch.manual_seed(seed)
        model = workload.build(device)
        apply_checkpointing(model, strategy.checkpoint)
        tokens = workload.tokens(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        built = _allocated(device)
        patch = contextlib.nullcontext() if amb is None else torch._functorch.config.patch(activation_memory_budget=amb)
        plans: list[Any] = []
        records: list[dict[str, Any]] | None = [] if dump_dir is not None else None
        with patch:  # compile and the first calls (where AOTAutograd partitions) see the budget
            fn = compile_for(model, strategy, None if budget_bytes is None else budget_bytes + (start or 0), plans,
                             records)
            for i in range(warmup):
                t0 = time.perf_counter()
                _train_step(fn, tokens)
                model.zero_grad(set_to_none=True)
                if i == 0:
                    _sync(device)
                    first_step_s = time.perf_counter() - t0
        if strategy.backend is not None and counters["stats"]["unique_graphs"] == graphs:
            raise RuntimeError(f"{strategy.name} compiled no graph of its own (it would time another strategy's)")
        # Measured after the warm-up: memory that the compile released must not count against it.
        after = _allocated(device)

        def own(b: int | None) -> int | None:
            return None if b is None or start is None else b - start

        prepared = _Prepared(strategy, base, model, fn, tokens, own(built), own(after), first_step_s, plans)
        prepared.time_round(steps, device)
        if records is not None:
            _dump_partitions(dump_dir, workload.name, strategy.name, records)
        return prepared
    except Exception as e:
        return _error_result(base, e)


def sac_budget(compiled: StrategyResult, fraction: float) -> int:
    """The strategy's own budget: the parameter-and-input bytes plus ``fraction`` of compile's extra
    peak (the backend is given this plus what the strategies kept alive before it hold)."""
    return compiled.before_bytes + round(fraction * (compiled.peak_bytes - compiled.before_bytes))


@dataclass(frozen=True)
class GradCheck:
    """backend="sac" against plain torch.compile, one seeded step each, same initial weights."""

    model: str
    strategy: str
    budget_bytes: int | None
    status: str  # "ok", or "error"/"skipped" as the strategy's result
    max_abs_diff: float | None = None  # over every parameter
    max_abs_grad: float | None = None  # the reference gradients' largest magnitude, for scale
    error_summary: str | None = None


def compare_grads(result: StrategyResult, grads: Grads | None, reference: Grads) -> GradCheck:
    base = dict(model=result.model, strategy=result.strategy, budget_bytes=result.budget_bytes)
    if grads is None:
        return GradCheck(**base, status=result.status, error_summary=result.error_summary)
    if grads.keys() != reference.keys():
        raise AssertionError(f"parameters with gradients differ: {sorted(grads.keys() ^ reference.keys())}")
    diff = max((grads[k].float() - reference[k].float()).abs().max().item() for k in reference)
    scale = max(g.float().abs().max().item() for g in reference.values())
    return GradCheck(**base, status="ok", max_abs_diff=diff, max_abs_grad=scale)


LEAK_WARNING_BYTES = 16 * 2**20


def run_workload(workload: Workload, strategies: Sequence[Strategy], device: torch.device, steps: int,
                 warmup: int, seed: int, rounds: int = 1, baseline_bytes: int | None = None,
                 check_grads: bool = False,
                 on_round: Callable[[list[StrategyResult], int], None] | None = None,
                 dump_dir: Path | None = None,
                 ) -> tuple[list[StrategyResult], list[GradCheck]]:
    """Every strategy in turn, timed in ``rounds`` interleaved rounds of ``steps`` steps, and with
    ``check_grads`` each sac strategy's gradients against compile's.

    Each strategy is built, compiled, warmed up and timed once in the order given (compile's peak
    sets the sac budgets); then rounds 2.. time every strategy again, one after another, so that a
    drift of the GPU's clocks over the run falls on all of them alike. ``baseline_bytes`` is what
    should be allocated once they are all released; more is recorded and reported. ``on_round``
    receives the results so far and the number of rounds done after every strategy of the first
    round (0 rounds done) and after every round (a run stopped part way keeps what it measured).
    With ``dump_dir`` each sac graph's partition is written there as JSON, by model, strategy and
    graph (``sac_compiler.partition_record``).
    """
    # Each strategy's loss has its own code object, but the model code that a graph break would
    # leave to Dynamo is shared: every strategy kept alive holds its own cache entries there.
    with torch._dynamo.config.patch(recompile_limit=max(8, 2 * len(strategies))):
        return _run_workload(workload, strategies, device, steps, warmup, seed, rounds, baseline_bytes, check_grads,
                             on_round, dump_dir)


def _run_workload(workload: Workload, strategies: Sequence[Strategy], device: torch.device, steps: int,
                  warmup: int, seed: int, rounds: int, baseline_bytes: int | None, check_grads: bool,
                  on_round: Callable[[list[StrategyResult], int], None] | None,
                  dump_dir: Path | None = None,
                  ) -> tuple[list[StrategyResult], list[GradCheck]]:
    results: dict[str, StrategyResult] = {}
    checks: list[GradCheck] = []
    live: list[_Prepared] = []
    for strategy in strategies:
        budget = None
        if strategy.sac_fraction is not None:
            compiled = results.get(COMPILE)
            if compiled is None or compiled.peak_bytes is None:
                why = ("did not run" if compiled is None else f"failed: {compiled.error_summary}"
                       if compiled.status != "ok" else "measured no peak memory (CPU)")
                error = f"no budget: plain torch.compile {why}"
                results[strategy.name] = StrategyResult(workload.name, strategy.name, "skipped", error=error,
                                                        error_summary=error)
                _progress(results[strategy.name], 0.0)
                if on_round is not None:
                    on_round(list(results.values()), 0)
                continue
            budget = sac_budget(compiled, strategy.sac_fraction)
        start = time.perf_counter()
        prepared = prepare_strategy(workload, strategy, device, steps, warmup, seed, budget, dump_dir)
        if isinstance(prepared, _Prepared):
            live.append(prepared)
            result = prepared.result()
        else:
            result = prepared
            _release(device, reset=False)  # the strategies kept for the later rounds stay compiled
        results[strategy.name] = result
        _progress(result, time.perf_counter() - start)
        if on_round is not None:  # the first round in progress: what it has measured so far
            on_round(list(results.values()), 0)
    by_name = {p.strategy.name: p for p in live}

    def report_round(done: int) -> None:
        if on_round is not None:
            on_round([by_name[n].result() if n in by_name else r for n, r in results.items()], done)

    report_round(1)
    for i in range(1, rounds):
        for prepared in live:
            prepared.time_round(steps, device)
        print(f"[{workload.name}] timing round {i + 1} of {rounds} done", flush=True)
        report_round(i + 1)
    reference: Grads | None = None
    for strategy in strategies:
        prepared, result = by_name.get(strategy.name), results[strategy.name]
        if prepared is not None:
            result = results[strategy.name] = prepared.result()
            if rounds > 1:
                _progress(result, 0.0)
        is_compile = strategy.name == COMPILE
        if not check_grads or not (is_compile or strategy.backend == "sac"):
            continue
        grads = None
        if prepared is not None and (is_compile or reference is not None):
            try:
                grads = prepared.seeded_grads(seed)
            except Exception as e:
                result = results[strategy.name] = _error_result(prepared.base, e)
        if is_compile:
            reference = grads
        elif reference is not None or result.status != "ok":
            checks.append(compare_grads(result, grads, reference or {}))
            _progress_grads(checks[-1])
    live.clear()
    by_name.clear()
    prepared = None
    _release(device)
    if baseline_bytes is not None:
        left = _allocated(device) - baseline_bytes
        results = {k: dataclasses.replace(r, left_allocated_bytes=left) for k, r in results.items()}
        if abs(left) > LEAK_WARNING_BYTES:
            print(f"  WARNING: {left / 2**30:+.2f} GiB allocated compared with the start once the "
                  f"{workload.name} strategies were released", flush=True)
    return list(results.values()), checks


def _progress(result: StrategyResult, seconds: float) -> None:
    if result.status == "ok":
        extra = "" if result.extra_peak_gib is None else f", extra peak {result.extra_peak_gib:.2f} GiB"
        if result.predicted_extra_gib is not None:
            extra += f" (predicted {result.predicted_extra_gib:.2f})"
        line = f"{result.step_ms:.1f} ms{extra}, first step {result.first_step_s:.1f} s"
        if result.planning_s is not None:
            line += f" (planning {result.planning_s:.1f} s{_solves(result.solves_s)})"
    else:
        line = f"{result.status.upper()} {_clip(result.error_summary)}"
    print(f"[{result.model}] {result.strategy}: {line} ({seconds:.0f} s)", flush=True)


def _progress_grads(check: GradCheck) -> None:
    if check.status == "ok":
        detail = f"max |grad diff| {check.max_abs_diff:.3g} (max |grad| {check.max_abs_grad:.3g})"
    else:
        detail = f"{check.status.upper()} {_clip(check.error_summary)}"
    print(f"[{check.model}] grad check {check.strategy} vs {COMPILE}: {detail}", flush=True)


def _clip(text: str | None, width: int = 160) -> str:
    text = text or ""
    return text if len(text) <= width else text[: width - 3] + "..."


# --- output ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchmarkReport:
    device: str
    torch_version: str
    python_version: str
    smoke: bool
    steps: int
    rounds: int
    warmup: int
    models: dict[str, dict[str, Any]]
    results: list[StrategyResult]
    grad_checks: list[GradCheck] | None
    rounds_done: dict[str, int]  # timing rounds finished per model (fewer than rounds: the run was stopped)
    complete: bool  # every model ran all its rounds (and its gradient checks)


def format_table(results: Sequence[StrategyResult]) -> str:
    # a sac budget is compile's parameter-and-input bytes plus its share of compile's extra peak
    before = {r.model: r.before_bytes for r in results if r.strategy == COMPILE and r.before_bytes is not None}
    rows = [
        (r.model, r.strategy, r.step_ms, r.extra_peak_gib, r.predicted_extra_gib,
         None if r.budget_bytes is None or r.model not in before else (r.budget_bytes - before[r.model]) / 2**30,
         r.first_step_s,
         r.planning_s, max(r.solves_s) if r.solves_s else None,
         "ok" if r.status == "ok" else f"{r.status}: {_clip(r.error_summary, 140)}")
        for r in results
    ]
    return tabulate(rows, headers=["model", "strategy", "step ms", "extra peak GiB", "predicted GiB", "extra budget GiB",
                                   "first step s", "planning s", "longest solve s", "status"],
                    tablefmt="github", floatfmt=".2f", missingval="-")


def _solves(times: Sequence[float] | None) -> str:
    if not times:
        return ""
    return f"; {len(times)} solves, {sum(times):.1f} s in all, the longest {max(times):.2f} s"


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (memory, time) points that no other point beats on both, sorted by memory."""
    front: list[tuple[float, float]] = []
    for mem, ms in sorted(points):
        if not front or ms < front[-1][1]:
            front.append((mem, ms))
    return front


def plot_pareto(results: Sequence[StrategyResult], path: Path) -> str:
    """Step ms against extra peak GiB, one panel per model; returns what happened, for stdout."""
    measured = [r for r in results if r.status == "ok" and r.extra_peak_gib is not None]
    if not measured:
        return "no peak memory was measured (CPU run or every strategy failed): no Pareto plot"
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no Pareto plot"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in measured))
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 5.5), squeeze=False)
    for ax, name in zip(axes[0], models):
        points = [r for r in measured if r.model == name]
        for is_sac in (False, True):
            group = [r for r in points if r.strategy.startswith("sac") == is_sac]
            ax.scatter([r.extra_peak_gib for r in group], [r.step_ms for r in group], marker="*" if is_sac else "o",
                       s=180 if is_sac else 50, color="tab:red" if is_sac else "tab:blue", zorder=3,
                       label="backend='sac'" if is_sac else "baselines")
        for r in points:
            ax.annotate(r.strategy, (r.extra_peak_gib, r.step_ms), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
        front = pareto_front([(r.extra_peak_gib, r.step_ms) for r in points])
        ax.step([m for m, _ in front], [t for _, t in front], where="post", linestyle="--", color="gray",
                zorder=1, label="Pareto front")
        ax.set_title(name)
        ax.set_xlabel("extra peak memory (GiB)")
        ax.set_ylabel("step time (ms)")
        ax.grid(alpha=0.3)
        ax.margins(0.12)
        ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"wrote {path}"


# --- command line ------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["llama", "seed", "both"], default="both")
    defaults = LlamaArgs()
    for field in dataclasses.fields(LlamaArgs):
        parser.add_argument(f"--{field.name}", type=int, default=getattr(defaults, field.name),
                            help=f"Llama {field.name} (default {getattr(defaults, field.name)})")
    parser.add_argument("--seed-batch", type=int, default=8, help="batch of the seed Transformer (default 8)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per strategy (default 10)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="timing rounds over all strategies, --steps steps each (default 3)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first; the first compiles (default 3)")
    parser.add_argument("--rng-seed", type=int, default=0)
    parser.add_argument("--dump-partitions", action="store_true",
                        help="write each sac graph's partition as data to OUT/partitions/ (replay it on any "
                             "machine: benchmarks/replay_partition.py)")
    parser.add_argument("--check-grads", action="store_true",
                        help="compare the seed model's gradients under backend='sac' with torch.compile's")
    parser.add_argument("--smoke", action="store_true", help="tiny Llama on CPU, three strategies")
    parser.add_argument("--strategies", nargs="+", metavar="NAME",
                        help="run only the strategies whose name contains one of these (default: all); "
                             f"'{COMPILE}' always runs, as it sets the sac budgets")
    parser.add_argument("--sac-estimate-modes", nargs="+", choices=("cost-model", "benchmark"), default=["cost-model"],
                        metavar="MODE",
                        help="run the budgeted sac strategies once per estimate_mode: cost-model (a roofline on "
                             "the device's spec) and/or benchmark (each distinct op timed on the GPU); the "
                             "first keeps the plain names (default: cost-model)")
    parser.add_argument("--out", type=Path, default=Path("bench-out/compare_strategies"),
                        help="folder for results.json and pareto.png")
    parser.add_argument("--from-json", type=Path, metavar="RESULTS_JSON",
                        help="measure nothing: print the table of an earlier run's results.json (one a stopped "
                             "run left after its last full round too) and write its Pareto plot into --out")
    args = parser.parse_args(argv)
    if args.from_json is not None:
        return args
    if args.steps < 1 or args.warmup < 1 or args.rounds < 1:
        parser.error("--steps, --rounds and --warmup must be >= 1 (the first warm-up step compiles)")
    if args.check_grads and (args.smoke or args.model == "llama"):
        parser.error("--check-grads runs on the seed model: use --model seed or both, without --smoke")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA GPU; --smoke runs the CPU variant")
    return args


def _warm_up_cublas(device: torch.device) -> None:
    """Create the cuBLAS handles and workspaces (kept for the process) before anything is measured."""
    for dtype in (torch.float32, torch.bfloat16):
        lin = nn.Linear(256, 256, device=device, dtype=dtype)
        lin(torch.randn(4, 8, 256, device=device, dtype=dtype)).sum().backward()
    _sync(device)


def main(argv: Sequence[str] | None = None) -> BenchmarkReport:
    args = _parse_args(None if argv is None else [str(a) for a in argv])
    if args.from_json is not None:
        return _from_json(args.from_json, args.out)
    start = time.perf_counter()
    if args.smoke:
        device = torch.device("cpu")
        workloads, strategies = [llama_workload(SMOKE_LLAMA)], list(SMOKE_STRATEGIES)
        device_name = f"cpu ({platform.processor() or platform.machine()})"
    else:
        device = torch.device("cuda", torch.cuda.current_device())
        llama = LlamaArgs(**{f.name: getattr(args, f.name) for f in dataclasses.fields(LlamaArgs)})
        workloads = []
        if args.model in ("llama", "both"):
            workloads.append(llama_workload(llama))
        if args.model in ("seed", "both"):
            workloads.append(seed_workload(args.seed_batch))
        strategies = gpu_strategies(args.sac_estimate_modes)
        if args.strategies:
            strategies = [s for s in strategies if s.name == COMPILE or any(k in s.name for k in args.strategies)]
        device_name = torch.cuda.get_device_name(device)
        _warm_up_cublas(device)
    print(f"{device_name}, torch {torch.__version__}, {len(strategies)} strategies x {len(workloads)} model(s), "
          f"{args.warmup} warm-up + {args.rounds} x {args.steps} timed steps each", flush=True)

    results: list[StrategyResult] = []
    grad_checks: list[GradCheck] | None = [] if args.check_grads else None
    rounds_done: dict[str, int] = {}
    baseline = _allocated(device)
    json_path = args.out / "results.json"

    def write(model_results: list[StrategyResult], complete: bool) -> BenchmarkReport:
        report = BenchmarkReport(
            device=device_name, torch_version=torch.__version__, python_version=platform.python_version(),
            smoke=args.smoke, steps=args.steps, rounds=args.rounds, warmup=args.warmup,
            models={w.name: w.config for w in workloads}, results=results + model_results, grad_checks=grad_checks,
            rounds_done=dict(rounds_done), complete=complete,
        )
        args.out.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(dataclasses.asdict(report), indent=2) + "\n")
        return report

    for n, workload in enumerate(workloads):
        def on_round(partial: list[StrategyResult], done: int, name: str = workload.name) -> None:
            rounds_done[name] = done
            write(partial, complete=False)  # a run stopped part way keeps what it measured

        model_results, model_checks = run_workload(
            workload, strategies, device, args.steps, args.warmup, args.rng_seed, rounds=args.rounds, baseline_bytes=baseline,
            check_grads=args.check_grads and workload.name == "seed", on_round=on_round,
            dump_dir=args.out / "partitions" if args.dump_partitions else None)
        results += model_results
        if grad_checks is not None:
            grad_checks += model_checks
        report = write([], complete=n == len(workloads) - 1)
    print()
    print(format_table(results))
    if grad_checks:
        print()
        print(tabulate([(c.model, c.strategy, c.max_abs_diff, c.max_abs_grad,
                         "ok" if c.status == "ok" else f"{c.status}: {_clip(c.error_summary, 100)}") for c in grad_checks],
                       headers=["model", f"vs {COMPILE}", "max |grad diff|", "max |grad|", "status"],
                       tablefmt="github", floatfmt=".3g", missingval="-"))
    print()
    print(plot_pareto(results, args.out / "pareto.png"))
    print(f"wrote {json_path} ({time.perf_counter() - start:.0f} s in all)", flush=True)
    return report


def _from_json(path: Path, out: Path) -> BenchmarkReport:
    """The table and the Pareto plot of a results.json written earlier."""
    data = json.loads(path.read_text())
    if "rounds_done" not in data:  # written before these fields: only once a model had run all its rounds
        data["rounds_done"] = {r["model"]: data["rounds"] for r in data["results"]}
        data["complete"] = set(data["rounds_done"]) == set(data["models"])
    data["results"] = [StrategyResult(**{**r, "step_ms_all": tuple(r["step_ms_all"]),
                                         "solves_s": None if r["solves_s"] is None else tuple(r["solves_s"])})
                       for r in data["results"]]
    if data.get("grad_checks") is not None:
        data["grad_checks"] = [GradCheck(**c) for c in data["grad_checks"]]
    report = BenchmarkReport(**data)
    state = "complete" if report.complete else f"stopped part way (rounds done: {report.rounds_done} of {report.rounds})"
    print(f"{report.device}, torch {report.torch_version}: {path} ({state})")
    print(format_table(report.results))
    out.mkdir(parents=True, exist_ok=True)
    print(plot_pareto(report.results, out / "pareto.png"))
    return report


if __name__ == "__main__":
    main()
