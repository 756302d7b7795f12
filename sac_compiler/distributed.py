"""Planning under FSDP2 (``torch.distributed.fsdp.fully_shard``): world size, shards, one plan.

What a graph compiled under FSDP2 holds (traced on a fake process group, per-block and whole-model
compile alike): FSDP2's hooks run outside the graph, so the graph's parameters are the
*all-gathered* (unsharded) parameters of the block, in flight while it runs, and its gradients are
unsharded too; FSDP2 reduce-scatters them once the block's backward is done. At rest a rank holds
``1/world_size`` of each parameter and gradient (dim 0 padded to a multiple of the world size).
:class:`FSDPSharding` says which of a graph's parameters FSDP shards and how many bytes their
shards take; the memory model (``annotate_memory``) counts from it:

* the shards of the parameters, alive throughout;
* the graph's unsharded parameters (its placeholders) as it runs, as before;
* the next block's all-gathered parameters in backward (FSDP2 prefetches one all-gather ahead);
* after the graph, the reduce-scatter: its input buffer (the padded unsharded gradients) beside
  what the graph leaves, then the gradient shards;
* at the optimizer step: shards of parameters, gradients and optimizer state only.

A graph that shards itself (SimpleFSDP: sharded parameters all-gathered by functional collectives
in the graph) needs none of this: its placeholders are the shards and its collectives' outputs are
values of the graph. Its collectives are never recomputed (``plan_graph.never_recomputed``).

Every rank must make the same plan, or their graphs run different collectives and deadlock: the
solve is made deterministic where it can be (one thread, a fixed seed), and on a real process
group rank 0's plan is broadcast to the others (:func:`agree_on_recompute`).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)


def process_group_world_size() -> int | None:
    """The default process group's world size when one is initialised, else None."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.get_world_size()


def is_fake_process_group() -> bool:
    """The default process group is torch.distributed's ``fake`` backend (no communication)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_backend() == "fake"


def resolve_world_size(option: int | None) -> int:
    """The world size a plan is for: the option when given, else the process group's, else 1.

    An option that disagrees with an initialised process group is refused: the plan would count
    shards of the wrong size on every rank.
    """
    group = process_group_world_size()
    if option is None:
        return group if group is not None else 1
    if group is not None and group != option:
        raise ValueError(
            f"world_size={option}, but the initialised process group has world size {group}; leave "
            f"world_size unset (it is read from the process group) or set it to {group}. world_size "
            "is for planning without a process group (offline planning for N GPUs)"
        )
    return option


@contextlib.contextmanager
def fake_process_group(world_size: int, rank: int = 0) -> Iterator[None]:
    """A fake process group of ``world_size`` (torch.distributed's ``fake`` backend: collectives
    do nothing) as the default group while the block runs, so that a model can be traced and
    planned for ``world_size`` ranks in one process without GPUs. An initialised group of the same
    size is used as it is; one of another size is an error."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    current = process_group_world_size()
    if current is not None:
        if current != world_size:
            raise ValueError(f"world_size={world_size}, but a process group of world size {current} is "
                             "initialised; plan offline in a process without one, or for its world size")
        yield
        return
    dist.init_process_group("fake", rank=rank, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def shard_nbytes(shape: Sequence[int], itemsize: int, world_size: int) -> int:
    """Bytes of one rank's FSDP2 shard of a tensor of ``shape``: dim 0 split in ``world_size``
    chunks of ``ceil(dim0 / world_size)`` rows (FSDP2 pads the last ranks' shards to that size)."""
    if not shape:
        return itemsize  # a scalar parameter: FSDP2 shards a 1-element view of it
    rest = math.prod(int(d) for d in shape[1:])
    return -(-int(shape[0]) // world_size) * rest * itemsize


@dataclass(frozen=True)
class FSDPSharding:
    """Which of a graph's parameters FSDP shards over ``world_size`` ranks, and their shards' bytes.

    ``shard_bytes``: per parameter placeholder that holds an unsharded (all-gathered) FSDP
    parameter, the bytes of this rank's shard of it (and of its gradient's shard).
    ``unsharded_bytes``: per such placeholder, the all-gather's padded output (``world_size``
    shards; the reduce-scatter's input for its gradient is as large).
    ``prefetch_bytes``: the all-gathered parameters of the block whose backward runs next, which
    FSDP2 gathers while this graph's backward runs.
    """

    world_size: int
    shard_bytes: Mapping[str, int] = field(default_factory=dict)
    unsharded_bytes: Mapping[str, int] = field(default_factory=dict)
    prefetch_bytes: int = 0

    @property
    def sharded_param_bytes(self) -> int:
        return sum(self.shard_bytes.values())

    @property
    def reduce_scatter_bytes(self) -> int:
        """The reduce-scatter's input buffer: every gradient padded to ``world_size`` shards."""
        return sum(self.unsharded_bytes.values())


@dataclass(frozen=True)
class FSDPInputs:
    """What FSDP2 says about a graph's inputs, by position among the graph's (non-tangent) inputs:
    the shard and padded unsharded bytes of each FSDP parameter, and what the next block to run
    backward all-gathers. Turned into an :class:`FSDPSharding` once the joint graph's placeholder
    names are known (:meth:`sharding`)."""

    world_size: int
    shards: Mapping[int, tuple[int, int]]  # input position -> (shard bytes, padded unsharded bytes)
    prefetch_bytes: int = 0
    num_inputs: int = 0  # the inputs the positions count

    def sharding(self, primal_names: Sequence[str]) -> FSDPSharding:
        """By the joint graph's primal names; none sharded where AOTAutograd added or removed
        inputs (the positions would name the wrong ones)."""
        if len(primal_names) != self.num_inputs:
            log.warning("sac: cannot pair %d graph inputs with the %d inputs FSDP's parameters were found "
                        "among; planning without FSDP sharding", len(primal_names), self.num_inputs)
            return FSDPSharding(self.world_size)
        shard = {primal_names[i]: s for i, (s, _) in self.shards.items() if i < len(primal_names)}
        unsharded = {primal_names[i]: u for i, (_, u) in self.shards.items() if i < len(primal_names)}
        return FSDPSharding(self.world_size, shard, unsharded, self.prefetch_bytes)


def _fsdp_classes() -> tuple[type, type] | None:
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    except ImportError:  # a torch without FSDP2's modules where this file expects them
        return None
    return FSDPParam, FSDPState


def _param_figures(fsdp_param: Any) -> tuple[int, int]:
    """(shard bytes, padded unsharded bytes) of one FSDP2 parameter, in its sharded dtype (the
    gradient's shard takes it too: FSDP2 casts the reduced gradient to it)."""
    itemsize = fsdp_param.sharded_param.dtype.itemsize
    shard = math.prod(fsdp_param.padded_sharded_param_size) * itemsize
    return shard, shard * fsdp_param.mesh_info.shard_mesh_size


def fsdp_inputs(example_inputs: Sequence[Any], world_size: int, shard_all: bool = False) -> FSDPInputs | None:
    """The FSDP2 parameters among a graph's example inputs (Dynamo's: the real tensors).

    FSDP2's parameters are found among live objects: each ``FSDPParam`` whose unsharded parameter
    is one of the inputs (FSDP2 all-gathers before the graph runs, so the graph reads that
    parameter). ``shard_all``: without FSDP2 state, count every ``nn.Parameter`` input as FSDP2
    would shard it (offline planning of a model to be wrapped). None when ``world_size`` is 1 or
    nothing is sharded.
    """
    if world_size <= 1:
        return None
    positions = {id(x): i for i, x in enumerate(example_inputs) if isinstance(x, torch.Tensor)}
    shards: dict[int, tuple[int, int]] = {}
    states: list[Any] = []
    classes = _fsdp_classes()
    if classes is not None:
        fsdp_param_cls, state_cls = classes
        for obj in gc.get_objects():
            kind = type(obj)
            if issubclass(kind, fsdp_param_cls):
                unsharded = getattr(obj, "_unsharded_param", None)
                if unsharded is not None and id(unsharded) in positions:
                    shards[positions[id(unsharded)]] = _param_figures(obj)
            elif issubclass(kind, state_cls):
                states.append(obj)
    prefetch = _backward_prefetch_bytes(example_inputs, states) if shards else 0
    if not shards and shard_all:
        for i, x in enumerate(example_inputs):
            if isinstance(x, torch.nn.Parameter):
                shard = shard_nbytes(tuple(x.shape), x.element_size(), world_size)
                shards[i] = (shard, shard * world_size)
        # the neighbouring block is taken to be like this one (a stack of identical blocks)
        prefetch = sum(u for _, u in shards.values())
    return FSDPInputs(world_size, shards, prefetch, len(example_inputs)) if shards else None


def _backward_prefetch_bytes(example_inputs: Sequence[Any], states: list[Any]) -> int:
    """Padded unsharded bytes of the FSDP2 module whose backward runs after the one these inputs
    belong to (the module before it in FSDP2's order), which FSDP2 all-gathers ahead; 0 if none."""
    ids = {id(x) for x in example_inputs}
    for state in states:
        group = state._fsdp_param_group
        if group is None or not any(id(getattr(p, "_unsharded_param", None)) in ids for p in group.fsdp_params):
            continue
        order = list(state._state_ctx.all_states)
        at = next((i for i, s in enumerate(order) if s is state), None)
        for earlier in reversed(order[:at] if at is not None else []):
            other = earlier._fsdp_param_group
            if other is not None and other.fsdp_params:
                return sum(_param_figures(p)[1] for p in other.fsdp_params)
        return 0
    return 0


def plans_are_broadcast() -> bool:
    """Rank 0's plans are broadcast to the other ranks (a real process group of several ranks):
    then every rank must run the partitioner for every graph, in the same order, or the ranks wait
    on each other's broadcasts for ever."""
    world = process_group_world_size()
    return world is not None and world > 1 and not is_fake_process_group()


def agree_on_recompute(recompute: frozenset[str]) -> frozenset[str]:
    """The recompute set every rank uses: rank 0's, broadcast over a real process group of more
    than one rank (on one rank or a fake group, ``recompute`` itself).

    The names are those of the joint graph's nodes, which every rank traces alike from the same
    model and inputs. A rank whose own plan differs logs it: its solve took another path."""
    import torch.distributed as dist

    world = process_group_world_size()
    if world is None or world <= 1 or is_fake_process_group():
        return recompute
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    payload: list[Any] = [sorted(recompute) if dist.get_rank() == 0 else None]
    # the plan is made while the compile's fake tensor mode is active: the broadcast's own tensors
    # (the pickled payload, its size, read with .item()) must be real ones
    with unset_fake_temporarily():
        dist.broadcast_object_list(payload, src=0)
    agreed = frozenset(payload[0])
    if agreed != recompute:
        log.info("sac: rank %d planned another recompute set (%d values against rank 0's %d); rank 0's is used",
                 dist.get_rank(), len(recompute), len(agreed))
    return agreed
