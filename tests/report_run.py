"""The tiny model the bench tests time (`TinyNet`, `export_tiny_onnx`), and a tiny run folder for the report
tests: report.json, metrics.jsonl and one bundle under export/ holding a
real tiny ONNX model benchmarked by `rkdtool bench` (benchmark.json), a host report and a device report in
the layouts `rkdtool export` and `device/check.py` write. The host and device numbers are written out here
(no student is trained), so the tests can check the report quotes them exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rkdtool.deploy.bench import bench_path
from rkdtool.deploy.bench_report import write_benchmark
from rkdtool.machine import machine_info

TARGET = "jetson-orin-nano"
PROBE = "lba-blend"


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


def export_tiny_onnx(path: Path) -> Path:
    """Writes TinyNet (3x8x8 input, dynamic batch) as ONNX; gives back the path."""
    torch.manual_seed(0)
    torch.onnx.export(
        TinyNet().eval(),
        (torch.rand(2, 3, 8, 8),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    return path


def _summary(p50: float) -> dict:
    return {"p50": p50, "p90": 1.5 * p50, "p99": 2 * p50, "mean": 1.2 * p50}


def host_report() -> dict:
    """Gives back a host_report.json with the fields the report reads."""
    precisions = {
        "torch-fp32": ("torch-cpu", 0.97, 0.02, 0.50),
        "onnx-fp32": ("onnxruntime-cpu", 0.97, 0.02, 0.25),
        "onnx-int8": ("onnxruntime-cpu", 0.965, 0.03, 0.125),
    }
    return {
        "target": TARGET,
        "probes": [{"name": PROBE}],
        "probe_images": 40,
        "latency": {"batch": 1, "warmup": 2, "runs": 10, "machine": machine_info()},
        "precisions": {
            name: {
                "backend": backend,
                "acc": acc,
                "asr": {PROBE: asr},
                "latency_ms": _summary(p50),
                "max_abs_logit_diff": 1e-5,
                "top1_agreement": 1.0,
            }
            for name, (backend, acc, asr, p50) in precisions.items()
        },
    }


def device_report() -> dict:
    """Gives back a device_report.json as device/check.py writes it (TensorRT int8 on an Orin Nano)."""
    return {
        "target": TARGET,
        "backend": "tensorrt",
        "precision": "int8",
        "created": "2026-11-30T10:00:00",
        "platform": {
            "model": "NVIDIA Jetson Orin Nano Developer Kit",
            "power_mode": "NV Power Mode: MAXN_SUPER",
        },
        "tensorrt_version": "10.3.0",
        "engine": "model.int8.trt10.3.0.engine",
        "acc": 0.96,
        "asr": {PROBE: 0.04},
        "latency": {
            "batch_1": {"host_ms": _summary(0.8), "gpu_ms": _summary(0.5), "gpu_timer": "cuda-graph"},
            "batch_8": {"host_ms": _summary(1.6), "gpu_ms": _summary(1.0), "gpu_timer": "cuda-graph"},
            "batch_256": {"skipped": "above the engine's maximum batch"},
        },
        "latency_ms": {"p50": 0.5, "p90": 0.75, "p99": 1.0},
        "latency_budget_ms": 2.0,
        "vs_host": {"precision": "onnx-int8", "acc_delta": -0.005, "asr_delta": {PROBE: 0.01}},
    }


def write_report_run(folder: Path) -> Path:
    """Writes the run folder and its bundle; gives back the run folder."""
    folder.mkdir(parents=True, exist_ok=True)
    student = {"arch": "wrn16-1", "params": 175_000, "acc": 0.97, "asr": {PROBE: 0.02}}
    report = {
        "teacher": {
            "ref": "demo:lba",
            "arch": "wrn16-1",
            "params": 175_000,
            "acc": 0.98,
            "asr": {PROBE: 0.99},
        },
        "students": {"fkd": {**student, "asr": {PROBE: 0.9}}, "robustkd-ta": student},
        "probes": [{"name": PROBE}],
        "data": "digits",
        "method": "robustkd-ta",
        "asr_definition": "share of non-target test images sent to the target",
    }
    (folder / "report.json").write_text(json.dumps(report))
    (folder / "config.json").write_text(json.dumps({"device": "cpu", "machine": "test machine"}))
    epochs = [{"task": "robustkd-ta", "epoch": e, "acc": 0.5 + 0.2 * e, "asr": {PROBE: 0.1}} for e in (1, 2)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in epochs))
    bundle = folder / "export" / TARGET
    bundle.mkdir(parents=True)
    export_tiny_onnx(bundle / "model.onnx")
    images = np.random.default_rng(0).random((12, 3, 8, 8), dtype=np.float32)
    np.savez(
        bundle / "probes.npz",
        images=images,
        labels=np.arange(12) % 10,
        probe_names=np.array([PROBE]),
        targets=np.array([0]),
        triggered_0=images[::-1].copy(),
    )
    (bundle / "host_report.json").write_text(json.dumps(host_report()))
    (bundle / "device_report.json").write_text(json.dumps(device_report()))
    bench = bench_path(bundle, batch_sizes=(1, 2), warmup=1, runs=5).to_dict()
    write_benchmark(bench, bundle / "benchmark.json", bundle / "benchmark.md")
    return folder
