"""The machine a result was measured on: CPU (model, cores, the instruction sets that change numerics and
INT8 speed), accelerators, and the software stack. Every benchmark and report names it.

oneDNN and MKL pick different kernels on AVX2, AVX-512 and AMX machines (and when `ONEDNN_MAX_CPU_ISA` /
`MKL_ENABLE_INSTRUCTIONS` hold them lower), so training takes a different floating-point trajectory and
ONNX Runtime's INT8 kernels run at a different speed (VNNI); `cpu_flags` and `numerics_environment` say
which applied.
"""

from __future__ import annotations

import importlib.util
import os
import platform
from pathlib import Path

import torch

from rkdtool import __version__

# The flags that decide oneDNN/MKL kernels and ONNX Runtime's INT8 speed, as /proc/cpuinfo names them.
NUMERIC_FLAGS = (
    "avx",
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_tile",
    "amx_int8",
)
# Environment variables that change which kernels run (and so the numbers).
NUMERIC_ENV = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "ONEDNN_MAX_CPU_ISA",
    "MKL_CBWR",
    "MKL_ENABLE_INSTRUCTIONS",
)


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def cpu_name() -> str:
    """Gives back the CPU model as /proc/cpuinfo names it (or what platform knows)."""
    for line in _cpuinfo():
        if line.lower().startswith(("model name", "hardware")):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """Gives back which of NUMERIC_FLAGS this CPU has (empty where /proc/cpuinfo is absent)."""
    for line in _cpuinfo():
        if line.lower().startswith(("flags", "features")):
            present = set(line.split(":", 1)[1].split())
            return [f for f in NUMERIC_FLAGS if f in present]
    return []


def numerics_environment() -> dict[str, str]:
    """Gives back the kernel- and thread-selecting environment variables that are set."""
    return {k: os.environ[k] for k in NUMERIC_ENV if os.environ.get(k)}


def tensorrt_version() -> str | None:
    """Gives back the importable TensorRT's version, or None."""
    if importlib.util.find_spec("tensorrt") is None:
        return None
    try:
        import tensorrt

        return str(tensorrt.__version__)
    except Exception as exc:  # a broken install: say so rather than hide it
        return f"unimportable ({type(exc).__name__}: {exc})"


def tensorrt_ready() -> bool:
    """Gives back whether TensorRT, pycuda and a CUDA GPU are all present."""
    return (
        importlib.util.find_spec("tensorrt") is not None
        and importlib.util.find_spec("pycuda") is not None
        and torch.cuda.is_available()
    )


def cpu_summary() -> dict:
    """Gives back the CPU facts every results file carries: model, cores, numeric flags, torch threads and
    the kernel-selecting environment."""
    return {
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "torch_threads": torch.get_num_threads(),
        "numerics_env": numerics_environment(),
    }


def machine_info() -> dict:
    """Gives back the machine and software stack: CPU, cores, torch, CUDA device, ONNX Runtime, TensorRT."""
    import onnx
    import onnxruntime as ort

    cuda = torch.cuda.is_available()
    return {
        "rkdtool": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        **cpu_summary(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": cuda,
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
        "tensorrt": tensorrt_version(),
        "pycuda": importlib.util.find_spec("pycuda") is not None,
    }
