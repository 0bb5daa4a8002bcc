"""Latency on the host: warm-up, then many timed runs; p50/p90/p99, mean, throughput, per batch and backend.

Method (reference/edge.md §7): warm up before timing, time enough runs to report a distribution, time real
images rather than zeros, name the machine and backend on every result. On CUDA, torch is timed with CUDA
events on the stream (device time) and, where capture works, replays a CUDA graph to remove launch overhead.
TensorRT engines are timed through the device runtime (`export/trt_run.py`) when TensorRT and pycuda exist.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rkdtool.deploy.onnx import load_pixel_model, onnx_session
from rkdtool.deploy.timing import LatencyStats, latency_stats, sample_inputs, time_cuda, time_host
from rkdtool.errors import NotFoundError, UsageError
from rkdtool.machine import cpu_name, machine_info, tensorrt_ready
from rkdtool.resources import load_device_module
from rkdtool.weights import write_json


@dataclass
class BenchResult:
    """One backend at one batch size: its latency distribution and throughput."""

    model: str  # what was timed (a file name or a label)
    backend: str  # torch-cpu, torch-cuda, onnxruntime-cpu, tensorrt
    precision: str  # fp32, int8, fp16
    device: str  # the processor that ran it, in words
    batch: int
    warmup: int
    runs: int
    timer: str  # perf_counter (host) or cuda-events (device)
    latency_ms: LatencyStats
    throughput_ips: float  # images per second = batch / p50
    cuda_graph: bool = False
    threads: int | None = None
    notes: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class BenchReport:
    """A benchmark run: the machine it ran on and one result per (backend, batch)."""

    machine: dict
    results: list[BenchResult] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"machine": self.machine, "results": [r.to_dict() for r in self.results]}


def _result(model, backend, precision, device, batch, warmup, samples, timer, **extra) -> BenchResult:
    stats = latency_stats(samples)
    return BenchResult(
        model,
        backend,
        precision,
        device,
        batch,
        warmup,
        len(samples),
        timer,
        stats,
        batch * 1e3 / stats.p50 if stats.p50 > 0 else float("inf"),
        **extra,
    )


def bench_torch(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    batch_sizes: Sequence[int] = (1,),
    device: str = "cpu",
    warmup: int = 20,
    runs: int = 200,
    cuda_graph: bool = True,
    pool: np.ndarray | None = None,
    label: str = "torch",
    threads: int | None = None,
) -> list[BenchResult]:
    """Gives back torch latency per batch size: perf_counter on CPU, CUDA events (+ CUDA graphs) on CUDA.

    `threads` sets torch's intra-op threads for the measurement (on a busy machine, 1 avoids OpenMP
    oversubscription stalls); the default keeps torch's setting.
    """
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _bench_torch(model, input_shape, batch_sizes, device, warmup, runs, cuda_graph, pool, label)
    finally:
        torch.set_num_threads(saved)


def _bench_torch(model, input_shape, batch_sizes, device, warmup, runs, cuda_graph, pool, label):
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but torch sees no CUDA GPU")
    model = model.to(dev).eval()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name()
    results = []
    for batch in batch_sizes:
        x = torch.from_numpy(sample_inputs(input_shape, batch, pool)).to(dev)
        if dev.type == "cuda":
            samples, graphed, note = time_cuda(model, x, warmup=warmup, runs=runs, use_graph=cuda_graph)
            results.append(
                _result(
                    label,
                    "torch-cuda",
                    "fp32",
                    name,
                    batch,
                    warmup,
                    samples,
                    "cuda-events",
                    cuda_graph=graphed,
                    notes=note,
                )
            )
        else:
            with torch.inference_mode():
                samples = time_host(lambda x=x: model(x), warmup=warmup, runs=runs)
            results.append(
                _result(
                    label,
                    "torch-cpu",
                    "fp32",
                    name,
                    batch,
                    warmup,
                    samples,
                    "perf_counter",
                    threads=torch.get_num_threads(),
                )
            )
    return results


def bench_onnxruntime(
    path: Path,
    *,
    batch_sizes: Sequence[int] = (1,),
    warmup: int = 20,
    runs: int = 200,
    precision: str = "fp32",
    threads: int | None = None,
    pool: np.ndarray | None = None,
) -> list[BenchResult]:
    """Gives back ONNX Runtime (CPU execution provider) latency per batch size."""
    session = onnx_session(Path(path), threads=threads)
    spec = session.get_inputs()[0]
    shape = [int(d) for d in spec.shape[1:]]
    results = []
    for batch in batch_sizes:
        feed = {spec.name: sample_inputs(shape, batch, pool)}
        samples = time_host(lambda feed=feed: session.run(None, feed), warmup=warmup, runs=runs)
        results.append(
            _result(
                Path(path).name,
                "onnxruntime-cpu",
                precision,
                cpu_name(),
                batch,
                warmup,
                samples,
                "perf_counter",
                threads=threads,
            )
        )
    return results


def bench_tensorrt(
    engine: Path,
    input_shape: Sequence[int],
    *,
    batch_sizes: Sequence[int] = (1,),
    warmup: int = 20,
    runs: int = 200,
    precision: str = "?",
    pool: np.ndarray | None = None,
) -> list[BenchResult]:
    """Gives back TensorRT latency per batch size (CUDA events around the execution: GPU compute time)."""

    runner = load_device_module("trt_run").EngineRunner(str(engine))
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cuda"
    results = []
    for batch in batch_sizes:
        timed = runner.time(sample_inputs(input_shape, batch, pool), warmup, runs)
        results.append(
            _result(
                Path(engine).name,
                "tensorrt",
                precision,
                name,
                batch,
                warmup,
                timed["gpu_ms"],
                "cuda-events",
                notes=f"execution API: {runner.api}",
            )
        )
    return results


def bench_path(
    target: str | Path,
    *,
    batch_sizes: Sequence[int] = (1,),
    warmup: int = 20,
    runs: int = 200,
    device: str = "cpu",
    progress: Callable[[str, int, int], None] = lambda *_: None,
) -> BenchReport:
    """Gives back a benchmark of what `target` names: a bundle folder, a run folder, .onnx, .safetensors or
    .engine file. A bundle times model.onnx and model.int8.onnx with ONNX Runtime (and its engines with
    TensorRT when present) on its own calibration images; a run folder or .safetensors times the torch
    student.
    """
    target = Path(target)
    if not target.exists():
        raise NotFoundError(f"{target} does not exist (give a bundle folder, a run folder, or a model file)")
    if any(b < 1 for b in batch_sizes):
        raise UsageError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    jobs: list[Callable[[], list[BenchResult]]] = []
    common = {"batch_sizes": batch_sizes, "warmup": warmup, "runs": runs}
    if target.is_dir() and (target / "model.onnx").exists():
        pool = _bundle_images(target)
        for name, precision in (("model.onnx", "fp32"), ("model.int8.onnx", "int8")):
            if (target / name).exists():
                jobs.append(
                    partial(bench_onnxruntime, target / name, precision=precision, pool=pool, **common)
                )
        if tensorrt_ready():
            shape = _bundle_input_shape(target)
            for engine in sorted(target.glob("*.engine")):
                precision = engine.name.split(".")[1]  # model.PRECISION[.dlaN].trtVERSION.engine
                jobs.append(partial(bench_tensorrt, engine, shape, precision=precision, pool=pool, **common))
    elif target.is_dir() and (target / "student.safetensors").exists() or target.suffix == ".safetensors":
        weights = target / "student.safetensors" if target.is_dir() else target
        model, shape = load_pixel_model(weights)
        jobs.append(partial(bench_torch, model, shape, device=device, label=weights.name, **common))
    elif target.suffix == ".onnx":
        jobs.append(partial(bench_onnxruntime, target, **common))
    elif target.suffix == ".engine":
        if not tensorrt_ready():
            raise UsageError(
                f"{target} is a TensorRT engine: timing it needs tensorrt, pycuda and a CUDA GPU"
            )
        jobs.append(partial(bench_tensorrt, target, _bundle_input_shape(target.parent), **common))
    else:
        raise UsageError(
            f"cannot benchmark {target}: give a bundle folder (rkdtool export), a run folder, or a .onnx, "
            ".safetensors or .engine file"
        )
    report = BenchReport(machine_info())
    for done, job in enumerate(jobs):
        progress("bench", done, len(jobs))
        report.results.extend(job())
    progress("bench", len(jobs), len(jobs))
    return report


def _bundle_input_shape(bundle: Path) -> list[int]:
    """Gives back (C, H, W) of a bundle's input, from its host_report.json."""
    path = bundle / "host_report.json"
    if not path.exists():
        raise NotFoundError(f"{path} is missing: an engine is timed from inside its bundle")
    return [int(d) for d in json.loads(path.read_text())["input"]["shape"][1:]]


def _bundle_images(bundle: Path) -> np.ndarray | None:
    """Gives back the bundle's calibration images (real data to time with), or None."""
    path = bundle / "calib.npz"
    if not path.exists():
        return None
    with np.load(path) as data:
        return data["images"].astype(np.float32)


def write_bench_report(report: BenchReport, path: Path) -> None:
    """Writes a benchmark report as JSON (atomically)."""
    write_json(Path(path), report.to_dict())
