"""The device runtime (export/): import hygiene, build decisions per TensorRT version, and check.py's numbers.

TensorRT and pycuda cannot run here. The tests named `*_api_dispatch_*` drive trt_build/trt_run/check with a
small fake `tensorrt` and `pycuda` that record the calls made and do simple numpy arithmetic: they show which
API each TensorRT version gets, not that a real engine builds. Real engines: the `tensorrt` marked test.
"""

from __future__ import annotations

import ast
import importlib.machinery
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from rkdtool.probes.metrics import asr_from_predictions
from rkdtool.resources import export_dir, load_device_module, load_profile

EXPORT = export_dir()
trt_build = load_device_module("trt_build")
trt_run = load_device_module("trt_run")
check = load_device_module("check")


def settings_for(target: str = "jetson-xavier-nx", chw=(3, 4, 4)) -> dict:
    profile = {k: v for k, v in load_profile(target).to_dict().items() if k != "path"}
    return {"target": target, "profile": profile, "input": {"name": "input", "shape": ["batch", *chw]}}


# ------------------------------------------------------------------------------------------- import hygiene


@pytest.mark.parametrize("name", ["trt_build.py", "trt_run.py", "check.py"])
def test_device_files_are_python36_syntax(name):
    # JetPack 4.6 (Nano, TX2) ships Python 3.6: no walrus, no positional-only, no postponed annotations.
    source = (EXPORT / name).read_text()
    ast.parse(source, feature_version=(3, 6))
    assert "from __future__ import annotations" not in source
    assert "import dataclasses" not in source and "from dataclasses" not in source


def test_device_files_import_where_tensorrt_and_pycuda_are_absent():
    code = (
        "import sys\n"
        "for m in ('tensorrt', 'pycuda', 'pycuda.driver', 'pycuda.autoinit'): sys.modules[m] = None\n"
        "import trt_build, trt_run, check\n"
        "try:\n    trt_build.import_tensorrt()\nexcept trt_build.DeviceError as e:\n    print(e)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=EXPORT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "python3-libnvinfer" in done.stdout and "pip install tensorrt" in done.stdout


def test_missing_pycuda_is_a_clear_device_error(monkeypatch):
    for name in ("pycuda", "pycuda.driver", "pycuda.autoinit"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(trt_build.DeviceError, match="pip3 install pycuda"):
        trt_build.import_pycuda()


# ------------------------------------------------------------------------------------------- build decisions


@pytest.mark.parametrize(
    ("version", "dla", "mode"),
    [
        ("8.2.1.8", None, "implicit"),
        ("8.2.1.8", 0, "implicit"),
        ("8.5.2.2", None, "qdq"),
        ("8.6.2", 1, "implicit"),
        ("10.3.0.30", None, "qdq"),
        ("10.3.0.30", 0, "qdq"),
        ("11.4.1", None, "qdq"),
    ],
)
def test_int8_mode_follows_edge_md(version, dla, mode):
    # Explicit Q/DQ from 8.5; the implicit calibrator for 8.2 and for DLA on 8.x (edge.md §1.1).
    assert trt_build.int8_mode(version, dla) == mode


def test_plan_for_tensorrt_85_int8_uses_the_qdq_model_and_explicit_batch():
    plan = trt_build.plan_build(settings_for("jetson-xavier-nx"), "8.5.2.2")
    assert plan["precision"] == "int8" and plan["int8_mode"] == "qdq" and plan["onnx"] == "model.int8.onnx"
    assert plan["flags"] == ["INT8", "FP16"] and plan["explicit_batch_flag"] and not plan["strongly_typed"]
    assert plan["workspace_api"] == "set_memory_pool_limit" and plan["workspace_bytes"] == 1024 << 20
    assert plan["shapes"] == {"min": [1, 3, 4, 4], "opt": [32, 3, 4, 4], "max": [256, 3, 4, 4]}
    assert plan["engine"] == "model.int8.trt8.5.2.engine" and plan["calibration_cache"] is None


def test_plan_for_tensorrt_82_calibrates_implicitly_with_a_versioned_cache():
    plan = trt_build.plan_build(settings_for("jetson-nano"), "8.2.1.8", precision="int8")
    assert plan["int8_mode"] == "implicit" and plan["onnx"] == "model.onnx"
    assert plan["workspace_api"] == "max_workspace_size"  # set_memory_pool_limit arrived in 8.4
    assert plan["calibration_cache"] == "calib.gpu.trt8.2.cache" and plan["calibration_batch"] == 32
    assert trt_build.plan_build(settings_for("jetson-nano"), "8.2.1.8")["precision"] == "fp16"


def test_plan_for_tensorrt_10_and_11():
    ten = trt_build.plan_build(settings_for("jetson-orin-nano"), "10.3.0.30")
    assert not ten["explicit_batch_flag"] and ten["flags"] == ["INT8", "FP16"] and not ten["strongly_typed"]
    eleven = trt_build.plan_build(settings_for("jetson-agx-orin"), "11.4.1")
    assert eleven["strongly_typed"] and eleven["flags"] == [] and eleven["onnx"] == "model.int8.onnx"
    with pytest.raises(trt_build.DeviceError, match="strongly typed.*AutoCast"):
        trt_build.plan_build(settings_for("jetson-agx-orin"), "11.4.1", precision="fp16")


def test_plan_checks_dla_requests():
    plan = trt_build.plan_build(settings_for("jetson-agx-orin"), "10.3.0", precision="fp16", dla_core=1)
    assert plan["flags"] == ["FP16", "GPU_FALLBACK"] and plan["engine"] == "model.fp16.dla1.trt10.3.0.engine"
    with pytest.raises(trt_build.DeviceError, match="has 0 DLA core"):
        trt_build.plan_build(settings_for("jetson-orin-nano"), "10.3.0", dla_core=0)
    with pytest.raises(trt_build.DeviceError, match="DLA runs FP16 or INT8 only"):
        trt_build.plan_build(settings_for("jetson-agx-orin"), "10.3.0", precision="fp32", dla_core=0)
    with pytest.raises(trt_build.DeviceError, match="precision must be one of"):
        trt_build.plan_build(settings_for(), "10.3.0", precision="int4")


def test_trtexec_commands_match_the_plan():
    build, timing = trt_build.trtexec_commands(
        trt_build.plan_build(settings_for("jetson-orin-nano"), "10.3.0")
    )
    assert build[:3] == ["trtexec", "--onnx=model.int8.onnx", "--saveEngine=model.int8.trt10.3.0.engine"]
    assert {"--int8", "--fp16", "--minShapes=input:1x3x4x4", "--optShapes=input:32x3x4x4"} <= set(build)
    assert "--maxShapes=input:256x3x4x4" in build and "--memPoolSize=workspace:1024M" in build
    assert {"--shapes=input:1x3x4x4", "--useCudaGraph", "--noDataTransfers", "--percentile=50,90,99"} <= set(
        timing
    )
    old, _ = trt_build.trtexec_commands(
        trt_build.plan_build(settings_for("jetson-nano"), "8.2.1", "int8", None)
    )
    assert "--workspace=256" in old and "--calib=calib.gpu.trt8.2.cache" in old and "--onnx=model.onnx" in old
    dla, _ = trt_build.trtexec_commands(
        trt_build.plan_build(settings_for("jetson-agx-orin"), "11.4.1", None, 0)
    )
    assert "--useDLACore=0" in dla and "--allowGPUFallback" in dla and "--int8" not in dla


# ------------------------------------------------------------------------------------------- fake TensorRT


def fake_pycuda() -> types.ModuleType:
    """A pycuda.driver stand-in: device memory is a dict of numpy buffers keyed by pointer."""
    cuda = types.ModuleType("pycuda.driver")
    cuda.memory = {}

    class Allocation:
        def __init__(self, nbytes):
            self.ptr = 0x1000 * (len(cuda.memory) + 1)
            cuda.memory[self.ptr] = np.zeros(nbytes // 4, np.float32)

        def __int__(self):
            return self.ptr

    def htod(dev, host, stream=None):
        cuda.memory[int(dev)][: host.size] = np.asarray(host, np.float32).ravel()

    def dtoh(host, dev, stream=None):
        host[...] = cuda.memory[int(dev)][: host.size].reshape(host.shape)

    class Stream:
        handle = 7

        def synchronize(self):
            return None

    class Event:
        def record(self, stream=None):
            return None

        def synchronize(self):
            return None

        def time_till(self, other):
            return 0.25

    cuda.mem_alloc = Allocation
    cuda.pagelocked_empty = lambda n, dtype: np.zeros(n, dtype)
    cuda.memcpy_htod_async, cuda.memcpy_htod, cuda.memcpy_dtoh_async = htod, htod, dtoh
    cuda.Stream, cuda.Event = Stream, Event
    return cuda


def compute_logits(x: np.ndarray, classes: int = 10) -> np.ndarray:
    """The fake engine's arithmetic: logit k of an image = its pixel sum times (k - 4.5)."""
    return x.reshape(len(x), -1).sum(1, keepdims=True) * (np.arange(classes) - 4.5)


def fake_tensorrt(version: str, cuda: types.ModuleType) -> types.ModuleType:
    """A tensorrt stand-in exposing the API of `version`: bindings before 8.5, named tensors from 8.5."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls = []
    major_minor = tuple(int(p) for p in version.split(".")[:2])
    named, pool = major_minor >= (8, 5), major_minor >= (8, 4)
    record = trt.calls.append

    class Logger:
        WARNING = "warning"

        def __init__(self, level):
            self.level = level

    creation = {"STRONGLY_TYPED": 1} if major_minor >= (10, 0) else {"EXPLICIT_BATCH": 0}
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(**creation)
    flags = ["GPU_FALLBACK"] + ([] if major_minor >= (11, 0) else ["INT8", "FP16"])
    trt.BuilderFlag = types.SimpleNamespace(**{f: f for f in flags})
    trt.DeviceType = types.SimpleNamespace(DLA="DLA", GPU="GPU")
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    if pool:
        trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.nptype = lambda dtype: np.float32
    trt.Logger = Logger

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            record(("set_shape", name, lo, opt, hi))

    class Config:
        def set_flag(self, flag):
            record(("set_flag", flag))

        def add_optimization_profile(self, profile):
            record(("add_optimization_profile",))

        def set_calibration_profile(self, profile):
            record(("set_calibration_profile",))

        def __setattr__(self, key, value):
            record(("config", key, value if key != "int8_calibrator" else type(value).__name__))
            object.__setattr__(self, key, value)

    if pool:
        Config.set_memory_pool_limit = lambda self, kind, size: record(("set_memory_pool_limit", kind, size))

    class Builder:
        def __init__(self, logger):
            self.config = None

        def create_network(self, flags):
            record(("create_network", flags))
            return "network"

        def create_builder_config(self):
            self.config = Config()
            return self.config

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calibrator = getattr(config, "int8_calibrator", None)
            if calibrator is not None:  # what TensorRT does with an implicit calibrator
                batches = 0
                while calibrator.get_batch(["input"]) is not None:
                    batches += 1
                record(("calibrated_batches", batches, calibrator.get_batch_size()))
                calibrator.write_calibration_cache(b"TRT-EntropyCalibration2\ninput: 3c010204\n")
            return b"serialized-engine"

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            record(("parse_from_file", Path(path).name))
            return Path(path).exists()

    class Calibrator:
        def __init__(self):
            pass

    class Context:
        def __init__(self, engine):
            self.engine, self.shape, self.addresses = engine, None, {}

        def _run(self, x_ptr, y_ptr):
            n = int(np.prod(self.shape))
            x = cuda.memory[x_ptr][:n].reshape(self.shape)
            y = compute_logits(x)
            cuda.memory[y_ptr][: y.size] = y.ravel()

    class NamedContext(Context):
        def set_input_shape(self, name, shape):
            record(("set_input_shape", name, tuple(shape)))
            self.shape = tuple(shape)

        def get_tensor_shape(self, name):
            return (self.shape[0], 10)

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr

        def execute_async_v3(self, stream_handle):
            record(("execute_async_v3", stream_handle))
            self._run(self.addresses["input"], self.addresses["logits"])

    class BindingContext(Context):
        def set_binding_shape(self, index, shape):
            record(("set_binding_shape", index, tuple(shape)))
            self.shape = tuple(shape)

        def get_binding_shape(self, index):
            return (self.shape[0], 10)

        def execute_async_v2(self, bindings, stream_handle):
            record(("execute_async_v2", len(bindings)))
            self._run(bindings[0], bindings[1])

    names = ["input", "logits"]

    class Engine:
        def create_execution_context(self):
            return NamedContext(self) if named else BindingContext(self)

    if named:
        Engine.num_io_tensors = 2
        Engine.get_tensor_name = lambda self, i: names[i]
        Engine.get_tensor_mode = lambda self, n: "in" if n == "input" else "out"
        Engine.get_tensor_dtype = lambda self, n: "float32"
        Engine.get_tensor_profile_shape = lambda self, n, p: [(1, 3, 4, 4), (2, 3, 4, 4), (4, 3, 4, 4)]
    else:
        Engine.num_bindings = 2
        Engine.get_binding_name = lambda self, i: names[i]
        Engine.binding_is_input = lambda self, i: i == 0
        Engine.get_binding_dtype = lambda self, i: "float32"
        Engine.get_profile_shape = lambda self, p, i: [(1, 3, 4, 4), (2, 3, 4, 4), (4, 3, 4, 4)]

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return Engine() if data == b"serialized-engine" else None

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
    trt.IInt8EntropyCalibrator2 = Calibrator
    return trt


@pytest.fixture
def tiny_bundle(tmp_path):
    """A bundle folder with what trt_build and check read: host_report, dummy ONNX, calib and probes."""
    settings = settings_for("jetson-xavier-nx")
    rng = np.random.default_rng(0)
    images = rng.random((9, 3, 4, 4), dtype=np.float32)
    labels = np.array([9, 1, 2, 9, 3, 9, 0, 5, 9])
    triggered = images.copy()
    triggered[:3] = -triggered[:3]  # negative pixel sums: the fake engine's top class becomes 0
    host = {"precisions": {"onnx-int8": {"acc": 0.25, "asr": {"patch": 0.0}}}, **settings}
    (tmp_path / "host_report.json").write_text(json.dumps(host))
    for name in ("model.onnx", "model.int8.onnx"):
        (tmp_path / name).write_bytes(b"onnx")
    np.savez(tmp_path / "calib.npz", images=rng.random((70, 3, 4, 4), dtype=np.float32))
    np.savez(
        tmp_path / "probes.npz",
        images=images,
        labels=labels,
        probe_names=np.array(["patch"]),
        targets=np.array([0]),
        triggered_0=triggered,
    )
    return tmp_path


@pytest.mark.parametrize(
    ("version", "network_flags"),
    [("8.2.1.8", 1 << 0), ("8.5.2.2", 1 << 0), ("10.3.0.30", 0), ("11.4.1", 1 << 1)],
)
def test_build_engine_api_dispatch_per_tensorrt_version(tiny_bundle, version, network_flags):
    cuda = fake_pycuda()
    trt = fake_tensorrt(version, cuda)
    plan = trt_build.plan_build(settings_for("jetson-xavier-nx"), version)
    path = trt_build.build_engine(trt, plan, str(tiny_bundle), cuda=cuda)
    assert Path(path).read_bytes() == b"serialized-engine"
    calls = trt.calls
    assert ("create_network", network_flags) in calls
    assert ("set_shape", "input", (1, 3, 4, 4), (32, 3, 4, 4), (256, 3, 4, 4)) in calls
    flags = [c[1] for c in calls if c[0] == "set_flag"]
    if version.startswith("8.2"):
        assert ("parse_from_file", "model.onnx") in calls
        assert ("config", "max_workspace_size", 1024 << 20) in calls
        assert ("config", "int8_calibrator", "EntropyCalibrator") in calls
        assert ("set_calibration_profile",) in calls
        assert ("calibrated_batches", 2, 32) in calls  # 70 images -> two full batches of 32
        assert (tiny_bundle / "calib.gpu.trt8.2.cache").read_bytes().startswith(b"TRT-EntropyCalibration2")
    else:
        assert ("parse_from_file", "model.int8.onnx") in calls
        assert ("set_memory_pool_limit", "workspace", 1024 << 20) in calls
        assert not any(c[0] == "config" and c[1] == "int8_calibrator" for c in calls)
    assert flags == ([] if version.startswith("11") else ["INT8", "FP16"])


def test_dla_build_api_dispatch_on_tensorrt_8(tiny_bundle):
    cuda = fake_pycuda()
    trt = fake_tensorrt("8.5.2.2", cuda)
    plan = trt_build.plan_build(settings_for("jetson-xavier-nx"), "8.5.2.2", dla_core=1)
    trt_build.build_engine(trt, plan, str(tiny_bundle), cuda=cuda)
    assert ("config", "default_device_type", "DLA") in trt.calls and ("config", "DLA_core", 1) in trt.calls
    assert [c[1] for c in trt.calls if c[0] == "set_flag"] == ["INT8", "FP16", "GPU_FALLBACK"]
    assert ("parse_from_file", "model.onnx") in trt.calls  # DLA INT8 on 8.x: implicit calibration
    assert (tiny_bundle / "calib.dla.trt8.5.cache").exists()


def test_unparsable_onnx_is_a_device_error(tiny_bundle):
    (tiny_bundle / "model.int8.onnx").unlink()
    cuda = fake_pycuda()
    plan = trt_build.plan_build(settings_for(), "10.3.0")
    with pytest.raises(trt_build.DeviceError, match="missing from the bundle"):
        trt_build.build_engine(fake_tensorrt("10.3.0", cuda), plan, str(tiny_bundle), cuda=cuda)


@pytest.mark.parametrize(
    ("version", "api"), [("8.2.1", "bindings"), ("8.6.1", "tensors"), ("10.3.0", "tensors")]
)
def test_engine_runner_api_dispatch_infers_in_chunks(tmp_path, version, api):
    cuda = fake_pycuda()
    trt = fake_tensorrt(version, cuda)
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"serialized-engine")
    runner = trt_run.EngineRunner(str(engine), trt=trt, cuda=cuda)
    assert runner.api == api and runner.max_batch == 4
    images = np.random.default_rng(1).standard_normal((10, 3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(runner.infer(images), compute_logits(images), rtol=1e-5)
    executed = [c for c in trt.calls if c[0].startswith("execute_async")]
    assert len(executed) == 3  # 10 images at a max batch of 4
    assert executed[0][0] == ("execute_async_v3" if api == "tensors" else "execute_async_v2")
    timed = runner.time(images[:1], warmup=2, runs=5)
    assert len(timed["host_ms"]) == 5 and timed["gpu_ms"] == [0.25] * 5


def test_an_engine_from_another_tensorrt_is_a_device_error(tmp_path):
    cuda = fake_pycuda()
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"other bytes")
    with pytest.raises(trt_build.DeviceError, match="rebuild"):
        trt_run.EngineRunner(str(engine), trt=fake_tensorrt("10.3.0", cuda), cuda=cuda)


def test_check_with_tensorrt_api_dispatch_builds_evaluates_and_reports(tiny_bundle, monkeypatch):
    cuda = fake_pycuda()
    trt = fake_tensorrt("10.3.0.30", cuda)
    pycuda = types.ModuleType("pycuda")
    pycuda.driver, pycuda.autoinit = cuda, types.ModuleType("pycuda.autoinit")
    for name, module in (
        ("tensorrt", trt),
        ("pycuda", pycuda),
        ("pycuda.driver", cuda),
        ("pycuda.autoinit", pycuda.autoinit),
    ):
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, module)
    report = check.run_check(str(tiny_bundle), backend="auto", warmup=1, runs=4, batches=(1, 3))
    assert report["backend"] == "tensorrt" and report["execution_api"] == "tensors"
    assert report["engine"] == "model.int8.trt10.3.0.engine" and report["engine_built_now"]
    assert not report["tensorrt_in_profile_range"]  # the xavier-nx profile is for TensorRT 8.5
    # The fake engine's top class is 9 for positive pixel sums and 0 for negative ones.
    assert report["acc"] == pytest.approx(4 / 9)
    assert report["asr"]["patch"] == pytest.approx(3 / 8)  # 3 of the 8 non-target images go to class 0
    assert report["latency_ms"]["p50"] == 0.25 and report["latency_timer"].startswith("cuda-events")
    assert set(report["latency"]) == {"batch_1", "batch_3"}
    assert report["vs_host"]["acc_delta"] == pytest.approx(4 / 9 - 0.25)
    written = json.loads((tiny_bundle / "device_report.json").read_text())
    assert written["acc"] == report["acc"] and written["trtexec"][0].startswith(
        "trtexec --onnx=model.int8.onnx"
    )
    assert not list(tiny_bundle.glob("*.tmp"))
    again = check.run_check(str(tiny_bundle), backend="tensorrt", warmup=0, runs=1)
    assert not again["engine_built_now"]


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


def test_check_without_any_backend_says_what_to_install(tiny_bundle, monkeypatch):
    monkeypatch.setattr(check.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(trt_build.DeviceError, match="pip3 install pycuda"):
        check.run_check(str(tiny_bundle))


def test_check_main_exits_2_on_a_folder_that_is_not_a_bundle(tmp_path, capsys):
    assert check.main([str(tmp_path), "--backend", "onnxruntime"]) == 2
    assert "no host_report.json" in capsys.readouterr().err
    assert check.main([str(tmp_path), "--runs", "0"]) == 2


def test_trt_build_prints_trtexec_commands_without_tensorrt(tiny_bundle, monkeypatch, capsys):
    monkeypatch.setenv("TRT_VERSION", "8.5.2")
    assert trt_build.main([str(tiny_bundle), "--print-trtexec"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("trtexec --onnx=model.int8.onnx") and "--int8" in lines[0]


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
