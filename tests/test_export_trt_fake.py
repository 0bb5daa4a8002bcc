"""The device runtime against the recording TensorRT stand-in (tests/fake_tensorrt.py): DLA builds, TF32, the
board's limits, failures TensorRT reports as False, chunking and padding, optimisation profiles, CUDA graphs,
warm-up, the engine sidecar, the calibration and timing caches, the layer report and Polygraphy parity.

These show what the runtime asks of TensorRT and what it does with the answers; a real engine is the
`tensorrt` marked test in test_export_runtime.py.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from fake_tensorrt import (
    FakeGpu,
    FakeGraphDriver,
    compute_logits,
    engine_bytes,
    fake_pycuda,
    fake_tensorrt,
    install,
    write_tiny_bundle,
)

from rkdtool.deploy import host_check
from rkdtool.deploy.host_check import ProbeSet
from rkdtool.resources import export_dir, load_device_module, load_profile

trt_build = load_device_module("trt_build")
trt_run = load_device_module("trt_run")
check = load_device_module("check")
trt_sidecar, trt_layers, trt_compare = check.trt_sidecar, trt_build.trt_layers, check.trt_compare
DeviceError = trt_build.DeviceError
TWO_PROFILES = [[[1, 3, 4, 4], [32, 3, 4, 4], [256, 3, 4, 4]], [[1, 3, 4, 4]] * 3]


@pytest.fixture(autouse=True)
def no_real_cuda_driver(monkeypatch):
    """CUDA graphs come from a FakeGraphDriver a test passes in, never from this machine's libcuda."""

    def refuse():
        raise trt_run.cuda_graph.CaptureError("no CUDA driver in these tests")

    monkeypatch.setattr(trt_run.cuda_graph, "load_driver", refuse)


def settings_for(target: str) -> dict:
    profile = {k: v for k, v in load_profile(target).to_dict().items() if k != "path"}
    return {"target": target, "profile": profile, "input": {"name": "input", "shape": ["batch", 3, 4, 4]}}


@pytest.fixture
def orin(tmp_path):
    """A bundle for the AGX Orin profile (TensorRT 10.3, 2 DLA cores)."""
    return write_tiny_bundle(tmp_path, settings_for("jetson-agx-orin"))


def fakes(version="10.3.0", gpu=None, **options):
    gpu = gpu or FakeGpu()
    return gpu, fake_pycuda(gpu), fake_tensorrt(version, gpu, **options)


def runner_for(tmp_path, version, profiles, *, graph=None, dla_core=None, **options):
    gpu, cuda, trt = fakes(version, **options)
    path = tmp_path / "model.engine"
    path.write_bytes(engine_bytes(profiles, dla_core))
    driver = graph(gpu) if graph else None
    runner = trt_run.EngineRunner(str(path), trt=trt, cuda=cuda, dla_core=dla_core, graph_driver=driver)
    return runner, trt, driver


def images(n, seed=1):
    return np.random.default_rng(seed).standard_normal((n, 3, 4, 4)).astype(np.float32)


# ------------------------------------------------------------------------------------------- building


def test_dla_int8_on_tensorrt_10_builds_a_static_profile_with_the_calibrator(orin):
    gpu, cuda, trt = fakes("10.3.0")
    plan = trt_build.plan_build(settings_for("jetson-agx-orin"), "10.3.0", dla_core=1)
    path = trt_build.build_engine(trt, plan, str(orin), cuda=cuda)
    calls = trt.calls
    shapes = [c for c in calls if c[0] == "set_shape"]
    assert shapes[0] == ("set_shape", "input", (1, 3, 4, 4), (1, 3, 4, 4), (1, 3, 4, 4))  # min = opt = max
    assert [c[0] for c in calls].count("add_optimization_profile") == 1
    assert ("config", "default_device_type", "DLA") in calls and ("config", "DLA_core", 1) in calls
    assert ("parse_from_file", "model.onnx") in calls and (
        "config",
        "int8_calibrator",
        "EntropyCalibrator",
    ) in calls
    assert ("set_calibration_profile", ((32, 3, 4, 4),) * 3) in calls
    assert ("calibrated_batches", 2, 32) in calls  # 70 images -> two full batches of 32
    assert [c[1] for c in calls if c[0] == "set_flag"] == ["INT8", "FP16", "GPU_FALLBACK"]
    assert (orin / "calib.dla.trt10.3.cache").read_bytes().startswith(b"TRT-EntropyCalibration2")
    assert json.loads((orin / "calib.dla.trt10.3.cache.json").read_text())["dla"] is True
    sidecar = json.loads((orin / (plan["engine"] + ".json")).read_text())
    assert sidecar["dla_core"] == 1 and sidecar["layers"]["dla"] == 1 and sidecar["int8_mode"] == "implicit"
    assert path.endswith("model.int8.dla1.trt10.3.0.engine")


def test_dla_build_that_puts_no_layer_on_the_dla_fails_and_leaves_no_engine(orin):
    gpu_layers = lambda record: {"Layers": [{"Name": "conv", "LayerType": "CaskConvolution", "Inputs": []}]}  # noqa: E731
    gpu, cuda, trt = fakes("10.3.0", layers=gpu_layers)
    plan = trt_build.plan_build(settings_for("jetson-agx-orin"), "10.3.0", "fp16", dla_core=0)
    with pytest.raises(DeviceError, match="no layer of model.onnx was placed on DLA core 0"):
        trt_build.build_engine(trt, plan, str(orin), cuda=cuda)
    assert not (orin / plan["engine"]).exists() and (orin / (plan["engine"] + ".layers.json")).exists()
    unclear = lambda record: {"Layers": [{"Name": "{ForeignNode[conv...fc]}", "LayerType": "Myelin"}]}  # noqa: E731
    gpu, cuda, trt = fakes("10.3.0", layers=unclear)
    said = []
    trt_build.build_engine(trt, plan, str(orin), cuda=cuda, log=said.append)  # a warning, not a failure
    assert (orin / plan["engine"]).exists() and "does not say which layers run on DLA core 0" in said[-1]


def test_a_dla_build_where_no_layer_can_run_on_the_dla_fails_before_building(orin):
    plan = trt_build.plan_build(settings_for("jetson-agx-orin"), "10.3.0", "fp16", dla_core=0)
    gpu, cuda, trt = fakes("10.3.0", dla_capable=0)
    with pytest.raises(DeviceError, match=r"none of the 3 layers of model.onnx can run on DLA core 0"):
        trt_build.build_engine(trt, plan, str(orin), cuda=cuda)
    assert not any(c[0] == "built" for c in trt.calls) and not (orin / plan["engine"]).exists()
    gpu, cuda, trt = fakes("10.3.0", dla_capable=2)
    path = trt_build.build_engine(trt, plan, str(orin), cuda=cuda)
    assert json.loads(Path(path + ".json").read_text())["layers"]["dla_capable"] == 2
    gpu, cuda, trt = fakes("10.3.0", dla_capable=0)  # a GPU build does not ask
    trt_build.build_engine(
        trt, trt_build.plan_build(settings_for("jetson-agx-orin"), "10.3.0"), str(orin), cuda=cuda
    )
    assert not any(c[0] == "can_run_on_DLA" for c in trt.calls)


def test_the_dla_core_count_comes_from_the_board_not_the_profile(orin):
    gpu, cuda, trt = fakes("10.3.0", num_dla_cores=1)  # Orin NX 8 GB: one core; the profile says two
    plan = trt_build.plan_build(settings_for("jetson-agx-orin"), "10.3.0", "fp16", dla_core=1)
    with pytest.raises(
        DeviceError, match=r"this board has 1 DLA core\(s\) \(builder.num_DLA_cores\) \(the profile"
    ):
        trt_build.build_engine(trt, plan, str(orin), cuda=cuda, profile_cores=2)


def test_int8_is_refused_without_fast_int8_and_fp16_is_warned(orin):
    gpu, cuda, trt = fakes("8.2.1", fast_int8=False, fast_fp16=False)  # a Nano: no INT8, slow FP16
    plan = trt_build.plan_build(settings_for("jetson-nano"), "8.2.1", "int8")
    with pytest.raises(DeviceError, match="no fast INT8.*--precision fp16"):
        trt_build.build_engine(trt, plan, str(orin), cuda=cuda)
    said = []
    plan = trt_build.plan_build(settings_for("jetson-nano"), "8.2.1", "fp16")
    trt_build.build_engine(trt, plan, str(orin), cuda=cuda, log=said.append)
    assert any("no fast FP16" in line for line in said)


@pytest.mark.parametrize(("precision", "tf32"), [("fp32", False), ("fp16", True), ("int8", True)])
def test_tf32_is_cleared_for_fp32_and_kept_for_fp16_and_int8(orin, precision, tf32):
    gpu, cuda, trt = fakes("10.3.0")
    plan = trt_build.plan_build(settings_for("jetson-agx-orin"), "10.3.0", precision)
    trt_build.build_engine(trt, plan, str(orin), cuda=cuda)
    built = [c[1] for c in trt.calls if c[0] == "built"][0]
    assert ("TF32" in built["flags"]) is tf32
    assert (("clear_flag", "TF32") in trt.calls) is not tf32


def test_timing_cache_is_one_file_per_tensorrt_and_gpu_and_is_read_back(orin):
    gpu, cuda, trt = fakes("10.3.0")
    plan = trt_build.plan_build(settings_for("jetson-agx-orin"), "10.3.0", "fp16")
    trt_build.build_engine(trt, plan, str(orin), cuda=cuda)
    cache = orin / "timing.trt10.3.0.orin.sm87.cache"
    assert cache.read_bytes() == b"timing-cache:10.3.0"
    trt_build.build_engine(trt, plan, str(orin), cuda=cuda)
    assert [c[1] for c in trt.calls if c[0] == "create_timing_cache"] == [b"", b"timing-cache:10.3.0"]


# ------------------------------------------------------------------------------------------- the sidecar


def test_a_stale_sidecar_forces_a_rebuild_and_says_why(orin):
    gpu, cuda, trt = fakes("10.3.0")
    plan = trt_build.plan_build(settings_for("jetson-agx-orin"), "10.3.0")
    said = []
    path, built, reasons = trt_build.ensure_engine(trt, plan, str(orin), cuda, log=said.append)
    assert built and reasons == ["no engine file yet"]
    assert trt_build.ensure_engine(trt, plan, str(orin), cuda, log=said.append)[1:] == (False, [])
    (orin / "model.int8.onnx").write_bytes(b"another model copied over the bundle")
    _, built, reasons = trt_build.ensure_engine(trt, plan, str(orin), cuda, log=said.append)
    assert built and len(reasons) == 1 and reasons[0].startswith("onnx_sha256: ")
    assert "because: onnx_sha256" in said[-1]
    other_gpu = fake_pycuda(FakeGpu(name="Xavier", sm=(7, 2)))
    _, built, reasons = trt_build.ensure_engine(trt, plan, str(orin), other_gpu, log=said.append)
    assert built and reasons == ['gpu_name: "Orin" -> "Xavier"', 'gpu_sm: "8.7" -> "7.2"']
    (orin / (plan["engine"] + ".json")).unlink()
    assert trt_build.ensure_engine(trt, plan, str(orin), other_gpu, log=said.append)[2][0].startswith(
        "no sidecar"
    )
    newer = fake_tensorrt("10.3.1", gpu)
    plan = trt_build.plan_build(settings_for("jetson-agx-orin"), "10.3.0")  # same file name, new TensorRT
    assert (
        'tensorrt: "10.3.0" -> "10.3.1"'
        in trt_build.ensure_engine(newer, plan, str(orin), other_gpu, log=said.append)[2]
    )


def test_a_calibration_cache_from_other_images_is_dropped(orin):
    gpu, cuda, trt = fakes("10.3.0")
    plan = trt_build.plan_build(settings_for("jetson-agx-orin"), "10.3.0", dla_core=0)
    trt_build.build_engine(trt, plan, str(orin), cuda=cuda)
    np.savez(orin / "calib.npz", images=np.ones((64, 3, 4, 4), np.float32))
    said = []
    trt_build.build_engine(trt, plan, str(orin), cuda=cuda, log=said.append)
    assert (
        said
        and said[0].startswith("calibrating again: calib.dla.trt10.3.cache")
        and "calib_sha256" in said[0]
    )
    assert [c for c in trt.calls if c[0] == "calibrated_batches"][-1] == ("calibrated_batches", 2, 32)


def test_trt_build_main_reuses_a_current_engine(orin, monkeypatch, capsys):
    gpu, cuda, trt = fakes("10.3.0")
    install(monkeypatch, trt, cuda)
    assert trt_build.main([str(orin), "--precision", "fp16"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("built ")
    assert trt_build.main([str(orin), "--precision", "fp16"]) == 0
    assert "engine is current" in capsys.readouterr().out
    assert trt_build.main([str(orin), "--precision", "fp16", "--rebuild"]) == 0
    assert "because: --rebuild" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- running


def test_runtime_dla_core_is_set_before_deserialising_also_from_the_sidecar(orin):
    gpu, cuda, trt = fakes("10.3.0")
    plan = trt_build.plan_build(settings_for("jetson-agx-orin"), "10.3.0", "fp16", dla_core=1)
    path = trt_build.build_engine(trt, plan, str(orin), cuda=cuda)
    del trt.calls[:]
    runner = trt_run.EngineRunner(path, trt=trt, cuda=cuda)  # the core comes from the sidecar
    assert runner.dla_core == 1
    assert trt.calls[:2] == [("runtime", "DLA_core", 1), ("deserialize_cuda_engine", 1)]
    with pytest.raises(DeviceError, match=r"this board has 1 DLA core\(s\) \(IRuntime.num_DLA_cores\)"):
        trt_run.EngineRunner(path, trt=fake_tensorrt("10.3.0", gpu, num_dla_cores=1), cuda=cuda)


def test_a_static_dla_batch_is_padded_and_results_stay_in_order(tmp_path):
    static = [[2, 3, 4, 4]] * 3
    runner, trt, _ = runner_for(tmp_path, "10.3.0", [static], dla_core=0)
    x = images(5)
    np.testing.assert_allclose(runner.infer(x), compute_logits(x), rtol=1e-5)
    assert [c[2] for c in trt.calls if c[0] == "execute_async_v3"] == [2, 2, 2]  # the last one padded


@pytest.mark.parametrize(("version", "call"), [("8.2.1", "set_binding_shape"), ("10.3.0", "set_input_shape")])
def test_a_rejected_input_shape_raises_with_a_clear_message(tmp_path, version, call):
    runner, _, _ = runner_for(tmp_path, version, TWO_PROFILES, set_input_shape_ok=False)
    with pytest.raises(DeviceError, match=rf"rejected input shape \(4, 3, 4, 4\) \({call} returned False"):
        runner.infer(images(4))


@pytest.mark.parametrize(("version", "call"), [("8.2.1", "execute_async_v2"), ("8.5.2", "execute_async_v3")])
def test_a_failed_enqueue_raises_instead_of_giving_garbage(tmp_path, version, call):
    runner, _, _ = runner_for(tmp_path, version, TWO_PROFILES, execute_ok=False)
    with pytest.raises(DeviceError, match=f"{call} returned False for batch 3: the enqueue failed"):
        runner.infer(images(3))


def test_a_rejected_tensor_address_or_missing_context_raises(tmp_path):
    runner, _, _ = runner_for(tmp_path, "10.3.0", TWO_PROFILES, set_tensor_address_ok=False)
    with pytest.raises(DeviceError, match="device address of input"):
        runner.infer(images(2))
    with pytest.raises(DeviceError, match="could not create an execution context"):
        runner_for(tmp_path, "10.3.0", TWO_PROFILES, no_context=True)


@pytest.mark.parametrize("version", ["8.2.1", "10.3.0"])
def test_batch_1_is_timed_on_the_batch_1_profile_and_oversized_batches_are_refused(tmp_path, version):
    runner, trt, _ = runner_for(tmp_path, version, TWO_PROFILES)
    timed = runner.time(images(1), warmup=2, runs=3, warmup_ms=0)
    assert timed["profile"] == 1 and ("set_optimization_profile_async", 1) in trt.calls
    api = "execute_async_v2" if version.startswith("8.2") else "execute_async_v3"
    assert {c[1] for c in trt.calls if c[0] == api} == {1}  # every timed run on profile 1
    x = images(300)  # above the engine's maximum of 256: infer() chunks it, back on profile 0
    np.testing.assert_allclose(runner.infer(x), compute_logits(x), rtol=1e-4)
    assert [c[2] for c in trt.calls if c[0] == api][-2:] == [256, 44]
    with pytest.raises(DeviceError, match="batch 300 is outside this engine's profiles"):
        runner.time(x, runs=1, warmup_ms=0)


def test_cuda_graph_timing_replays_the_captured_enqueue(tmp_path):
    runner, trt, driver = runner_for(tmp_path, "10.3.0", TWO_PROFILES, graph=FakeGraphDriver)
    x = images(8)
    timed = runner.time(x, warmup=3, runs=5, warmup_ms=0)
    assert timed["gpu_timer"] == "cuda-graph" and timed["cuda_graph"] is None
    assert driver.modes == [1]  # CU_STREAM_CAPTURE_MODE_THREAD_LOCAL, as trtexec captures
    assert driver.launches == timed["warmup"]["iterations"] + 2 * 5  # host-timed and event-timed runs
    np.testing.assert_allclose(runner.host_out[: 8 * 10].reshape(8, 10), compute_logits(x), rtol=1e-5)
    assert len(timed["gpu_ms"]) == 5 and timed["gpu_ms"] == [0.25] * 5


def test_cuda_graph_capture_failure_is_labelled_enqueue_plus_gpu(tmp_path):
    runner, _, _ = runner_for(
        tmp_path, "10.3.0", TWO_PROFILES, graph=FakeGraphDriver, execute_ok_in_capture=False
    )
    timed = runner.time(images(1), warmup=1, runs=2, warmup_ms=0)
    assert (
        timed["gpu_timer"] == "enqueue+GPU"
        and "not permitted under CUDA graph capture" in timed["cuda_graph"]
    )
    runner, _, _ = runner_for(
        tmp_path, "10.3.0", TWO_PROFILES, graph=lambda gpu: FakeGraphDriver(gpu, begin_result=900)
    )
    assert (
        "cuStreamBeginCapture failed (CUresult 900)"
        in runner.time(images(1), runs=1, warmup_ms=0)["cuda_graph"]
    )


def test_warm_up_is_time_based_and_repeats_report_a_median_each(tmp_path):
    runner, _, _ = runner_for(tmp_path, "10.3.0", TWO_PROFILES)
    timed = runner.time(images(1), warmup=1, runs=4, warmup_ms=30, repeats=3, use_graph=False)
    assert timed["warmup"]["ms"] >= 30 and timed["warmup"]["iterations"] >= 1
    assert len(timed["host_ms"]) == 12 and len(timed["repeat_p50"]["gpu_ms"]) == 3
    counted = runner.time(images(1), warmup=5, runs=1, warmup_ms=0, use_graph=False)
    assert counted["warmup"]["iterations"] == 5


# ------------------------------------------------------------------------------------------- reports


def test_layer_summary_counts_precisions_and_dla_layers():
    tensor = lambda text: {"Name": "t", "Format/Datatype": text}  # noqa: E731
    info = {
        "Layers": [
            {
                "Name": "a",
                "LayerType": "Conv",
                "Inputs": [tensor("Four wide channel vectorized row major Int8 format")],
            },
            {
                "Name": "b",
                "LayerType": "Conv",
                "Inputs": [tensor("Channel major FP16 format where channel % 8 == 0")],
            },
            {"Name": "c", "LayerType": "Gemm", "Inputs": [tensor("Row major linear FP32")]},
            {"Name": "d", "LayerType": "Shuffle", "Inputs": [tensor("Row major linear Int32")]},
            {"Name": "e", "LayerType": "DLA", "Inputs": [], "Outputs": [tensor("Half")]},
        ]
    }
    summary = trt_layers.summarise(json.dumps(info))
    assert summary["precision"] == {"INT8": 1, "FP16": 2, "FP32": 1, "other": 1, "unknown": 0}
    assert (summary["dla"], summary["gpu"], summary["detail"]) == (1, 4, "detailed")
    names = {"Layers": ["input to nvm", "{ForeignNode[conv1...fc]}", "logits from nvm", "{ForeignNode[x]}"]}
    assert trt_layers.summarise(names)["dla"] == 2 and trt_layers.summarise(names)["detail"] == "names only"
    myelin = trt_layers.summarise({"Layers": ["{ForeignNode[myelin]}"]})  # no nvm copies: DLA or GPU Myelin?
    assert myelin["dla"] == 0 and myelin["dla_uncertain"] and not trt_layers.summarise(info)["dla_uncertain"]


def test_dla_check_reports_implicit_int8_as_not_like_for_like(orin, monkeypatch):
    gpu, cuda, trt = fakes("10.3.0")
    install(monkeypatch, trt, cuda)
    report = check.run_check(
        str(orin), backend="tensorrt", dla_core=0, runs=2, warmup_ms=0, batches=(1, 4), cuda_graph=False
    )
    assert report["dla_core"] == 0 and report["int8_mode"] == "implicit" and report["profiles"] == [[1, 1, 1]]
    assert report["latency"]["batch_4"] == {"skipped": "outside the engine's profiles ['1-1']"}
    assert not report["vs_host"]["like_for_like"] and "calibrated implicitly" in report["vs_host"]["note"]
    assert report["layers"]["dla"] == 1 and report["acc"] == pytest.approx(4 / 9)
    wide = check.run_check(
        str(orin), backend="tensorrt", dla_core=0, dla_batch=4, runs=1, warmup_ms=0, cuda_graph=False
    )
    assert set(wide["latency"]) == {"batch_1", "batch_4"} and wide["latency_batch"] == 4  # its static batch
    assert wide["latency"]["batch_1"]["skipped"].startswith("outside") and not wide["within_budget"]


def test_compare_without_polygraphy_is_a_clear_skip(orin, monkeypatch):
    gpu, cuda, trt = fakes("10.3.0")
    install(monkeypatch, trt, cuda)
    monkeypatch.setitem(sys.modules, "polygraphy", None)
    report = check.run_check(
        str(orin), backend="tensorrt", runs=1, warmup_ms=0, compare=True, cuda_graph=False
    )
    assert (
        report["compare"]["skipped"].startswith("polygraphy is not importable")
        and "pip3 install" in (report["compare"]["skipped"])
    )


def fake_polygraphy(monkeypatch, fed):
    """Polygraphy's runner/comparator surface: the ORT side adds 0.01 to the fake engine's logits."""

    class Runner:
        def __init__(self, name, offset):
            self.name, self.offset = name, offset

    def run(runners, data_loader):
        fed.extend(data_loader)
        return {
            r.name: [{"logits": compute_logits(feed["input"]) + r.offset} for feed in data_loader]
            for r in runners
        }

    onnxrt = types.SimpleNamespace(
        OnnxrtRunner=lambda session: Runner("onnxrt", 0.01), SessionFromOnnx=lambda path, providers: path
    )
    trt_backend = types.SimpleNamespace(TrtRunner=lambda engine: Runner("trt", 0.0))
    comparator = types.SimpleNamespace(
        Comparator=types.SimpleNamespace(run=run, compare_accuracy=lambda results, compare_func: True),
        CompareFunc=types.SimpleNamespace(simple=lambda atol, rtol: (atol, rtol)),
    )
    for name, module in (
        ("polygraphy", types.SimpleNamespace()),
        ("polygraphy.backend", types.SimpleNamespace()),
        ("polygraphy.backend.onnxrt", onnxrt),
        ("polygraphy.backend.trt", trt_backend),
        ("polygraphy.comparator", comparator),
    ):
        monkeypatch.setitem(sys.modules, name, module)


def test_compare_through_polygraphy_feeds_the_real_probe_images(orin, monkeypatch):
    gpu, cuda, trt = fakes("10.3.0")
    install(monkeypatch, trt, cuda)
    fed = []
    fake_polygraphy(monkeypatch, fed)
    report = check.run_check(
        str(orin), backend="tensorrt", runs=1, warmup_ms=0, compare=True, cuda_graph=False
    )
    probes = check.load_probes(str(orin))
    np.testing.assert_array_equal(fed[0]["input"], probes["images"])  # clean images, then each probe's
    np.testing.assert_array_equal(fed[1]["input"], probes["triggered"][0])
    result = report["compare"]
    assert result["passed"] and result["onnx"] == "model.int8.onnx" and result["images"] == 18
    assert result["max_abs_diff"] == pytest.approx(0.01, abs=1e-5) and result["top1_agreement"] == 1.0
    assert result["atol"] == trt_compare.TOLERANCES["int8"]


def test_a_batch_sweep_times_every_batch_the_engine_takes(orin, monkeypatch):
    gpu, cuda, trt = fakes("10.3.0")
    install(monkeypatch, trt, cuda)
    report = check.run_check(
        str(orin), backend="tensorrt", runs=2, warmup_ms=0, sweep=True, batches=(3,), cuda_graph=False
    )
    assert list(report["latency"]) == [f"batch_{b}" for b in (1, 3, 8, 32, 64, 128, 256)]
    assert report["latency"]["batch_256"]["gpu_ms"]["throughput_ips"] == pytest.approx(256 / 0.25e-3)
    assert report["latency"]["batch_1"]["profile"] == 1 and report["latency"]["batch_32"]["profile"] == 0
    assert report["latency_batch"] == 1
    executed = [c[2] for c in trt.calls if c[0] == "execute_async_v3"]
    assert 256 in executed and 128 in executed


def test_parity_feeds_pad_a_static_batch_and_drop_the_padding():
    probes = {"images": np.arange(5, dtype=np.float32)[:, None], "triggered": []}
    feeds, real = trt_compare.probe_feeds(probes, "input", 2, 2)
    assert [len(f["input"]) for f in feeds] == [2, 2, 2] and real == [2, 2, 1]
    results = {"trt": [{"logits": f["input"] * 10} for f in feeds]}
    np.testing.assert_array_equal(
        trt_compare._outputs(results, "trt", "logits", real)[:, 0], np.arange(5) * 10
    )


# ------------------------------------------------------------------------------------------- host check


def test_the_host_check_builds_and_times_engines_through_the_bundles_runtime(orin, monkeypatch):
    (orin / "device").symlink_to(export_dir())  # the stage's runtime is export/ itself: one set of modules
    gpu, cuda, trt = fakes("10.3.0")
    install(monkeypatch, trt, cuda)
    runtime = load_device_module("trt_run", orin / "device")
    monkeypatch.setattr(runtime.cuda_graph, "load_driver", lambda: FakeGraphDriver(gpu))
    monkeypatch.setattr(host_check, "tensorrt_ready", lambda: True)
    probes = check.load_probes(str(orin))
    probe_set = ProbeSet(probes["images"], probes["labels"], {"patch": probes["triggered"][0]}, 9)
    reference = {
        "clean": compute_logits(probe_set.images),
        "patch": compute_logits(probe_set.triggered["patch"]),
    }
    patch = types.SimpleNamespace(name="patch", target=0)
    profile = load_profile("jetson-agx-orin")
    info, rows = host_check.check_tensorrt_precisions(
        orin, settings_for("jetson-agx-orin"), profile, reference, probe_set, [patch], warmup=1, runs=3
    )
    assert info["checked"] and info["in_profile_range"] and set(rows) == {"trt-int8", "trt-fp16"}
    engine = info["engines"]["int8"]
    assert (
        engine["timer"] == "cuda-graph" and engine["batch_1_profile"] == 1 and engine["layers"]["layers"] == 3
    )
    assert rows["trt-int8"].top1_agreement == 1.0 and rows["trt-int8"].acc == pytest.approx(4 / 9)
    assert rows["trt-int8"].latency_ms["p50"] == 0.25 and rows["trt-int8"].model == "model.int8.onnx"
    assert not list(orin.glob("*.engine"))  # built in a scratch folder, not in the bundle
    monkeypatch.setattr(host_check, "tensorrt_ready", lambda: False)
    assert host_check.check_tensorrt_precisions(
        orin, {}, profile, reference, probe_set, [patch], warmup=1, runs=3
    ) == ({"checked": False, "reason": "TensorRT, pycuda or a CUDA GPU is not available on this host"}, {})
