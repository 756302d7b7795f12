"""Data of the seed tests shared by several test files."""

from sac_compiler.sac_stats import SACStats


def seed_sac_stats(force_store_random: bool = False) -> SACStats:
    """The SACStats of PyTorch's test (adapted from xformers): 420 bytes in total."""
    data = [
        ("aten.copy_", 5, 0),
        ("aten.add", 5, 100),
        ("aten.div", 8, 100),
        ("aten.mm", 15, 120),
        ("aten.native_dropout", 15, 0),
        ("aten.linear", 9, 100),
        ("aten.t", 1, 0),
        ("aten.relu_", 5, 0),
    ]
    return SACStats(
        func_names=[x[0] for x in data],
        runtimes=[x[1] for x in data],
        memory=[x[2] for x in data],
        view_like_ops=[6],
        rand_ops=[4],
        saved_autograd_ops=[],  # not needed for SAC decisions
        inplace_ops=[(0, 0), (7, 5)],
        force_store_random=force_store_random,
    )
