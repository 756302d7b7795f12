"""Module-level memory/runtime statistics and the module tree the SAC MILP runs on.

Torch-free port of PyTorch's ``torch.distributed._tools.ilp_utils`` (everything but
``aggregate_stats``, which needs the eager trackers): the ``ModStats``/``ModuleInfo``
records, the ``Node``/``Graph`` module tree, ``parse_module_info`` and
``get_peak_memory_runtime_baseline``, plus ``get_peak_memory`` and
``get_recomputation_time``, evaluators that recompute the MILP's memory and runtime
models for any AC decision.

Memory is in bytes and runtime in milliseconds throughout. Nodes are numbered in
forward pre-order, so node 0 is the root module and every subtree is a contiguous
index range.

Differences from PyTorch: ``parse_module_info`` copies the records instead of adding
``index``/``pos_fw_post_order`` to the caller's dicts, and really orders the nodes by
forward pre-order (PyTorch sorts a copy and then iterates the unsorted list); module
ancestry is a prefix test (``"a.b" + "."`` starts the descendant's name) instead of a
substring test.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import TypedDict, cast

import numpy as np

__all__ = [
    "Graph",
    "ModOrder",
    "ModRuntime",
    "ModStats",
    "ModuleInfo",
    "Node",
    "discarded_memory",
    "display_bytes",
    "get_peak_memory",
    "get_peak_memory_runtime_baseline",
    "get_recomputation_time",
    "is_self_or_submodule",
    "is_submodule",
    "parse_module_info",
]


class ModOrder(TypedDict):
    """Module FQNs in the order their pre/post forward/backward hooks ran."""

    fw_pre_order: list[str]
    bw_pre_order: list[str]
    fw_post_order: list[str]
    bw_post_order: list[str]


class ModRuntime(TypedDict):
    fw: float
    bw: float


class ModStats(TypedDict):
    fqn: str
    # per-module params
    param_per_module: int
    # per-module grads
    grad_per_module: int
    # total accumulated gradients up to and including this module
    grad_total: int
    # per module fw activation size (excluding input and output)
    act_fw_per_module: int
    # per module bw activation size during peak_bw
    act_bw_per_module: int
    # per module activation grad size during peak_bw
    act_grad_per_module: int
    # total activation size up to but excluding the current module
    # includes input of the current module (i.e., output of previous module)
    act_total: int
    # Inputs to the module
    input_per_module: int
    # Outputs of the module
    output_per_module: int
    # Total fw run-time of the module
    fw_runtime_per_module: float
    # Total bw run-time of the module
    bw_runtime_per_module: float
    # Is this module a leaf module
    is_leaf: bool
    # Total ac run-time of the module
    sac_runtime: float
    # Total ac_memory for the module
    sac_memory: int
    # Number of piecewise-linear functions used for approximating ac tradeoff curve
    n_segments: int
    # Slopes of the of piecewise-linear functions
    slopes: list[float]
    # Intercepts of the of piecewise-linear functions
    intercepts: list[float]
    # X breakpoints of the of piecewise-linear functions
    breakpoints: list[float]
    # Original trade-off curves
    tradeoff_curve: OrderedDict[float, float]


class ModuleInfo(TypedDict):
    mod_order: ModOrder
    mod_stats: list[ModStats]


class Node(ModStats):
    index: int  # index according to forward pre-order
    pos_fw_post_order: int  # index according to forward post-order


class Graph:
    """The module tree: nodes in forward pre-order and an ancestor-descendant matrix.

    ``ad_matrix[i][j] == 1`` iff node ``j`` is node ``i`` or one of its submodules.
    """

    def __init__(self, n: int) -> None:
        self.nodes: list[Node] = []
        self.name2node: dict[str, Node] = {}
        self.ad_matrix = np.zeros((n, n))
        self.fw_post_order: list[str] = []

    def add_node(self, node: Node) -> None:
        self.nodes.append(node)
        self.name2node[node["fqn"]] = node


def is_self_or_submodule(name_descendant: str, name_ancestor: str) -> bool:
    """Whether ``name_descendant`` is ``name_ancestor`` or one of its submodules."""
    return name_descendant == name_ancestor or is_submodule(name_descendant, name_ancestor)


def is_submodule(name_descendant: str, name_ancestor: str) -> bool:
    """Whether ``name_descendant`` is a submodule of ``name_ancestor`` (not itself)."""
    return name_descendant.startswith(name_ancestor + ".")


def display_bytes(b: int, unit: str = "MiB") -> str:
    """``b`` bytes as a string in ``unit`` (KiB, MiB or GiB; anything else: bytes)."""
    if unit == "KiB":
        return f"{b / 2**10:.2f} KiB"
    if unit == "MiB":
        return f"{b / 2**20:.2f} MiB"
    if unit == "GiB":
        return f"{b / 2**30:.2f} GiB"
    return f"{b:.2f} bytes"


def _check_same_modules(kind: str, names: list[str], known: set[str]) -> None:
    missing = known - set(names)
    extra = set(names) - known
    if missing or extra or len(names) != len(known):
        raise ValueError(
            f"module_info['mod_order']['{kind}'] must list every module of "
            f"module_info['mod_stats'] exactly once; missing {sorted(missing)}, "
            f"unknown {sorted(extra)}, {len(names)} entries for {len(known)} modules"
        )


def parse_module_info(module_info: ModuleInfo) -> Graph:
    """Builds the module tree the SAC MILP runs on.

    Nodes are copies of the ``ModStats`` records, ordered by forward pre-order, with
    ``index`` (pre-order position) and ``pos_fw_post_order`` (post-order position)
    added. The input is not modified.
    """
    mod_stats = module_info["mod_stats"]
    fw_pre_order = module_info["mod_order"]["fw_pre_order"]
    fw_post_order = module_info["mod_order"]["fw_post_order"]
    fqns = [s["fqn"] for s in mod_stats]
    if len(set(fqns)) != len(fqns):
        raise ValueError(f"module_info['mod_stats'] has duplicate fqns: {fqns}")
    _check_same_modules("fw_pre_order", fw_pre_order, set(fqns))
    _check_same_modules("fw_post_order", fw_post_order, set(fqns))

    n_nodes = len(mod_stats)
    g = Graph(n_nodes)
    g.fw_post_order = list(fw_post_order)
    pre_pos = {fqn: i for i, fqn in enumerate(fw_pre_order)}
    post_pos = {fqn: i for i, fqn in enumerate(fw_post_order)}
    for i, one_mod_stats in enumerate(sorted(mod_stats, key=lambda s: pre_pos[s["fqn"]])):
        node = cast(Node, dict(one_mod_stats))
        node["index"] = i
        node["pos_fw_post_order"] = post_pos[node["fqn"]]
        g.add_node(node)

    # Ancestor-descendant matrix: in pre-order a subtree is the contiguous range that
    # starts at its root.
    for i in range(n_nodes):
        for j in range(i, n_nodes):
            if is_self_or_submodule(g.nodes[j]["fqn"], g.nodes[i]["fqn"]):
                g.ad_matrix[i][j] = 1
            else:
                break
    return g


def get_peak_memory_runtime_baseline(graph: Graph) -> tuple[int, float]:
    """Baseline peak memory (bytes) and compute time (ms): no FSDP, no AC.

    Memory counts parameters, gradients, activations and activation gradients, not
    optimizer states; the peak is taken over every module's backward.
    """
    P_1 = graph.nodes[0]["param_per_module"]
    peak_mem = 0
    for node in graph.nodes:
        TG_i = node["grad_total"]
        AG_i = node["act_grad_per_module"]
        TA_i = node["act_total"]
        peak_mem = max(peak_mem, P_1 + TG_i + AG_i + TA_i)
    compute_time = (
        graph.nodes[0]["fw_runtime_per_module"] + graph.nodes[0]["bw_runtime_per_module"]
    )
    return (peak_mem, compute_time)


def discarded_memory(node: ModStats, ratio: float) -> float:
    """Bytes freed by AC-ing ``node`` and discarding ``ratio`` of its SAC memory.

    ``sac_memory * ratio - (sac_memory - act_fw_per_module)``: the part of the ops'
    memory autograd would not have kept anyway does not count as saved. A
    ``sac_memory`` below ``act_fw_per_module`` is raised to it, as the MILP does.
    """
    acm = max(node["sac_memory"], node["act_fw_per_module"])
    return acm * ratio - (acm - node["act_fw_per_module"])


def get_peak_memory(
    graph: Graph, ac_decisions: Mapping[str, float], world_size: int = 1
) -> int:
    """Peak memory (bytes) of the MILP's memory model for given AC decisions.

    For every module ``i``, in backward:
    ``act_total_i + act_grad_i - (memory discarded by the AC units that finished their
    forward before i) + (root params + grad_total_i) / world_size``.
    With no decisions and ``world_size == 1`` this is the baseline peak.

    Args:
        graph: the module tree from ``parse_module_info``.
        ac_decisions: module fqn -> fraction of its SAC memory discarded.
        world_size: FSDP sharding factor of parameters and gradients.
    """
    unknown = set(ac_decisions) - set(graph.name2node)
    if unknown:
        raise ValueError(f"ac_decisions name unknown modules {sorted(unknown)}")
    P_1 = graph.nodes[0]["param_per_module"]
    # Discarded memory before each forward post-order position (a prefix sum).
    discarded_before = [0.0]
    for fqn in graph.fw_post_order:
        ratio = ac_decisions.get(fqn)
        d = discarded_memory(graph.name2node[fqn], ratio) if ratio is not None else 0.0
        discarded_before.append(discarded_before[-1] + d)
    peak = max(
        node["act_total"]
        + node["act_grad_per_module"]
        - discarded_before[node["pos_fw_post_order"]]
        + (P_1 + node["grad_total"]) / world_size
        for node in graph.nodes
    )
    return round(peak)


def get_recomputation_time(graph: Graph, ac_decisions: Mapping[str, float]) -> float:
    """Recomputation time (ms) of the MILP's runtime model for given AC decisions.

    An AC unit discarding ``r`` of its SAC memory recomputes
    ``sac_runtime * max(0, max_s(slope_s * r + intercept_s))``: the pwlf fit of its
    trade-off curve, read as the upper envelope of its segments.
    """
    unknown = set(ac_decisions) - set(graph.name2node)
    if unknown:
        raise ValueError(f"ac_decisions name unknown modules {sorted(unknown)}")
    total = 0.0
    for fqn, ratio in ac_decisions.items():
        node = graph.name2node[fqn]
        n = node["n_segments"]
        lines = zip(node["slopes"][:n], node["intercepts"][:n], strict=True)
        fraction = max((slope * ratio + intercept for slope, intercept in lines), default=0.0)
        total += node["sac_runtime"] * max(0.0, fraction)
    return total
