"""The export job: a run's student bundled for a target (DESIGN §5 "Bundle", reference/edge.md): ONNX FP32,
INT8 Q/DQ, calibration and probe tensors, the device runtime, the host re-check (`host_check`) and a README.

The bundle is assembled in a hidden temporary folder beside its destination and renamed into place at the
end: a failed export leaves no folder that looks complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import torch

from rkdtool import __version__
from rkdtool.deploy.host_check import (
    ProbeSet,
    check_onnx_precisions,
    check_tensorrt_precisions,
    select_probe_set,
    split_agreement_parts,
    test_split_agreement,
    torch_logits,
)
from rkdtool.deploy.int8 import QUANTIZED_OP_TYPES, qdq_summary, quantize_int8, select_calibration
from rkdtool.deploy.onnx import INPUT_NAME, OUTPUT_NAME, export_onnx
from rkdtool.errors import DataError, UsageError
from rkdtool.machine import machine_info
from rkdtool.models.pixel import PixelSpaceModel, input_chw
from rkdtool.probes.metrics import ASR_DEFINITION
from rkdtool.probes.spec import Probe, load_probes
from rkdtool.resources import Profile, export_dir
from rkdtool.runs import RunFolder
from rkdtool.training import ProgressFn, no_progress
from rkdtool.weights import write_json, write_text_atomic

DEFAULT_MAX_PROBE_IMAGES = 2000


# ---------------------------------------------------------------------------------------------- ONNX FP32


# ---------------------------------------------------------------------------------------------- INT8 Q/DQ


# ---------------------------------------------------------------------------------------------- checks


# ---------------------------------------------------------------------------------------------- the bundle


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
    seed = int(run.config.get("seed", 0))
    steps = 6
    task = f"export {profile.name}"
    progress(task, 0, steps)

    student, meta = run.student()
    data = run.data()
    mean = tuple(meta.get("mean") or data.mean)
    std = tuple(meta.get("std") or data.std)
    chw = input_chw(meta)
    probes = [p.bind(mean, std) for p in load_probes(run.probe_spec)]
    model = PixelSpaceModel(student, mean, std).eval()
    probe_set = select_probe_set(data, probes, mean=mean, std=std, limit=max_probe_images, seed=seed)
    calib = select_calibration(data, profile.calib_samples, seed)
    if calib.shape[1:] != chw or probe_set.images.shape[1:] != chw:
        raise DataError(f"the dataset's images are {calib.shape[1:]}, the student expects {chw}")
    input_spec = _input_spec(chw, mean, std)

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
        _write_inputs_and_runtime(stage, profile, calib, probe_set, probes)
        progress(task, 3, steps)

        reference = torch_logits(model, probe_set, mean=mean, std=std)
        precisions = check_onnx_precisions(
            model,
            stage,
            reference,
            probe_set,
            probes,
            chw,
            warmup=latency_warmup,
            runs=latency_runs,
            profile_precision=profile.precision,
        )
        split = test_split_agreement(model, stage, data, mean=mean, std=std, fp16="onnx-fp16" in precisions)
        progress(task, 4, steps)
        settings = {"target": profile.name, "profile": _profile_dict(profile), "input": input_spec}
        tensorrt, trt_results = check_tensorrt_precisions(
            stage, settings, profile, reference, probe_set, probes, warmup=latency_warmup, runs=latency_runs
        )
        precisions.update(trt_results)
        progress(task, 5, steps)

        report = host_report(
            run,
            profile,
            stage,
            calib=calib,
            probes=probes,
            probe_set=probe_set,
            input_spec=input_spec,
            tensorrt=tensorrt,
            precisions=precisions,
            latency=(latency_warmup, latency_runs),
            test_split=split,
        )
        write_json(stage / "host_report.json", report)
        write_text_atomic(stage / "README.md", bundle_readme(report, profile))
    progress(task, steps, steps)
    return report


def _input_spec(chw: tuple[int, int, int], mean, std) -> dict:
    """Gives back the bundle's input contract: pixels in [0, 1], normalisation inside the graph."""
    return {
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


def _profile_dict(profile: Profile) -> dict:
    return {k: v for k, v in profile.to_dict().items() if k != "path"}


def _write_inputs_and_runtime(stage: Path, profile: Profile, calib, probe_set, probes) -> None:
    """Writes calib.npz, probes.npz, the profile and the device runtime into the staged bundle."""
    _save_npz(stage / "calib.npz", images=calib)
    write_probes_npz(stage / "probes.npz", probe_set, probes)
    # The profile's own file keeps its comments (the sources of its facts).
    write_text_atomic(stage / "profile.toml", profile.path.read_text() if profile.path else profile.to_toml())
    shutil.copytree(
        export_dir(), stage / "device", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "ruff.toml")
    )


def host_report(
    run: RunFolder,
    profile: Profile,
    stage: Path,
    *,
    calib,
    probes,
    probe_set,
    input_spec: dict,
    tensorrt,
    precisions: dict,
    latency: tuple[int, int],
    test_split: dict | None = None,
) -> dict:
    """Gives back host_report.json (DESIGN §5): what was exported and how, and every precision's re-check.
    `latency` is (warm-up runs, timed runs)."""
    config = run.config
    seed = int(config.get("seed", 0))
    latency_warmup, latency_runs = latency
    return {
        "rkdtool_version": __version__,
        "target": profile.name,
        "run": str(run.path),
        "asr_definition": ASR_DEFINITION,
        "input": input_spec,
        "profile": _profile_dict(profile),
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
        "test_split_agreement": test_split,
        "files": sorted(p.name for p in stage.iterdir()) + ["host_report.json", "README.md"],
    }


def _split_sentence(report: dict) -> str:
    split = report.get("test_split_agreement")
    if not split:
        return ""
    return f"; top-1 agreement on all {split['images']} clean test images: {split_agreement_parts(split, 2)}"


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
- `calib.npz`: those calibration images (`images`), for TensorRT's implicit calibrator (DLA INT8 only).
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
version, power mode, clocks, temperatures) and compares it with the host numbers below. Options:
`--precision fp16|int8|fp32`, `--dla N` (DLA cores: {profile.dla_cores}) with `--dla-batch`, `--runs`,
`--repeats`, `--batch`, `--sweep`, `--no-cuda-graph`, `--rebuild`, `--compare` (Polygraphy, where installed),
`--backend onnxruntime` (the host twin). An engine is reused only while its sidecar (`<engine>.json`: GPU,
JetPack, TensorRT build, ONNX sha256, flags) matches.
`python3 device/trt_build.py . --print-trtexec` prints the equivalent trtexec build and timing commands.
Rebuild the engine after every JetPack/TensorRT upgrade: engines are tied to the GPU and TensorRT version.

## Host re-check
Measured on {machine["cpu"]} ({machine["cpu_cores"]} cores): batch-1 latency after
{report["latency"]["warmup"]} warm-up runs over {report["latency"]["runs"]} timed runs; parity against
torch-fp32 on the clean and triggered probe images{_split_sentence(report)}. ASR: {report["asr_definition"]}.

| precision | ACC | ASR | p50 ms | max abs logit diff | top-1 agreement |
|---|---|---|---|---|---|
{chr(10).join(rows)}

Notes on the target: {profile.notes}
"""
