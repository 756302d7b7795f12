"""Seed 001's module statistics two ways on one GPU: PyTorch's eager tools and this project.

Runs PyTorch's MemTracker + RuntimeEstimator + SACEstimator + aggregate_stats (the seed's own
procedure, under FakeTensorMode on CUDA) and ``sac_compiler.estimate(...).module_info()`` for the
seed's 4-layer Transformer, and prints the baseline peak and the per-layer fields side by side.
Needs CUDA.
"""

from __future__ import annotations

import copy
import sys

import torch
from torch._subclasses.fake_tensor import FakeTensorMode


def seed_module_info():
    from torch.distributed._tools.ilp_utils import aggregate_stats
    from torch.distributed._tools.mem_tracker import MemTracker, _ModState
    from torch.distributed._tools.runtime_estimator import RuntimeEstimator
    from torch.distributed._tools.sac_estimator import SACEstimator
    from torch.testing._internal.distributed._tensor.common_dtensor import (
        ModelArgs,
        Transformer,
    )

    dev = torch.cuda.current_device()
    with FakeTensorMode():
        args = ModelArgs(n_layers=4, n_heads=12, vocab_size=8192, max_seq_len=1024, dim=768, dropout_p=0.1)
        with torch.device(dev):
            model = Transformer(args)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, foreach=True)
        inp = torch.randint(0, args.vocab_size, (8, args.max_seq_len), device=dev)
        mem_tracker = MemTracker()
        mem_tracker.track_external(model, optimizer)
        with mem_tracker as mt:
            for i in range(2):
                model(inp).sum().backward()
                if i == 1:
                    last = mt.get_tracker_snapshot("current")
                optimizer.step()
                optimizer.zero_grad()
                if i == 0:
                    mt.reset_mod_stats()
        for stats in mem_tracker.memory_tracking.values():
            if _ModState.POST_BW not in stats.snapshots:
                stats.snapshots.setdefault(_ModState.POST_BW, []).append(copy.deepcopy(last))
        model(inp).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        runtime = RuntimeEstimator()
        with runtime(estimate_mode_type="operator-level-cost-model"):
            model(inp).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        sac = SACEstimator()
        with sac(estimate_mode_type="operator-level-cost-model"):
            loss = model(inp).sum()
        loss.backward()
        return aggregate_stats(model, mem_tracker, runtime, sac, torch.device(dev))


def project_module_info():
    from torch.testing._internal.distributed._tensor.common_dtensor import (
        ModelArgs,
        Transformer,
    )

    from sac_compiler.estimator import estimate

    with FakeTensorMode():
        args = ModelArgs(n_layers=4, n_heads=12, vocab_size=8192, max_seq_len=1024, dim=768, dropout_p=0.1)
        with torch.device("cuda"):
            model = Transformer(args)
        inp = torch.randint(0, args.vocab_size, (8, args.max_seq_len), device="cuda")
        return estimate(model, inp, mode="operator-level-cost-model").module_info()


FIELDS = ("param_per_module", "grad_total", "act_fw_per_module", "act_bw_per_module", "act_grad_per_module",
          "act_total", "input_per_module", "output_per_module", "fw_runtime_per_module", "bw_runtime_per_module")


def main() -> int:
    if not torch.cuda.is_available():
        sys.stdout.write("needs CUDA\n")
        return 1
    from sac_compiler.module_info import (
        get_peak_memory_runtime_baseline,
        parse_module_info,
    )

    infos = {"eager tools": seed_module_info(), "sac_compiler": project_module_info()}
    sys.stdout.write(f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    for name, info in infos.items():
        peak, ms = get_peak_memory_runtime_baseline(parse_module_info(copy.deepcopy(info)))
        sys.stdout.write(f"{name}: baseline peak {peak} bytes, compute {ms:.2f} ms\n")
    by_fqn = {name: {s["fqn"]: s for s in info["mod_stats"]} for name, info in infos.items()}
    for fqn in ("Transformer", "Transformer.layers.0", "Transformer.layers.3", "Transformer.output"):
        sys.stdout.write(f"{fqn}\n")
        for field in FIELDS:
            values = [by_fqn[name].get(fqn, {}).get(field) for name in infos]
            sys.stdout.write(f"  {field:24s} " + "  ".join(f"{v!s:>16}" for v in values) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
