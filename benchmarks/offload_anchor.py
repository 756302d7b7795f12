"""The hand-picked offload anchor: plain ``torch.compile`` with PyTorch's own activation offloading,
every matmul output its partitioner saves for backward offloaded to host memory.

No planner chooses anything here: every ``mm``, ``addmm``, ``bmm`` and ``baddbmm`` output of the
joint graph is marked ``should_offload`` (the mark PyTorch's offload pass reads), PyTorch's
min-cut partitioner decides what to save as it always does, and its offload pass copies the
marked values it saved to pinned host memory on a stream of their own, waits for the copies at
the end of forward (right after each copy where that is not safe under Inductor:
``sac_compiler.offload.forward_copies_synchronous``) and reloads them with its prefetch in backward
(``torch._functorch.config``: ``enable_activation_offloading``,
``activation_offload_separate_stream``, ``activation_offload_sink_wait``,
``activation_reload_prefetch``, the link's bandwidth left at PyTorch's default). This is what a
user can do with PyTorch's flags alone; ``benchmarks/zoo_matrix.py --anchors offload_mm``
measures it beside the planner's keep, recompute or offload plans.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomPartitionerFn

aten = torch.ops.aten

MATMUL_OPS = frozenset({aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default})

# the partitioner's offload switches, as a user sets them (an entry the installed torch lacks is
# left out by ``matmul_offload``, which adds the prefetch's)
OFFLOAD_CONFIG = {
    "enable_activation_offloading": True,
    "activation_offload_separate_stream": True,
    "activation_offload_sink_wait": True,
}


def tag_matmul_outputs(gm: fx.GraphModule) -> int:
    """Mark every matmul output of the joint graph ``should_offload``; returns how many. PyTorch's
    offload pass acts only on the marked values its partitioner saves for backward."""
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in MATMUL_OPS:
            node.meta["should_offload"] = True
            count += 1
    return count


class MatmulOffloadPartitioner(CustomPartitionerFn):
    """Inductor's partitioner hook: the matmul outputs marked, then PyTorch's min-cut partitioner
    (with its offload pass, under the switches ``matmul_offload`` sets)."""

    def __call__(self, gm: fx.GraphModule, joint_inputs: Sequence[object],
                 **kwargs: Any) -> tuple[fx.GraphModule, fx.GraphModule]:
        from torch._functorch.partitioners import min_cut_rematerialization_partition

        tag_matmul_outputs(gm)
        return min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)

    def uuid(self) -> str:
        return f"{type(self).__module__}.{type(self).__qualname__}:{sorted(map(str, MATMUL_OPS))}"


@contextlib.contextmanager
def matmul_offload(prefetch: bool | None = None) -> Iterator[None]:
    """Within the block, ``torch.compile`` (Inductor) offloads every saved matmul output.

    ``prefetch``: PyTorch's reload prefetch, which times backward ops on the GPU while
    partitioning (None: where CUDA is available). Raises RuntimeError where the installed torch
    has no partitioner offloading (``sac_compiler.offload.offload_support`` says why)."""
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    from sac_compiler.offload import forward_copies_synchronous, mend_stream_op_fakes, offload_support

    reason = offload_support()
    if reason is not None:
        raise RuntimeError(reason)
    mend_stream_op_fakes()  # torch 2.11's streams.record_stream fake (sac_compiler.offload)
    wanted = dict(OFFLOAD_CONFIG, activation_reload_prefetch=torch.cuda.is_available() if prefetch is None else prefetch)
    if forward_copies_synchronous("inductor"):  # torch 2.11: sunk waits let Inductor overwrite a value mid-copy
        wanted["activation_offload_sink_wait"] = False
    entries = {name: value for name, value in wanted.items() if hasattr(functorch_config, name)}
    with functorch_config.patch(**entries), inductor_config.patch(custom_partitioner_fn=MatmulOffloadPartitioner()):
        yield
