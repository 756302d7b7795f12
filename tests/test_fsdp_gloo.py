"""backend="sac" under FSDP2 on CPU, two processes over gloo: every rank compiles, rank 0's plan
is broadcast while the compile's fake tensors are active, and the losses and gradients equal FSDP2
without checkpointing (the eager route: exact)."""

import datetime
import faulthandler
import os
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")

STEPS = 2


DEADLINE_S = 300  # the whole test; a rank waiting on a broadcast the other never joins hangs
COLLECTIVE_TIMEOUT_S = 120  # gloo's own limit on a connection or collective: a hang becomes an error


def _run(rank: int, world: int, store: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from tests.fsdp_models import Stack

    # a rank still running near the deadline prints where each of its threads is (to the test's
    # captured stderr), so a hang names its place
    faulthandler.dump_traceback_later(DEADLINE_S - 30, exit=False, file=sys.stderr)
    if os.path.exists("/sys/class/net/lo"):
        # gloo connects the ranks over the loopback interface, not an address resolved from the
        # host name (which may be slow to resolve, or unreachable, on a machine without a network)
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    # a file store: no TCP port to find free and race for
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    import sac_compiler.distributed as distributed

    broadcasts = []
    agree = distributed.agree_on_recompute

    def counted(recompute):
        broadcasts.append(sorted(recompute))
        return agree(recompute)

    distributed.agree_on_recompute = counted
    try:
        mesh = init_device_mesh("cpu", (world,))
        runs, plans = {}, []
        for name in ("plain", "sac"):
            torch.manual_seed(0)
            model = Stack(depth=2, dim=32, hidden=256)
            for layer in model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            if name == "sac":
                from sac_compiler.backend import SACPartitioner, compile_graph
                from sac_compiler.config import SACConfig

                class Recording(SACPartitioner):
                    def __init__(self, *args, **kwargs):
                        super().__init__(*args, **kwargs)
                        plans.append(self)

                config = SACConfig.from_options({"memory_budget": 0.0, "compiler": "eager"})
                for layer in model.layers:
                    layer.compile(backend=lambda gm, inputs: compile_graph(gm, inputs, config, Recording))
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
            generator = torch.Generator().manual_seed(1 + rank)
            losses, grads = [], []
            for _ in range(STEPS):
                loss = model(torch.randn(1024, 32, generator=generator)).square().mean()
                loss.backward()
                losses.append(loss.detach())
                grads.append([p.grad.full_tensor() for p in model.parameters()])
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            runs[name] = (losses, grads)
        recomputed = [sorted(p.last_result.plan.recompute) for p in plans]
        torch.save({"runs": runs, "recomputed": recomputed, "world": config.world_size, "broadcasts": broadcasts},
                   f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_ranks_over_gloo_agree_on_the_plan_and_match_plain_fsdp(tmp_path):
    out = str(tmp_path / "runs")
    context = mp.start_processes(_run, args=(2, str(tmp_path / "store"), out), nprocs=2, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    while not context.join(timeout=max(1.0, deadline - time.monotonic())):  # False until every rank ended
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            pytest.fail(f"the two ranks did not finish within {DEADLINE_S} s")
    ranks = [torch.load(f"{out}.{rank}") for rank in range(2)]
    for saved in ranks:
        assert saved["world"] == 2  # from the process group
        # each rank joined a broadcast of rank 0's plan for every plan it made, as many as the other
        assert len(saved["broadcasts"]) >= len(saved["recomputed"]) == 2
    assert len(ranks[0]["broadcasts"]) == len(ranks[1]["broadcasts"])
    assert ranks[0]["recomputed"] == ranks[1]["recomputed"]
    for saved in ranks:
        (plain_losses, plain_grads), (sac_losses, sac_grads) = saved["runs"]["plain"], saved["runs"]["sac"]
        for step in range(STEPS):
            torch.testing.assert_close(sac_losses[step], plain_losses[step], rtol=0, atol=0)
            for got, want in zip(sac_grads[step], plain_grads[step]):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
