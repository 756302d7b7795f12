"""backend="sac" under FSDP2 on 2 GPUs (NCCL): the same losses and gradients as FSDP2 without
checkpointing, per-block and whole-model compile. Skipped without 2 CUDA GPUs.

Each test spawns 2 processes (as torchrun would start them); each rank builds the same model from
the same seed, shards it with ``fully_shard`` block by block, and runs a few SGD steps twice: once
plain, once compiled with ``backend="sac"`` under a budget that makes the plan recompute. Rank 0
writes both runs' losses and full gradients to a file the test compares.
"""

import os
import socket

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (FSDP2 over NCCL)"),
]

STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(rank: int, world: int, port: int, mode: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from tests.fsdp_models import Stack

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cuda", (world,))
        runs = {}
        for name in ("plain", "sac"):
            torch.manual_seed(0)
            model = Stack(depth=4, dim=256, hidden=1024).cuda()
            for layer in model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            if name == "sac":
                options = {"memory_budget": 0.5, "compiler": "inductor"}
                if mode == "per-block":
                    for layer in model.layers:
                        layer.compile(backend="sac", options=options)
                else:
                    model = torch.compile(model, backend="sac", options=options)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
            generator = torch.Generator(device="cuda").manual_seed(1 + rank)
            losses, grads = [], []
            for _ in range(STEPS):
                x = torch.randn(512, 256, device="cuda", generator=generator)
                loss = model(x).square().mean()
                loss.backward()
                losses.append(loss.detach().cpu())
                grads.append([p.grad.full_tensor().cpu() for p in model.parameters()])
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            runs[name] = (losses, grads)
        if rank == 0:
            torch.save(runs, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["per-block", "whole-model"])
def test_losses_and_gradients_match_plain_fsdp(mode, tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "runs.pt")
    mp.spawn(_run, args=(2, _free_port(), mode, out), nprocs=2, join=True)
    runs = torch.load(out)
    (plain_losses, plain_grads), (sac_losses, sac_grads) = runs["plain"], runs["sac"]
    # Inductor's kernels round differently from eager's: compare as torch.compile's own tests do
    for step in range(STEPS):
        torch.testing.assert_close(sac_losses[step], plain_losses[step], rtol=1e-4, atol=1e-5)
        for got, want in zip(sac_grads[step], plain_grads[step]):
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)
