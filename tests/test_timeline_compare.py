"""benchmarks/timeline_compare.py: the allocator's record lined up with the simulation by the
source nodes Inductor names in its generated code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.timeline_compare import Comparison, main, source_nodes

# a piece of Inductor's generated wrapper: an extern kernel with its comment above it, and a
# buffer allocated empty, filled by the kernel whose comment follows
_CODE = """def call(args):
    # Topologically Sorted Source Nodes: [conv2d_1, convolution_1], Original ATen: [aten.convolution]
    buf0 = extern_kernels.convolution(arg0, arg1, stride=(1, 1))
    buf1 = empty_strided_cuda((4, 4), (4, 1), torch.float32)
    # Topologically Sorted Source Nodes: [relu_1], Original ATen: [aten.relu]
    stream0 = get_raw_stream(0)
    triton_poi_fused_relu_0.run(buf0, buf1, 16, stream=stream0)
    return (buf1, )
""".splitlines()


def test_source_nodes_of_an_extern_kernel_and_of_an_empty_buffer() -> None:
    assert source_nodes(_CODE, 3) == ("buf0", ["conv2d_1", "convolution_1"])
    assert source_nodes(_CODE, 4) == ("buf1", ["relu_1"])
    assert source_nodes(["    buf9 = empty_strided_cuda((4, ), (1, ), torch.float32)"], 1) == ("buf9", [])


def _cell() -> dict:
    # the simulation: a forward of one step, a backward of two (convolution_1 at 0, relu_1 at 1);
    # records: name, category, rule, alloc step, free step, freed, bytes
    return {
        "measured": {"base": 1000, "forward_events": 1, "events": [
            ["alloc", 512, 1, "gen.py:3 buf0 = ..."],  # forward
            ["alloc", 2048, 2, "gen.py:3 buf0 = ..."],  # backward, convolution_1's
            ["alloc", 1024, 3, "gen.py:4 buf1 = ..."],  # backward, relu_1's
            ["free_completed", 2048, 2, "gen.py:3 buf0 = ..."],
        ]},
        "simulated": [{"graph": 0, "steps": [["convolution_1"], ["convolution_1", "relu_1"]], "lifetimes": [
            [["convolution_1", "activation", "liveness", 0, None, "AFTER", 512]],
            [["convolution_1", "temporary", "liveness", 0, 1, "AFTER", 2048],
             ["relu_1", "temporary", "liveness", 1, None, "AFTER", 512]],
        ]}],
    }


def test_each_measured_moment_beside_the_simulation_at_its_node() -> None:
    comparison = Comparison(_cell(), {"gen.py": _CODE})
    assert comparison.live == [1512, 3560, 4584, 2536]
    assert comparison.highest(2, apart=1) == [2, 1]
    assert comparison.step_of(2) == (1, 1)  # relu_1's allocation: the backward's second step
    assert comparison.step_of(3) == (1, 1)  # a free: the allocation before it
    assert comparison.step_of(0) == (0, 0)
    assert comparison.simulated[1] == [2048, 2560]
    assert comparison.measured_live(2)[0] == (2048, "B", "buf0", ["conv2d_1", "convolution_1"])
    assert [row[1] for row in comparison.simulated_live(1, 1)] == ["convolution_1", "relu_1"]


def test_a_timeline_without_events_says_how_to_record_one(tmp_path: Path) -> None:
    cell = _cell()
    del cell["measured"]["events"]
    with pytest.raises(ValueError, match="zoo_matrix.py --timeline"):
        Comparison(cell, {})
    path = tmp_path / "cell.json"
    path.write_text(json.dumps(_cell()))
    with pytest.raises(SystemExit, match="no .py files"):
        main([str(path), "--code", str(tmp_path)])


def test_the_script_prints_the_moments_and_what_each_side_holds(tmp_path: Path, capsys) -> None:
    (tmp_path / "gen.py").write_text("\n".join(_CODE) + "\n")
    path = tmp_path / "cell.json"
    path.write_text(json.dumps(_cell()))
    main([str(path), "--code", str(tmp_path), "--top", "1", "--live", "2"])
    out = capsys.readouterr().out
    assert "4,584           2,560" in out and "backward relu_1" in out
