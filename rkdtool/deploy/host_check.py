"""The host re-check of a bundle: ACC, ASR per probe, parity with torch-fp32 and batch-1 latency for every
precision (torch, ONNX Runtime FP32 and INT8, FP16 for FP16 targets, TensorRT where present), since
quantisation can wake a backdoor.

The onnx-fp16 row and the TensorRT rows run the bundle's own device runtime (`device/ort_twin.py`,
`device/trt_build.py`, `device/trt_run.py`), so `device/check.py --backend onnxruntime` reproduces them.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from rkdtool.deploy.bench import BenchResult, bench_onnxruntime, bench_torch
from rkdtool.deploy.onnx import ExportError, onnx_logits, onnx_session
from rkdtool.deploy.timing import latency_stats
from rkdtool.errors import DataError
from rkdtool.machine import tensorrt_ready
from rkdtool.models.pixel import PixelSpaceModel
from rkdtool.probes.metrics import asr_from_predictions, predict_logits
from rkdtool.probes.spec import Probe
from rkdtool.resources import Profile, load_device_module


@dataclass
class PrecisionResult:
    """One precision's re-check: ACC, ASR per probe, latency at batch 1, parity against torch-fp32."""

    acc: float
    asr: dict[str, float]
    asr_all_images: dict[str, float]
    latency_ms: dict[str, float] | None
    max_abs_logit_diff: float
    top1_agreement: float
    backend: str
    model: str

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_logits(
    clean: np.ndarray, triggered: dict[str, np.ndarray], labels: np.ndarray, probes: Sequence[Probe]
) -> tuple[float, dict[str, float], dict[str, float]]:
    """Gives back ACC, ASR per probe and ASR over all images from logits (`probes.metrics` definitions)."""
    labels_t = torch.from_numpy(labels)
    acc = float((clean.argmax(1) == labels).mean()) if len(labels) else 0.0
    asr, asr_all = {}, {}
    for probe in probes:
        result = asr_from_predictions(
            torch.from_numpy(triggered[probe.name].argmax(1)), labels_t, probe.target
        )
        asr[probe.name], asr_all[probe.name] = result.asr, result.asr_all_images
    return acc, asr, asr_all


def parity(reference: np.ndarray, logits: np.ndarray) -> tuple[float, float]:
    """Gives back (max |logit difference|, share of equal top-1 predictions) against the reference logits."""
    if reference.shape != logits.shape:
        raise ExportError(f"logit shapes differ: {reference.shape} vs {logits.shape}")
    return float(np.abs(reference - logits).max()), float((reference.argmax(1) == logits.argmax(1)).mean())


def _latency_dict(results: list[BenchResult]) -> dict[str, float]:
    stats = results[0].latency_ms
    return {"p50": stats.p50, "p90": stats.p90, "p99": stats.p99, "mean": stats.mean}


@dataclass
class ProbeSet:
    """The images every precision is checked on: clean test images and each probe's triggered copy."""

    images: np.ndarray  # float32 (N, 3, H, W) in [0, 1]
    labels: np.ndarray  # int64 (N,)
    triggered: dict[str, np.ndarray]
    total: int  # test images the run has (before the cap)


def select_probe_set(data, probes: Sequence[Probe], *, mean, std, limit: int, seed: int) -> ProbeSet:
    """Gives back at most `limit` seeded-random test images, their labels and their triggered copies."""
    images, labels = data.test_images, data.test_labels
    total = len(labels)
    if total == 0:
        raise DataError("the run's dataset has no test images to check ACC/ASR on")
    if total > limit:
        idx = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:limit]
        images, labels = images[idx], labels[idx]
    triggered = {p.name: p.apply(images, mean=mean, std=std).numpy().astype(np.float32) for p in probes}
    return ProbeSet(images.numpy().astype(np.float32), labels.numpy().astype(np.int64), triggered, total)


def _inputs(probe_set: ProbeSet) -> dict[str, np.ndarray]:
    """Gives back every image set the precisions are checked on: "clean" and one per probe."""
    return {"clean": probe_set.images, **probe_set.triggered}


def _stacked(logits: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate(list(logits.values()))


def _precision_result(logits, reference, probe_set, probes, latency, backend, model) -> PrecisionResult:
    acc, asr, asr_all = evaluate_logits(logits["clean"], logits, probe_set.labels, probes)
    diff, agree = parity(_stacked(reference), _stacked(logits))
    return PrecisionResult(acc, asr, asr_all, latency, diff, agree, backend, model)


def torch_logits(model: PixelSpaceModel, probe_set: ProbeSet, *, mean, std) -> dict[str, np.ndarray]:
    """Gives back torch-fp32 logits (`probes.metrics.predict_logits`) on the probe set's exact images."""
    return {
        key: predict_logits(model.model, torch.from_numpy(images), mean=mean, std=std).numpy()
        for key, images in _inputs(probe_set).items()
    }


def check_onnx_precisions(
    model,
    stage: Path,
    reference,
    probe_set,
    probes,
    chw,
    *,
    warmup: int,
    runs: int,
    profile_precision: str | None = None,
) -> dict[str, PrecisionResult]:
    """Gives back ACC/ASR, parity and batch-1 latency for torch-fp32, onnx-fp32 and onnx-int8, and onnx-fp16
    when the profile's precision is fp16 (the bundle's device runtime must already be in `stage/device`)."""
    results = {}
    torch_latency = bench_torch(model, chw, warmup=warmup, runs=runs, pool=probe_set.images)
    results["torch-fp32"] = _precision_result(
        reference,
        reference,
        probe_set,
        probes,
        _latency_dict(torch_latency),
        "torch-cpu",
        "student.safetensors",
    )
    for name, file, precision in (
        ("onnx-fp32", "model.onnx", "fp32"),
        ("onnx-int8", "model.int8.onnx", "int8"),
    ):
        session = onnx_session(stage / file, optimize=False)  # Q/DQ as written: TensorRT's semantics
        logits = {key: onnx_logits(session, images) for key, images in _inputs(probe_set).items()}
        latency = bench_onnxruntime(
            stage / file, precision=precision, warmup=warmup, runs=runs, pool=probe_set.images
        )
        results[name] = _precision_result(
            logits, reference, probe_set, probes, _latency_dict(latency), "onnxruntime-cpu", file
        )
    if profile_precision == "fp16":
        results.update(check_onnx_fp16(stage, reference, probe_set, probes, warmup=warmup, runs=runs))
    return results


def check_onnx_fp16(stage: Path, reference, probe_set, probes, *, warmup: int, runs: int) -> dict:
    """Gives back {"onnx-fp16": result} from the device runtime's FP16 copy of model.onnx on ONNX Runtime,
    or {} where that copy cannot run here (the device check then runs FP32 and says so)."""
    twin = load_device_module("ort_twin", stage / "device").OrtBackend(str(stage), "fp16")
    if twin.precision_run != "fp16":
        return {}
    logits = {key: twin.infer(images) for key, images in _inputs(probe_set).items()}
    # Count-based warm-up as the other host rows; the time-based one is for boards whose clocks ramp.
    timed = twin.time(probe_set.images[:1], warmup=warmup, runs=runs, warmup_ms=0.0)["host_ms"]
    return {
        "onnx-fp16": _precision_result(
            logits,
            reference,
            probe_set,
            probes,
            _stats_dict(timed),
            "onnxruntime-cpu",
            "model.onnx (FP16 copy)",
        )
    }


def test_split_agreement(model: PixelSpaceModel, stage: Path, data, *, mean, std, fp16: bool = False) -> dict:
    """Gives back each ONNX model's top-1 agreement with torch-fp32 (and max |logit difference|, ACC) on
    every clean image of the test split, not only the probe images, so a quantisation that moves 1% of the
    predictions shows at the split's resolution. Q/DQ run as written (TensorRT's semantics)."""
    images = data.test_images.numpy().astype(np.float32)
    labels = data.test_labels.numpy()
    reference = predict_logits(model.model, data.test_images, mean=mean, std=std).numpy()
    runs = {
        name: onnx_logits(onnx_session(stage / file, optimize=False), images)
        for name, file in (("onnx-fp32", "model.onnx"), ("onnx-int8", "model.int8.onnx"))
    }
    if fp16:
        twin = load_device_module("ort_twin", stage / "device").OrtBackend(str(stage), "fp16")
        if twin.precision_run == "fp16":
            runs["onnx-fp16"] = twin.infer(images)
    models = {}
    for name, logits in runs.items():
        diff, agree = parity(reference, logits)
        models[name] = {
            "top1_agreement": agree,
            "disagreeing_images": int((reference.argmax(1) != logits.argmax(1)).sum()),
            "max_abs_logit_diff": diff,
            "acc": float((logits.argmax(1) == labels).mean()),
        }
    return {
        "images": int(len(labels)),
        "reference": "torch-fp32",
        "reference_acc": float((reference.argmax(1) == labels).mean()),
        "models": models,
    }


def split_agreement_parts(split: dict, decimals: int) -> str:
    """Gives back `test_split_agreement`'s models as "onnx-int8 99.72% (1 differ), ..." (tables, READMEs)."""
    return ", ".join(
        f"{name} {100 * m['top1_agreement']:.{decimals}f}% ({m['disagreeing_images']} differ)"
        for name, m in split["models"].items()
    )


def _stats_dict(samples_ms) -> dict[str, float]:
    stats = latency_stats(samples_ms)
    return {"p50": stats.p50, "p90": stats.p90, "p99": stats.p99, "mean": stats.mean}


def check_tensorrt_precisions(
    stage: Path, settings: dict, profile: Profile, reference, probe_set, probes, *, warmup: int, runs: int
) -> tuple[dict, dict[str, PrecisionResult]]:
    """Builds and checks TensorRT engines when TensorRT, pycuda and a GPU are present; else says why not.

    Gives back (what was tried, trt-* results). Engines are built in a scratch folder, not in the bundle: an
    engine only runs on the GPU and TensorRT version that built it, so the board builds its own.
    """
    if not tensorrt_ready():
        return {
            "checked": False,
            "reason": "TensorRT, pycuda or a CUDA GPU is not available on this host",
        }, {}
    trt_build = load_device_module("trt_build", stage / "device")
    trt_run = load_device_module("trt_run", stage / "device")
    try:
        trt, cuda = trt_build.import_tensorrt(), trt_build.import_pycuda()
    except trt_build.DeviceError as exc:  # importable, yet no CUDA context could be made
        return {"checked": False, "reason": str(exc)}, {}
    info: dict = {
        "checked": True,
        "version": trt.__version__,
        "in_profile_range": profile.tensorrt_allows(trt.__version__),
        "engines": {},
    }
    results = {}
    wanted = ["int8", "fp16"] if profile.precision == "int8" else [profile.precision]
    with tempfile.TemporaryDirectory(prefix="rkdtool-trt-") as scratch:
        for name in ("model.onnx", "model.int8.onnx", "calib.npz"):
            shutil.copy2(stage / name, Path(scratch) / name)
        for precision in wanted:
            said: list[str] = []  # the runtime's warnings, kept in the report: the library prints nothing
            try:
                plan = trt_build.plan_build(settings, trt.__version__, precision)
                path = trt_build.build_engine(trt, plan, scratch, cuda=cuda, log=said.append)
                runner = trt_run.EngineRunner(path, trt=trt, cuda=cuda)
                logits = {key: runner.infer(images) for key, images in _inputs(probe_set).items()}
                timed = runner.time(probe_set.images[:1], warmup=warmup, runs=runs)
            except trt_build.DeviceError as exc:
                info["engines"][precision] = {"error": str(exc), "log": said}
                continue
            results[f"trt-{precision}"] = _precision_result(
                logits, reference, probe_set, probes, _stats_dict(timed["gpu_ms"]), "tensorrt", plan["onnx"]
            )
            sidecar = trt_build.trt_sidecar.read_json(trt_build.trt_sidecar.sidecar_path(path)) or {}
            info["engines"][precision] = {
                "int8_mode": plan["int8_mode"],
                "execution_api": runner.api,
                "timer": timed["gpu_timer"],
                "cuda_graph": timed["cuda_graph"],
                "batch_1_profile": timed["profile"],
                "layers": sidecar.get("layers"),
                "log": said,
            }
    return info, results
