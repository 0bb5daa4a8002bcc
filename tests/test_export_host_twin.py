"""The host twin (`check.py --backend onnxruntime`, export/ort_twin.py) on every bundle precision, FP16 ones
(the Nano and TX2 profiles) included, and rkdtool's onnx-fp16 host row that it reproduces.

Real ONNX models run by ONNX Runtime's CPU provider: a Flatten+Gemm graph small enough to check against
numpy, and a WRN-10-1 exported the way bundles are. Where the FP16 copy cannot be made or run, the twin runs
the FP32 model, says so, and reproduces the host report's onnx-fp32 row.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from fake_tensorrt import write_tiny_bundle
from onnx import TensorProto, helper, numpy_helper

from rkdtool.deploy.host_check import ProbeSet, check_onnx_fp16
from rkdtool.deploy.onnx import export_onnx, onnx_logits, onnx_session
from rkdtool.models import build_model
from rkdtool.models.pixel import PixelSpaceModel
from rkdtool.resources import export_dir, load_device_module, load_profile

check = load_device_module("check")
ort_twin = load_device_module("ort_twin")


def linear_model() -> onnx.ModelProto:
    """input [batch, 3, 4, 4] -> Flatten -> Gemm (48 -> 10) -> logits, opset 13 (TensorRT 8.2's ceiling)."""
    rng = np.random.default_rng(7)
    weight = numpy_helper.from_array(rng.standard_normal((10, 48)).astype(np.float32) / 3, "weight")
    bias = numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "bias")
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "weight", "bias"], ["logits"], transB=1),
        ],
        "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def numpy_logits(model: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return images.reshape(len(images), -1) @ weights["weight"].T + weights["bias"]


def fp16_settings() -> dict:
    profile = {k: v for k, v in load_profile("jetson-nano").to_dict().items() if k != "path"}
    return {
        "target": "jetson-nano",
        "profile": profile,
        "input": {"name": "input", "shape": ["batch", 3, 4, 4]},
    }


@pytest.fixture
def fp16_bundle(tmp_path):
    """A jetson-nano bundle (precision fp16) with the device runtime in device/ and the host report's
    onnx-fp32 row of this model (no onnx-fp16 row yet)."""
    model = linear_model()
    write_tiny_bundle(tmp_path, fp16_settings(), onnx_bytes=model.SerializeToString())
    shutil.copytree(export_dir(), tmp_path / "device", ignore=shutil.ignore_patterns("__pycache__", "*.toml"))
    probes = check.load_probes(str(tmp_path))
    row = check.evaluate(lambda x: numpy_logits(model, x), probes)
    host = json.loads((tmp_path / "host_report.json").read_text())
    host["precisions"]["onnx-fp32"] = {"acc": row["acc"], "asr": row["asr"]}
    (tmp_path / "host_report.json").write_text(json.dumps(host))
    return tmp_path, model, row


def run_twin(bundle, **options):
    return check.run_check(str(bundle), backend="onnxruntime", runs=3, warmup_ms=0, batches=(1, 4), **options)


def add_host_row(bundle: Path, name: str, row: dict) -> None:
    host = json.loads((bundle / "host_report.json").read_text())
    host["precisions"][name] = row
    (bundle / "host_report.json").write_text(json.dumps(host))


# ------------------------------------------------------------------------------------------- the FP16 copy


def test_the_fp16_copy_has_fp16_weights_and_float32_io():
    half = ort_twin.half_precision(linear_model())
    assert [t.data_type for t in half.graph.initializer] == [TensorProto.FLOAT16] * 2
    ops = [n.op_type for n in half.graph.node]
    assert ops == ["Cast", "Flatten", "Gemm", "Cast"]
    assert half.graph.node[0].input[0] == "input" and half.graph.node[-1].output[0] == "logits"
    assert half.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    onnx.checker.check_model(half)


def test_the_fp16_copy_clamps_weights_to_the_fp16_range_and_keeps_resize_scales_float():
    model = linear_model()
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.full((10, 48), 1e6, np.float32), "weight"))
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    model.graph.initializer.append(scales)
    model.graph.node.insert(0, helper.make_node("Resize", ["input", "", "scales"], ["up"], mode="nearest"))
    model.graph.node[1].input[0] = "up"
    half = ort_twin.half_precision(model)
    kept = {t.name: numpy_helper.to_array(t) for t in half.graph.initializer}
    assert kept["weight"].dtype == np.float16 and np.all(kept["weight"] == 65504)  # no inf
    assert kept["scales"].dtype == np.float32  # Resize takes tensor(float) scales whatever T is


def test_a_graph_with_subgraphs_is_not_converted():
    model = linear_model()
    branch = helper.make_graph(
        [], "branch", [], [helper.make_tensor_value_info("flat", TensorProto.FLOAT, None)]
    )
    model.graph.node.append(helper.make_node("If", ["cond"], ["x"], then_branch=branch, else_branch=branch))
    with pytest.raises(ValueError, match="holds a subgraph"):
        ort_twin.half_precision(model)


def test_the_fp16_copy_of_an_exported_wrn_runs_on_onnx_runtime_close_to_fp32(tmp_path):
    torch.manual_seed(0)
    model = PixelSpaceModel(build_model("wrn10-1", 10), (0.5,) * 3, (0.25,) * 3).eval()
    path = tmp_path / "model.onnx"
    export_onnx(model, path, input_shape=(3, 32, 32), opset=13, exporter="torchscript", max_batch=64)
    half, why = ort_twin.fp16_model(str(path))
    assert why is None
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(half, options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((8, 3, 32, 32), dtype=np.float32)
    fp32 = onnx_logits(onnx_session(path, optimize=False), x)
    fp16 = session.run(None, {"input": x})[0]
    assert fp16.dtype == np.float32
    error = float(np.abs(fp16 - fp32).max())
    assert 0 < error < 1e-2 * float(np.abs(fp32).max())  # FP16 rounding: close, and not the FP32 result


# ------------------------------------------------------------------------------------------- the twin


def test_fp16_bundle_runs_fp16_and_reproduces_the_host_fp16_row(fp16_bundle):
    bundle, model, _ = fp16_bundle
    twin = ort_twin.OrtBackend(str(bundle), "fp16")
    assert twin.precision_run == "fp16" and "FP16 rounding, not TensorRT's FP16 kernels" in twin.note
    x = np.random.default_rng(2).random((6, 3, 4, 4), dtype=np.float32)
    error = np.abs(twin.infer(x) - numpy_logits(model, x)).max()
    assert 0 < error < 0.05
    probes = check.load_probes(str(bundle))
    probe_set = ProbeSet(probes["images"], probes["labels"], {"patch": probes["triggered"][0]}, 9)
    reference = {
        "clean": numpy_logits(model, probes["images"]),
        "patch": numpy_logits(model, probe_set.triggered["patch"]),
    }
    fake_probe = type("P", (), {"name": "patch", "target": 0})()
    rows = check_onnx_fp16(bundle, reference, probe_set, [fake_probe], warmup=1, runs=3)
    row = rows["onnx-fp16"].to_dict()
    assert row["model"] == "model.onnx (FP16 copy)" and row["latency_ms"]["p50"] > 0
    add_host_row(bundle, "onnx-fp16", row)
    report = run_twin(bundle)
    assert report["precision"] == report["precision_run"] == "fp16"
    assert report["vs_host"]["precision"] == "onnx-fp16" and report["vs_host"]["like_for_like"]
    assert report["acc"] == pytest.approx(row["acc"]) and report["asr"] == pytest.approx(row["asr"])
    assert report["vs_host"]["acc_delta"] == pytest.approx(0)


def test_fp16_bundle_without_a_host_fp16_row_is_compared_with_fp32_and_says_so(fp16_bundle):
    bundle, _, _ = fp16_bundle
    report = run_twin(bundle)
    assert report["precision_run"] == "fp16" and report["vs_host"]["precision"] == "onnx-fp32"
    assert not report["vs_host"]["like_for_like"] and "no onnx-fp16 row" in report["vs_host"]["note"]


def test_without_onnx_the_fp16_bundle_runs_fp32_says_so_and_matches_the_host(fp16_bundle, monkeypatch):
    bundle, _, row = fp16_bundle
    monkeypatch.setitem(sys.modules, "onnx", None)
    report = run_twin(bundle)
    assert report["precision"] == "fp16" and report["precision_run"] == "fp32"
    assert "ran the FP32 model" in report["note"] and "onnx module is not installed" in report["note"]
    assert report["acc"] == row["acc"] and report["asr"] == row["asr"]
    assert report["vs_host"]["precision"] == "onnx-fp32" and report["vs_host"]["like_for_like"]
    assert report["vs_host"]["acc_delta"] == 0 and set(report["latency"]) == {"batch_1", "batch_4"}
    assert check_onnx_fp16(bundle, {}, None, [], warmup=0, runs=1) == {}  # no host row either


def test_a_copy_onnx_runtime_cannot_run_falls_back_to_fp32(fp16_bundle, monkeypatch):
    bundle, _, _ = fp16_bundle
    real = ort_twin.half_precision

    def broken(model):
        bad = real(model)
        bad.graph.node[1].op_type = "NoSuchOp"
        return bad

    monkeypatch.setattr(ort_twin, "half_precision", broken)
    twin = ort_twin.OrtBackend(str(bundle), "fp16")
    assert twin.precision_run == "fp32" and "ONNX Runtime could not run the FP16 model" in twin.note


def test_check_main_prints_what_precision_ran(fp16_bundle, monkeypatch, capsys):
    bundle, _, _ = fp16_bundle
    argv = [str(bundle), "--backend", "onnxruntime", "--runs", "2", "--warmup-ms", "0", "--repeats", "2"]
    assert check.main(argv) == 0
    assert "(onnxruntime, fp16)" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert check.main(argv) == 0
    out = capsys.readouterr().out
    assert (
        "jetson-nano on" in out and "(onnxruntime, fp16 run as fp32)" in out and "note: the bundle's" in out
    )
    report = json.loads((bundle / "device_report.json").read_text())
    assert len(report["latency"]["batch_1"]["repeat_p50"]["host_ms"]) == 2
    assert report["latency_timer"].startswith("perf_counter")


def test_int8_and_fp32_twins_run_their_own_models(fp16_bundle):
    bundle, _, _ = fp16_bundle
    for precision, model_file in (("int8", "model.int8.onnx"), ("fp32", "model.onnx")):
        twin = ort_twin.OrtBackend(str(bundle), precision)
        assert (twin.model_file, twin.precision_run, twin.note) == (model_file, precision, None)
    with pytest.raises(check.DeviceError, match="--dla needs the tensorrt backend"):
        run_twin(bundle, dla_core=0)


def test_check_py_runs_as_a_script_from_the_bundles_device_folder(fp16_bundle):
    # On the board: `python3 device/check.py .`, the siblings imported by plain name from device/.
    bundle, _, row = fp16_bundle
    done = subprocess.run(
        [
            sys.executable,
            "device/check.py",
            ".",
            "--backend",
            "onnxruntime",
            "--runs",
            "2",
            "--warmup-ms",
            "0",
        ],
        cwd=bundle,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ""},
    )
    assert done.returncode == 0, done.stderr
    assert "ACC" in done.stdout and "power mode" in done.stdout
    report = json.loads((bundle / "device_report.json").read_text())
    assert report["precision_run"] == "fp16" and abs(report["acc"] - row["acc"]) <= 1 / 9


def test_a_tensorrt_fp16_run_is_compared_with_the_fp16_row_where_there_is_one(fp16_bundle):
    bundle, _, _ = fp16_bundle
    name, _, like, note = check.host_reference(str(bundle), "fp16", None, "tensorrt")
    assert (name, like) == ("onnx-fp32", False) and "no onnx-fp16 row" in note
    add_host_row(bundle, "onnx-fp16", {"acc": 0.5, "asr": {"patch": 0.0}})
    name, row, like, note = check.host_reference(str(bundle), "fp16", None, "tensorrt")
    assert (name, row["acc"], like) == ("onnx-fp16", 0.5, True) and "TensorRT FP16 kernels" in note
    assert check.host_reference(str(bundle), "fp32", None, "tensorrt")[:1] == ("onnx-fp32",)
