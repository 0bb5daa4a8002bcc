"""Host latency of a student per backend and batch size: torch (CPU, or CUDA with events and CUDA graphs),
ONNX Runtime FP32 and INT8 Q/DQ on the CPU, through rkdtool.deploy.bench (warm-up, then timed runs,
p50/p90/p99).

    python benchmarks/latency.py                                  # WRN-16-2, 10 classes, CPU backends
    python benchmarks/latency.py --device cuda --gpu-batch 1 8 64 256  # adds torch on the GPU
    python benchmarks/latency.py --arch wrn10-1 --runs 100 --out benchmarks/results/latency.json

The weights are freshly initialised (latency does not depend on their values; ONNX Runtime's INT8 is
calibrated on uniform noise, which is fine for timing and says nothing about accuracy). Every row names the
machine and backend; these are host numbers, not Jetson numbers (edge.md §8).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from rkdtool.deploy.bench import BenchReport, bench_onnxruntime, bench_torch, write_bench_report
from rkdtool.deploy.int8 import quantize_int8
from rkdtool.deploy.onnx import export_onnx
from rkdtool.machine import machine_info
from rkdtool.models import build_model
from rkdtool.models.pixel import PixelSpaceModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="wrn16-2")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda to add torch on the GPU")
    parser.add_argument("--gpu-batch", type=int, nargs="+", help="batch sizes on the GPU [default: --batch]")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/latency.json"))
    args = parser.parse_args()

    torch.manual_seed(0)
    model = PixelSpaceModel(build_model(args.arch, args.classes), (0.5,) * 3, (0.25,) * 3).eval()
    shape = (3, 32, 32)
    pool = np.random.default_rng(0).random((max(args.batch), *shape), dtype=np.float32)
    report = BenchReport(machine_info())
    common = {"batch_sizes": args.batch, "warmup": args.warmup, "runs": args.runs, "pool": pool}
    report.results += bench_torch(model, shape, device="cpu", label=args.arch, **common)
    if args.device.startswith("cuda"):
        report.results += bench_torch(model, shape, device=args.device, label=args.arch, **common)
        report.results += bench_torch(
            model, shape, device=args.device, label=args.arch, cuda_graph=False, **common
        )
    with tempfile.TemporaryDirectory() as work:
        fp32, int8 = Path(work) / "model.onnx", Path(work) / "model.int8.onnx"
        export_onnx(model.cpu(), fp32, input_shape=shape, opset=17, exporter="torchscript")
        quantize_int8(fp32, int8, pool[:64], method="entropy")
        report.results += bench_onnxruntime(fp32, precision="fp32", **common)
        report.results += bench_onnxruntime(int8, precision="int8", **common)
    write_bench_report(report, args.out)
    machine = report.machine
    print(f"machine: {machine['cpu']} ({machine['cpu_cores']} cores), GPU {machine['cuda_device']}")
    header = ("backend", "prec", "graph", "batch", "p50 ms", "p90 ms", "p99 ms", "img/s")
    print("".join(f"{h:<16}" if i == 0 else f"{h:>10}" for i, h in enumerate(header)))
    for r in report.results:
        lat = r.latency_ms
        cells = (
            r.precision,
            str(r.cuda_graph),
            r.batch,
            f"{lat.p50:.3f}",
            f"{lat.p90:.3f}",
            f"{lat.p99:.3f}",
            f"{r.throughput_ips:,.0f}",
        )
        print(f"{r.backend:<16}" + "".join(f"{c:>10}" for c in cells))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
