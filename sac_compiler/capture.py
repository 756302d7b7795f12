"""Capture the joint forward+backward ATen graph of a model on fake tensors.

Dynamo traces the model (fake-ifying real, meta or fake parameters, so no device memory is used),
AOTAutograd functionalises it and builds the joint graph; :func:`capture_joint` stops there and
returns it with what the passes need to know: how many forward outputs there are, and which graph
inputs are parameters, buffers, user inputs or tangents.

The graph is traced on the device the model and inputs live on. Build the model under
``FakeTensorMode()`` and ``torch.device("cuda")`` (where CUDA works) to plan a model of any size
on CUDA fake tensors, or on ``"meta"``/CPU elsewhere; ``target_device`` then labels the values
with the device the plan is for (the memory pass rounds as that device's allocator does).

Traced on CPU or meta for a CUDA target, the composites whose body depends on the device
(``scaled_dot_product_attention``, ``rms_norm``) are traced as their CUDA branch runs them, so the
graph holds the fused attention and normalisation kernels the GPU runs and the tensors they keep
for backward (see :mod:`sac_compiler.gpu_lowering`).
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

log = logging.getLogger(__name__)

CAPTURE_META_KEY = "sac_capture"


class InputKind(str, enum.Enum):
    PARAMETER = "parameter"
    BUFFER = "buffer"
    USER_INPUT = "user_input"
    TANGENT = "tangent"


@dataclass(frozen=True)
class GraphInput:
    """One placeholder of the joint graph."""

    name: str
    kind: InputKind
    fqn: str | None = None  # parameter/buffer FQN (with the root module's class name), else None


@dataclass
class JointGraph:
    """A captured joint (or, without backward, forward-only) graph and its inputs' meaning."""

    gm: fx.GraphModule
    num_fwd_outputs: int
    inputs: tuple[GraphInput, ...]
    root_name: str
    target_device: torch.device
    has_backward: bool
    source_gm: fx.GraphModule | None = field(default=None, repr=False)
    # the composites traced as the target device runs them ("aten.op -> kernel"; see gpu_lowering)
    lowered: tuple[str, ...] = ()
    # the FSDP2 parameters among the inputs (sac_compiler.distributed.FSDPInputs), None if none
    fsdp: Any = None

    def sharding(self) -> Any:
        """The graph's FSDP2 parameters by placeholder name (an ``FSDPSharding``), or None."""
        if self.fsdp is None:
            return None
        return self.fsdp.sharding([i.name for i in self.inputs if i.kind != InputKind.TANGENT])

    @property
    def trace_device(self) -> torch.device | None:
        for node in self.gm.graph.find_nodes(op="placeholder"):
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                return val.device
        return None


class CaptureError(RuntimeError):
    """The model could not be captured as one joint graph."""


class _CaptureDone(Exception):
    """Raised from inside the capture backend to stop Dynamo before anything runs."""

    def __init__(self, graph: JointGraph) -> None:
        super().__init__("joint graph captured")
        self.graph = graph


_SOURCE_PART = re.compile(r"\._(?:modules|parameters|buffers)\['([^']*)'\]|\['([^']*)'\]|\[(\d+)\]|\.(\w+)")


def _fqn_from_source(source_name: str, root_name: str) -> tuple[InputKind, str | None]:
    """Classify a Dynamo input source such as ``L['self']._modules['fc1']._parameters['weight']``."""
    if "._parameters[" in source_name:
        kind = InputKind.PARAMETER
    elif "._buffers[" in source_name:
        kind = InputKind.BUFFER
    else:
        return InputKind.USER_INPUT, None
    head = re.match(r"^[LG]\['[^']*'\]", source_name)
    rest = source_name[head.end():] if head else source_name
    parts = [next(g for g in m.groups() if g is not None) for m in _SOURCE_PART.finditer(rest)]
    return kind, ".".join([root_name, *parts])


def describe_inputs(source_gm: fx.GraphModule, aot_gm: fx.GraphModule, root_name: str) -> tuple[GraphInput, ...]:
    """Pair the AOT graph's placeholders with Dynamo's graph inputs (they come in the same order)."""
    sources = []
    for node in source_gm.graph.find_nodes(op="placeholder"):
        grapharg = node.meta.get("grapharg")
        sources.append(grapharg.source.name if grapharg is not None and grapharg.source is not None else "")
    placeholders = list(aot_gm.graph.find_nodes(op="placeholder"))
    primals = [n for n in placeholders if not n.name.startswith("tangents")]
    described: list[GraphInput] = []
    for i, node in enumerate(placeholders):
        if node.name.startswith("tangents"):
            described.append(GraphInput(node.name, InputKind.TANGENT))
            continue
        index = primals.index(node)
        if len(primals) == len(sources):
            kind, fqn = _fqn_from_source(sources[index], root_name)
        else:  # AOTAutograd added or removed inputs: only the user can tell; say so at debug level
            log.debug("cannot pair %d graph inputs with %d Dynamo inputs", len(primals), len(sources))
            kind, fqn = InputKind.USER_INPUT, None
        described.append(GraphInput(node.name, kind, fqn))
    return tuple(described)


def attach_capture_info(graph: JointGraph) -> None:
    """Store what the passes need on ``gm.meta`` so they also work on the bare GraphModule."""
    graph.gm.meta[CAPTURE_META_KEY] = graph


def capture_info(gm: fx.GraphModule) -> JointGraph | None:
    return gm.meta.get(CAPTURE_META_KEY)


def _validate(model: Any, example_inputs: Sequence[Any]) -> None:
    if not callable(model):
        raise ValueError(
            f"model must be a torch.nn.Module or a callable, got {type(model).__name__}; "
            "pass the module itself (e.g. capture_joint(model, x))"
        )
    if not example_inputs:
        raise ValueError("capture_joint needs example inputs: capture_joint(model, *example_inputs)")


def _root_name(model: Any) -> str:
    if isinstance(model, torch.nn.Module):
        return type(model).__name__
    return getattr(model, "__name__", type(model).__name__)


def capture_joint(
    model: torch.nn.Module | Callable[..., Any],
    *example_inputs: Any,
    target_device: str | torch.device | None = None,
    backward: bool = True,
    lower_for_target: bool = True,
    decompose: bool = False,
    world_size: int = 1,
    shard_all: bool = False,
) -> JointGraph:
    """Trace ``model(*example_inputs)`` to the joint forward+backward ATen graph on fake tensors.

    Nothing is executed: Dynamo fake-ifies the parameters and inputs, AOTAutograd builds the joint
    graph and the capture stops. With ``backward=False`` (or when nothing requires grad) the result
    is the forward graph alone (``has_backward=False``).

    With a CUDA ``target_device`` and a CPU or meta trace, attention and RMSNorm are traced as the
    GPU runs them (``lower_for_target=False`` keeps the trace device's own lowering);
    ``JointGraph.lowered`` lists what was lowered. ``decompose``: trace through Inductor's
    decompositions, as the backend's graph is traced when it compiles with Inductor (a plan for
    Inductor sees the ops Inductor lowers: ``log_softmax``'s backward as the pointwise ops it fuses,
    not three vocabulary-sized buffers). ``world_size`` > 1: the graph's FSDP2 parameters
    (``JointGraph.fsdp``) are found among the model's (``shard_all``: every parameter counts as
    FSDP2 would shard it when the model holds no FSDP2 state). On meta, whatever the target, composites whose
    gradient would stop at a meta kernel (``cross_entropy``'s ``nll_loss``) are traced through, as
    on CPU.

    Raises ValueError for a model or inputs that do not fit, CaptureError when the model cannot be
    traced as one graph (graph breaks).
    """
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from sac_compiler.distributed import fsdp_inputs
    from sac_compiler.gpu_lowering import lowered_as_on, restore_aten_ops

    _validate(model, example_inputs)
    root_name = _root_name(model)

    def capture_backend(source_gm: fx.GraphModule, dynamo_inputs: list[Any]) -> Callable[..., Any]:
        trace_device = _trace_device(dynamo_inputs)
        lowering_target = target_device if (lower_for_target and target_device is not None) else trace_device

        def finish(gm: fx.GraphModule, num_fwd_outputs: int, has_backward: bool) -> None:
            device = target_device
            if device is None:
                vals = [n.meta.get("val") for n in gm.graph.find_nodes(op="placeholder")]
                devices = [v.device for v in vals if isinstance(v, torch.Tensor)]
                device = devices[0] if devices else torch.device("cpu")
            restore_aten_ops(gm)
            graph = JointGraph(
                gm=gm,
                num_fwd_outputs=num_fwd_outputs,
                inputs=describe_inputs(source_gm, gm, root_name),
                root_name=root_name,
                target_device=torch.device(device),
                has_backward=has_backward,
                source_gm=source_gm,
                lowered=tuple(sorted(lowering.counts)),
                fsdp=fsdp_inputs(dynamo_inputs, world_size, shard_all=shard_all),
            )
            attach_capture_info(graph)
            raise _CaptureDone(graph)

        def partition(joint: fx.GraphModule, _joint_inputs: Any, *, num_fwd_outputs: int, **_: Any) -> Any:
            if decompose:
                random_as_inductor(joint)
            finish(joint, num_fwd_outputs, has_backward=True)

        def inference(gm: fx.GraphModule, _inputs: Any) -> Any:
            out = next(iter(gm.graph.find_nodes(op="output")))
            finish(gm, len(out.args[0]), has_backward=False)

        def unused(gm: fx.GraphModule, _inputs: Any) -> Any:  # pragma: no cover - capture stops earlier
            return make_boxed_func(gm.forward)

        decompositions = None
        if decompose:
            import importlib

            from torch._inductor.decomposition import select_decomp_table

            importlib.import_module("torch._inductor.lowering")  # some decompositions call into it
            decompositions = select_decomp_table()
        with lowered_as_on(trace_device, lowering_target) as lowering:
            return aot_autograd(
                fw_compiler=unused, bw_compiler=unused, partition_fn=partition, inference_compiler=inference,
                decompositions=decompositions,
            )(source_gm, dynamo_inputs)

    compiled = torch.compile(model, backend=capture_backend, fullgraph=True, dynamic=False)
    try:
        with torch.set_grad_enabled(backward and torch.is_grad_enabled()):
            compiled(*example_inputs)
    except Exception as e:  # noqa: BLE001 - unwrapped and re-raised below, never swallowed
        done = _find_cause(e, _CaptureDone)
        if done is not None:
            return done.graph
        _raise_capture_error(e, model, example_inputs)
        raise
    raise CaptureError(
        "the model ran without producing a graph to plan (nothing was traced); "
        "does its forward return tensors computed from its inputs or parameters?"
    )


def random_as_inductor(gm: fx.GraphModule) -> int:
    """Draw ``gm``'s random values as Inductor's joint-graph passes do before its partitioner runs
    (``replace_random_passes``, unless ``torch._inductor.config.fallback_random``): ``aten.rand`` and
    ``aten.randn`` (dropout's masks) become ``inductor_random`` from one ``inductor_seeds`` tensor,
    which the partitioner recomputes from its seed instead of saving an RNG state. The backend's
    graph has been through that pass when its partitioner is called; a capture for Inductor
    (``decompose=True``) applies it too, so that the graph planned offline is the one the backend
    plans. Inductor's pass leaves graphs of meta tensors alone (its pattern matcher skips values of
    devices it cannot compile for): its patterns are applied here directly. Returns the number of
    values replaced (and seed tensors made)."""
    from torch._guards import detect_fake_mode
    from torch._inductor import config as inductor_config
    from torch._inductor.fx_passes import replace_random
    from torch._inductor.virtualized import V

    if inductor_config.fallback_random:
        return 0
    fake_mode = detect_fake_mode([n.meta.get("val") for n in gm.graph.find_nodes(op="placeholder")])
    count = 0
    with V.set_fake_mode(fake_mode):
        for node in list(gm.graph.nodes):
            if node.op != "call_function":
                continue
            for entry in replace_random.patterns.patterns.get((node.op, node.target), ()):
                match = entry.pattern.match(node)
                if match and entry.extra_check(match):
                    entry.apply(match, gm.graph, node)  # leaves a draw from a given generator as it is
                    count += node._erased
                    break
        if count:
            count += replace_random.fuse_seed_creation_pass(gm.graph)
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def _trace_device(inputs: Sequence[Any]) -> torch.device:
    """The device the graph is traced on: that of its tensor inputs (meta if any is, as meta
    decides how composites trace), CPU when it has none."""
    devices = [x.device for x in inputs if isinstance(x, torch.Tensor)]
    for kind in ("meta", "cuda"):
        found = next((d for d in devices if d.type == kind), None)
        if found is not None:
            return found
    return devices[0] if devices else torch.device("cpu")


def _find_cause(e: BaseException, kind: type) -> Any:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, kind):
            return e
        seen.add(id(e))
        inner = getattr(e, "inner_exception", None)
        e = inner if inner is not None else (e.__cause__ or e.__context__)
    return None


def _root_message(e: BaseException) -> str:
    """The message of the innermost exception in the chain, on one line."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    lines = [line for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0].rstrip('.') if lines else ''}"


def _raise_capture_error(e: Exception, model: Any, example_inputs: Sequence[Any]) -> None:
    from torch._dynamo.exc import TorchRuntimeError, Unsupported, UserError

    shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in example_inputs]
    if isinstance(e, TorchRuntimeError) or isinstance(_find_cause(e, TypeError), TypeError):
        raise ValueError(
            f"the example inputs {shapes} do not fit {_root_name(model)}: {_root_message(e)}. "
            "Pass inputs with the shapes, dtypes and devices the model's forward expects."
        ) from e
    if isinstance(e, (Unsupported, UserError)):
        raise CaptureError(
            f"{_root_name(model)} cannot be traced as one graph ({str(e).splitlines()[0]}). "
            "Remove the graph break, or use torch.compile(model, backend='sac'), which plans each "
            "graph Dynamo produces on its own."
        ) from e
