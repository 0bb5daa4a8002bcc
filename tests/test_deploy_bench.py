"""The latency harness: warm-up and run counts, percentiles, per-backend results that serialise to JSON.

No latency target is asserted anywhere (timings depend on the machine); only the harness's arithmetic and
bookkeeping are.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from rkdtool.cli.app import app
from rkdtool.deploy.bench import bench_onnxruntime, bench_path, bench_torch, write_bench_report
from rkdtool.deploy.timing import latency_stats, sample_inputs, time_host
from rkdtool.errors import NotFoundError, UsageError
from rkdtool.machine import machine_info


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "tiny.onnx"
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


def test_latency_stats_are_numpy_percentiles():
    stats = latency_stats(list(range(1, 101)))
    assert (stats.p50, stats.p90, stats.p99) == pytest.approx((50.5, 90.1, 99.01))
    assert (stats.mean, stats.min, stats.max) == (50.5, 1, 100)
    with pytest.raises(ValueError):
        latency_stats([])


def test_time_host_warms_up_then_times_each_run():
    calls = []
    samples = time_host(lambda: (calls.append(1), time.sleep(0.002)), warmup=3, runs=5)
    assert len(calls) == 8 and len(samples) == 5
    assert all(s >= 1.5 for s in samples)  # each timed run slept 2 ms
    with pytest.raises(UsageError):
        time_host(lambda: None, warmup=0, runs=0)


def test_sample_inputs_use_real_images_when_given():
    pool = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    batch = sample_inputs((3, 2, 2), 5, pool)
    assert (
        batch.shape == (5, 3, 2, 2)
        and np.array_equal(batch[2], pool[0])
        and np.array_equal(batch[3], pool[1])
    )
    noise = sample_inputs((3, 2, 2), 4)
    assert noise.dtype == np.float32 and 0 <= noise.min() and noise.max() <= 1
    assert np.array_equal(noise, sample_inputs((3, 2, 2), 4))  # seeded


def test_bench_torch_on_cpu_reports_each_batch_size():
    results = bench_torch(TinyNet(), (3, 8, 8), batch_sizes=(1, 4), warmup=2, runs=7, label="tiny")
    assert [r.batch for r in results] == [1, 4]
    for r in results:
        assert (r.backend, r.timer, r.runs, r.warmup, r.model) == ("torch-cpu", "perf_counter", 7, 2, "tiny")
        assert r.latency_ms.min <= r.latency_ms.p50 <= r.latency_ms.p99 <= r.latency_ms.max
        assert r.throughput_ips == pytest.approx(r.batch * 1e3 / r.latency_ms.p50)
        assert r.threads == torch.get_num_threads() and r.device
    json.dumps([r.to_dict() for r in results])


def test_bench_onnxruntime_names_backend_and_precision(tiny_onnx):
    results = bench_onnxruntime(tiny_onnx, batch_sizes=(1, 3), warmup=1, runs=4, precision="fp32")
    assert [(r.backend, r.precision, r.batch, r.runs, r.model) for r in results] == [
        ("onnxruntime-cpu", "fp32", 1, 4, "tiny.onnx"),
        ("onnxruntime-cpu", "fp32", 3, 4, "tiny.onnx"),
    ]


def test_bench_path_dispatches_on_what_it_is_given(tiny_onnx, tmp_path):
    report = bench_path(tiny_onnx, batch_sizes=(2,), warmup=1, runs=3)
    assert [r.backend for r in report.results] == ["onnxruntime-cpu"]
    assert {"cpu", "cpu_cores", "torch", "onnxruntime", "tensorrt", "cuda_available"} <= set(report.machine)
    out = tmp_path / "bench.json"
    write_bench_report(report, out)
    written = json.loads(out.read_text())
    assert written["results"][0]["latency_ms"]["p50"] == report.results[0].latency_ms.p50
    with pytest.raises(NotFoundError):
        bench_path(tmp_path / "absent.onnx")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UsageError, match="cannot benchmark"):
        bench_path(tmp_path / "notes.txt")
    with pytest.raises(UsageError, match="batch sizes"):
        bench_path(tiny_onnx, batch_sizes=(0,))


def test_bench_cli_prints_json(tiny_onnx, tmp_path):
    out = tmp_path / "b.json"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            str(tiny_onnx),
            "--batch",
            "1",
            "--batch",
            "2",
            "--runs",
            "3",
            "--warmup",
            "1",
            "--json",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert [r["batch"] for r in printed["results"]] == [1, 2] and json.loads(out.read_text()) == printed


def test_bench_cli_help_has_an_example():
    result = CliRunner().invoke(app, ["bench", "--help"])
    assert result.exit_code == 0 and "rkdtool bench" in result.output and "--batch" in result.output


def test_machine_info_names_the_stack():
    info = machine_info()
    assert info["torch"] == torch.__version__ and info["cpu_cores"] >= 1
    assert "CPUExecutionProvider" in info["onnxruntime_providers"]


@pytest.mark.gpu
def test_bench_torch_on_cuda_uses_events_and_graphs():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    results = bench_torch(TinyNet(), (3, 8, 8), batch_sizes=(1, 8), device="cuda", warmup=3, runs=20)
    for r in results:
        assert r.backend == "torch-cuda" and r.timer == "cuda-events" and r.cuda_graph, r.notes
        assert 0 < r.latency_ms.p50 <= r.latency_ms.p99
