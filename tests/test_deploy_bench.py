"""The latency harness: warm-up and run counts, percentiles, per-backend results that serialise to JSON;
the benchmark report (size, ACC and ASR beside latency, benchmark.json and benchmark.md, --compare) and its
tables in 80 columns.

No latency target is asserted anywhere (timings depend on the machine); only the harness's arithmetic and
bookkeeping are.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from report_run import TinyNet, export_tiny_onnx
from rich.console import Console
from typer.testing import CliRunner

from rkdtool.cli import main
from rkdtool.cli.app import app
from rkdtool.cli.tables import bench_tables
from rkdtool.deploy.bench import bench_onnxruntime, bench_path, bench_torch, write_bench_report
from rkdtool.deploy.bench_report import benchmark_paths, compare_reports
from rkdtool.deploy.int8 import quantize_int8
from rkdtool.deploy.onnx import onnx_logits, onnx_session
from rkdtool.deploy.timing import latency_stats, sample_inputs, time_host
from rkdtool.errors import NotFoundError, UsageError
from rkdtool.machine import machine_info
from rkdtool.probes.metrics import asr_from_predictions


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    return export_tiny_onnx(tmp_path_factory.mktemp("bench") / "tiny.onnx")


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


def test_bench_cli_out_may_name_an_existing_folder(tiny_onnx, tmp_path):
    folder = tmp_path / "reports"
    folder.mkdir()
    args = ["bench", str(tiny_onnx), "--batch", "1", "--runs", "2", "--warmup", "0", "--json"]
    result = CliRunner().invoke(app, [*args, "--out", str(folder)])
    assert result.exit_code == 0, result.output
    assert json.loads((folder / "benchmark.json").read_text()) == json.loads(result.stdout)
    assert (folder / "benchmark.md").read_text().startswith(f"# rkdtool bench: {tiny_onnx}\n")


# ------------------------------------------------------------------ the benchmark report (rkdtool bench)


@pytest.fixture(scope="module")
def tiny_bundle(tiny_onnx, tmp_path_factory) -> Path:
    """A bundle folder as `rkdtool export` lays it out, around the tiny model: model.onnx, model.int8.onnx
    (Q/DQ), calib.npz and probes.npz. Half the probe labels are the FP32 model's own predictions and half
    are not, so its ACC is exactly 50%."""
    bundle = tmp_path_factory.mktemp("bundle") / "jetson-orin-nano"
    bundle.mkdir()
    shutil.copy(tiny_onnx, bundle / "model.onnx")
    rng = np.random.default_rng(0)
    calib = rng.random((32, 3, 8, 8), dtype=np.float32)
    quantize_int8(bundle / "model.onnx", bundle / "model.int8.onnx", calib, method="percentile")
    np.savez(bundle / "calib.npz", images=calib)
    images = rng.random((40, 3, 8, 8), dtype=np.float32)
    predictions = onnx_logits(onnx_session(bundle / "model.onnx"), images).argmax(1)
    labels = np.where(np.arange(40) < 20, predictions, (predictions + 1) % 10)
    np.savez(
        bundle / "probes.npz",
        images=images,
        labels=labels,
        probe_names=np.array(["patch", "blend-noise"]),
        targets=np.array([3, -1]),  # -1: untargeted
        triggered_0=np.zeros_like(images),
        triggered_1=images[::-1].copy(),
    )
    return bundle


def test_bench_of_a_bundle_gives_size_acc_and_asr_from_the_timed_session(tiny_bundle):
    report = bench_path(tiny_bundle, batch_sizes=(1, 2), warmup=0, runs=2)
    assert [(r.model, r.batch) for r in report.results] == [
        ("model.onnx", 1),
        ("model.onnx", 2),
        ("model.int8.onnx", 1),
        ("model.int8.onnx", 2),
    ]
    probes = np.load(tiny_bundle / "probes.npz")
    labels = torch.from_numpy(probes["labels"])
    for r in report.results:
        assert r.size_bytes == (tiny_bundle / r.model).stat().st_size
        session = onnx_session(tiny_bundle / r.model)  # optimised, as the timed session
        predict = lambda images, session=session: torch.from_numpy(onnx_logits(session, images).argmax(1))  # noqa: E731
        assert r.acc == float((predict(probes["images"]) == labels).float().mean())
        assert r.asr == {
            "patch": asr_from_predictions(predict(probes["triggered_0"]), labels, 3).asr,
            "blend-noise": asr_from_predictions(predict(probes["triggered_1"]), labels, None).asr,
        }
    assert report.results[0].acc == 0.5  # by construction of the labels
    assert report.probe_images == 40 and report.to_dict()["asr_definition"]
    assert (
        bench_path(tiny_bundle / "model.onnx", warmup=0, runs=1).results[0].acc == 0.5
    )  # probes.npz beside it


def test_benchmark_paths_take_a_folder_or_a_json_file(tiny_bundle, tiny_onnx, tmp_path):
    assert benchmark_paths(None, tiny_bundle) == (
        tiny_bundle / "benchmark.json",
        tiny_bundle / "benchmark.md",
    )
    assert benchmark_paths(None, tiny_onnx) is None  # a model file alone: nothing written unless asked
    assert benchmark_paths(tmp_path, tiny_onnx) == (tmp_path / "benchmark.json", tmp_path / "benchmark.md")
    new = tmp_path / "today"
    assert benchmark_paths(new, tiny_onnx) == (new / "benchmark.json", new / "benchmark.md")
    assert benchmark_paths(tmp_path / "b.json", tiny_onnx) == (tmp_path / "b.json", tmp_path / "b.md")
    with pytest.raises(UsageError, match="give a folder or a .json file"):
        benchmark_paths(tmp_path / "b.txt", tiny_onnx)


def run_cli(*args: str) -> CliRunner:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


def test_bench_cli_writes_json_and_markdown_into_the_bundle(tiny_bundle):
    result = run_cli("bench", str(tiny_bundle), "--batch", "1", "--runs", "3", "--warmup", "0", "--json")
    written = json.loads((tiny_bundle / "benchmark.json").read_text())
    assert written == json.loads(result.stdout)
    md = (tiny_bundle / "benchmark.md").read_text()
    machine = written["machine"]
    cores = f"{machine['cpu_cores']} cores, {machine['torch_threads']} torch threads"
    assert f"Machine: CPU {machine['cpu']} ({cores}; " in md
    assert all(flag in md for flag in machine["cpu_flags"]) and f"onnxruntime {machine['onnxruntime']}" in md
    header = "| model | backend | precision | size MB | ACC | ASR patch | ASR blend-noise | batch | p50 ms |"
    assert header in md and "on the bundle's 40 probe images" in md
    row = written["results"][0]
    assert f"| model.onnx | onnxruntime-cpu | fp32 | {row['size_bytes'] / 1e6:.3g} | 50.0% |" in md


def test_bench_cli_compare_shows_the_change_of_every_row(tiny_bundle, tmp_path):
    earlier = bench_path(tiny_bundle, batch_sizes=(1,), warmup=0, runs=2).to_dict()
    for row in earlier["results"]:
        row["latency_ms"]["p50"] *= 2
        row["throughput_ips"] /= 2
        row["acc"] -= 0.1
    (tmp_path / "then.json").write_text(json.dumps(earlier))
    args = ["bench", str(tiny_bundle), "--batch", "1", "--batch", "2", "--runs", "3", "--warmup", "0"]
    result = run_cli(*args, "--out", str(tmp_path / "now"), "--compare", str(tmp_path / "then.json"))
    now = json.loads((tmp_path / "now" / "benchmark.json").read_text())
    compared = now["compared_with"]
    assert compared["path"] == str(tmp_path / "then.json") and compared["machine"] == earlier["machine"]
    assert [c is None for c in compared["changes"]] == [False, True, False, True]  # batch 2 is new
    then = {(r["model"], r["batch"]): r for r in earlier["results"]}
    for row, change in zip(now["results"], compared["changes"], strict=True):
        if change is None:
            continue
        old = then[(row["model"], row["batch"])]
        assert change["p50_ms"] == row["latency_ms"]["p50"] / old["latency_ms"]["p50"] - 1
        assert change["acc"] == pytest.approx(0.1) and change["asr"] == {"patch": 0.0, "blend-noise": 0.0}
    md = (tmp_path / "now" / "benchmark.md").read_text()
    assert f"Change against `{tmp_path / 'then.json'}`" in md and "| p50 change | img/s change |" in md
    assert md.count(" | new" * 5 + " |\n") == 2 and "+10.0 pt" in md  # p50, img/s, ACC, 2 ASR
    assert "+10.0 pt" in result.stdout and "new" in result.stdout
    # a folder holding a benchmark.json will do, and so will an older bench.json
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "bench.json").write_text(json.dumps(earlier))
    run_cli(*args, "--out", str(tmp_path / "again.json"), "--compare", str(tmp_path / "old"))
    assert json.loads((tmp_path / "again.json").read_text())["compared_with"]["path"].endswith("bench.json")
    assert (tmp_path / "again.md").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--compare", "nothing.json"], "nothing.json does not exist"),
        (["--compare", "broken.json"], "broken.json is not JSON"),
        (["--compare", "other.json"], "has no 'results' list"),
        (["--compare", "rows.json"], "result 0 lacks latency_ms, throughput_ips"),
        (["--compare", "."], "holds no benchmark.json"),
        (["--out", "notes.txt"], "give a folder or a .json file"),
        (["--runs", "0"], "--runs must be >= 1"),
    ],
)
def test_bench_bad_input_is_one_line_before_any_timing(
    extra, message, tiny_bundle, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / "other.json").write_text('{"rows": []}')
    (tmp_path / "rows.json").write_text(
        '{"results": [{"model": "m", "backend": "b", "precision": "p", "batch": 1}]}'
    )
    (tiny_bundle / "benchmark.json").unlink(missing_ok=True)  # other tests bench this bundle too
    before = sorted(p.name for p in tiny_bundle.iterdir())
    monkeypatch.setattr(sys, "argv", ["rkdtool", "bench", str(tiny_bundle), *extra])
    with pytest.raises(SystemExit) as exited:
        main()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exited.value.code == 2 and len(lines) == 1 and message in lines[0], lines
    assert sorted(p.name for p in tiny_bundle.iterdir()) == before  # nothing written


def render80(table) -> str:
    console = Console(width=80, file=io.StringIO(), color_system=None)
    console.print(table)
    return console.file.getvalue()


def test_bench_tables_show_every_name_in_80_columns(tiny_bundle, tmp_path):
    report = bench_path(tiny_bundle, batch_sizes=(1, 64), warmup=0, runs=2).to_dict()
    report["compared_with"] = compare_reports(report, report, tmp_path / "same.json")
    models, latency = (render80(t) for t in bench_tables(report))
    for text in (models, latency):
        assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text
        assert "│ model.onnx " in text and "│ model.int8.onnx " in text
    assert "│ onnxruntime-cpu " in models
    for row in report["results"]:
        for probe, asr in row["asr"].items():
            assert f"{probe} {100 * asr:.1f}%" in models
    assert latency.count("+0.0%") == 3 * len(report["results"])  # p50, p99 and img/s against itself


@pytest.mark.parametrize("gpu_timer, why_not", [("cuda-graph", None), ("enqueue+GPU", "capture failed: x")])
def test_bench_tensorrt_says_how_each_row_was_timed(gpu_timer, why_not, tmp_path, monkeypatch):
    from types import SimpleNamespace

    import rkdtool.deploy.bench as bench

    calls = []

    class Runner:
        api = "execute_async_v3"

        def __init__(self, path):
            calls.append(path)

        def time(self, images, warmup, runs):
            calls.append((images.shape, warmup, runs))
            return {"gpu_ms": [1.0, 2.0, 3.0], "gpu_timer": gpu_timer, "cuda_graph": why_not, "profile": 0}

    monkeypatch.setattr(bench, "load_device_module", lambda name: SimpleNamespace(EngineRunner=Runner))
    engine = tmp_path / "model.int8.engine"
    engine.write_bytes(b"plan")
    (row,) = bench.bench_tensorrt(engine, (3, 32, 32), warmup=4, runs=3, precision="int8")
    assert calls == [str(engine), ((1, 3, 32, 32), 4, 3)]
    assert row.backend == "tensorrt" and row.timer == "cuda-events" and row.latency_ms.p50 == 2.0
    assert row.cuda_graph is (gpu_timer == "cuda-graph")
    assert ("CUDA graph replay" in row.notes) is row.cuda_graph
    assert row.cuda_graph or "capture failed: x" in row.notes
    assert row.size_bytes == 4
