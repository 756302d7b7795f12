"""A partition as plain data, and its simulation replayed from that data on any machine.

``record_partition(result, fw, bw)`` turns the forward and backward graphs the backend partitioned
(with every placeholder's size, stride and dtype) and the arguments of their simulation into a
JSON-ready dict; ``replay_partition(record)`` rebuilds the graphs on CPU fake tensors and runs the
partitioned simulation of the code at hand on them. A plan recorded on a GPU can so be
re-simulated on a laptop after the memory model changes, and compared with what the GPU measured
(``benchmarks/compare_strategies.py --dump-partitions`` records every plan it runs).
"""

from __future__ import annotations

import importlib
import math
import operator
from typing import Any

import torch
import torch.fx as fx

from sac_compiler.passes.memory_model import rule_on

FORMAT = 1

_SCALARS = (bool, int, float, str, type(None))


def record_partition(result: Any, fw: fx.GraphModule, bw: fx.GraphModule) -> dict[str, Any]:
    """``result``: the backend's ``GraphPlanResult`` for the graph ``fw`` and ``bw`` came from."""
    args = result.simulation_args()
    peak = result.partitioned
    return {
        "format": FORMAT,
        "torch": torch.__version__,
        "fw": _graph(fw),
        "bw": _graph(bw),
        "num_fwd_outputs": args["num_fwd_outputs"],
        "static_names": sorted(args["static_names"]),
        "target_device": str(args["target_device"]),
        "fused_pointwise": args["fused_pointwise"],
        "extra_static_bytes": args["extra_static_bytes"],
        "forward_names": sorted(args["forward_names"]),
        "hold_outputs": args["hold_outputs"],
        "loss_memory": args["loss_memory"],
        "gradients_held": args["gradients_held"],
        # the emission kept far matmul-and-add folds apart (records before it: Inductor folded them)
        "far_addmm_apart": rule_on("far_addmm_apart"),
        # the emission kept far accumulated sums apart (records before it: Inductor fused them)
        "accumulation_apart": rule_on("accumulation_apart"),
        # Inductor compiled the graphs with its reordering for peak memory (SACConfig.reorder_for_peak_memory)
        "reorder_for_peak_memory": result.reorder_for_peak_memory,
        "static_bytes": result.analysis.memory.static_bytes,
        "outside_bytes": result.outside_bytes,
        "budget_bytes": result.budget_bytes,
        "recompute": sorted(result.plan.recompute) if result.plan is not None else None,
        "partitioned": None if peak is None else {
            "peak_bytes": peak.peak_bytes, "peak_graph": peak.peak_graph, "peak_node": peak.peak_node},
    }


def replay_partition(record: dict[str, Any], timelines: dict[str, list[tuple[str, int]]] | None = None,
                     inductor_order: bool = False, on_target: bool = False) -> Any:
    """The partitioned simulation (``sac_compiler.passes.annotate_memory.PartitionedPeak``) of a recorded
    partition, by the memory model of this code; ``timelines`` receives each graph's live bytes
    per node. ``inductor_order``: the backward runs in the order Inductor schedules it
    (``sac_compiler.inductor_order``). ``on_target``: the graphs are rebuilt on fake tensors of
    the record's target device rather than of the CPU, so that Inductor lowers them as it does
    there (its fusion and its reordering for peak memory differ between CPU and CUDA); a CUDA
    target needs a GPU."""
    from sac_compiler.passes.annotate_memory import simulate_partitioned

    if record.get("format") != FORMAT:
        raise ValueError(f"partition record format {record.get('format')!r} is not {FORMAT}: "
                         "record it again with this version of sac-compiler")
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    device = torch.device(record["target_device"]) if on_target else torch.device("cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"on_target: the record's target device is {device}, and no GPU is visible; "
                           "replay on CPU (on_target=False) or on a machine with the GPU")
    fw, bw = _module(record["fw"], mode, device), _module(record["bw"], mode, device)
    if inductor_order:
        from sac_compiler.inductor_order import in_inductor_order

        reorder = record.get("reorder_for_peak_memory", True)  # records before the option: Inductor's default
        with mode:  # the backward, as the backend simulates it (inductor_order.simulate_in_inductor_order)
            bw = in_inductor_order(bw, backward=True, reorder_for_peak_memory=reorder)
    with _rules_off(inductor_order), _as_emitted(record):
        return simulate_partitioned(
            fw, bw, record["num_fwd_outputs"], set(record["static_names"]), torch.device(record["target_device"]),
            record["fused_pointwise"], record["extra_static_bytes"], frozenset(record["forward_names"]), timelines,
            hold_outputs=record.get("hold_outputs", False),  # records before the option: dropped outputs
            loss_memory=record.get("loss_memory", 0),
            gradients_held=record.get("gradients_held", 0))  # records before it: none counted


def _as_emitted(record: dict[str, Any]) -> Any:
    """The rules that follow what the backend emitted, as the record says it was emitted."""
    import contextlib

    from sac_compiler.passes.memory_model import rules_disabled

    off = [rule for rule in ("far_addmm_apart", "accumulation_apart") if not record.get(rule, False)]
    return rules_disabled(*off) if off else contextlib.nullcontext()


def _rules_off(inductor_order: bool) -> Any:
    """The ordering rules Inductor's schedule replaces switched off (``inductor_order``), else nothing."""
    import contextlib

    from sac_compiler.inductor_order import REPLACED_RULES
    from sac_compiler.passes.memory_model import rules_disabled

    return rules_disabled(*REPLACED_RULES) if inductor_order else contextlib.nullcontext()


_CPU = torch.device("cpu")  # where a record is rebuilt unless on_target


# --- graphs as data ------------------------------------------------------------------------------


def _graph(gm: fx.GraphModule) -> dict[str, Any]:
    nodes: list[dict[str, Any]] = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            nodes.append({"op": "placeholder", "name": node.name, "val": _tensor_spec(node)})
        elif node.op == "call_function":
            target, args, kwargs = _unwrapped(node)
            nodes.append({"op": "call_function", "name": node.name, "target": _target(target),
                          "args": _value(args), "kwargs": _value(kwargs)})
        elif node.op == "output":
            nodes.append({"op": "output", "args": _value(node.args)})
        else:
            raise ValueError(f"cannot record graph node {node.name} ({node.op}): only placeholders, "
                             "call_function nodes and the output are supported")
    return {"nodes": nodes}


def _unwrapped(node: fx.Node) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """A call's target, args and kwargs, with a random op the partitioner runs from a saved RNG
    state (``graphsafe_run_with_rng_state(op, *args, rng_state=...)``, ``run_with_rng_state(state,
    op, *args)``) recorded as the op itself: it allocates what the op allocates."""
    target, args, kwargs = node.target, tuple(node.args), dict(node.kwargs)
    name = getattr(target, "__name__", None) if isinstance(target, torch._ops.HigherOrderOperator) else None
    if name == "graphsafe_run_with_rng_state":
        kwargs.pop("rng_state", None)
        return args[0], args[1:], kwargs
    if name == "run_with_rng_state":
        return args[1], args[2:], kwargs
    return target, args, kwargs


def _tensor_spec(node: fx.Node) -> Any:
    from sac_compiler.passes.record import size_hint

    val = node.meta.get("val")
    if isinstance(val, torch.Generator):  # a graph-safe RNG state: only the wrappers above read it
        return {"scalar": None}
    if isinstance(val, torch.Tensor):
        return {"size": [size_hint(s) for s in val.shape], "stride": [size_hint(s) for s in val.stride()],
                "dtype": str(val.dtype).removeprefix("torch.")}
    if isinstance(val, (int, float, bool)) or val is None:
        return {"scalar": _value(val)}
    return {"scalar": size_hint(val)}  # a symbolic size: its hint


def _target(target: Any) -> str:
    if target is operator.getitem:
        return "operator.getitem"
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}.{target._overloadname}"
    raise ValueError(f"cannot record call target {target!r}: only ATen/prims operator overloads and getitem")


def _value(value: Any) -> Any:
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if isinstance(value, tuple):
        return {"tuple": [_value(v) for v in value]}
    if isinstance(value, list):
        return [_value(v) for v in value]
    if isinstance(value, dict):
        return {"dict": {k: _value(v) for k, v in value.items()}}
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": repr(value)}
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    raise ValueError(f"cannot record argument {value!r} of type {type(value).__name__}")


def _module(data: dict[str, Any], mode: Any, device: torch.device = _CPU) -> fx.GraphModule:
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    inputs: list[Any] = []
    for entry in data["nodes"]:
        if entry["op"] == "placeholder":
            node = graph.placeholder(entry["name"])
            inputs.append(_input(entry["val"], mode, device))
        elif entry["op"] == "call_function":
            # named through the graph's namespace: a node a pass adds later gets a name of its own
            node = graph.create_node("call_function", _resolve(entry["target"]), _load(entry["args"], env, device),
                                     _load(entry["kwargs"], env, device), name=entry["name"])
        else:
            graph.output(_load(entry["args"], env, device)[0])
            continue
        env[entry["name"]] = node
    gm = fx.GraphModule(torch.nn.Module(), graph)
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*inputs)
    return gm


def _input(spec: dict[str, Any], mode: Any, device: torch.device = _CPU) -> Any:
    if "scalar" in spec:
        return _load(spec["scalar"], {}, device)
    with mode:
        return torch.empty_strided(spec["size"], spec["stride"], dtype=getattr(torch, spec["dtype"]), device=device)


def _resolve(name: str) -> Any:
    if name == "operator.getitem":
        return operator.getitem
    if name.startswith("prims."):
        # registers Inductor's prims (inductor_seeds, inductor_random, and fma, which Inductor's
        # decompositions write), which a fresh process does not have
        importlib.import_module("torch._inductor.inductor_prims")
    if name.startswith("sac_compiler."):
        importlib.import_module("sac_compiler.fusion_barrier")  # the backend's own ops
    namespace, op, overload = name.split(".")
    return getattr(getattr(getattr(torch.ops, namespace), op), overload)


def _load(value: Any, env: dict[str, fx.Node], device: torch.device = _CPU) -> Any:
    if isinstance(value, list):
        return [_load(v, env, device) for v in value]
    if not isinstance(value, dict):
        return value
    (kind, inner), = value.items()
    if kind == "node":
        return env[inner]
    if kind == "tuple":
        return tuple(_load(v, env, device) for v in inner)
    if kind == "dict":
        return {k: _load(v, env, device) for k, v in inner.items()}
    if kind == "float":
        return float(inner)
    if kind == "dtype":
        return getattr(torch, inner)
    if kind == "device":
        return device  # the device the graphs are rebuilt on (the sizes are the target's either way)
    if kind == "layout":
        return getattr(torch, inner)
    if kind == "memory_format":
        return getattr(torch, inner)
    raise ValueError(f"unknown recorded value {value!r}")
