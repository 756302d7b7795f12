"""The module-level SAC MILP on a synthetic 4-layer GPT-2-like Transformer.

The ModuleInfo is built the way PyTorch's ``aggregate_stats`` would see the model of
``test_sac_ilp.py`` (bsz 8, seq 1024, dim 768, vocab 8192, dropout): every op's output
memory and runtime is written down, the forward is replayed to get each module's
activation, parameter and gradient memory, and every non-leaf module's trade-off
curve comes from a real ``get_sac_tradeoff_pwlf_stats`` run on its ops. Budgets are
derived from the baseline peak: the tight and impossible ones in the proportions of
PyTorch's test (1.6 and 0.8 GiB for a 2.58 GiB baseline), the loose one is the
baseline itself.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from functools import cache

import pytest

from sac_compiler.module_info import (
    Graph,
    ModOrder,
    ModStats,
    ModuleInfo,
    get_peak_memory,
    get_peak_memory_runtime_baseline,
    get_recomputation_time,
    is_submodule,
    parse_module_info,
)
from sac_compiler.sac_stats import (
    SACStats,
    SACTradeOffStats,
    get_greedy_order_meta,
    get_sac_tradeoff_pwlf_stats,
)
from sac_compiler.solvers import SolverOptions, sac_milp

GiB = 2**30
BSZ, SEQ, DIM, VOCAB = 8, 1024, 768, 8192
H = BSZ * SEQ * DIM * 4  # one fp32 hidden state
LOGITS = BSZ * SEQ * VOCAB * 4
MASK = BSZ * SEQ * DIM  # a bool dropout mask
WORLD_SIZE = 4


@dataclass(frozen=True)
class Op:
    name: str
    runtime: float  # ms
    memory: int  # bytes of output
    saved: bool = True  # autograd keeps the output for backward
    view: bool = False
    rand: bool = False


@dataclass(frozen=True)
class Mod:
    name: str
    body: tuple[Op | Mod, ...]
    params: int = 0  # bytes of the module's own parameters


def _linear(name: str, n_in: int, n_out: int, runtime: float, out_mem: int) -> Mod:
    transpose = Op("t", 0.001, 0, saved=False, view=True)
    return Mod(name, (transpose, Op("mm", runtime, out_mem)), params=n_in * n_out * 4)


def _norm(name: str) -> Mod:
    return Mod(name, (Op("native_layer_norm", 0.05, H),), params=2 * DIM * 4)


def _dropout() -> Op:
    return Op("native_dropout", 0.05, H + MASK, rand=True)


def _layer(i: int) -> Mod:
    attention = Mod("attention", (
        _linear("wq", DIM, DIM, 0.25, H),
        _linear("wk", DIM, DIM, 0.25, H),
        _linear("wv", DIM, DIM, 0.25, H),
        Op("view", 0.001, 0, saved=False, view=True),
        Op("_scaled_dot_product_flash_attention", 0.5, H + BSZ * 12 * SEQ * 4, rand=True),
        _linear("wo", DIM, DIM, 0.25, H),
        _dropout(),
    ))
    feed_forward = Mod("feed_forward", (
        _linear("w1", DIM, 4 * DIM, 1.0, 4 * H),
        Op("gelu", 0.1, 4 * H),
        _linear("w2", 4 * DIM, DIM, 1.0, H),
        _dropout(),
    ))
    residual = Op("add", 0.03, H, saved=False)
    return Mod(
        f"layers.{i}",
        (_norm("attention_norm"), attention, residual, _norm("ffn_norm"), feed_forward, residual),
    )


def transformer(n_layers: int) -> Mod:
    return Mod("Transformer", (
        Mod("tok_embeddings", (Op("embedding", 0.02, H),), params=VOCAB * DIM * 4),
        Mod("pos_embeddings", (Op("embedding", 0.02, H),), params=SEQ * DIM * 4),
        Op("add", 0.03, H, saved=False),
        Mod("dropout", (_dropout(),)),
        *(_layer(i) for i in range(n_layers)),
        _norm("norm"),
        _linear("output", DIM, VOCAB, 1.0, LOGITS),
    ))


def _sac_stats(ops: tuple[Op, ...]) -> SACStats:
    """What the SAC estimator records for a module running ``ops``."""
    memory = [op.memory for op in ops]
    # The module's last non-view op is its output, always stored (PyTorch's rule).
    last = max(i for i, op in enumerate(ops) if not op.view)
    memory[last] = 0
    return SACStats(
        func_names=[f"aten.{op.name}" for op in ops],
        runtimes=[op.runtime for op in ops],
        memory=memory,
        view_like_ops=[i for i, op in enumerate(ops) if op.view],
        rand_ops=[i for i, op in enumerate(ops) if op.rand],
        saved_autograd_ops=[i for i, op in enumerate(ops) if op.saved],
        inplace_ops=[],
        force_store_random=False,
    )


@cache
def _tradeoff(ops: tuple[Op, ...]) -> SACTradeOffStats:
    stats = _sac_stats(ops)
    return get_sac_tradeoff_pwlf_stats(stats, get_greedy_order_meta(stats), n_segments=2)


def build_module_info(model: Mod) -> ModuleInfo:
    """Replays the forward of ``model`` and records what the eager trackers would."""
    events: list[tuple[str, str, Op | Mod]] = []

    def flatten(mod: Mod, prefix: str) -> None:
        fqn = f"{prefix}.{mod.name}" if prefix else mod.name
        events.append(("enter", fqn, mod))
        for item in mod.body:
            if isinstance(item, Op):
                events.append(("op", fqn, item))
            else:
                flatten(item, fqn)
        events.append(("exit", fqn, mod))

    flatten(model, "")
    fw_pre_order = [fqn for kind, fqn, _ in events if kind == "enter"]
    fw_post_order = [fqn for kind, fqn, _ in events if kind == "exit"]
    enter_at = {fqn: t for t, (kind, fqn, _) in enumerate(events) if kind == "enter"}
    exit_at = {fqn: t for t, (kind, fqn, _) in enumerate(events) if kind == "exit"}
    own_params = {fqn: item.params for _, fqn, item in events if isinstance(item, Mod)}
    total_params = sum(own_params.values())

    live = BSZ * SEQ * 8  # the token ids
    live_at: dict[int, int] = {}
    ops_of: dict[str, list[Op]] = {fqn: [] for fqn in fw_pre_order}
    open_mods: list[str] = []
    for t, (kind, fqn, item) in enumerate(events):
        if kind == "enter":
            open_mods.append(fqn)
        elif kind == "exit":
            open_mods.pop()
        else:
            assert isinstance(item, Op)
            for mod_fqn in open_mods:
                ops_of[mod_fqn].append(item)
            live += item.memory if item.saved else 0
        live_at[t] = live

    mod_stats: list[ModStats] = []
    for fqn in fw_pre_order:
        ops = tuple(ops_of[fqn])
        is_leaf = all(
            not (other != fqn and other.startswith(fqn + ".")) for other in fw_pre_order
        )
        subtree = [f for f in fw_pre_order if f == fqn or f.startswith(fqn + ".")]
        params = sum(own_params[f] for f in subtree)
        # Gradients already accumulated when this module's backward starts: those of
        # the modules that ran after it in forward.
        grads_before = sum(p for f, p in own_params.items() if enter_at[f] > exit_at[fqn])
        fw_ms = sum(op.runtime for op in ops)
        output = ops[-1].memory
        act_total = live_at[exit_at[fqn]]
        act_fw = max(0, act_total - live_at[enter_at[fqn]] - output)
        tradeoff = None if is_leaf else _tradeoff(ops)
        mod_stats.append({
            "fqn": fqn,
            "param_per_module": params,
            "grad_per_module": params,
            "grad_total": grads_before,
            "act_fw_per_module": act_fw,
            "act_bw_per_module": act_total,
            "act_grad_per_module": 2 * max(op.memory for op in ops),
            "act_total": act_total,
            "input_per_module": H,
            "output_per_module": output,
            "fw_runtime_per_module": fw_ms,
            "bw_runtime_per_module": 2 * fw_ms,
            "is_leaf": is_leaf,
            "sac_runtime": tradeoff.sac_runtime if tradeoff else 0,
            "sac_memory": tradeoff.sac_memory if tradeoff else 0,
            "n_segments": tradeoff.n_segments if tradeoff else 0,
            "slopes": tradeoff.slopes if tradeoff else [],
            "intercepts": tradeoff.intercepts if tradeoff else [],
            "breakpoints": tradeoff.fit_breaks if tradeoff else [],
            "tradeoff_curve": tradeoff.tradeoff_curve if tradeoff else OrderedDict(),
        })
    assert total_params == mod_stats[0]["param_per_module"]
    mod_order: ModOrder = {
        "fw_pre_order": fw_pre_order,
        "bw_pre_order": list(reversed(fw_post_order)),
        "fw_post_order": fw_post_order,
        "bw_post_order": list(reversed(fw_pre_order)),
    }
    return {"mod_order": mod_order, "mod_stats": mod_stats}


LAYERS = {f"Transformer.layers.{i}" for i in range(4)}


def _lowest_possible_peak(graph: Graph, world_size: int) -> float:
    """A lower bound on the peak of any AC plan, independent of the MILP.

    In module i's backward, the AC units that finished their forward before i are
    disjoint subtrees, and each frees at most its forward activations
    (act_fw_per_module, at r = 1). The most they can free is a max over disjoint
    subtrees: best(v) = max(act_fw(v), sum of best(children)).
    """
    P_1 = graph.nodes[0]["param_per_module"]
    children: dict[int, list[int]] = {i: [] for i in range(len(graph.nodes))}
    for j in range(1, len(graph.nodes)):
        parent = max(i for i in range(j) if graph.ad_matrix[i][j] == 1)
        children[parent].append(j)
    best: dict[int, float] = {}
    for fqn in graph.fw_post_order:  # children before parents
        v = graph.name2node[fqn]
        own = 0 if v["is_leaf"] else v["act_fw_per_module"]
        best[v["index"]] = max(own, sum(best[c] for c in children[v["index"]]))
    bound = 0.0
    for node in graph.nodes:
        finished = set(graph.fw_post_order[: node["pos_fw_post_order"]])
        tops = [  # finished modules whose parent has not finished
            graph.name2node[f]["index"]
            for f in finished
            if not any(is_submodule(f, other) for other in finished)
        ]
        static = node["act_grad_per_module"] + (P_1 + node["grad_total"]) / world_size
        freed = sum(best[t] for t in tops)
        bound = max(bound, node["act_total"] + static - freed)
    return bound


@pytest.fixture(scope="module")
def graph() -> Graph:
    return parse_module_info(build_module_info(transformer(n_layers=4)))


@pytest.fixture(scope="module")
def baseline(graph: Graph) -> tuple[int, float]:
    return get_peak_memory_runtime_baseline(graph)


@pytest.fixture(params=["cbc", "highs"])
def options(request: pytest.FixtureRequest) -> SolverOptions:
    return SolverOptions(solver=request.param)


def test_graph_shape(graph: Graph, baseline: tuple[int, float]) -> None:
    assert graph.nodes[0]["fqn"] == "Transformer"
    assert set(graph.name2node) >= LAYERS
    # A layer and its 10 submodules form one contiguous pre-order block.
    i = graph.name2node["Transformer.layers.1"]["index"]
    assert graph.ad_matrix[i].sum() == 11
    assert graph.ad_matrix[0].sum() == len(graph.nodes)
    peak, compute_time = baseline
    # Same scale as PyTorch's test model (about 2.58 GiB, activation dominated).
    assert 2 * GiB < peak < 3.5 * GiB
    assert compute_time > 0


def test_tight_budget_checkpoints_every_layer(
    graph: Graph, baseline: tuple[int, float], options: SolverOptions
) -> None:
    """Case 1: the budget binds; every layer is checkpointed, by similar amounts.

    PyTorch's test sees three layers at 0.55 and one at 0.80, layers.3 among the
    former: discarding up to the knee of a layer's trade-off fit is cheap, and past
    it the cost per byte is the same in every layer, so the excess lands in one layer
    (any of the first three: they are interchangeable).
    """
    peak, compute_time = baseline
    budget = 0.62 * peak / GiB
    ac_decisions, recomputation_time, plan_peak = sac_milp(
        graph, memory_budget=budget, world_size=WORLD_SIZE, options=options
    )
    assert set(ac_decisions) == LAYERS
    ratios = sorted(ac_decisions.values())
    knee = graph.name2node["Transformer.layers.0"]["breakpoints"][1]
    assert ratios[:3] == pytest.approx([knee] * 3, abs=1e-3)
    assert knee < ratios[3] <= 1
    # In layers.3's own backward its activations are back (recomputed), so the
    # layers before it must cover that peak: layers.3 discards the least.
    assert ac_decisions["Transformer.layers.3"] == pytest.approx(ratios[0], abs=1e-3)
    # Every AC unit frees more than what autograd would not have saved anyway.
    for fqn, ratio in ac_decisions.items():
        node = graph.name2node[fqn]
        assert ratio > (node["sac_memory"] - node["act_fw_per_module"]) / node["sac_memory"]
    assert 0 < plan_peak <= budget * GiB * (1 + 1e-6)
    # The decisions are rounded to 4 decimals; the peak is that of the exact plan.
    assert plan_peak == pytest.approx(get_peak_memory(graph, ac_decisions, WORLD_SIZE), rel=1e-4)
    assert recomputation_time == pytest.approx(
        get_recomputation_time(graph, ac_decisions), abs=0.01
    )
    # Recomputing parts of four layers costs a few percent of a training step
    # (PyTorch's test: 7%).
    assert 0.02 < recomputation_time / compute_time < 0.2


def test_loose_budget_needs_no_ac(
    graph: Graph, baseline: tuple[int, float], options: SolverOptions
) -> None:
    """Case 2: the unsharded baseline peak fits, so nothing is checkpointed."""
    peak, _ = baseline
    ac_decisions, recomputation_time, plan_peak = sac_milp(
        graph, memory_budget=peak / GiB, world_size=WORLD_SIZE, options=options
    )
    assert ac_decisions == {}
    assert recomputation_time == 0
    assert plan_peak == get_peak_memory(graph, {}, WORLD_SIZE) > 1


def test_impossible_budget_is_reported_infeasible(
    graph: Graph,
    baseline: tuple[int, float],
    options: SolverOptions,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Case 3: even discarding everything cannot fit; the seed's ({}, 0, -1)."""
    peak, _ = baseline
    budget = 0.31 * peak / GiB
    assert budget * GiB < _lowest_possible_peak(graph, WORLD_SIZE)
    with caplog.at_level(logging.INFO, logger="sac_compiler.solvers.sac_milp"):
        result = sac_milp(graph, memory_budget=budget, world_size=WORLD_SIZE, options=options)
    assert result == ({}, 0, -1)
    assert "no AC plan fits" in caplog.text


def test_ac_units_restrict_the_choice(graph: Graph, baseline: tuple[int, float]) -> None:
    peak, _ = baseline
    budget = 0.75 * peak / GiB
    free, _, _ = sac_milp(graph, budget, world_size=WORLD_SIZE)
    ffn_units = [f"Transformer.layers.{i}.feed_forward" for i in range(4)]
    ac_decisions, recomputation_time, plan_peak = sac_milp(
        graph, budget, world_size=WORLD_SIZE, ac_units=ffn_units
    )
    assert ac_decisions and set(ac_decisions) <= set(ffn_units)
    assert 0 < plan_peak <= budget * GiB * (1 + 1e-6)
    # A restricted choice cannot be cheaper than the free one.
    assert recomputation_time >= get_recomputation_time(graph, free) - 0.01
    # Too few units for the tight budget: infeasible, not an error.
    assert sac_milp(graph, 0.62 * peak / GiB, WORLD_SIZE, ac_units=ffn_units[:1]) == (
        {}, 0, -1,
    )


def test_fsdp_units(graph: Graph, baseline: tuple[int, float]) -> None:
    peak, _ = baseline
    budget = 0.7 * peak / GiB
    fsdp_units = ["Transformer", *sorted(LAYERS)]
    _, plain_time, _ = sac_milp(graph, budget, world_size=WORLD_SIZE)
    ac_decisions, recomputation_time, plan_peak = sac_milp(
        graph, budget, world_size=WORLD_SIZE, fsdp_units=fsdp_units
    )
    # The root holds FSDP units below it, so it cannot be an AC unit; layers can.
    assert ac_decisions and "Transformer" not in ac_decisions
    # All-gathered parameters (3 x the largest unit) take budget: AC works harder.
    largest_unit = max(
        graph.name2node["Transformer"]["param_per_module"]
        - sum(graph.name2node[f]["param_per_module"] for f in LAYERS),
        *(graph.name2node[f]["param_per_module"] for f in LAYERS),
    )
    assert plan_peak + 3 * largest_unit <= budget * GiB * (1 + 1e-6)
    assert recomputation_time >= plain_time


def test_invalid_arguments(graph: Graph) -> None:
    with pytest.raises(ValueError, match="root module 'Transformer' must be an FSDP unit"):
        sac_milp(graph, 2.0, fsdp_units=["Transformer.layers.0"])
    with pytest.raises(ValueError, match="not in the graph"):
        sac_milp(graph, 2.0, ac_units=["Transformer.layer.0"])
    with pytest.raises(ValueError, match="world_size"):
        sac_milp(graph, 2.0, world_size=0)
    with pytest.raises(ValueError, match="memory_budget"):
        sac_milp(graph, float("nan"))


def test_parse_module_info_does_not_mutate_and_sorts() -> None:
    info = build_module_info(transformer(n_layers=1))
    shuffled: ModuleInfo = {
        "mod_order": info["mod_order"],
        "mod_stats": list(reversed(info["mod_stats"])),
    }
    g = parse_module_info(shuffled)
    assert [n["fqn"] for n in g.nodes] == info["mod_order"]["fw_pre_order"]
    assert all("index" not in s for s in shuffled["mod_stats"])
    assert [n["pos_fw_post_order"] for n in g.nodes] == [
        info["mod_order"]["fw_post_order"].index(n["fqn"]) for n in g.nodes
    ]
