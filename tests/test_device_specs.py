"""Tests for sac_compiler.device_specs: the GPU table, name matching and the roofline helpers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sac_compiler.device_specs import (
    DEVICE_ALIASES,
    DEVICE_SPECS,
    DeviceSpec,
    get_device_spec,
    known_device_names,
    match_device_name,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

# torch.cuda.get_device_name() strings -> expected spec name.
REPORTED_NAMES = {
    "NVIDIA H100 80GB HBM3": "H100-SXM",
    "NVIDIA H100 PCIe": "H100-PCIe",
    "NVIDIA H200": "H200",
    "NVIDIA H200 NVL": "H200-NVL",
    "NVIDIA A100-SXM4-40GB": "A100-40GB",
    "NVIDIA A100-PCIE-40GB": "A100-40GB",
    "NVIDIA A100-SXM4-80GB": "A100-80GB",
    "NVIDIA A100 80GB PCIe": "A100-80GB-PCIe",
    "NVIDIA B200": "B200",
}


@pytest.fixture
def matmul_precision_state():
    """Save and restore the global TF32 / float32 matmul precision settings."""
    saved_allow = torch.backends.cuda.matmul.allow_tf32
    saved_precision = torch.get_float32_matmul_precision()
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved_precision)
        torch.backends.cuda.matmul.allow_tf32 = saved_allow
    assert torch.backends.cuda.matmul.allow_tf32 == saved_allow
    assert torch.get_float32_matmul_precision() == saved_precision


def _fake_cuda(monkeypatch: pytest.MonkeyPatch, gpu_name: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu_name)


# --- name matching -----------------------------------------------------------------


@pytest.mark.parametrize("gpu_name,expected", sorted(REPORTED_NAMES.items()))
def test_match_reported_device_names(gpu_name: str, expected: str) -> None:
    assert match_device_name(gpu_name).name == expected
    # Exactly one entry claims each name, so table order never decides.
    assert [s.name for s in DEVICE_SPECS.values() if s.matches(gpu_name)] == [expected]


def test_match_is_case_and_whitespace_insensitive() -> None:
    assert match_device_name("nvidia h100 80gb hbm3").name == "H100-SXM"
    assert match_device_name("  NVIDIA H100 PCIE  ").name == "H100-PCIe"


@pytest.mark.parametrize(
    "gpu_name",
    ["NVIDIA GH200 480GB", "NVIDIA GB200", "NVIDIA GeForce RTX 4090", "NVIDIA L40S", "Tesla V100-SXM2-16GB"],
)
def test_unlisted_gpus_do_not_match(gpu_name: str) -> None:
    with pytest.raises(ValueError) as info:
        match_device_name(gpu_name)
    message = str(info.value)
    assert repr(gpu_name) in message
    assert "device=<spec name>" in message
    for name in known_device_names():
        assert name in message


# --- lookup by name / alias ----------------------------------------------------------


@pytest.mark.parametrize("name", list(DEVICE_SPECS))
def test_exact_names_any_case(name: str) -> None:
    spec = DEVICE_SPECS[name]
    assert get_device_spec(name) is spec
    assert get_device_spec(name.lower()) is spec
    assert get_device_spec(name.upper()) is spec
    assert get_device_spec(f" {name} ") is spec


@pytest.mark.parametrize(
    "alias,expected",
    [("h100", "H100-SXM"), ("H100", "H100-SXM"), ("a100", "A100-80GB"), ("A100", "A100-80GB"),
     ("h200", "H200"), ("b200", "B200"), ("B200", "B200")],
)
def test_aliases(alias: str, expected: str) -> None:
    assert get_device_spec(alias).name == expected


def test_aliases_point_at_known_specs() -> None:
    assert set(DEVICE_ALIASES.values()) <= set(DEVICE_SPECS)
    assert all(alias == alias.lower() for alias in DEVICE_ALIASES)


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(ValueError) as info:
        get_device_spec("H300-SXM")
    message = str(info.value)
    assert "unknown device spec 'H300-SXM'" in message
    for name in known_device_names():
        assert name in message
    assert "auto" in message


def test_non_string_name_is_type_error() -> None:
    with pytest.raises(TypeError):
        get_device_spec(None)  # type: ignore[arg-type]


def test_known_device_names() -> None:
    names = known_device_names()
    assert names == list(DEVICE_SPECS)
    for required in ("H100-SXM", "H100-PCIe", "H200", "A100-40GB", "A100-80GB", "B200"):
        assert required in names
    names.append("mutating the returned list")
    assert "mutating the returned list" not in known_device_names()


# --- device="auto" -------------------------------------------------------------------


def test_auto_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("auto", "AUTO"):
        with pytest.raises(ValueError) as info:
            get_device_spec(name)
        message = str(info.value)
        assert "auto" in message
        assert "torch.cuda.is_available() is False" in message
        assert 'device="H100-SXM"' in message
        for known in known_device_names():
            assert known in message


def test_auto_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="auto"):
        get_device_spec()


@pytest.mark.parametrize("gpu_name,expected", sorted(REPORTED_NAMES.items()))
def test_auto_matches_visible_gpu(monkeypatch: pytest.MonkeyPatch, gpu_name: str, expected: str) -> None:
    _fake_cuda(monkeypatch, gpu_name)
    assert get_device_spec("auto") is DEVICE_SPECS[expected]
    assert get_device_spec() is DEVICE_SPECS[expected]


def test_auto_queries_current_device(monkeypatch: pytest.MonkeyPatch) -> None:
    names = {0: "NVIDIA H100 80GB HBM3", 1: "NVIDIA B200"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: names[device])
    assert get_device_spec("auto").name == "B200"


def test_auto_with_unlisted_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, "NVIDIA GeForce RTX 4090")
    with pytest.raises(ValueError) as info:
        get_device_spec("auto")
    message = str(info.value)
    assert "'NVIDIA GeForce RTX 4090'" in message
    assert "not in the device spec table" in message
    assert "device=<spec name>" in message
    for name in known_device_names():
        assert name in message


# --- peak_flops_for ------------------------------------------------------------------


def test_peak_flops_for_low_precision_dtypes() -> None:
    h100 = DEVICE_SPECS["H100-SXM"]
    assert h100.peak_flops_for(torch.bfloat16) == pytest.approx(989.4e12)
    assert h100.peak_flops_for(torch.float16) == pytest.approx(989.4e12)
    assert h100.peak_flops_for(torch.float64) == pytest.approx(33.5e12)
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz):
        assert h100.peak_flops_for(dtype) == pytest.approx(1978.9e12)


def test_peak_flops_for_integer_and_bool_fall_back_to_fp32() -> None:
    h100 = DEVICE_SPECS["H100-SXM"]
    for dtype in (torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool):
        assert h100.peak_flops_for(dtype) == h100.peak_flops["fp32"]


def test_peak_flops_for_float32_follows_tf32_switch(matmul_precision_state: None) -> None:
    h100 = DEVICE_SPECS["H100-SXM"]

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    assert h100.peak_flops_for(torch.float32) == pytest.approx(66.9e12)

    torch.backends.cuda.matmul.allow_tf32 = True
    assert h100.peak_flops_for(torch.float32) == pytest.approx(494.7e12)

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("high")
    assert h100.peak_flops_for(torch.float32) == pytest.approx(494.7e12)

    torch.set_float32_matmul_precision("medium")
    assert h100.peak_flops_for(torch.float32) == pytest.approx(494.7e12)

    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    assert h100.peak_flops_for(torch.float32) == pytest.approx(66.9e12)


def test_float32_without_tf32_entry_uses_fp32(matmul_precision_state: None) -> None:
    spec = DeviceSpec(
        name="Toy",
        marketing_name="Toy GPU",
        peak_flops={"fp32": 10e12},
        hbm_bandwidth=1e12,
        memory_bytes=16 * 10**9,
        sources=("Toy datasheet",),
        name_patterns=(r"\bToy\b",),
    )
    torch.set_float32_matmul_precision("high")
    assert spec.peak_flops_for(torch.float32) == 10e12


def test_missing_format_is_value_error() -> None:
    a100 = DEVICE_SPECS["A100-80GB"]
    assert "fp8" not in a100.peak_flops
    with pytest.raises(ValueError, match="A100-80GB has no fp8"):
        a100.peak_flops_for(torch.float8_e4m3fn)


def test_complex_dtypes_run_at_a_quarter_of_their_real_rate() -> None:
    """A complex model is planned like any other (it was refused for lack of a rate)."""
    h100 = DEVICE_SPECS["H100-SXM"]
    assert h100.peak_flops_for(torch.complex64) == h100.peak_flops["fp32"] / 4
    assert h100.peak_flops_for(torch.complex128) == h100.peak_flops["fp64"] / 4
    assert h100.peak_flops_for(torch.complex32) == h100.peak_flops["fp16"] / 4


def test_non_dtype() -> None:
    h100 = DEVICE_SPECS["H100-SXM"]
    with pytest.raises(TypeError):
        h100.peak_flops_for("bf16")  # type: ignore[arg-type]


# --- seconds_for ---------------------------------------------------------------------


def test_seconds_for_is_max_of_compute_and_memory_time() -> None:
    h100 = DEVICE_SPECS["H100-SXM"]
    peak = h100.peak_flops_for(torch.bfloat16)
    bw = h100.hbm_bandwidth

    # Compute-bound: an 8192^3 bf16 matmul.
    flops, nbytes = 2 * 8192**3, 3 * 8192 * 8192 * 2
    assert flops / peak > nbytes / bw
    assert h100.seconds_for(flops, nbytes, torch.bfloat16) == pytest.approx(flops / peak)

    # Memory-bound: an elementwise op over 1 GB.
    flops, nbytes = 1e8, 1e9
    assert nbytes / bw > flops / peak
    assert h100.seconds_for(flops, nbytes, torch.bfloat16) == pytest.approx(nbytes / bw)

    assert h100.seconds_for(0, 0, torch.bfloat16) == 0.0


def test_seconds_for_uses_dtype_rate() -> None:
    h100 = DEVICE_SPECS["H100-SXM"]
    flops = 1e15
    assert h100.seconds_for(flops, 0, torch.float8_e4m3fn) == pytest.approx(flops / 1978.9e12)
    assert h100.seconds_for(flops, 0, torch.float64) == pytest.approx(flops / 33.5e12)


def test_seconds_for_rejects_negative() -> None:
    with pytest.raises(ValueError):
        DEVICE_SPECS["H100-SXM"].seconds_for(-1, 0, torch.bfloat16)
    with pytest.raises(ValueError):
        DEVICE_SPECS["H100-SXM"].seconds_for(0, -1, torch.bfloat16)


# --- table contents ------------------------------------------------------------------


@pytest.mark.parametrize("name", list(DEVICE_SPECS))
def test_every_entry_is_complete(name: str) -> None:
    spec = DEVICE_SPECS[name]
    assert spec.name == name
    assert spec.marketing_name
    assert spec.sources and all(isinstance(s, str) and s for s in spec.sources)
    assert not any("://" in s for s in spec.sources)
    assert spec.name_patterns
    assert spec.hbm_bandwidth > 0
    assert isinstance(spec.memory_bytes, int) and spec.memory_bytes > 0
    assert set(spec.peak_flops) <= {"fp64", "fp32", "tf32", "bf16", "fp16", "fp8"}
    assert {"fp64", "fp32", "tf32", "bf16", "fp16"} <= set(spec.peak_flops)
    assert all(v > 0 for v in spec.peak_flops.values())
    # Lower precision is never slower than higher precision.
    f = spec.peak_flops
    assert f["fp64"] <= f["fp32"] < f["tf32"] < f["bf16"] == f["fp16"]
    if "fp8" in f:
        assert f["fp8"] == pytest.approx(2 * f["bf16"], rel=1e-3)


def test_datasheet_numbers() -> None:
    h100, pcie, h200 = DEVICE_SPECS["H100-SXM"], DEVICE_SPECS["H100-PCIe"], DEVICE_SPECS["H200"]
    a40, a80, b200 = DEVICE_SPECS["A100-40GB"], DEVICE_SPECS["A100-80GB"], DEVICE_SPECS["B200"]
    assert h100.hbm_bandwidth == pytest.approx(3.35e12)
    assert dict(h100.peak_flops) == pytest.approx(
        {"fp64": 33.5e12, "fp32": 66.9e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12, "fp8": 1978.9e12}
    )
    assert pcie.hbm_bandwidth == pytest.approx(2.0e12)
    assert pcie.peak_flops["bf16"] == pytest.approx(756e12)
    assert pcie.peak_flops["fp8"] == pytest.approx(1513e12)
    assert dict(h200.peak_flops) == dict(h100.peak_flops)
    assert h200.hbm_bandwidth == pytest.approx(4.8e12)
    assert a40.hbm_bandwidth == pytest.approx(1.555e12)
    assert a80.hbm_bandwidth == pytest.approx(2.039e12)
    assert dict(a40.peak_flops) == dict(a80.peak_flops)
    assert a80.peak_flops["bf16"] == pytest.approx(312e12)
    assert b200.peak_flops["bf16"] == pytest.approx(2250e12)
    assert b200.peak_flops["fp8"] == pytest.approx(4500e12)
    assert b200.peak_flops["fp32"] == pytest.approx(75e12)
    assert b200.peak_flops["fp64"] == pytest.approx(37e12)


def test_bandwidth_ordering() -> None:
    bw = {name: spec.hbm_bandwidth for name, spec in DEVICE_SPECS.items()}
    assert bw["H200"] > bw["H100-SXM"] > bw["H100-PCIe"]
    assert bw["A100-80GB"] > bw["A100-80GB-PCIe"] > bw["A100-40GB"]
    assert bw["B200"] > bw["H200"]


def test_memory_is_decimal_datasheet_gb() -> None:
    gb = 10**9
    expected = {
        "H100-SXM": 80, "H100-PCIe": 80, "H200": 141, "H200-NVL": 141,
        "A100-40GB": 40, "A100-80GB": 80, "A100-80GB-PCIe": 80, "B200": 180,
    }
    assert {n: s.memory_bytes for n, s in DEVICE_SPECS.items()} == {n: v * gb for n, v in expected.items()}
    # The convention is a lower bound on what torch reports as total memory.
    assert DEVICE_SPECS["H100-SXM"].memory_bytes < 85_520_809_984
    assert DEVICE_SPECS["H200"].memory_bytes < 150_121_070_592


# --- immutability and validation -----------------------------------------------------


def test_table_and_specs_are_read_only() -> None:
    with pytest.raises(TypeError):
        DEVICE_SPECS["X"] = DEVICE_SPECS["H100-SXM"]  # type: ignore[index]
    spec = DEVICE_SPECS["H100-SXM"]
    with pytest.raises(AttributeError):
        spec.hbm_bandwidth = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        spec.peak_flops["bf16"] = 1.0  # type: ignore[index]
    assert hash(spec) == hash(DEVICE_SPECS["H100-SXM"])


def test_spec_copies_its_flops_mapping() -> None:
    flops = {"fp32": 1e12}
    spec = DeviceSpec("Toy", "Toy GPU", flops, 1e12, 10**9, ("Toy datasheet",), ())
    flops["fp32"] = 2e12
    assert spec.peak_flops["fp32"] == 1e12


@pytest.mark.parametrize(
    "overrides",
    [
        {"peak_flops": {"fp32": 1e12, "int4": 1e12}},
        {"peak_flops": {"bf16": 1e12}},
        {"peak_flops": {"fp32": 0.0}},
        {"hbm_bandwidth": -1.0},
        {"memory_bytes": 0},
        {"sources": ()},
        {"name_patterns": ("(",)},
        {"name": ""},
    ],
)
def test_spec_validation(overrides: dict) -> None:
    kwargs = dict(
        name="Toy",
        marketing_name="Toy GPU",
        peak_flops={"fp32": 1e12},
        hbm_bandwidth=1e12,
        memory_bytes=10**9,
        sources=("Toy datasheet",),
        name_patterns=(r"\bToy\b",),
    )
    kwargs.update(overrides)
    with pytest.raises(ValueError):
        DeviceSpec(**kwargs)


