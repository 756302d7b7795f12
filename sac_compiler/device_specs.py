"""GPU spec table for the roofline cost model.

Each :class:`DeviceSpec` records the dense (no 2:4 sparsity) peak throughput per
number format, the HBM bandwidth and the memory capacity of one NVIDIA data-centre
GPU, taken from NVIDIA's datasheets and architecture whitepapers (titles in
``sources``).  NVIDIA's datasheets quote Tensor Core rates *with* sparsity (marked
"*"); the values here are half of those.

Conventions used by every entry:

* ``peak_flops`` is in FLOP/s.  ``"tf32"``, ``"bf16"``, ``"fp16"`` and ``"fp8"`` are
  dense Tensor Core rates; ``"fp32"`` and ``"fp64"`` are the non-Tensor-Core
  (CUDA core) rates.  For A100/H100/H200 the FP64 Tensor Core (DGEMM) peak is
  twice the ``"fp64"`` figure; the table keeps the conservative vector rate.
* ``hbm_bandwidth`` is in bytes/s, decimal (1 TB/s = 1e12 B/s), as on the datasheet.
* ``host_link_bandwidth`` is the bytes/s a copy between pinned host memory and the GPU
  is assumed to move in each direction: a cost-model value for planning activation
  offload, not a datasheet figure. The datasheets give the host interface's theoretical
  rate in both directions together (PCIe Gen5 x16: "128 GB/s", i.e. 64 GB/s each way;
  Gen4 x16: "64 GB/s", 32 GB/s each way). Encoding and packet overheads alone take about a
  tenth of that, and a DMA copy from pinned memory reaches less again, so the table uses
  three quarters of the one-way rate (48 GB/s on Gen5, 24 GB/s on Gen4), a conservative
  figure until measured on the GPU (PyTorch's own default for its prefetch estimate,
  ``torch._functorch.config.activation_offload_cpu_gpu_bw``, is 50 GiB/s). None: unknown.
* ``memory_bytes`` is the datasheet capacity in *decimal* GB (80 GB = 80e9 bytes).
  It is a lower bound on what the device reports: torch reports 85,520,809,984
  bytes total for "NVIDIA H100 80GB HBM3" and 150,121,070,592 bytes for
  "NVIDIA H200", some of which the driver and CUDA context then reserve.

torch is imported only inside the functions that need a dtype or a CUDA query.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "DEVICE_ALIASES",
    "DEVICE_SPECS",
    "DeviceSpec",
    "get_device_spec",
    "known_device_names",
    "match_device_name",
]

#: Keys allowed in ``DeviceSpec.peak_flops``.
FLOPS_KEYS: tuple[str, ...] = ("fp64", "fp32", "tf32", "bf16", "fp16", "fp8")

_T = 1e12  # TFLOP/s or TB/s
_GB = 10**9  # decimal gigabyte
# host links, per direction (see host_link_bandwidth in the module docstring): three quarters of
# PCIe x16's theoretical one-way rate
_PCIE_GEN5_X16 = 0.75 * 64 * _GB
_PCIE_GEN4_X16 = 0.75 * 32 * _GB


def _tf32_enabled() -> bool:
    """Whether float32 matmuls may run on TF32 Tensor Cores under the current settings."""
    import torch

    return bool(torch.backends.cuda.matmul.allow_tf32) or (
        torch.get_float32_matmul_precision() != "highest"
    )


def _flops_key(dtype: torch.dtype) -> str:
    """Map a torch dtype to the ``peak_flops`` key whose rate it runs at."""
    import torch

    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"expected a torch.dtype, got {type(dtype).__name__}: {dtype!r}")
    if dtype == torch.float32:
        return "tf32" if _tf32_enabled() else "fp32"
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float16:
        return "fp16"
    if dtype == torch.float64:
        return "fp64"
    if str(dtype).startswith("torch.float8_"):
        return "fp8"
    if dtype.is_complex:  # the rate of the real component (see peak_flops_for)
        return {torch.complex32: "fp16", torch.complex64: "fp32", torch.complex128: "fp64"}.get(dtype, "fp32")
    if not dtype.is_floating_point and not dtype.is_complex:
        # Integer and bool ops: no separate table entry, use the FP32 rate.
        return "fp32"
    raise ValueError(f"no peak FLOP/s rate is defined for dtype {dtype}")


@dataclass(frozen=True)
class DeviceSpec:
    """Roofline parameters of one GPU model (see the module docstring for units)."""

    name: str
    marketing_name: str
    peak_flops: Mapping[str, float] = field(hash=False)
    hbm_bandwidth: float
    memory_bytes: int
    sources: tuple[str, ...]
    name_patterns: tuple[str, ...]
    host_link_bandwidth: float | None = None

    def __post_init__(self) -> None:
        if not self.name or not self.marketing_name:
            raise ValueError("DeviceSpec needs a non-empty name and marketing_name")
        flops = dict(self.peak_flops)
        unknown = sorted(set(flops) - set(FLOPS_KEYS))
        if unknown:
            raise ValueError(f"{self.name}: unknown peak_flops keys {unknown}; allowed: {FLOPS_KEYS}")
        if "fp32" not in flops:
            raise ValueError(f"{self.name}: peak_flops needs an 'fp32' entry")
        for key, value in flops.items():
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{self.name}: peak_flops[{key!r}] must be positive, got {value!r}")
        if not (math.isfinite(self.hbm_bandwidth) and self.hbm_bandwidth > 0):
            raise ValueError(f"{self.name}: hbm_bandwidth must be positive")
        if self.host_link_bandwidth is not None and not (
            isinstance(self.host_link_bandwidth, (int, float)) and not isinstance(self.host_link_bandwidth, bool)
            and math.isfinite(self.host_link_bandwidth) and self.host_link_bandwidth > 0
        ):
            raise ValueError(f"{self.name}: host_link_bandwidth must be None or positive bytes/s, "
                             f"got {self.host_link_bandwidth!r}")
        if int(self.memory_bytes) != self.memory_bytes or self.memory_bytes <= 0:
            raise ValueError(f"{self.name}: memory_bytes must be a positive integer")
        sources = tuple(self.sources)
        patterns = tuple(self.name_patterns)
        if not sources:
            raise ValueError(f"{self.name}: sources must name at least one document")
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{self.name}: bad name pattern {pattern!r}: {exc}") from None
        ordered = {k: float(flops[k]) for k in FLOPS_KEYS if k in flops}
        object.__setattr__(self, "peak_flops", MappingProxyType(ordered))
        object.__setattr__(self, "memory_bytes", int(self.memory_bytes))
        object.__setattr__(self, "sources", sources)
        object.__setattr__(self, "name_patterns", patterns)

    def matches(self, gpu_name: str) -> bool:
        """Whether ``gpu_name`` (as from ``torch.cuda.get_device_name``) is this GPU."""
        return any(re.search(p, gpu_name.strip(), re.IGNORECASE) for p in self.name_patterns)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # The read-only view of peak_flops does not pickle; rebuild from a plain dict.
        return (type(self), (self.name, self.marketing_name, dict(self.peak_flops), self.hbm_bandwidth,
                             self.memory_bytes, self.sources, self.name_patterns, self.host_link_bandwidth))

    def peak_flops_for(self, dtype: torch.dtype) -> float:
        """Dense peak FLOP/s for matmul-class work in ``dtype``.

        float32 uses the TF32 rate when TF32 matmuls are allowed
        (``torch.backends.cuda.matmul.allow_tf32`` or a float32 matmul precision
        other than "highest") and the chip has TF32, else the FP32 rate.  float8
        dtypes use "fp8", float64 "fp64", integer and bool dtypes fall back to
        "fp32".  Complex dtypes run at a quarter of their real component's rate
        (complex64 at fp32's, without Tensor Cores): one complex multiply-add is
        four real ones, and PyTorch's flop formulas count it as one.  A format the
        chip lacks (e.g. fp8 on A100) is a ValueError.
        """
        key = _flops_key(dtype)
        if key == "tf32" and "tf32" not in self.peak_flops:
            key = "fp32"
        try:
            return self.peak_flops[key] / (4 if dtype.is_complex else 1)
        except KeyError:
            raise ValueError(
                f"{self.name} has no {key} peak rate (dtype {dtype}); "
                f"available: {', '.join(self.peak_flops)}"
            ) from None

    def seconds_for(self, flops: float, bytes_moved: float, dtype: torch.dtype) -> float:
        """Roofline time: ``max(flops / peak_flops_for(dtype), bytes_moved / hbm_bandwidth)``."""
        if flops < 0 or bytes_moved < 0:
            raise ValueError(f"flops and bytes_moved must be >= 0, got {flops!r} and {bytes_moved!r}")
        return max(flops / self.peak_flops_for(dtype), bytes_moved / self.hbm_bandwidth)


_H100_SOURCES = (
    "NVIDIA H100 Tensor Core GPU Datasheet",
    "NVIDIA H100 Tensor Core GPU Architecture (whitepaper)",
)
_H200_SOURCES = (
    "NVIDIA H200 Tensor Core GPU Datasheet",
    "NVIDIA H100 Tensor Core GPU Architecture (whitepaper)",
)
_A100_SOURCES = (
    "NVIDIA A100 Tensor Core GPU Datasheet",
    "NVIDIA A100 Tensor Core GPU Architecture (whitepaper)",
)

# GH100 at SXM5 clocks (whitepaper dense figures; the datasheets round them to
# 34 / 67 TFLOPS and 989* / 1,979* / 3,958* with sparsity).  H200 SXM is the same
# silicon and clocks as H100 SXM with HBM3e.
_HOPPER_SXM_FLOPS = {
    "fp64": 33.5 * _T,
    "fp32": 66.9 * _T,
    "tf32": 494.7 * _T,
    "bf16": 989.4 * _T,
    "fp16": 989.4 * _T,
    "fp8": 1978.9 * _T,
}
# GA100: FP64 9.7 (19.5 with FP64 Tensor Cores), FP32 19.5, TF32 156 (312*),
# BF16/FP16 312 (624*); no FP8.  Same for every A100 variant.
_AMPERE_FLOPS = {
    "fp64": 9.7 * _T,
    "fp32": 19.5 * _T,
    "tf32": 156.0 * _T,
    "bf16": 312.0 * _T,
    "fp16": 312.0 * _T,
}

_SPECS: tuple[DeviceSpec, ...] = (
    DeviceSpec(
        name="H100-SXM",
        marketing_name="NVIDIA H100 SXM5 80GB HBM3",
        peak_flops=_HOPPER_SXM_FLOPS,
        hbm_bandwidth=3.35 * _T,
        memory_bytes=80 * _GB,
        sources=_H100_SOURCES,
        # Reported as "NVIDIA H100 80GB HBM3"; PCIe and NVL boards say so in the name.
        name_patterns=(r"^(?!.*\b(?:PCIe|NVL)\b).*\bH100\b.*\b(?:HBM3|SXM\d?)\b",),
        host_link_bandwidth=_PCIE_GEN5_X16,
    ),
    DeviceSpec(
        name="H100-PCIe",
        marketing_name="NVIDIA H100 PCIe 80GB HBM2e",
        # Whitepaper: FP64 25.6, FP32 51.2, TF32 378 (756*), BF16/FP16 756 (1,513*),
        # FP8 1,513 (3,026*).
        peak_flops={
            "fp64": 25.6 * _T,
            "fp32": 51.2 * _T,
            "tf32": 378.0 * _T,
            "bf16": 756.0 * _T,
            "fp16": 756.0 * _T,
            "fp8": 1513.0 * _T,
        },
        hbm_bandwidth=2.0 * _T,
        memory_bytes=80 * _GB,
        sources=_H100_SOURCES,
        name_patterns=(r"\bH100\b.*\bPCIe\b",),
        host_link_bandwidth=_PCIE_GEN5_X16,
    ),
    DeviceSpec(
        name="H200",
        marketing_name="NVIDIA H200 SXM 141GB HBM3e",
        peak_flops=_HOPPER_SXM_FLOPS,
        hbm_bandwidth=4.8 * _T,
        memory_bytes=141 * _GB,
        sources=_H200_SOURCES,
        # "NVIDIA H200"; \b keeps "NVIDIA GH200 ..." (Grace Hopper) out.
        name_patterns=(r"^(?!.*\bNVL\b).*\bH200\b",),
        host_link_bandwidth=_PCIE_GEN5_X16,
    ),
    DeviceSpec(
        name="H200-NVL",
        marketing_name="NVIDIA H200 NVL 141GB HBM3e",
        # Datasheet (up to 600 W): FP64 30, FP32 60, TF32 835*, BF16/FP16 1,671*,
        # FP8 3,341*; the sparse figures are halved here.
        peak_flops={
            "fp64": 30.0 * _T,
            "fp32": 60.0 * _T,
            "tf32": 417.5 * _T,
            "bf16": 835.5 * _T,
            "fp16": 835.5 * _T,
            "fp8": 1670.5 * _T,
        },
        hbm_bandwidth=4.8 * _T,
        memory_bytes=141 * _GB,
        sources=("NVIDIA H200 Tensor Core GPU Datasheet",),
        name_patterns=(r"\bH200\b.*\bNVL\b",),
        host_link_bandwidth=_PCIE_GEN5_X16,
    ),
    DeviceSpec(
        name="A100-40GB",
        marketing_name="NVIDIA A100 40GB HBM2 (SXM4)",
        peak_flops=_AMPERE_FLOPS,
        hbm_bandwidth=1.555 * _T,
        memory_bytes=40 * _GB,
        sources=_A100_SOURCES,
        # "NVIDIA A100-SXM4-40GB"; the 40GB PCIe card ("NVIDIA A100-PCIE-40GB")
        # has the same peak rates and 1,555 GB/s, so it maps here too.
        name_patterns=(r"\bA100\b.*\b40GB\b",),
        host_link_bandwidth=_PCIE_GEN4_X16,
    ),
    DeviceSpec(
        name="A100-80GB",
        marketing_name="NVIDIA A100 80GB HBM2e (SXM4)",
        peak_flops=_AMPERE_FLOPS,
        hbm_bandwidth=2.039 * _T,
        memory_bytes=80 * _GB,
        sources=_A100_SOURCES,
        name_patterns=(r"^(?!.*\bPCIe\b).*\bA100\b.*\b80GB\b",),
        host_link_bandwidth=_PCIE_GEN4_X16,
    ),
    DeviceSpec(
        name="A100-80GB-PCIe",
        marketing_name="NVIDIA A100 80GB PCIe HBM2e",
        peak_flops=_AMPERE_FLOPS,
        hbm_bandwidth=1.935 * _T,
        memory_bytes=80 * _GB,
        sources=_A100_SOURCES,
        name_patterns=(r"^(?=.*\bPCIe\b).*\bA100\b.*\b80GB\b",),
        host_link_bandwidth=_PCIE_GEN4_X16,
    ),
    DeviceSpec(
        name="B200",
        marketing_name="NVIDIA B200 (HGX B200) 180GB HBM3e",
        # HGX B200 per-GPU table: FP8 9 PF*, BF16/FP16 4.5 PF*, TF32 2.2 PF*,
        # FP32 75 TF, FP64 (= FP64 Tensor Core) 37 TF, 180 GB HBM3e at 7.7 TB/s.
        # Earlier material (DGX B200 datasheet: 64 TB/s over 8 GPUs) says 8 TB/s;
        # the later, lower 7.7 TB/s is used.  8 x 180 GB = DGX B200's 1,440 GB.
        peak_flops={
            "fp64": 37.0 * _T,
            "fp32": 75.0 * _T,
            "tf32": 1100.0 * _T,
            "bf16": 2250.0 * _T,
            "fp16": 2250.0 * _T,
            "fp8": 4500.0 * _T,
        },
        hbm_bandwidth=7.7 * _T,
        memory_bytes=180 * _GB,
        sources=(
            "NVIDIA HGX Platform: HGX B200 Technical Specifications",
            "NVIDIA DGX B200 Datasheet",
        ),
        # "NVIDIA B200"; \b keeps "NVIDIA GB200" out.
        name_patterns=(r"\bB200\b",),
        host_link_bandwidth=_PCIE_GEN5_X16,  # the HGX/DGX B200 hosts' PCIe Gen5 (x16 per GPU)
    ),
)

#: Spec name -> DeviceSpec, read-only, in table order.
DEVICE_SPECS: Mapping[str, DeviceSpec] = MappingProxyType({s.name: s for s in _SPECS})

#: Lower-case short names accepted by :func:`get_device_spec`.
DEVICE_ALIASES: Mapping[str, str] = MappingProxyType(
    {"h100": "H100-SXM", "a100": "A100-80GB", "h200": "H200", "b200": "B200"}
)

_BY_LOWER: Mapping[str, str] = MappingProxyType({n.lower(): n for n in DEVICE_SPECS})


def known_device_names() -> list[str]:
    """Spec names in table order."""
    return list(DEVICE_SPECS)


def _known_list() -> str:
    return ", ".join(known_device_names())


def match_device_name(gpu_name: str) -> DeviceSpec:
    """The spec whose ``name_patterns`` match a CUDA device name such as "NVIDIA H100 80GB HBM3"."""
    hits = [spec for spec in DEVICE_SPECS.values() if spec.matches(gpu_name)]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise ValueError(
            f"GPU {gpu_name!r} matches several device specs ({', '.join(s.name for s in hits)}); "
            f"pass device=<spec name> to choose one"
        )
    raise ValueError(
        f"GPU {gpu_name!r} is not in the device spec table (known specs: {_known_list()}); "
        f'pass device=<spec name> with the closest entry, e.g. device="H100-SXM"'
    )


def get_device_spec(name: str = "auto") -> DeviceSpec:
    """Look up a spec by name or alias (case-insensitive); "auto" detects the current CUDA GPU."""
    if not isinstance(name, str):
        raise TypeError(f"device spec name must be a str, got {type(name).__name__}")
    key = name.strip().lower()
    if key == "auto":
        import torch

        if not torch.cuda.is_available():
            raise ValueError(
                "device='auto' needs a visible CUDA GPU, but torch.cuda.is_available() is False; "
                f'pass a spec name instead, such as device="H100-SXM" (known specs: {_known_list()})'
            )
        return match_device_name(torch.cuda.get_device_name(torch.cuda.current_device()))
    if key in _BY_LOWER:
        return DEVICE_SPECS[_BY_LOWER[key]]
    if key in DEVICE_ALIASES:
        return DEVICE_SPECS[DEVICE_ALIASES[key]]
    raise ValueError(
        f"unknown device spec {name!r}; known specs: {_known_list()} "
        f"(aliases: {', '.join(sorted(DEVICE_ALIASES))}), or 'auto' to detect the visible GPU"
    )
