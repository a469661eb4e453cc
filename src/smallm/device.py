"""Devices and precision: where a model runs, and in which dtype, chosen from what the hardware does well.

Every `auto` choice reads a few hardware facts through the small functions below (the CPU's flags, the
GPU's compute capability, torch's version), so tests can inject the facts of machines we do not have:

| device | `--dtype auto` | why |
|---|---|---|
| CPU with `amx_bf16` or `avx512_bf16` | bf16 autocast | oneDNN runs bf16 matmuls 2.5-3.5x faster than fp32 |
| other CPUs | fp32 | bf16 is emulated: slower than fp32 |
| CUDA, compute capability >= 8.0; ROCm | bf16 autocast | bf16 tensor cores |
| CUDA below 8.0 (T4, V100) | fp16 autocast + GradScaler | fp16 tensor cores; bf16 is emulated there |
| MPS | fp32 | bf16 autocast needs torch >= 2.6 and was not measured here |

Muon's Newton-Schulz iterations (`--muon-ns-dtype auto`, `pick_ns_dtype`) follow the same facts: bf16 where
it is native, fp32 wherever the table above says bf16 is emulated, and on MPS.

`torch.cuda.is_bf16_supported()` is not used: since torch 2.3 it also says True where bf16 is emulated.
"""

from __future__ import annotations

import re

import torch

from smallm.errors import SmallmError

DTYPES = ("auto", "float32", "bfloat16", "float16")

# CPU flags (Linux /proc/cpuinfo) with native bf16 dot products: AMX tiles (Intel Sapphire Rapids+) and
# AVX512-BF16 (Intel Cooper Lake+, AMD Zen 4+). The vector ISA torch reports (AVX512) cannot tell them apart.
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")

# MPS autocast: fp16 from torch 2.5, bf16 from 2.6 (macOS 14+); GradScaler (needed by fp16) from 2.8.
MPS_MIN_TORCH = {"bfloat16": (2, 6), "float16": (2, 8)}

# Dense 16-bit tensor-core peak FLOP/s for MFU, by a substring of the device name; the first match wins,
# so "H100 PCIe" comes before "H100" (SXM). Pre-Ampere cards list their fp16 peak (no bf16 there).
PEAK_FLOPS = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("4090", 165e12),
    ("3090", 71e12),
    ("V100", 125e12),
    ("T4", 65e12),
]


# ---- hardware facts (tests replace these) ------------------------------------------------------------


def cpu_bf16_flag(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The first of CPU_BF16_FLAGS this CPU lists in /proc/cpuinfo, or None (also where the file cannot be
    read: macOS, Windows)."""
    try:
        with open(cpuinfo) as f:
            flags = next((set(line.split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return None
    return next((flag for flag in CPU_BF16_FLAGS if flag in flags), None)


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of this GPU (not "the current one": under torchrun it may differ)."""
    return torch.cuda.get_device_capability(device)


def torch_version(version: str | None = None) -> tuple[int, int]:
    """(major, minor) of torch, e.g. (2, 4) for "2.4.1+cpu"."""
    major, minor = re.match(r"(\d+)\.(\d+)", version or torch.__version__).groups()
    return int(major), int(minor)


# ---- choices ---------------------------------------------------------------------------------------------


def pick_device(requested: str = "auto", local_rank: int = 0, distributed: bool = False) -> torch.device:
    """cuda > mps > cpu for "auto". "cuda" means cuda:local_rank, so each torchrun process takes the GPU of
    its LOCAL_RANK; an explicit cuda:N under torchrun must be that GPU too (else every rank would share N)."""
    if requested == "auto":
        if torch.cuda.is_available():
            requested = "cuda"
        elif torch.backends.mps.is_available():
            requested = "mps"
        else:
            requested = "cpu"
    kind, _, index = requested.partition(":")
    if kind == "cuda" and not torch.cuda.is_available():
        raise SmallmError(f"device {requested!r} was asked for but CUDA is not available; use --device cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise SmallmError("device 'mps' was asked for but MPS is not available; use --device cpu")
    if kind == "cuda" and not index:
        return torch.device("cuda", local_rank)
    if kind == "cuda" and distributed and int(index) != local_rank:
        raise SmallmError(
            f"--device {requested} under torchrun would put every process on GPU {index} (this is local "
            f"rank {local_rank}); pass --device cuda (each process takes the GPU of its LOCAL_RANK), and "
            "CUDA_VISIBLE_DEVICES to choose which GPUs"
        )
    return torch.device(requested)


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether this CPU or GPU multiplies bf16 natively (else it is emulated: slower than fp32), and the fact
    that says so."""
    if device.type == "cuda":
        if torch.version.hip:
            return True, "ROCm GPU"
        major, minor = cuda_capability(device)
        if major >= 8:
            return True, f"compute capability {major}.{minor} has bf16 tensor cores"
        return False, f"compute capability {major}.{minor} < 8.0 has no bf16"
    if device.type == "cpu":
        flag = cpu_bf16_flag()
        if flag:
            return True, f"the CPU has {flag}"
        return False, "the CPU has neither amx_bf16 nor avx512_bf16"
    return False, device.type


def pick_dtype(requested: str, device: torch.device) -> tuple[str, str]:
    """The autocast dtype ("float32", "bfloat16" or "float16": fp16 trains with a GradScaler) and why;
    see the table at the top of this module. An explicit dtype is kept, unless the device cannot run it."""
    if device.type == "mps":
        return _mps_dtype(requested)
    if requested != "auto":
        return requested, "asked for"
    native, why = native_bf16(device)
    if native:
        return "bfloat16", f"auto: {why}"
    if device.type == "cuda":
        return "float16", f"auto: {why}; fp16 + grad scaler"
    return "float32", f"auto: {why}"


def pick_ns_dtype(requested: str, device: torch.device) -> tuple[str, str]:
    """The dtype of Muon's Newton-Schulz iterations and why: bfloat16 (torch's choice, and fast) where the
    hardware multiplies bf16 natively, float32 where bf16 is emulated (bench/RESULTS.md: 18x slower than
    fp32 on an AVX2-only CPU) and on MPS. Unlike autocast it does not follow --dtype: it is only speed."""
    if requested != "auto":
        return requested, "asked for"
    native, why = native_bf16(device)
    return ("bfloat16" if native else "float32"), f"auto: {why}"


def inference_dtype(requested: str) -> str:
    """The dtype to cast weights to for generate, eval and serve. "auto" is float32 on every device: bf16
    weights halve the bytes a decoded token reads, but change greedy text measurably (bench/RESULTS.md), so
    they are opt-in (--dtype bfloat16)."""
    if requested not in DTYPES:
        raise SmallmError(f"--dtype must be one of {', '.join(DTYPES)}, got {requested!r}")
    return "float32" if requested == "auto" else requested


def _mps_dtype(requested: str) -> tuple[str, str]:
    if requested == "auto":
        return "float32", "auto: MPS (bf16 autocast there is not measured)"
    if requested == "float32":
        return "float32", "asked for"
    need = MPS_MIN_TORCH[requested]
    if torch_version() < need:
        raise SmallmError(
            f"--dtype {requested} on MPS needs torch >= {need[0]}.{need[1]} (this is {torch.__version__}); "
            "upgrade torch or use --dtype float32"
        )
    return requested, "asked for"


def peak_flops(device: torch.device) -> float | None:
    """The GPU's dense 16-bit peak FLOP/s from its name (PEAK_FLOPS), or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))


def peak_flops_of(name: str) -> float | None:
    """PEAK_FLOPS' entry for a device name such as "NVIDIA H100 PCIe", or None."""
    return next((flops for key, flops in PEAK_FLOPS if key in name), None)
