"""The export stage on a small really trained model: ONNX parity, INT8 Q/DQ structure and agreement, the
bundle's files and host report, the device check on it with ONNX Runtime, and failures that leave nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from rkdtool.cli import main
from rkdtool.cli.app import app
from rkdtool.cli.tables import export_table, split_agreement_line
from rkdtool.data import load_dataset
from rkdtool.deploy.bench import bench_path
from rkdtool.deploy.bundle import export_bundle
from rkdtool.deploy.host_check import select_probe_set
from rkdtool.deploy.onnx import export_onnx, load_pixel_model, onnx_logits, onnx_session
from rkdtool.errors import UsageError
from rkdtool.models import build_model
from rkdtool.models.pixel import PixelSpaceModel
from rkdtool.probes.metrics import accuracy, attack_success_rate
from rkdtool.probes.spec import load_probes
from rkdtool.resources import load_profile
from rkdtool.runs import open_run
from rkdtool.training import ClassifierRecipe, seed_everything, train_classifier
from rkdtool.weights import save_weights

PROBES_TOML = """
[[probe]]
name = "patch"
kind = "patch"
target = 0
pattern = "white"
size = 4

[[probe]]
name = "blend"
kind = "blend"
pattern = "noise:3"
alpha = 0.3
"""


def write_run(folder: Path, model: torch.nn.Module, arch: str, data) -> Path:
    """Writes a run folder the way runs.py describes it: config.json, student.safetensors, probes.toml."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"data": "digits", "seed": 0}))
    meta = {"arch": arch, "num_classes": 10, "input_size": 32, "mean": list(data.mean), "std": list(data.std)}
    save_weights(folder / "student.safetensors", model, meta)
    (folder / "probes.toml").write_text(PROBES_TOML)
    return folder


def test_profile(tmp_path: Path, **changes: str) -> Path:
    """Writes a copy of the cpu profile with edits (a faster TorchScript export, fewer calibration images)."""
    text = load_profile("cpu").path.read_text()
    for old, new in changes.items():
        text = text.replace(old, new)
    path = tmp_path / "profile.toml"
    path.write_text(text)
    return path


test_profile.__test__ = False  # a helper, not a test


def train_wrn10(epochs: int) -> tuple[torch.nn.Module, object]:
    """Gives back a WRN-10-1 trained on digits (step schedule, lr 0.1) and the data; channels_last halves
    the CPU time of these small convolutions."""
    data = load_dataset("digits")
    model = build_model("wrn10-1", 10).to(memory_format=torch.channels_last)
    train_classifier(
        model,
        data,
        ClassifierRecipe(epochs=epochs, batch_size=64, lr=0.1),
        generator=seed_everything(0),
        device=torch.device("cpu"),
        transform=lambda x, y, _g: (x.contiguous(memory_format=torch.channels_last), y),
    )
    return model.eval(), data


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    # Six epochs give confident margins (about 97% test accuracy): INT8 then flips only near-ties.
    model, data = train_wrn10(epochs=6)
    return write_run(tmp_path_factory.mktemp("run") / "run", model, "wrn10-1", data)


@pytest.fixture(scope="module")
def bundle(run_dir) -> tuple[Path, dict]:
    """The bundle for `--target jetson` (Orin Nano: dynamo exporter, opset 18, percentile calibration)."""
    report = export_bundle(open_run(run_dir), load_profile("jetson"), latency_warmup=2, latency_runs=10)
    return run_dir / "export" / "jetson-orin-nano", report


@pytest.fixture(scope="module")
def student(run_dir) -> PixelSpaceModel:
    return load_pixel_model(run_dir / "student.safetensors")[0]


# ------------------------------------------------------------------------------------------- the bundle


def test_bundle_has_every_file_and_nothing_half_written(bundle):
    path, report = bundle
    names = {p.name for p in path.iterdir()}
    assert names == {
        "model.onnx",
        "model.int8.onnx",
        "calib.npz",
        "probes.npz",
        "profile.toml",
        "device",
        "host_report.json",
        "README.md",
    }
    assert {p.name for p in (path / "device").iterdir()} >= {"check.py", "trt_build.py", "trt_run.py"}
    assert not (path / "device" / "ruff.toml").exists()
    assert sorted(report["files"]) == sorted(names)
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no staging folders left
    assert json.loads((path / "host_report.json").read_text()) == json.loads(json.dumps(report))
    assert (path / "profile.toml").read_text() == load_profile("jetson-orin-nano").path.read_text()


def test_host_report_follows_design_section_5(bundle):
    _, report = bundle
    assert report["target"] == "jetson-orin-nano"
    assert set(report["precisions"]) == {"torch-fp32", "onnx-fp32", "onnx-int8"}
    for row in report["precisions"].values():
        assert 0 <= row["acc"] <= 1 and set(row["asr"]) == {"patch", "blend"}
        assert set(row["latency_ms"]) >= {"p50", "p90", "p99"} and row["latency_ms"]["p50"] > 0
        assert row["max_abs_logit_diff"] >= 0 and 0 <= row["top1_agreement"] <= 1
    assert report["input"]["range"] == [0.0, 1.0] and report["input"]["shape"] == ["batch", 3, 32, 32]
    assert report["probe_images"] == report["probe_images_total"] == 360
    assert report["tensorrt"]["checked"] is False and "not available" in report["tensorrt"]["reason"]


def test_torch_numbers_are_rkdtool_metrics(bundle, run_dir):
    _, report = bundle
    run = open_run(run_dir)
    model, meta = run.student()
    data = run.data()
    probes = {p.name: p.bind(meta["mean"], meta["std"]) for p in load_probes(run.probe_spec)}
    kw = {"mean": meta["mean"], "std": meta["std"]}
    torch_row = report["precisions"]["torch-fp32"]
    assert torch_row["acc"] == pytest.approx(accuracy(model, data.test_images, data.test_labels, **kw))
    patch_asr = attack_success_rate(model, data.test_images, data.test_labels, probes["patch"], **kw)
    assert torch_row["asr"]["patch"] == pytest.approx(patch_asr)
    assert torch_row["acc"] > 0.9  # the model is really trained (measured 96.1-97.8% over the settings above)


def test_onnx_fp32_matches_torch(bundle):
    _, report = bundle
    fp32, torch_row = report["precisions"]["onnx-fp32"], report["precisions"]["torch-fp32"]
    assert fp32["max_abs_logit_diff"] < 1e-4 and fp32["top1_agreement"] == 1.0
    assert fp32["acc"] == torch_row["acc"] and fp32["asr"] == torch_row["asr"]


def test_onnx_graph_bakes_in_normalisation_with_a_dynamic_batch(bundle):
    path, _ = bundle
    model = onnx.load(str(path / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 18
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 32, 32]
    assert [n.op_type for n in model.graph.node[:2]] == ["Sub", "Div"]
    assert not list(path.glob("*.data"))  # weights inside the file


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_onnx_runtime_fp32_parity_per_batch_size(bundle, student, batch):
    path, _ = bundle
    x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        expected = student(x).numpy()
    got = onnx_session(path / "model.onnx").run(None, {"input": x.numpy()})[0]
    assert got.shape == (batch, 10)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_torchscript_export_at_opset_13_keeps_parity(student, tmp_path):
    path = tmp_path / "m13.onnx"
    export_onnx(student, path, input_shape=(3, 32, 32), opset=13, exporter="torchscript")
    model = onnx.load(str(path))
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 13
    x = torch.rand(7, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = student(x).numpy()
    np.testing.assert_allclose(onnx_session(path).run(None, {"input": x.numpy()})[0], expected, atol=1e-4)
    with pytest.raises(UsageError, match="unknown exporter"):
        export_onnx(student, tmp_path / "x.onnx", input_shape=(3, 32, 32), opset=17, exporter="tflite")


def test_int8_graph_meets_tensorrt_qdq_rules(bundle):
    # edge.md §8: zero points 0 and int8, per-channel conv weight scales of length C_out, no bias DQ,
    # no Q/DQ on BatchNormalization parameters, opset >= 13. Checked on the graph, not only via qdq_summary.
    path, report = bundle
    model = onnx.load(str(path / "model.int8.onnx"))
    init = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for node in qdq:
        zero_point = init[node.input[2]]
        assert zero_point.dtype == np.int8 and not zero_point.any()
    producers = {n.output[0]: n for n in model.graph.node}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert convs
    for conv in convs:
        weight_dq = producers[conv.input[1]]
        assert weight_dq.op_type == "DequantizeLinear"
        weight, scale = init[weight_dq.input[0]], init[weight_dq.input[1]]
        assert weight.dtype == np.int8 and scale.shape == (weight.shape[0],)
        assert producers[conv.input[0]].op_type == "DequantizeLinear"  # activations quantised too
        if len(conv.input) > 2:
            assert conv.input[2] in init and init[conv.input[2]].dtype == np.float32  # bias stays float
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            assert all(name in init for name in node.input[1:])
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 13
    graph = report["int8"]["graph"]
    assert graph["all_zero_points_zero"] and graph["per_channel_conv_weights"]
    assert graph["bias_dequantize_nodes"] == 0 and graph["batchnorm_param_dequantize_nodes"] == 0
    assert graph["domains"] == ["ai.onnx"]  # ORT's pre-processing imports pruned


def test_int8_agrees_with_fp32_on_98_percent_of_the_digits_test_set(bundle, run_dir):
    # Q/DQ run as written (TensorRT's semantics), on the clean test images. Measured on an AMD EPYC
    # (AVX-512, VNNI) with default kernels, AVX2 kernels and one thread: clean agreement 100.0 / 99.7 /
    # 100.0%, clean and triggered 99.5 / 99.3 / 98.9%, ACC change 0.0 / -0.3 / 0.0 points. 98% and not 99%
    # on the clean split: ONNX Runtime's INT8 kernels differ by CPU (VNNI or not), and the demo student's
    # export agreed on 98.9% on an Intel Xeon (issue 11); a broken quantisation falls far below either.
    path, report = bundle
    test_images = open_run(run_dir).data().test_images.numpy()
    fp32 = onnx_logits(onnx_session(path / "model.onnx"), test_images)
    int8 = onnx_logits(onnx_session(path / "model.int8.onnx", optimize=False), test_images)
    assert float((fp32.argmax(1) == int8.argmax(1)).mean()) >= 0.98
    rows = report["precisions"]
    # Over clean and triggered images together (the blend probe's noisy images have smaller margins).
    assert rows["onnx-int8"]["top1_agreement"] >= 0.97
    assert abs(rows["onnx-int8"]["acc"] - rows["onnx-fp32"]["acc"]) <= 0.01
    assert rows["onnx-int8"]["max_abs_logit_diff"] > 0  # it really is a different, quantised model
    # The host report measures the same on the whole split (torch-fp32 is its reference; ONNX FP32 agrees
    # with torch on every image, test_onnx_fp32_matches_torch).
    split = report["test_split_agreement"]
    assert split["images"] == len(test_images) == 360 and split["reference"] == "torch-fp32"
    differ = int((fp32.argmax(1) != int8.argmax(1)).sum())
    assert split["models"]["onnx-int8"]["disagreeing_images"] == differ
    assert split["models"]["onnx-int8"]["top1_agreement"] == pytest.approx(1 - differ / 360)
    assert split["models"]["onnx-fp32"]["disagreeing_images"] == 0
    assert "on all 360 clean test images: onnx-fp32 100.00% (0 differ)" in (path / "README.md").read_text()


def test_calibration_uses_clean_training_images_only(bundle, run_dir):
    path, report = bundle
    calib = np.load(path / "calib.npz")["images"]
    data = open_run(run_dir).data()
    assert calib.shape == (512, 3, 32, 32) and report["int8"]["calibration_images"] == 512
    train = {row.tobytes() for row in data.train_images.numpy()}
    test = {row.tobytes() for row in data.test_images.numpy()}
    assert all(row.tobytes() in train for row in calib)
    assert not any(row.tobytes() in test for row in calib)


def test_probes_npz_holds_what_the_board_needs(bundle, run_dir):
    path, _ = bundle
    run = open_run(run_dir)
    data = run.data()
    stored = np.load(path / "probes.npz")
    assert list(stored["probe_names"]) == ["patch", "blend"] and list(stored["targets"]) == [0, -1]
    np.testing.assert_array_equal(stored["images"], data.test_images.numpy())
    np.testing.assert_array_equal(stored["labels"], data.test_labels.numpy())
    patch = load_probes(run.probe_spec)[0].bind(data.mean, data.std)
    np.testing.assert_allclose(stored["triggered_0"], patch.apply(data.test_images).numpy())


def test_probe_images_are_capped_and_recorded(run_dir):
    data = load_dataset("digits")
    probes = [p.bind(data.mean, data.std) for p in load_probes(open_run(run_dir).probe_spec)]
    probe_set = select_probe_set(data, probes, mean=data.mean, std=data.std, limit=50, seed=0)
    assert len(probe_set.labels) == 50 and probe_set.total == 360
    assert set(probe_set.triggered) == {"patch", "blend"} and probe_set.triggered["blend"].shape == (
        50,
        3,
        32,
        32,
    )


def test_readme_tells_how_to_run_on_the_board(bundle):
    path, report = bundle
    readme = (path / "README.md").read_text()
    assert "python3 device/check.py ." in readme and "pixel values in [0, 1]" in readme
    assert "| onnx-int8 |" in readme and str(report["input"]["mean"]) in readme


def test_device_check_with_onnx_runtime_reproduces_the_host_int8_numbers(bundle):
    path, report = bundle
    done = subprocess.run(
        [
            sys.executable,
            str(path / "device" / "check.py"),
            str(path),
            "--backend",
            "onnxruntime",
            "--runs",
            "5",
            "--warmup",
            "1",
            "--batch",
            "1",
            "--batch",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    device = json.loads((path / "device_report.json").read_text())
    host = report["precisions"]["onnx-int8"]
    assert device["precision"] == "int8" and device["backend"] == "onnxruntime"
    assert device["acc"] == pytest.approx(host["acc"]) and device["vs_host"]["acc_delta"] == pytest.approx(0)
    assert device["asr"] == pytest.approx(host["asr"])
    assert set(device["latency"]) == {"batch_1", "batch_4"} and device["latency_ms"]["p50"] > 0
    assert "ACC" in done.stdout and "power mode" in done.stdout
    (path / "device_report.json").unlink()


def test_bench_on_the_bundle_times_both_onnx_models(bundle):
    path, _ = bundle
    report = bench_path(path, batch_sizes=(1, 4), warmup=1, runs=3)
    rows = [(r.model, r.precision, r.batch) for r in report.results]
    assert rows == [
        ("model.onnx", "fp32", 1),
        ("model.onnx", "fp32", 4),
        ("model.int8.onnx", "int8", 1),
        ("model.int8.onnx", "int8", 4),
    ]


def test_export_table_renders_each_precision(bundle):
    _, report = bundle
    console = Console(record=True, width=200)
    console.print(export_table(report))
    text = console.export_text()
    assert all(name in text for name in ("torch-fp32", "onnx-fp32", "onnx-int8", "ASR patch", "ASR blend"))
    line = split_agreement_line(report)
    assert line.startswith(
        "top-1 agreement with torch-fp32 on all 360 test images: onnx-fp32 100.0% (0 differ)"
    )
    assert split_agreement_line({**report, "test_split_agreement": None}) is None  # bundles made before


# ------------------------------------------------------------------------------------------- failures


def test_a_failed_export_leaves_no_bundle_and_keeps_the_old_one(run_dir, tmp_path, monkeypatch):
    def broken_quantize(fp32_path, int8_path, calib, *, method):
        int8_path.write_bytes(b"half")
        raise RuntimeError("calibration crashed")

    monkeypatch.setattr("rkdtool.deploy.bundle.quantize_int8", broken_quantize)
    profile = load_profile(
        test_profile(tmp_path, **{"opset = 18": "opset = 17", '"dynamo"': '"torchscript"'})
    )
    out = tmp_path / "bundles" / "cpu"
    with pytest.raises(RuntimeError, match="calibration crashed"):
        export_bundle(open_run(run_dir), profile, out)
    assert not out.exists() and list(out.parent.iterdir()) == []
    out.mkdir()
    (out / "host_report.json").write_text("{}")
    with pytest.raises(RuntimeError):
        export_bundle(open_run(run_dir), profile, out)
    assert [p.name for p in out.parent.iterdir()] == ["cpu"] and (
        out / "host_report.json"
    ).read_text() == "{}"


def test_export_rejects_bad_arguments(run_dir):
    with pytest.raises(UsageError, match="max_probe_images"):
        export_bundle(open_run(run_dir), load_profile("cpu"), max_probe_images=0)


def test_cli_export_missing_run_is_one_red_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["rkdtool", "export", str(tmp_path / "nope"), "--target", "jetson"])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "does not exist" in lines[0]


def test_cli_export_unknown_target_exits_2_with_the_known_ones(run_dir):
    done = subprocess.run(
        [sys.executable, "-m", "rkdtool", "export", str(run_dir), "--target", "jetson-thor"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown target 'jetson-thor'" in lines[0] and "jetson-orin-nano" in lines[0]
    assert not (run_dir / "export" / "jetson-thor").exists()


def test_cli_commands_show_an_example_in_help():
    runner = CliRunner()
    for command in ("export", "bench", "targets", "info"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0 and f"rkdtool {command}" in result.output, command


def test_cli_targets_and_info_as_json():
    runner = CliRunner()
    targets = json.loads(runner.invoke(app, ["targets", "--json"]).stdout)
    assert targets["aliases"] == {"jetson": "jetson-orin-nano"} and len(targets["targets"]) == 9
    info = json.loads(runner.invoke(app, ["info", "--json"]).stdout)
    assert info["torch"] == torch.__version__ and "onnxruntime" in info and "tensorrt" in info


# ------------------------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_cli_export_json_writes_the_bundle(run_dir, tmp_path):
    profile = test_profile(tmp_path, **{"opset = 18": "opset = 17", '"dynamo"': '"torchscript"'})
    out = tmp_path / "bundle"
    result = CliRunner().invoke(
        app,
        [
            "export",
            str(run_dir),
            "--target",
            str(profile),
            "--out",
            str(out),
            "--json",
            "--latency-runs",
            "5",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == json.loads((out / "host_report.json").read_text())
    table = CliRunner().invoke(
        app, ["export", str(run_dir), "--target", str(profile), "--out", str(out), "--latency-runs", "5"]
    )
    # The table's cells are checked at full width in test_export_table_renders_each_precision.
    assert table.exit_code == 0 and "rkdtool export cpu" in table.output and "bundle:" in table.output


def test_calibration_reader_feeds_equal_batches():
    # ORT's entropy/percentile collectors stack per-batch outputs: a short last batch breaks them
    from rkdtool.deploy.int8 import calibration_reader

    reader = calibration_reader(np.zeros((40, 3, 32, 32), dtype=np.float32), batch_size=32)
    sizes = []
    while (batch := reader.get_next()) is not None:
        sizes.append(len(next(iter(batch.values()))))
    assert sizes == [32]
    small = calibration_reader(np.zeros((5, 3, 32, 32), dtype=np.float32), batch_size=32)
    assert len(next(iter(small.get_next().values()))) == 5
