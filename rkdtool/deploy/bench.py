"""Latency on the host: warm-up, then many timed runs; p50/p90/p99, mean, throughput, per batch and backend,
with the model's size on disk and, where the bundle's probes.npz is there, its ACC and ASR beside them.

Method (reference/edge.md §7): warm up before timing, time enough runs to report a distribution, time real
images rather than zeros, name the machine and backend on every result. On CUDA, torch is timed with CUDA
events on the stream (device time) and, where capture works, replays a CUDA graph to remove launch overhead.
TensorRT engines are timed through the device runtime (`export/trt_run.py`) when TensorRT and pycuda exist.
ACC and ASR come from the very session or engine that was timed (Ultralytics' benchmark validates the
exported model the same way), on the bundle's clean and triggered probe images.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rkdtool.deploy.onnx import load_pixel_model, onnx_logits, onnx_session
from rkdtool.deploy.timing import LatencyStats, latency_stats, sample_inputs, time_cuda, time_host
from rkdtool.errors import DataError, NotFoundError, UsageError
from rkdtool.machine import cpu_name, machine_info, tensorrt_ready
from rkdtool.probes.metrics import ASR_DEFINITION, asr_from_predictions
from rkdtool.resources import load_device_module
from rkdtool.weights import write_json


@dataclass
class BenchResult:
    """One backend at one batch size: its latency distribution and throughput (and the model's size, ACC
    and ASR per probe where known)."""

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
    size_bytes: int | None = None  # the model file(s) on disk
    acc: float | None = None  # on the probe images' clean copies, by the timed session or engine
    asr: dict[str, float] | None = None  # per probe (probes.metrics.ASR_DEFINITION)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class BenchReport:
    """A benchmark run: the machine it ran on and one result per (model, backend, batch)."""

    machine: dict
    results: list[BenchResult] = field(default_factory=list)
    target: str = ""  # what was benchmarked, as given
    probe_images: int | None = None  # clean images ACC/ASR were measured on (None: no probes.npz)
    created: str = field(default_factory=lambda: datetime.datetime.now().isoformat(timespec="seconds"))

    def to_dict(self) -> dict:
        return {
            "target": self.target,
            "created": self.created,
            "machine": self.machine,
            "probe_images": self.probe_images,
            "asr_definition": ASR_DEFINITION if self.probe_images else None,
            "results": [r.to_dict() for r in self.results],
        }


@dataclass
class ProbeImages:
    """A bundle's probes.npz: clean test images, their labels, and each probe's triggered copy."""

    images: np.ndarray  # float32 (N, C, H, W) in [0, 1]
    labels: np.ndarray  # int64 (N,)
    triggered: dict[str, np.ndarray]
    targets: dict[str, int | None]  # None: untargeted (stored as -1)


def load_probe_images(path: Path) -> ProbeImages:
    """Gives back the probe images of a bundle's probes.npz (layout: `bundle.write_probes_npz`)."""
    try:
        with np.load(path) as data:
            names = [str(n) for n in data["probe_names"]]
            return ProbeImages(
                np.ascontiguousarray(data["images"], dtype=np.float32),
                data["labels"].astype(np.int64),
                {
                    n: np.ascontiguousarray(data[f"triggered_{i}"], dtype=np.float32)
                    for i, n in enumerate(names)
                },
                {n: (None if int(t) < 0 else int(t)) for n, t in zip(names, data["targets"], strict=True)},
            )
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"{path} is not a bundle's probes.npz ({exc}); re-run rkdtool export") from exc


def probe_quality(
    predict: Callable[[np.ndarray], np.ndarray], probes: ProbeImages
) -> tuple[float, dict[str, float]]:
    """Gives back (ACC, ASR per probe) of a logits function on the probe images."""
    labels = torch.from_numpy(probes.labels)
    acc = float((predict(probes.images).argmax(1) == probes.labels).mean()) if len(labels) else 0.0
    asr = {
        name: asr_from_predictions(
            torch.from_numpy(predict(images).argmax(1)), labels, probes.targets[name]
        ).asr
        for name, images in probes.triggered.items()
    }
    return acc, asr


def model_size_bytes(path: Path) -> int:
    """Gives back the bytes a model takes on disk, external ONNX weights (`PATH.data`) included."""
    path = Path(path)
    extra = Path(f"{path}.data")
    return path.stat().st_size + (extra.stat().st_size if extra.exists() else 0)


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


def _with_quality(results: list[BenchResult], size: int | None, quality) -> list[BenchResult]:
    """Gives back `results` with the model's size and (ACC, ASR) filled in on every row."""
    for r in results:
        r.size_bytes = size
        if quality is not None:
            r.acc, r.asr = quality[0], dict(quality[1])
    return results


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
    probes: ProbeImages | None = None,
    size_bytes: int | None = None,
) -> list[BenchResult]:
    """Gives back torch latency per batch size: perf_counter on CPU, CUDA events (+ CUDA graphs) on CUDA.

    `threads` sets torch's intra-op threads for the measurement (on a busy machine, 1 avoids OpenMP
    oversubscription stalls); the default keeps torch's setting. With `probes`, ACC and ASR too.
    """
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        results = _bench_torch(model, input_shape, batch_sizes, device, warmup, runs, cuda_graph, pool, label)
        if probes is None:
            return _with_quality(results, size_bytes, None)
        dev = torch.device(device)

        def predict(images: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                chunks = [
                    model(torch.from_numpy(images[i : i + 256]).to(dev)) for i in range(0, len(images), 256)
                ]
            return torch.cat(chunks).float().cpu().numpy()

        return _with_quality(results, size_bytes, probe_quality(predict, probes))
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
            backend, timer, extra = "torch-cuda", "cuda-events", {"cuda_graph": graphed, "notes": note}
        else:
            with torch.inference_mode():
                samples = time_host(lambda x=x: model(x), warmup=warmup, runs=runs)
            backend, timer, extra = "torch-cpu", "perf_counter", {"threads": torch.get_num_threads()}
        results.append(_result(label, backend, "fp32", name, batch, warmup, samples, timer, **extra))
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
    probes: ProbeImages | None = None,
) -> list[BenchResult]:
    """Gives back ONNX Runtime (CPU execution provider) latency per batch size, the file's size, and with
    `probes` ACC and ASR from the same (fully optimised) session."""
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
    quality = probe_quality(partial(onnx_logits, session), probes) if probes is not None else None
    return _with_quality(results, model_size_bytes(path), quality)


def bench_tensorrt(
    engine: Path,
    input_shape: Sequence[int],
    *,
    batch_sizes: Sequence[int] = (1,),
    warmup: int = 20,
    runs: int = 200,
    precision: str = "?",
    pool: np.ndarray | None = None,
    probes: ProbeImages | None = None,
) -> list[BenchResult]:
    """Gives back TensorRT latency per batch size (CUDA events around the execution: GPU compute time, a
    CUDA graph replay where capture works, as trtexec --useCudaGraph), the engine's size, and with `probes`
    ACC and ASR from the same engine. Each row says whether its timing was a graph replay and why not."""

    runner = load_device_module("trt_run").EngineRunner(str(engine))
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cuda"
    results = []
    for batch in batch_sizes:
        timed = runner.time(sample_inputs(input_shape, batch, pool), warmup, runs)
        graphed = timed["gpu_timer"] == "cuda-graph"
        how = "a CUDA graph replay" if graphed else f"one enqueue ({timed['cuda_graph']})"
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
                cuda_graph=graphed,
                notes=f"execution API: {runner.api}; CUDA events around {how}; optimisation profile "
                f"{timed['profile']}",
            )
        )
    quality = probe_quality(runner.infer, probes) if probes is not None else None
    return _with_quality(results, model_size_bytes(engine), quality)


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
    TensorRT when present) on its own calibration images, and measures ACC/ASR on its probes.npz; a run
    folder or .safetensors times the torch student. A model file beside a probes.npz gets ACC/ASR too.
    """
    target = Path(target)
    if not target.exists():
        raise NotFoundError(f"{target} does not exist (give a bundle folder, a run folder, or a model file)")
    if any(b < 1 for b in batch_sizes):
        raise UsageError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    if runs < 1 or warmup < 0:
        raise UsageError(f"--runs must be >= 1 and --warmup >= 0, got runs={runs}, warmup={warmup}")
    folder = target if target.is_dir() else target.parent
    probes = load_probe_images(folder / "probes.npz") if (folder / "probes.npz").exists() else None
    common = {"batch_sizes": batch_sizes, "warmup": warmup, "runs": runs, "probes": probes}
    jobs = _bench_jobs(target, device, common)
    report = BenchReport(
        machine_info(), target=str(target), probe_images=len(probes.labels) if probes else None
    )
    for done, job in enumerate(jobs):
        progress("bench", done, len(jobs))
        report.results.extend(job())
    progress("bench", len(jobs), len(jobs))
    return report


def _bench_jobs(target: Path, device: str, common: dict) -> list[Callable[[], list[BenchResult]]]:
    """Gives back one job per model `target` holds (see `bench_path`), or raises what cannot be timed."""
    jobs: list[Callable[[], list[BenchResult]]] = []
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
        size = model_size_bytes(weights)
        jobs.append(
            partial(bench_torch, model, shape, device=device, label=weights.name, size_bytes=size, **common)
        )
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
    return jobs


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
