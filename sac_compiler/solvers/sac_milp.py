"""Which modules to checkpoint, and how much of each to discard: the module-level MILP.

Port of ``sac_milp`` from PyTorch's ``torch.distributed._tools.sac_ilp`` on
python-mip. Memory variables are in GiB (bytes / 2**30), times in ms. For module ``i``
(forward pre-order; 0 is the root):

* ``y_i`` in {0, 1}: module ``i`` is an AC unit;
* ``r_i`` in [0, 1]: fraction of its SAC memory discarded;
* ``d_i = ACM_i r_i - (ACM_i - IA_i) y_i``: memory really freed (``ACM``: memory of all
  its ops, ``IA``: what autograd would have saved anyway);
* ``a_i = act_total_i + act_grad_i - sum of d_j over modules j that finished their
  forward before i``: activation memory in i's backward;
* ``m_i = a_i + (params_root + grad_total_i) / world_size``, ``max_m >= m_i``;
* ``rct_i = sac_runtime_i * max(0, max_s(slope_s r_i + intercept_s))`` if ``y_i``
  else 0 (the pwlf fit of the module's trade-off curve);

minimize ``sum_i rct_i`` subject to ``max_m + 3 * (largest unsharded FSDP unit) <=
budget``, no AC unit nested in another, no leaf AC unit, AC units within ``ac_units``
and not above an FSDP unit.

Reformulations that leave every optimum unchanged: the discarded memory before each
post-order position is a prefix-sum variable (O(n) nonzeros instead of O(n^2)); "no
nested AC units" is one clique row per root-to-module path instead of one row per
ancestor pair (same integer points, tighter relaxation); ``rct_i`` is bounded by the
perspective of the fit, ``rcp_i >= slope_s r_i + intercept_s y_i``, instead of three
big-M rows (same integer points; on a 32-layer model CBC goes from 24 s to 0.1 s);
unsharded FSDP parameters are constants. One change of tie-breaking: a
negligible cost (1e-6 ms per AC unit) keeps modules whose fit is free at their
minimal discard ratio out of the plan, so a budget that needs no AC gives ``{}``.
The returned peak is the evaluated peak of the plan (PyTorch returns ``max_m``, which
the solver may leave anywhere up to the budget).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

from sac_compiler.module_info import (
    Graph,
    Node,
    get_peak_memory,
    get_recomputation_time,
    is_submodule,
)
from sac_compiler.solvers._mip import (
    BINARY,
    InfeasibleError,
    SolverOptions,
    new_model,
    solve,
    xsum,
)

__all__ = ["sac_milp"]

logger = logging.getLogger(__name__)

MEM_MULTIPLIER = 2**30
# Cost (ms) of each AC unit in the objective: breaks ties toward fewer AC units.
_AC_UNIT_TIE_BREAK_MS = 1e-6
# How far (bytes) the solver's peak may drift from the evaluator's before it is a bug.
_PEAK_CHECK_ABS_BYTES = 2**20
_PEAK_CHECK_REL = 1e-5


def _check_inputs(
    graph: Graph,
    memory_budget: float,
    world_size: int,
    ac_units: Sequence[str],
    fsdp_units: Sequence[str],
) -> None:
    if not graph.nodes:
        raise ValueError("sac_milp needs a graph with at least the root module")
    budget_ok = (
        isinstance(memory_budget, (int, float))
        and math.isfinite(memory_budget)
        and memory_budget >= 0
    )
    if not budget_ok:
        raise ValueError(
            f"memory_budget must be a finite number of GiB >= 0, got {memory_budget!r}"
        )
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    for arg, units in (("ac_units", ac_units), ("fsdp_units", fsdp_units)):
        unknown = sorted(set(units) - set(graph.name2node))
        if unknown:
            raise ValueError(
                f"{arg} names modules that are not in the graph: {unknown}; "
                f"use fully qualified names such as {graph.nodes[0]['fqn']!r}"
            )
    root = graph.nodes[0]["fqn"]
    if fsdp_units and root not in fsdp_units:
        raise ValueError(
            f"the root module {root!r} must be an FSDP unit; add it to fsdp_units"
        )
    inner_units = [u for u in fsdp_units if u != root]
    nested = [(a, b) for a in inner_units for b in inner_units if is_submodule(b, a)]
    if nested:
        raise ValueError(
            f"nested FSDP units are not supported (besides the root): {nested}"
        )
    for node in graph.nodes:
        if not node["is_leaf"] and not (
            len(node["slopes"]) >= node["n_segments"]
            and len(node["intercepts"]) >= node["n_segments"]
        ):
            raise ValueError(
                f"module {node['fqn']!r} has n_segments={node['n_segments']} but "
                f"{len(node['slopes'])} slopes and {len(node['intercepts'])} intercepts"
            )


def _sac_memory(node: Node) -> int:
    """ACM: the SAC estimator's memory, never below the memory tracker's activations."""
    if not node["is_leaf"] and node["sac_memory"] < node["act_fw_per_module"]:
        logger.warning(
            "module %s: activation memory from the memory tracker (%d B) exceeds the "
            "SAC estimator's (%d B); using the former. Check both estimates.",
            node["fqn"], node["act_fw_per_module"], node["sac_memory"],
        )
        return node["act_fw_per_module"]
    return node["sac_memory"]


def _unsharded_params(graph: Graph, fsdp_units: Sequence[str]) -> list[float]:
    """GiB of parameters each FSDP unit all-gathers (the root gets what is left)."""
    if not fsdp_units:
        return [0.0] * len(graph.nodes)
    units = set(fsdp_units)
    p = [0.0] + [
        node["param_per_module"] / MEM_MULTIPLIER if node["fqn"] in units else 0.0
        for node in graph.nodes[1:]
    ]
    p[0] = max(0.0, graph.nodes[0]["param_per_module"] / MEM_MULTIPLIER - sum(p[1:]))
    return p


def _log_infeasible(
    graph: Graph, memory_budget: float, world_size: int, max_p: float
) -> None:
    P_1 = graph.nodes[0]["param_per_module"]
    static, static_fqn = max(
        (node["act_grad_per_module"] + (P_1 + node["grad_total"]) / world_size, node["fqn"])
        for node in graph.nodes
    )
    no_ac_peak = get_peak_memory(graph, {}, world_size)
    logger.info(
        "sac_milp: no AC plan fits memory_budget=%.3f GiB with world_size=%d. Without AC "
        "the peak is %.3f GiB; parameters, gradients and activation gradients alone "
        "reach %.3f GiB at %s, plus %.3f GiB (3 x the largest FSDP unit) for all-gathers. "
        "Raise memory_budget or world_size, or allow more AC units.",
        memory_budget, world_size, no_ac_peak / MEM_MULTIPLIER, static / MEM_MULTIPLIER,
        static_fqn, 3 * max_p,
    )


def sac_milp(
    graph: Graph,
    memory_budget: float,
    world_size: int = 1,
    ac_units: list[str] | None = None,
    fsdp_units: list[str] | None = None,
    options: SolverOptions | None = None,
) -> tuple[dict[str, float], float, int]:
    """Chooses AC units and discard ratios that minimize recomputation time.

    Args:
        graph: the module tree from ``parse_module_info``.
        memory_budget: memory budget in GiB.
        world_size: number of ranks; parameters and gradients are sharded over them.
        ac_units: if given, only these modules may be AC units.
        fsdp_units: FSDP units (the root must be one; no other nesting). AC units
            cannot be supermodules of FSDP units.
        options: solver options; ``SolverOptions()`` (CBC) by default.

    Returns:
        ``(ac_decisions, recomputation_time, peak_memory)``: module fqn -> fraction of
        its activation memory to discard (4 decimals); recomputation time in ms
        (2 decimals); peak memory in bytes of the plan (``max_m``, without the FSDP
        all-gather term). ``({}, 0, -1)`` when no plan fits the budget (logged at info
        level with the reason).

    Raises:
        ValueError: invalid arguments.
        SolverError: any solver failure other than proven infeasibility.
    """
    ac_units = list(ac_units) if ac_units else []
    fsdp_units = list(fsdp_units) if fsdp_units else []
    _check_inputs(graph, memory_budget, world_size, ac_units, fsdp_units)
    options = options if options is not None else SolverOptions()
    nodes = graph.nodes
    num_nodes = len(nodes)
    ACM = [_sac_memory(node) / MEM_MULTIPLIER for node in nodes]
    IA = [node["act_fw_per_module"] / MEM_MULTIPLIER for node in nodes]
    ACT = [node["sac_runtime"] for node in nodes]
    p = _unsharded_params(graph, fsdp_units)
    max_p = max(p)

    model = new_model("SAC", "MIN", options)
    # y_i: module i is an AC unit
    y = [model.add_var(name=f"y_{i}", var_type=BINARY) for i in range(num_nodes)]
    # r_i: fraction of module i's SAC memory discarded
    r = [model.add_var(name=f"r_{i}", lb=0, ub=1) for i in range(num_nodes)]
    # d_i: memory discarded by module i
    d = [model.add_var(name=f"d_{i}", lb=0) for i in range(num_nodes)]
    # dc_k: memory discarded by the modules at forward post-order positions < k
    dc = [model.add_var(name=f"dc_{k}", lb=0) for k in range(num_nodes)]
    # a_i: activation memory in module i's backward
    a = [model.add_var(name=f"a_{i}", lb=0) for i in range(num_nodes)]
    # m_i: memory in module i's backward (activations, parameters, gradients)
    m = [model.add_var(name=f"m_{i}", lb=0) for i in range(num_nodes)]
    # rcp_i: fraction of module i's SAC runtime recomputed
    rcp = [model.add_var(name=f"rcp_{i}", lb=0) for i in range(num_nodes)]
    # rct_i: recomputation time of module i (ms)
    rct = [model.add_var(name=f"rct_{i}", lb=0) for i in range(num_nodes)]
    # max_m: peak memory
    max_m = model.add_var(name="max_m", lb=0)

    # User-specified AC units: no other module is an AC unit.
    if ac_units:
        allowed = set(ac_units)
        for i in range(num_nodes):
            if nodes[i]["fqn"] not in allowed:
                model += y[i] == 0

    # AC units cannot be supermodules of FSDP units.
    for i in range(num_nodes):
        if any(is_submodule(unit, nodes[i]["fqn"]) for unit in fsdp_units):
            model += y[i] == 0

    # No nested AC units: at most one AC unit on each root-to-module path.
    for j in range(num_nodes):
        path = np.flatnonzero(graph.ad_matrix[: j + 1, j]).tolist()
        if len(path) > 1 and not nodes[j]["is_leaf"]:
            model += xsum(y[i] for i in path) <= 1

    # Leaf modules are not AC units.
    for i in range(num_nodes):
        if nodes[i]["is_leaf"]:
            model += y[i] == 0

    # Discarded memory: the part of ACM that autograd would not have saved does not count.
    for i in range(num_nodes):
        model += d[i] == ACM[i] * r[i] - (ACM[i] - IA[i]) * y[i]

    # r_i > 0 only for AC units, and large enough to discard more than ACM - IA.
    for i in range(num_nodes):
        model += r[i] <= y[i]
        if not nodes[i]["is_leaf"] and ACM[i] > 0:
            model += r[i] >= (ACM[i] - IA[i]) / ACM[i] * y[i]

    # Prefix sums of discarded memory along the forward post-order.
    model += dc[0] == 0
    for k in range(1, num_nodes):
        j = graph.name2node[graph.fw_post_order[k - 1]]["index"]
        model += dc[k] == dc[k - 1] + d[j]

    # Activation memory in backward: everything alive after i's forward, plus
    # activation gradients, minus what the AC units finished before i discarded.
    for i in range(num_nodes):
        TA_i = nodes[i]["act_total"] / MEM_MULTIPLIER
        AG_i = nodes[i]["act_grad_per_module"] / MEM_MULTIPLIER
        model += a[i] == TA_i + AG_i - dc[nodes[i]["pos_fw_post_order"]]

    # Memory at each module: activations plus sharded parameters and gradients.
    P_1 = nodes[0]["param_per_module"] / MEM_MULTIPLIER
    for i in range(num_nodes):
        TG_i = nodes[i]["grad_total"] / MEM_MULTIPLIER
        model += m[i] == a[i] + (P_1 + TG_i) / world_size

    # Peak memory.
    for i in range(num_nodes):
        model += max_m >= m[i]

    # Recomputed fraction: above every segment of the pwlf fit if AC unit, else 0.
    # Intercepts are scaled by y_i (the perspective of the fit), which is exact for
    # integer y_i and needs no big-M.
    for i in range(num_nodes):
        for s in range(nodes[i]["n_segments"]):
            slope, intercept = nodes[i]["slopes"][s], nodes[i]["intercepts"][s]
            model += rcp[i] >= slope * r[i] + intercept * y[i]

    # Recomputation time.
    for i in range(num_nodes):
        model += rct[i] == ACT[i] * rcp[i]

    # Peak memory plus the all-gathered FSDP parameters stay within the budget.
    model += max_m + 3 * max_p <= memory_budget

    # Minimize recomputation time (ties: fewer AC units).
    model.objective = xsum(rct) + _AC_UNIT_TIE_BREAK_MS * xsum(y)

    try:
        solve(model, options)
    except InfeasibleError:
        _log_infeasible(graph, memory_budget, world_size, max_p)
        return {}, 0, -1

    ratios = {
        nodes[i]["fqn"]: min(1.0, max(0.0, r[i].x))
        for i in range(num_nodes)
        if round(y[i].x) == 1
    }
    peak_mem = get_peak_memory(graph, ratios, world_size)
    model_peak = max(m[i].x for i in range(num_nodes)) * MEM_MULTIPLIER
    tolerance = max(_PEAK_CHECK_ABS_BYTES, _PEAK_CHECK_REL * peak_mem)
    assert abs(peak_mem - model_peak) <= tolerance, (
        f"sac_milp: evaluated peak {peak_mem} B differs from the solver's {model_peak:.0f} B"
    )
    ac_decisions = {fqn: round(ratio, 4) for fqn, ratio in ratios.items()}
    recomputation_time = round(get_recomputation_time(graph, ratios), 2)
    return ac_decisions, recomputation_time, peak_mem
