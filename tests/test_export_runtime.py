"""The device runtime (export/): import hygiene, build decisions per TensorRT version, the trtexec lines, and
check.py's numbers.

TensorRT and pycuda cannot run here. The tests named `*_api_dispatch_*` drive trt_build/trt_run/check with the
recording stand-in of tests/fake_tensorrt.py: they show which API each TensorRT version gets, not that a real
engine builds. Real engines: the `tensorrt` marked test. DLA, failures, sidecars and CUDA graphs:
test_export_trt_fake.py; board state: test_export_board.py; the ONNX Runtime twin: test_export_host_twin.py.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_tensorrt import FakeGpu, compute_logits, engine_bytes, fake_pycuda, fake_tensorrt, install
from fake_tensorrt import write_tiny_bundle as write_bundle

from rkdtool.probes.metrics import asr_from_predictions
from rkdtool.resources import export_dir, load_device_module, load_profile

EXPORT = export_dir()
trt_build = load_device_module("trt_build")
trt_run = load_device_module("trt_run")
check = load_device_module("check")
DEVICE_FILES = sorted(p.name for p in EXPORT.glob("*.py"))


def settings_for(target: str = "jetson-xavier-nx", chw=(3, 4, 4)) -> dict:
    profile = {k: v for k, v in load_profile(target).to_dict().items() if k != "path"}
    return {"target": target, "profile": profile, "input": {"name": "input", "shape": ["batch", *chw]}}


@pytest.fixture(autouse=True)
def no_real_cuda_driver(request, monkeypatch):
    """The fake-TensorRT tests never hand a fake stream to this machine's libcuda for graph capture."""
    if request.node.get_closest_marker("tensorrt") is None:

        def refuse():
            raise trt_run.cuda_graph.CaptureError("no CUDA driver in these tests")

        monkeypatch.setattr(trt_run.cuda_graph, "load_driver", refuse)


@pytest.fixture
def tiny_bundle(tmp_path):
    return write_bundle(tmp_path, settings_for("jetson-xavier-nx"))


# ------------------------------------------------------------------------------------------- import hygiene


@pytest.mark.parametrize("name", DEVICE_FILES)
def test_device_files_are_python36_syntax(name):
    # JetPack 4.6 (Nano, TX2) ships Python 3.6: no walrus, no positional-only, no postponed annotations, and
    # none of the 3.7+ library calls that parse fine on 3.6 but fail when they run.
    source = (EXPORT / name).read_text()
    ast.parse(source, feature_version=(3, 6))
    assert "from __future__ import annotations" not in source
    assert "import dataclasses" not in source and "from dataclasses" not in source
    for later in (
        "capture_output=",
        "text=True",
        ".removeprefix(",
        ".removesuffix(",
        "math.prod",
        "asyncio.run(",
    ):
        assert later not in source, f"{name} uses {later} (Python 3.7+)"
    assert not re.search(r"f\"[^\"]*\{[^}]*=\}", source), "f-string '=' specifiers are Python 3.8+"


def test_device_files_import_where_tensorrt_and_pycuda_are_absent():
    modules = ", ".join(Path(name).stem for name in DEVICE_FILES)
    code = (
        "import sys\n"
        "for m in ('tensorrt', 'pycuda', 'pycuda.driver', 'pycuda.autoinit', 'pycuda.autoprimaryctx'):\n"
        "    sys.modules[m] = None\n"
        f"import {modules}\n"
        "try:\n    trt_build.import_tensorrt()\nexcept trt_build.DeviceError as e:\n    print(e)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=EXPORT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "python3-libnvinfer" in done.stdout and "pip install tensorrt" in done.stdout


def test_missing_pycuda_is_a_clear_device_error(monkeypatch):
    for name in ("pycuda", "pycuda.driver", "pycuda.autoinit", "pycuda.autoprimaryctx"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(trt_build.DeviceError, match="pip3 install pycuda"):
        trt_build.import_pycuda()


def fake_pycuda_package(root: Path, autoprimaryctx: str | None, autoinit: str) -> Path:
    """Writes a pycuda package whose context modules run the given code (None: module absent)."""
    package = root / "pycuda"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "driver.py").write_text("class Error(Exception):\n    pass\nCONTEXTS = []\n")
    if autoprimaryctx is not None:
        (package / "autoprimaryctx.py").write_text(autoprimaryctx)
    (package / "autoinit.py").write_text(autoinit)
    return root


def _use_package(monkeypatch, root: Path) -> None:
    for name in ("pycuda", "pycuda.driver", "pycuda.autoinit", "pycuda.autoprimaryctx"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(root))


def test_pycuda_prefers_the_primary_context_and_falls_back_to_autoinit(tmp_path, monkeypatch):
    record = "import pycuda.driver as d\nd.CONTEXTS.append('{}')\n"
    _use_package(
        monkeypatch, fake_pycuda_package(tmp_path / "a", record.format("primary"), record.format("own"))
    )
    assert trt_build.import_pycuda().CONTEXTS == ["primary"]  # autoprimaryctx (pycuda >= 2021.1)
    _use_package(monkeypatch, fake_pycuda_package(tmp_path / "b", None, record.format("own")))
    assert trt_build.import_pycuda().CONTEXTS == ["own"]  # older pycuda: autoinit


def test_no_cuda_device_is_one_line_not_a_traceback(tmp_path, monkeypatch):
    failing = (
        "import pycuda.driver as d\nraise d.Error('cuInit failed: no CUDA-capable device is detected')\n"
    )
    _use_package(monkeypatch, fake_pycuda_package(tmp_path, failing, failing))
    with pytest.raises(trt_build.DeviceError, match="no usable CUDA device: cuInit failed: no CUDA-capable"):
        trt_build.import_pycuda()


# ------------------------------------------------------------------------------------------- build decisions


@pytest.mark.parametrize(
    ("version", "dla", "mode"),
    [
        ("8.2.1.8", None, "qdq"),  # per-axis Q/DQ parses since 8.0 (review defect 11)
        ("8.2.1.8", 0, "implicit"),
        ("8.5.2.2", None, "qdq"),
        ("8.6.2", 1, "implicit"),
        ("10.3.0.30", None, "qdq"),
        ("10.3.0.30", 0, "implicit"),  # DLA runs implicit quantisation only (review defect 2)
        ("11.4.1", None, "qdq"),
        ("11.4.1", 0, "qdq"),  # 11 has no calibrator: DLA networks are strongly typed
    ],
)
def test_int8_mode_gpu_qdq_dla_implicit(version, dla, mode):
    assert trt_build.int8_mode(version, dla) == mode


def test_plan_for_tensorrt_85_int8_uses_the_qdq_model_with_a_batch_1_profile():
    plan = trt_build.plan_build(settings_for("jetson-xavier-nx"), "8.5.2.2")
    assert plan["precision"] == "int8" and plan["int8_mode"] == "qdq" and plan["onnx"] == "model.int8.onnx"
    assert plan["flags"] == ["INT8", "FP16"] and plan["clear_flags"] == [] and plan["explicit_batch_flag"]
    assert plan["workspace_api"] == "set_memory_pool_limit" and plan["workspace_bytes"] == 1024 << 20
    assert plan["profiles"] == [
        {"min": [1, 3, 4, 4], "opt": [32, 3, 4, 4], "max": [256, 3, 4, 4]},
        {"min": [1, 3, 4, 4], "opt": [1, 3, 4, 4], "max": [1, 3, 4, 4]},  # batch-1 latency kernels (defect 7)
    ]
    assert plan["shapes"] == plan["profiles"][0] and plan["latency_profile"] == 1
    assert plan["engine"] == "model.int8.trt8.5.2.engine" and plan["calibration_cache"] is None


def test_plan_for_tensorrt_82_int8_takes_qdq_and_fp32_clears_tf32():
    plan = trt_build.plan_build(settings_for("jetson-nano"), "8.2.1.8", precision="int8")
    assert plan["int8_mode"] == "qdq" and plan["onnx"] == "model.int8.onnx"
    assert plan["workspace_api"] == "max_workspace_size"  # set_memory_pool_limit arrived in 8.4
    assert trt_build.plan_build(settings_for("jetson-nano"), "8.2.1.8")["precision"] == "fp16"
    fp32 = trt_build.plan_build(settings_for("jetson-orin-nano"), "10.3.0", precision="fp32")
    assert fp32["flags"] == [] and fp32["clear_flags"] == ["TF32"]  # review defect 10
    fp16 = trt_build.plan_build(settings_for("jetson-orin-nano"), "10.3.0", precision="fp16")
    assert fp16["flags"] == ["FP16"] and fp16["clear_flags"] == []


def test_plan_for_tensorrt_10_and_11():
    ten = trt_build.plan_build(settings_for("jetson-orin-nano"), "10.3.0.30")
    assert not ten["explicit_batch_flag"] and ten["flags"] == ["INT8", "FP16"] and not ten["strongly_typed"]
    eleven = trt_build.plan_build(settings_for("jetson-agx-orin"), "11.4.1")
    assert eleven["strongly_typed"] and eleven["flags"] == [] and eleven["onnx"] == "model.int8.onnx"
    with pytest.raises(trt_build.DeviceError, match="strongly typed.*AutoCast"):
        trt_build.plan_build(settings_for("jetson-agx-orin"), "11.4.1", precision="fp16")


def test_dla_plan_is_static_and_calibrates_implicitly_on_every_version_with_a_calibrator():
    for version in ("8.5.2", "10.3.0"):
        plan = trt_build.plan_build(settings_for("jetson-agx-orin"), version, dla_core=1)
        static = [1, 3, 4, 4]
        assert plan["profiles"] == [{"min": static, "opt": static, "max": static}]  # review defect 1
        assert plan["int8_mode"] == "implicit" and plan["onnx"] == "model.onnx"
        assert plan["flags"] == ["INT8", "FP16", "GPU_FALLBACK"] and plan["latency_profile"] == 0
    wide = trt_build.plan_build(settings_for("jetson-agx-orin"), "10.3.0", "fp16", dla_core=0, dla_batch=8)
    assert wide["shapes"]["min"] == wide["shapes"]["max"] == [8, 3, 4, 4] and wide["latency_profile"] is None
    assert wide["engine"] == "model.fp16.dla0.trt10.3.0.engine"


def test_plan_checks_requests_but_leaves_the_dla_core_count_to_the_board():
    # The profile says 0 DLA cores for Orin Nano; the board's builder decides (test_export_trt_fake.py).
    assert trt_build.plan_build(settings_for("jetson-orin-nano"), "10.3.0", dla_core=0)["dla_core"] == 0
    with pytest.raises(trt_build.DeviceError, match="DLA runs FP16 or INT8 only"):
        trt_build.plan_build(settings_for("jetson-agx-orin"), "10.3.0", precision="fp32", dla_core=0)
    with pytest.raises(trt_build.DeviceError, match="precision must be one of"):
        trt_build.plan_build(settings_for(), "10.3.0", precision="int4")
    with pytest.raises(trt_build.DeviceError, match="--dla takes a DLA core number"):
        trt_build.plan_build(settings_for(), "10.3.0", dla_core=-1)


def test_tensorrt_outside_the_profile_range_fails_before_the_build_in_one_line():
    trt_build.check_tensorrt_range(settings_for("jetson-xavier-nx"), "8.5.2.2")
    with pytest.raises(trt_build.DeviceError) as caught:
        trt_build.check_tensorrt_range(settings_for("jetson-orin-nano"), "8.6.1")
    message = str(caught.value)
    assert "\n" not in message and ">=10.3,<11" in message and "opset 18" in message and "8.6.1" in message


# ------------------------------------------------------------------------------------------- trtexec lines


def _lines(target, version, precision=None, dla=None, bundle=None):
    return trt_build.trtexec_commands(
        trt_build.plan_build(settings_for(target), version, precision, dla), bundle
    )


def test_trtexec_lines_for_tensorrt_10_build_twice_and_time_the_batch_1_engine():
    build, build_one, timing = _lines("jetson-orin-nano", "10.3.0")
    assert build[:3] == ["trtexec", "--onnx=model.int8.onnx", "--saveEngine=model.int8.trt10.3.0.engine"]
    assert {"--int8", "--fp16", "--minShapes=input:1x3x4x4", "--optShapes=input:32x3x4x4"} <= set(build)
    assert {"--maxShapes=input:256x3x4x4", "--memPoolSize=workspace:1024M", "--skipInference"} <= set(build)
    assert "--profilingVerbosity=detailed" in build and "--noTF32" not in build
    assert (
        "--saveEngine=model.int8.trt10.3.0.b1.engine" in build_one and "--shapes=input:1x3x4x4" in build_one
    )
    assert timing[1] == "--loadEngine=model.int8.trt10.3.0.b1.engine"
    assert {"--shapes=input:1x3x4x4", "--useCudaGraph", "--noDataTransfers", "--warmUp=2000"} <= set(timing)
    assert (
        "--percentile=50,90,99" in timing
        and "--exportTimes=model.int8.trt10.3.0.b1.engine.times.json" in timing
    )


def test_trtexec_lines_for_tensorrt_82_take_one_percentile_and_build_only():
    build, _, timing = _lines("jetson-nano", "8.2.1", "int8")
    assert "--workspace=256" in build and "--buildOnly" in build and "--skipInference" not in build
    assert "--onnx=model.int8.onnx" in build and not any(a.startswith("--calib") for a in build)
    assert "--percentile=99" in timing and "--percentile=50,90,99" not in timing  # sampleOptions.cpp 8.2.1
    assert "--buildOnly" in _lines("jetson-xavier-nx", "8.5.2")[0]  # --skipInference arrived in 8.6
    assert "--percentile=50,90,99" in _lines("jetson-xavier-nx", "8.5.2")[-1]


def test_trtexec_lines_for_fp32_turn_tf32_off():
    build = _lines("jetson-orin-nano", "10.3.0", "fp32")[0]
    assert "--noTF32" in build and "--int8" not in build and "--fp16" not in build


def test_trtexec_lines_for_dla_name_the_core_when_building_and_when_loading(tmp_path):
    steps = _lines("jetson-agx-orin", "10.3.0", "int8", 0, bundle=str(tmp_path))
    first, build, timing = steps  # no calibration cache yet: trt_build.py writes it first
    assert first == ["python3", "device/trt_build.py", ".", "--precision", "int8", "--dla", "0"]
    assert {
        "--useDLACore=0",
        "--allowGPUFallback",
        "--shapes=input:1x3x4x4",
        "--calib=calib.dla.trt10.3.cache",
    } <= set(build)
    assert "--useDLACore=0" in timing and timing[1] == "--loadEngine=model.int8.dla0.trt10.3.0.engine"
    (tmp_path / "calib.dla.trt10.3.cache").write_bytes(b"cache")
    assert _lines("jetson-agx-orin", "10.3.0", "int8", 0, bundle=str(tmp_path))[0][0] == "trtexec"


def test_trtexec_lines_for_tensorrt_11_have_no_precision_flags():
    build = _lines("jetson-agx-orin", "11.4.1", None, 0)[0]  # DLA INT8 from Q/DQ, strongly typed
    assert "--useDLACore=0" in build and "--int8" not in build and "--calib" not in " ".join(build)


def test_trt_build_prints_trtexec_commands_without_tensorrt(tiny_bundle, monkeypatch, capsys):
    monkeypatch.setenv("TRT_VERSION", "8.5.2")
    assert trt_build.main([str(tiny_bundle), "--print-trtexec"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("trtexec --onnx=model.int8.onnx") and "--int8" in lines[0] and len(lines) == 3


# ------------------------------------------------------------------------------------------- fake TensorRT


@pytest.mark.parametrize(
    ("version", "network_flags"),
    [("8.2.1.8", 1 << 0), ("8.5.2.2", 1 << 0), ("10.3.0.30", 0), ("11.4.1", 1 << 1)],
)
def test_build_engine_api_dispatch_per_tensorrt_version(tiny_bundle, version, network_flags):
    gpu = FakeGpu()
    cuda, trt = fake_pycuda(gpu), fake_tensorrt(version, gpu)
    plan = trt_build.plan_build(settings_for("jetson-xavier-nx"), version)
    path = trt_build.build_engine(trt, plan, str(tiny_bundle), cuda=cuda)
    assert Path(path).read_bytes().startswith(b"fake-engine:")
    calls = trt.calls
    assert ("create_network", network_flags) in calls and ("parse_from_file", "model.int8.onnx") in calls
    assert ("set_shape", "input", (1, 3, 4, 4), (32, 3, 4, 4), (256, 3, 4, 4)) in calls
    assert ("set_shape", "input", (1, 3, 4, 4), (1, 3, 4, 4), (1, 3, 4, 4)) in calls
    assert [c[0] for c in calls].count("add_optimization_profile") == 2
    if version.startswith("8.2"):
        assert ("config", "max_workspace_size", 1024 << 20) in calls
    else:
        assert ("set_memory_pool_limit", "workspace", 1024 << 20) in calls
    assert not any(c[0] == "config" and c[1] == "int8_calibrator" for c in calls)
    assert ("config", "profiling_verbosity", "detailed") in calls
    assert [c[1] for c in calls if c[0] == "set_flag"] == (
        [] if version.startswith("11") else ["INT8", "FP16"]
    )
    assert not any(c[0] == "clear_flag" for c in calls)  # int8 keeps TF32 for the layers left in float
    sidecar = json.loads(Path(path + ".json").read_text())
    assert sidecar["tensorrt"] == version and sidecar["gpu_name"] == "Orin" and sidecar["gpu_sm"] == "8.7"
    assert sidecar["layers"]["precision"]["INT8" if not version.startswith("11") else "FP32"] == 3
    assert json.loads(Path(path + ".layers.json").read_text())["Layers"][0]["Name"] == "conv1"


def test_unparsable_onnx_is_a_device_error(tiny_bundle):
    (tiny_bundle / "model.int8.onnx").unlink()
    gpu = FakeGpu()
    plan = trt_build.plan_build(settings_for(), "10.3.0")
    with pytest.raises(trt_build.DeviceError, match="missing from the bundle"):
        trt_build.build_engine(fake_tensorrt("10.3.0", gpu), plan, str(tiny_bundle), cuda=fake_pycuda(gpu))


@pytest.mark.parametrize(
    ("version", "api"), [("8.2.1", "bindings"), ("8.6.1", "tensors"), ("10.3.0", "tensors")]
)
def test_engine_runner_api_dispatch_infers_in_chunks_in_order(tmp_path, version, api):
    gpu = FakeGpu()
    cuda, trt = fake_pycuda(gpu), fake_tensorrt(version, gpu)
    engine = tmp_path / "model.engine"
    engine.write_bytes(engine_bytes([[[1, 3, 4, 4], [2, 3, 4, 4], [4, 3, 4, 4]]]))
    runner = trt_run.EngineRunner(str(engine), trt=trt, cuda=cuda, graph_driver=None)
    assert runner.api == api and runner.max_batch == 4 and runner.profiles == [(1, 2, 4)]
    images = np.random.default_rng(1).standard_normal((10, 3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(runner.infer(images), compute_logits(images), rtol=1e-5)  # rows in order
    executed = [c for c in trt.calls if c[0].startswith("execute_async")]
    assert [c[2] for c in executed] == [4, 4, 2]  # 10 images at a max batch of 4 (review defect 6)
    assert executed[0][0] == ("execute_async_v3" if api == "tensors" else "execute_async_v2")


def test_an_engine_from_another_tensorrt_is_a_device_error(tmp_path):
    gpu = FakeGpu()
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"other bytes")
    with pytest.raises(trt_build.DeviceError, match="rebuild"):
        trt_run.EngineRunner(str(engine), trt=fake_tensorrt("10.3.0", gpu), cuda=fake_pycuda(gpu))


def test_check_with_tensorrt_api_dispatch_builds_evaluates_and_reports(tiny_bundle, monkeypatch, capsys):
    gpu = FakeGpu()
    trt = fake_tensorrt("8.5.2.2", gpu)
    install(monkeypatch, trt, fake_pycuda(gpu))
    options = {"warmup": 1, "warmup_ms": 0, "runs": 4, "sysfs_root": str(tiny_bundle / "no-sysfs")}
    report = check.run_check(str(tiny_bundle), backend="auto", batches=(1, 3), cuda_graph=False, **options)
    assert report["backend"] == "tensorrt" and report["execution_api"] == "tensors"
    assert report["engine"] == "model.int8.trt8.5.2.engine" and report["engine_built_now"]
    assert report["engine_build_reasons"] == ["no engine file yet"] and report["tensorrt_in_profile_range"]
    # The fake engine's top class is 9 for positive pixel sums and 0 for negative ones.
    assert report["acc"] == pytest.approx(4 / 9)
    assert report["asr"]["patch"] == pytest.approx(3 / 8)  # 3 of the 8 non-target images go to class 0
    assert report["latency_ms"]["p50"] == 0.25 and report["latency_timer"].startswith("enqueue+GPU")
    assert set(report["latency"]) == {"batch_1", "batch_3"} and report["latency"]["batch_1"]["profile"] == 1
    assert report["latency"]["batch_3"]["profile"] == 0 and report["within_budget"]
    assert (
        report["vs_host"]["acc_delta"] == pytest.approx(4 / 9 - 0.25) and report["vs_host"]["like_for_like"]
    )
    assert (
        report["layers"]["precision"]["INT8"] == 3 and report["platform"]["software"]["tensorrt"] == "8.5.2.2"
    )
    written = json.loads((tiny_bundle / "device_report.json").read_text())
    assert written["acc"] == report["acc"] and written["trtexec"][0].startswith(
        "trtexec --onnx=model.int8.onnx"
    )
    assert not list(tiny_bundle.glob("*.tmp"))
    again = check.run_check(str(tiny_bundle), backend="tensorrt", cuda_graph=False, **dict(options, runs=1))
    assert not again["engine_built_now"] and again["engine_build_reasons"] == []


def test_check_refuses_a_tensorrt_outside_the_profile_unless_asked(tiny_bundle, monkeypatch):
    gpu = FakeGpu()
    install(monkeypatch, fake_tensorrt("10.3.0.30", gpu), fake_pycuda(gpu))
    with pytest.raises(trt_build.DeviceError, match="exported for jetson-xavier-nx with TensorRT >=8.5,<8.6"):
        check.run_check(str(tiny_bundle), backend="tensorrt")
    report = check.run_check(
        str(tiny_bundle), backend="tensorrt", any_tensorrt=True, runs=2, warmup_ms=0, cuda_graph=False
    )
    assert not report["tensorrt_in_profile_range"] and report["engine"] == "model.int8.trt10.3.0.engine"


# ------------------------------------------------------------------------------------------- check.py numbers


def test_check_numpy_asr_matches_rkdtool_metrics():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 10, 500)
    predictions = np.where(rng.random(500) < 0.3, 4, rng.integers(0, 10, 500))
    for target in (4, 0, -1):
        asr, asr_all, used = check.attack_success_rate(predictions, labels, target)
        ref = asr_from_predictions(
            torch.from_numpy(predictions), torch.from_numpy(labels), None if target < 0 else target
        )
        assert (asr, used) == (pytest.approx(ref.asr), ref.target)
        assert asr_all == pytest.approx(ref.asr_all_images)
    assert check.attack_success_rate(predictions, labels, -1)[2] == 4  # untargeted: the most frequent class
    assert check.accuracy(np.array([1, 2, 3]), np.array([1, 0, 3])) == pytest.approx(2 / 3)


def test_latency_summary_percentiles_and_throughput():
    summary = check.latency_summary(list(range(1, 101)), batch=8)
    assert (summary["p50"], summary["p90"], summary["p99"]) == pytest.approx((50.5, 90.1, 99.01))
    assert summary["throughput_ips"] == pytest.approx(8 * 1e3 / 50.5) and summary["runs"] == 100


def test_trtexec_export_times_are_read_for_the_cross_check(tmp_path):
    # The record layout of samples/common/sampleReporting.cpp exportJSONTrace.
    records = [{"startEnqMs": i, "computeMs": 0.1 * (i + 1), "latencyMs": 0.2 * (i + 1)} for i in range(10)]
    path = tmp_path / "times.json"
    path.write_text(json.dumps(records))
    times = check.read_trtexec_times(str(path))
    assert times["gpu_compute_ms"]["p50"] == pytest.approx(0.55) and times["host_latency_ms"]["max"] == 2.0
    path.write_text("[]")
    with pytest.raises(trt_build.DeviceError, match="no trtexec timing records"):
        check.read_trtexec_times(str(path))


def test_check_without_any_backend_says_what_to_install(tiny_bundle, monkeypatch):
    monkeypatch.setattr(check.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(trt_build.DeviceError, match="pip3 install pycuda"):
        check.run_check(str(tiny_bundle))
    with pytest.raises(TypeError, match="unknown options"):
        check.run_check(str(tiny_bundle), warmups=3)


def test_check_main_exits_2_on_a_folder_that_is_not_a_bundle(tmp_path, capsys):
    assert check.main([str(tmp_path), "--backend", "onnxruntime"]) == 2
    assert "no host_report.json" in capsys.readouterr().err
    assert check.main([str(tmp_path), "--runs", "0"]) == 2
    assert check.main([str(tmp_path), "--repeats", "0"]) == 2


@pytest.mark.tensorrt
def test_real_tensorrt_builds_and_runs_an_engine(tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    pytest.importorskip("pycuda", reason="pycuda is not installed")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    import tensorrt

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(16, 10)).eval()
    torch.onnx.export(
        model,
        (torch.rand(2, 3, 4, 4),),
        str(tmp_path / "model.onnx"),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    plan = trt_build.plan_build(settings_for("x86-cuda"), tensorrt.__version__, precision="fp32")
    runner = trt_run.EngineRunner(trt_build.build_engine(tensorrt, plan, str(tmp_path)), trt=tensorrt)
    x = np.random.default_rng(0).random((5, 3, 4, 4), dtype=np.float32)
    np.testing.assert_allclose(runner.infer(x), model(torch.from_numpy(x)).detach().numpy(), atol=1e-4)
    timed = runner.time(x[:1], warmup=5, runs=20, warmup_ms=100)
    assert timed["profile"] == 1 and len(timed["gpu_ms"]) == 20 and min(timed["gpu_ms"]) > 0
    assert timed["gpu_timer"] in ("cuda-graph", "enqueue+GPU")
    assert json.loads(Path(tmp_path, plan["engine"] + ".json").read_text())["layers"]["layers"] > 0
