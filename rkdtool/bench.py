"""Latency on the host: warm-up, then many timed runs; p50/p90/p99, mean, throughput, per batch and backend.

Method (reference/edge.md §7): warm up before timing, time enough runs to report a distribution, time real
images rather than zeros, name the machine and backend on every result. On CUDA, torch is timed with CUDA
events on the stream (device time) and, where capture works, replays a CUDA graph to remove launch overhead.
TensorRT engines are timed through the device runtime (`export/trt_run.py`) when TensorRT and pycuda exist.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rkdtool.errors import NotFoundError, UsageError
from rkdtool.weights import write_json


@dataclass(frozen=True)
class LatencyStats:
    """Percentiles of one timed series, in milliseconds."""

    p50: float
    p90: float
    p99: float
    mean: float
    min: float
    max: float


def latency_stats(samples_ms: Sequence[float]) -> LatencyStats:
    """Gives back p50/p90/p99/mean/min/max of a series of latencies in ms."""
    if len(samples_ms) == 0:
        raise ValueError("no latency samples")
    a = np.asarray(samples_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return LatencyStats(float(p50), float(p90), float(p99), float(a.mean()), float(a.min()), float(a.max()))


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


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def tensorrt_version() -> str | None:
    """Gives back the importable TensorRT's version, or None."""
    if importlib.util.find_spec("tensorrt") is None:
        return None
    try:
        import tensorrt

        return str(tensorrt.__version__)
    except Exception as exc:  # a broken install: say so rather than hide it
        return f"unimportable ({type(exc).__name__}: {exc})"


def machine_info() -> dict:
    """Gives back the machine and software stack: CPU, cores, torch, CUDA device, ONNX Runtime, TensorRT."""
    import onnx
    import onnxruntime as ort

    from rkdtool import __version__

    cuda = torch.cuda.is_available()
    return {
        "rkdtool": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
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


def sample_inputs(
    shape: Sequence[int], batch: int, pool: np.ndarray | None = None, seed: int = 0
) -> np.ndarray:
    """Gives back `batch` float32 images: from `pool` (repeated if short) or seeded uniform [0, 1] noise."""
    if pool is not None and len(pool):
        reps = -(-batch // len(pool))
        return np.ascontiguousarray(np.concatenate([pool] * reps)[:batch], dtype=np.float32)
    rng = np.random.default_rng(seed)
    return rng.random((batch, *shape), dtype=np.float32)


def time_host(fn: Callable[[], object], *, warmup: int, runs: int) -> list[float]:
    """Gives back `runs` wall-clock latencies (ms, perf_counter) of fn() after `warmup` untimed calls."""
    if runs < 1 or warmup < 0:
        raise UsageError(f"runs must be >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


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


def _time_cuda(model: nn.Module, x: torch.Tensor, *, warmup: int, runs: int, use_graph: bool):
    """Gives back (latencies in ms from CUDA events, whether a CUDA graph was replayed, a note)."""
    note = ""
    step: Callable[[], object] = lambda: model(x)  # noqa: E731
    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as graph capture requires
            for _ in range(max(warmup, 3)):
                model(x)
        torch.cuda.current_stream().wait_stream(side)
        graphed = False
        if use_graph:
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    model(x)
                step, graphed = graph.replay, True
            except RuntimeError as exc:  # capture fails for some ops: time eagerly and say why
                note = f"CUDA graph capture failed, timed eagerly: {exc}"
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        samples = []
        for _ in range(runs):
            start.record()
            step()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
    return samples, graphed, note


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
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name()
    results = []
    for batch in batch_sizes:
        x = torch.from_numpy(sample_inputs(input_shape, batch, pool)).to(dev)
        if dev.type == "cuda":
            samples, graphed, note = _time_cuda(model, x, warmup=warmup, runs=runs, use_graph=cuda_graph)
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


def onnx_session(path: Path, *, threads: int | None = None, optimize: bool = True):
    """Gives back an ONNX Runtime CPU session for a model file.

    optimize=True: all graph optimisations (ORT fuses Q/DQ into its int8 kernels: what runs fastest here).
    optimize=False: the graph runs as written, Q/DQ as float quantise-dequantise: the semantics TensorRT
    implements. ORT's fused int8 kernels can drift from it on x86 without VNNI (edge.md §1.4).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    level = "ORT_ENABLE_ALL" if optimize else "ORT_DISABLE_ALL"
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


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
                _cpu_name(),
                batch,
                warmup,
                samples,
                "perf_counter",
                threads=threads,
            )
        )
    return results


def tensorrt_ready() -> bool:
    """Gives back whether TensorRT, pycuda and a CUDA GPU are all present."""
    return (
        importlib.util.find_spec("tensorrt") is not None
        and importlib.util.find_spec("pycuda") is not None
        and torch.cuda.is_available()
    )


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
    from rkdtool.resources import load_device_module

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
        from rkdtool.deploy import PixelSpaceModel

        weights = target / "student.safetensors" if target.is_dir() else target
        model, shape = PixelSpaceModel.from_weights(weights)
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
