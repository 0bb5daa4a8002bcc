"""Export a run's student for a target: ONNX FP32, INT8 Q/DQ ONNX, calibration and probe tensors, the device
runtime, and the host re-check of ACC/ASR and latency per precision (DESIGN §5 "Bundle", reference/edge.md).

The exported graph takes pixel-space float32 images in [0, 1] (N, 3, H, W) and applies the student's
mean/std normalisation itself as its first ops (Sub, Div), so the board needs no preprocessing beyond
scaling to [0, 1].

The bundle is assembled in a hidden temporary folder beside its destination and renamed into place at the
end: a failed export leaves no folder that looks complete.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from rkdtool import __version__
from rkdtool.bench import (
    BenchResult,
    bench_onnxruntime,
    bench_torch,
    latency_stats,
    machine_info,
    onnx_session,
    tensorrt_ready,
)
from rkdtool.errors import DataError, RkdError, UsageError
from rkdtool.metrics import ASR_DEFINITION, asr_from_predictions, predict_logits
from rkdtool.probes import Probe
from rkdtool.resources import Profile, export_dir, load_device_module
from rkdtool.runs import RunFolder
from rkdtool.training import ProgressFn, no_progress
from rkdtool.weights import build_from_weights, write_json, write_text_atomic

INPUT_NAME, OUTPUT_NAME = "input", "logits"
DEFAULT_MAX_PROBE_IMAGES = 2000
QUANTIZED_OP_TYPES = ("Conv", "Gemm")  # edge.md §1.4: keeps Q/DQ off BN scale/bias, Flatten, pooling


class ExportError(RkdError):
    """An export step failed on this run (checker, quantisation, parity) in a way the user can act on."""


class PixelSpaceModel(nn.Module):
    """Wraps a model taking normalised input so that it takes pixel-space [0, 1] images instead."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)

    @classmethod
    def from_weights(cls, path: Path) -> tuple[PixelSpaceModel, tuple[int, int, int]]:
        """Gives back the pixel-space student stored in a safetensors file and its input shape (C, H, W)."""
        model, meta = build_from_weights(path)
        if "mean" not in meta or "std" not in meta:
            raise UsageError(f"{path} carries no mean/std metadata; cannot bake its normalisation in")
        return cls(model, meta["mean"], meta["std"]).eval(), input_chw(meta)


def input_chw(meta: dict) -> tuple[int, int, int]:
    """Gives back (C, H, W) from weights metadata (`input_size` as an int or [H, W]); 3x32x32 by default."""
    size = meta.get("input_size", 32)
    if isinstance(size, int):
        return (3, size, size)
    if len(size) == 2:
        return (3, int(size[0]), int(size[1]))
    return tuple(int(s) for s in size[-3:])  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------- ONNX FP32


def export_onnx(
    model: nn.Module,
    path: Path,
    *,
    input_shape: Sequence[int],
    opset: int,
    exporter: str,
    max_batch: int = 1024,
) -> None:
    """Writes `model` (pixel-space input) as one self-contained ONNX file with a dynamic batch axis.

    TorchScript exporter for opset <= 17 (TensorRT 8.2/8.5), dynamo for >= 18: the dynamo exporter cannot
    down-convert and would silently keep opset 18 (edge.md §6.1). Weights stay inside the file.
    """
    model = model.eval()
    example = torch.rand(2, *input_shape)
    sink = io.StringIO()
    # The exporters warn about their own deprecations and print progress; the library stays quiet.
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
        if exporter == "torchscript":
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                do_constant_folding=True,
            )
        elif exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=max(max_batch, 2))
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=True,
                opset_version=opset,
                external_data=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes={"x": {0: batch}},
                verbose=False,
            )
        else:
            raise UsageError(f"unknown exporter {exporter!r}; use torchscript or dynamo")
    written = onnx.load(str(path), load_external_data=False)
    version = next((o.version for o in written.opset_import if o.domain in ("", "ai.onnx")), None)
    if version != opset:
        raise ExportError(f"the {exporter} exporter wrote opset {version}, not the profile's {opset}")
    if Path(f"{path}.data").exists():
        raise ExportError(f"the exporter wrote external weights ({path}.data); the bundle needs one file")
    onnx.checker.check_model(str(path), full_check=True)


# ---------------------------------------------------------------------------------------------- INT8 Q/DQ


def calibration_reader(images: np.ndarray, input_name: str = INPUT_NAME, batch_size: int = 32):
    """Gives back an ONNX Runtime CalibrationDataReader feeding `images` (clean training images).

    Every batch has the same size: ORT's entropy and percentile collectors stack per-batch outputs and fail
    on a short last batch, so the remainder (fewer than `batch_size` images) is left out.
    """
    from onnxruntime.quantization import CalibrationDataReader

    batch_size = max(1, min(batch_size, len(images)))
    usable = (len(images) // batch_size) * batch_size

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.starts = iter(range(0, usable, batch_size))

        def get_next(self) -> dict | None:
            start = next(self.starts, None)
            return None if start is None else {input_name: images[start : start + batch_size]}

        def rewind(self) -> None:
            self.starts = iter(range(0, usable, batch_size))

    return _Reader()


def quantize_int8(fp32_path: Path, int8_path: Path, calib_images: np.ndarray, *, method: str) -> None:
    """Writes the INT8 Q/DQ model: ORT pre-processing, then static quantisation with TensorRT's rules.

    Symmetric int8 activations and weights (zero point 0), per-channel weights (axis 0), bias left in float,
    Conv and Gemm only, entropy or percentile calibration (edge.md §1.3-1.4).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise UsageError(f"calibration must be entropy or percentile, got {method!r}")
    pre_path = int8_path.with_name(int8_path.stem + ".pre.onnx")
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink):  # ORT's calibrators print progress
        warnings.simplefilter("ignore")
        quant_pre_process(str(fp32_path), str(pre_path))
        quantize_static(
            str(pre_path),
            str(int8_path),
            calibration_reader(calib_images),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=list(QUANTIZED_OP_TYPES),
            calibrate_method=methods[method],
            extra_options={
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                "QuantizeBias": False,
                "CalibPercentile": 99.99,
            },
        )
    pre_path.unlink()
    model = onnx.load(str(int8_path))
    prune_unused_opsets(model)
    onnx.save(model, str(int8_path))
    onnx.checker.check_model(str(int8_path), full_check=True)


def prune_unused_opsets(model: onnx.ModelProto) -> None:
    """Drops opset imports of domains no node uses (ORT's pre-processing adds com.microsoft and others)."""
    used = {n.domain for n in model.graph.node} | {""}
    kept = [o for o in model.opset_import if o.domain in used or o.domain == "ai.onnx"]
    del model.opset_import[:]
    model.opset_import.extend(kept)


def qdq_summary(path: Path) -> dict:
    """Gives back the Q/DQ facts TensorRT cares about (edge.md §8): zero points, scales, bias DQ, opset."""
    model = onnx.load(str(path))
    init = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    zero_points, conv_weight_scales, bias_dq, bn_dq = [], [], 0, 0
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if len(node.input) > 2 and node.input[2] in init:
            zp = init[node.input[2]]
            zero_points.append((str(zp.dtype), bool(np.all(zp == 0))))
        if node.op_type != "DequantizeLinear":
            continue
        for user in consumers.get(node.output[0], []):
            if user.op_type in ("Conv", "Gemm") and len(user.input) > 2 and user.input[2] == node.output[0]:
                bias_dq += 1
            if user.op_type == "Conv" and user.input[1] == node.output[0]:
                weight = init.get(node.input[0])
                scale = init.get(node.input[1])
                c_out = None if weight is None else int(weight.shape[0])
                conv_weight_scales.append({"c_out": c_out, "scale_shape": list(np.shape(scale))})
            if user.op_type == "BatchNormalization" and node.output[0] in user.input[1:]:
                bn_dq += 1
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return {
        "opset": opset,
        "quantize_nodes": sum(n.op_type == "QuantizeLinear" for n in model.graph.node),
        "dequantize_nodes": sum(n.op_type == "DequantizeLinear" for n in model.graph.node),
        "zero_point_dtypes": sorted({dt for dt, _ in zero_points}),
        "all_zero_points_zero": all(z for _, z in zero_points) and bool(zero_points),
        "conv_weight_scales": conv_weight_scales,
        "per_channel_conv_weights": bool(conv_weight_scales)
        and all(s["scale_shape"] == [s["c_out"]] for s in conv_weight_scales),
        "bias_dequantize_nodes": bias_dq,
        "batchnorm_param_dequantize_nodes": bn_dq,
        "domains": sorted({o.domain or "ai.onnx" for o in model.opset_import}),
    }


# ---------------------------------------------------------------------------------------------- checks


def onnx_logits(session, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Gives back the logits an ONNX Runtime session computes for pixel-space images, in batches."""
    name = session.get_inputs()[0].name
    outs = [
        session.run(None, {name: images[i : i + batch_size]})[0] for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(outs).astype(np.float32) if outs else np.zeros((0, 0), np.float32)


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
    """Gives back ACC, ASR per probe and ASR over all images from logits (rkdtool.metrics definitions)."""
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


# ---------------------------------------------------------------------------------------------- the bundle


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


def select_calibration(data, count: int, seed: int) -> np.ndarray:
    """Gives back `count` seeded-random clean *training* images (never test images) for INT8 calibration."""
    n = len(data.train_labels)
    if n == 0:
        raise DataError("the run's dataset has no training images to calibrate INT8 with")
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))[: min(count, n)]
    return data.train_images[idx].numpy().astype(np.float32)


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)


def write_probes_npz(path: Path, probe_set: ProbeSet, probes: Sequence[Probe]) -> None:
    """Writes probes.npz: images, labels, probe_names, targets (-1: untargeted), triggered_{i}."""
    arrays = {
        "images": probe_set.images,
        "labels": probe_set.labels,
        "probe_names": np.array([p.name for p in probes], dtype=np.str_),
        "targets": np.array([-1 if p.target is None else p.target for p in probes], dtype=np.int64),
    }
    for i, probe in enumerate(probes):
        arrays[f"triggered_{i}"] = probe_set.triggered[probe.name]
    _save_npz(path, **arrays)


def default_bundle_dir(run: RunFolder, profile: Profile) -> Path:
    return run.path / "export" / profile.name


@contextlib.contextmanager
def staged_folder(destination: Path):
    """Yields a hidden temporary folder beside `destination`, renamed into place if the block succeeds."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = None
    if destination.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old-", dir=destination.parent))
        os.replace(destination, old / destination.name)
    os.replace(stage, destination)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_bundle(
    run: RunFolder,
    profile: Profile,
    out_dir: Path | None = None,
    *,
    progress: ProgressFn = no_progress,
    max_probe_images: int = DEFAULT_MAX_PROBE_IMAGES,
    latency_warmup: int = 20,
    latency_runs: int = 200,
) -> dict:
    """Writes the bundle of `run`'s student for `profile` and gives back its host report (host_report.json).

    Steps: ONNX FP32 (exporter and opset from the profile, full checker), INT8 Q/DQ calibrated on clean
    training images, calib.npz and probes.npz, the device runtime, then ACC/ASR, parity and batch-1 latency
    for torch-fp32, onnx-fp32 and onnx-int8 (and trt-* when TensorRT and a GPU are present).
    """
    if max_probe_images < 1 or latency_runs < 1 or latency_warmup < 0:
        raise UsageError("max_probe_images and latency_runs must be >= 1, latency_warmup >= 0")
    out_dir = Path(out_dir) if out_dir is not None else default_bundle_dir(run, profile)
    config = run.config
    seed = int(config.get("seed", 0))
    steps = 6
    task = f"export {profile.name}"
    progress(task, 0, steps)

    student, meta = run.student()
    data = run.data()
    mean = tuple(meta.get("mean") or data.mean)
    std = tuple(meta.get("std") or data.std)
    chw = input_chw(meta)
    probes = run.probes(mean, std)
    model = PixelSpaceModel(student, mean, std).eval()
    probe_set = select_probe_set(data, probes, mean=mean, std=std, limit=max_probe_images, seed=seed)
    calib = select_calibration(data, profile.calib_samples, seed)
    if calib.shape[1:] != chw or probe_set.images.shape[1:] != chw:
        raise DataError(f"the dataset's images are {calib.shape[1:]}, the student expects {chw}")
    input_spec = {
        "name": INPUT_NAME,
        "output": OUTPUT_NAME,
        "shape": ["batch", *chw],
        "dtype": "float32",
        "layout": "NCHW",
        "range": [0.0, 1.0],
        "normalization": "inside the graph: (x - mean) / std",
        "mean": list(mean),
        "std": list(std),
    }
    profile_dict = {k: v for k, v in profile.to_dict().items() if k != "path"}

    with staged_folder(out_dir) as stage:
        export_onnx(
            model,
            stage / "model.onnx",
            input_shape=chw,
            opset=profile.opset,
            exporter=profile.exporter,
            max_batch=profile.batch.max,
        )
        progress(task, 1, steps)
        quantize_int8(stage / "model.onnx", stage / "model.int8.onnx", calib, method=profile.calibration)
        progress(task, 2, steps)
        _save_npz(stage / "calib.npz", images=calib)
        write_probes_npz(stage / "probes.npz", probe_set, probes)
        # The profile's own file keeps its comments (the sources of its facts).
        write_text_atomic(
            stage / "profile.toml", profile.path.read_text() if profile.path else profile.to_toml()
        )
        shutil.copytree(
            export_dir(), stage / "device", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "ruff.toml")
        )
        progress(task, 3, steps)

        reference = torch_logits(model, probe_set, mean=mean, std=std)
        precisions = check_onnx_precisions(
            model, stage, reference, probe_set, probes, chw, warmup=latency_warmup, runs=latency_runs
        )
        progress(task, 4, steps)
        settings = {"target": profile.name, "profile": profile_dict, "input": input_spec}
        tensorrt, trt_results = check_tensorrt_precisions(
            stage, settings, profile, reference, probe_set, probes, warmup=latency_warmup, runs=latency_runs
        )
        precisions.update(trt_results)
        progress(task, 5, steps)

        report = {
            "rkdtool_version": __version__,
            "target": profile.name,
            "run": str(run.path),
            "asr_definition": ASR_DEFINITION,
            "input": input_spec,
            "profile": profile_dict,
            "export": {
                "exporter": profile.exporter,
                "opset": profile.opset,
                "torch": torch.__version__,
                "onnx": onnx.__version__,
            },
            "int8": {
                "tool": "onnxruntime.quantization.quantize_static (QDQ) after quant_pre_process",
                "calibration": profile.calibration,
                "calibration_images": int(len(calib)),
                "calibration_source": f"clean training images of {config.get('data')} (seed {seed})",
                "op_types": list(QUANTIZED_OP_TYPES),
                "graph": qdq_summary(stage / "model.int8.onnx"),
                "evaluation": "ACC/ASR/parity with ONNX Runtime graph optimisations off (Q/DQ run as "
                "written, as TensorRT reads them); latency with them on (ORT's fused int8 CPU kernels)",
            },
            "probes": [p.describe() for p in probes],
            "probe_images": int(len(probe_set.labels)),
            "probe_images_total": probe_set.total,
            "parity_inputs": "the clean and triggered probe images, compared with torch-fp32",
            "latency": {
                "batch": 1,
                "warmup": latency_warmup,
                "runs": latency_runs,
                "machine": machine_info(),
            },
            "tensorrt": tensorrt,
            "precisions": {name: result.to_dict() for name, result in precisions.items()},
            "files": sorted(p.name for p in stage.iterdir()) + ["host_report.json", "README.md"],
        }
        write_json(stage / "host_report.json", report)
        write_text_atomic(stage / "README.md", bundle_readme(report, profile))
    progress(task, steps, steps)
    return report


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
    """Gives back torch-fp32 logits (rkdtool.metrics.predict_logits) on the probe set's exact images."""
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
) -> dict[str, PrecisionResult]:
    """Gives back ACC/ASR, parity and batch-1 latency for torch-fp32, onnx-fp32 and onnx-int8."""
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
    return results


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
    trt = trt_build.import_tensorrt()
    info: dict = {"checked": True, "version": trt.__version__, "engines": {}}
    results = {}
    wanted = ["int8", "fp16"] if profile.precision == "int8" else [profile.precision]
    with tempfile.TemporaryDirectory(prefix="rkdtool-trt-") as scratch:
        for name in ("model.onnx", "model.int8.onnx", "calib.npz"):
            shutil.copy2(stage / name, Path(scratch) / name)
        for precision in wanted:
            try:
                plan = trt_build.plan_build(settings, trt.__version__, precision)
                runner = trt_run.EngineRunner(trt_build.build_engine(trt, plan, scratch), trt=trt)
                logits = {key: runner.infer(images) for key, images in _inputs(probe_set).items()}
                timed = runner.time(probe_set.images[:1], warmup, runs)["gpu_ms"]
            except trt_build.DeviceError as exc:
                info["engines"][precision] = {"error": str(exc)}
                continue
            stats = latency_stats(timed)
            latency = {"p50": stats.p50, "p90": stats.p90, "p99": stats.p99, "mean": stats.mean}
            results[f"trt-{precision}"] = _precision_result(
                logits, reference, probe_set, probes, latency, "tensorrt", plan["onnx"]
            )
            info["engines"][precision] = {
                "int8_mode": plan["int8_mode"],
                "execution_api": runner.api,
                "timer": "cuda-events (GPU compute)",
            }
    return info, results


def bundle_readme(report: dict, profile: Profile) -> str:
    """Gives back the bundle's README.md: what is inside, the input contract, how to check it on the board."""
    spec = report["input"]
    shape = "x".join(str(s) for s in spec["shape"])
    rows = []
    for name, r in report["precisions"].items():
        asr = ", ".join(f"{k} {100 * v:.1f}%" for k, v in r["asr"].items()) or "-"
        p50 = f"{r['latency_ms']['p50']:.3f}" if r.get("latency_ms") else "-"
        rows.append(
            f"| {name} | {100 * r['acc']:.2f}% | {asr} | {p50} | {r['max_abs_logit_diff']:.2e} | "
            f"{100 * r['top1_agreement']:.2f}% |"
        )
    machine = report["latency"]["machine"]
    trt_range = profile.tensorrt or "none (ONNX Runtime target)"
    return f"""# rkdtool bundle for `{profile.name}`

Made by rkdtool {report["rkdtool_version"]} from the run `{report["run"]}`.
Target: {profile.name} ({profile.family}, SM {profile.sm or "-"}, TensorRT {trt_range},
JetPack {profile.jetpack or "-"}); precision {profile.precision}, fallback {profile.fallback_precision}.

## Files
- `model.onnx`: FP32, opset {profile.opset} ({profile.exporter} exporter), dynamic batch axis, weights inside.
- `model.int8.onnx`: INT8 Q/DQ (symmetric, per-channel weights, Conv/Gemm), calibrated with
  {profile.calibration} on {report["int8"]["calibration_images"]} clean training images.
- `calib.npz`: those calibration images (`images`), for TensorRT's implicit calibrator (TensorRT 8.2, DLA).
- `probes.npz`: {report["probe_images"]} clean test images (`images`, `labels`; the test set has
  {report["probe_images_total"]}) and, per probe `i`, its triggered images `triggered_i`
  (`probe_names`, `targets`; -1 = untargeted).
- `profile.toml`: the target profile. `device/`: the device runtime (numpy + tensorrt + pycuda).
- `host_report.json`: ACC, ASR and latency per precision measured on the host.

## Input
`{spec["name"]}`: float32, {spec["layout"]}, shape {shape}, **pixel values in [0, 1]**.
The mean/std normalisation is inside the graph (mean {spec["mean"]}, std {spec["std"]}):
do not normalise on the board. Output: `{spec["output"]}`, one row of class scores per image.

## On the board
```
scp -r {profile.name} user@board:~/
cd ~/{profile.name}
sudo nvpmodel -q && sudo jetson_clocks     # record the power mode, lock the clocks
python3 device/check.py .                  # builds the engine if missing, then ACC/ASR and latency
```
Needs JetPack's TensorRT Python bindings (python3-libnvinfer), numpy and pycuda (`pip3 install pycuda`).
`check.py` writes `device_report.json` (ACC, ASR per probe, latency p50/p90/p99 after warm-up, TensorRT
version, power mode) and compares it with the host numbers below. Options: `--precision fp16|int8|fp32`,
`--dla N` (DLA cores: {profile.dla_cores}), `--runs`, `--batch`, `--rebuild`, `--backend onnxruntime`.
`python3 device/trt_build.py . --print-trtexec` prints the equivalent trtexec build and timing commands.
Rebuild the engine after every JetPack/TensorRT upgrade: engines are tied to the GPU and TensorRT version.

## Host re-check
Measured on {machine["cpu"]} ({machine["cpu_cores"]} cores): batch-1 latency after
{report["latency"]["warmup"]} warm-up runs over {report["latency"]["runs"]} timed runs; parity against
torch-fp32 on the clean and triggered probe images. ASR: {report["asr_definition"]}.

| precision | ACC | ASR | p50 ms | max abs logit diff | top-1 agreement |
|---|---|---|---|---|---|
{chr(10).join(rows)}

Notes on the target: {profile.notes}
"""
