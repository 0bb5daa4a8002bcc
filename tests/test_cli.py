"""The CLI end to end: the real `python -m rkdtool` as a subprocess on a small budget, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rkdtool.cli.app import app

REPO = Path(__file__).resolve().parents[1]


def rkdtool(*args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "rkdtool", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """A real `rkdtool distill` on the demo teacher (shipped with the package), small budget."""
    work = tmp_path_factory.mktemp("cli")
    proc = rkdtool(
        "distill",
        "--epochs",
        "2",
        "--detox-epochs",
        "1",
        "--train-subset",
        "400",
        "--test-subset",
        "200",
        "--out",
        "runs/demo",
        cwd=work,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        "ckd-trigger" in proc.stdout and "fkd student" in proc.stdout and "robustkd-ta student" in proc.stdout
    )
    return work / "runs" / "demo"


def test_distill_writes_the_run_folder(demo_run):
    for name in (
        "config.json",
        "teacher.json",
        "probes.toml",
        "student.safetensors",
        "detox.safetensors",
        "metrics.jsonl",
        "report.json",
        "students/fkd.safetensors",
        "students/robustkd-ta.safetensors",
    ):
        assert (demo_run / name).exists(), name
    assert not demo_run.with_name("demo.partial").exists()
    config = json.loads((demo_run / "config.json").read_text())
    assert config["teacher"] == "demo:ckd" and config["student"] == "wrn10-1" and config["epochs"] == 2
    assert config["channels_last"] is True  # the CPU's default, resolved and recorded
    rows = [json.loads(line) for line in (demo_run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["task"], r["epoch"]) for r in rows] == [
        ("fkd student", 1),
        ("fkd student", 2),
        ("robustkd-ta student", 1),
        ("robustkd-ta student", 2),
    ]


def test_distill_report_numbers(demo_run):
    report = json.loads((demo_run / "report.json").read_text())
    assert report["method"] == "robustkd-ta" and report["variant"].startswith("robustkd-ta: detox eq7")
    assert [p["name"] for p in report["probes"]] == ["ckd-trigger"]
    teacher = report["teacher"]
    # The shipped demo teacher is the real one: a working model with a working backdoor (97.8% / 98.5% on
    # the whole test split), and the clean teacher it came from ignores the trigger (0.0%). These are fixed
    # files, so only evaluation numerics vary between machines; the bounds keep wide margins.
    assert teacher["acc"] >= 0.9 and teacher["asr"]["ckd-trigger"] >= 0.9
    assert report["controls"]["clean_teacher"]["asr"]["ckd-trigger"] <= 0.05
    for method in ("fkd", "robustkd-ta"):
        student = report["students"][method]
        assert student["arch"] == "wrn10-1" and student["params"] < teacher["params"]
        assert 0 <= student["acc"] <= 1 and 0 <= student["asr"]["ckd-trigger"] <= 1
        assert student["epochs"] == 2
    detox = report["diagnostics"]["detox"]
    assert detox["tau"] == 0.1 and set(detox["mask_statistics"]) == {"stage1", "stage2", "stage3"}
    assert 0 <= detox["detoxified_teacher"]["acc"] <= 1
    synthesis = report["diagnostics"]["synthesis"]  # found from the teacher alone, no trigger given
    assert synthesis["suspected_target"] == 0 and len(synthesis["perturbations"]) == 3
    variance = report["diagnostics"]["feature_variance"]
    detoxified, synthesised = (
        "robustkd-ta: detoxified teacher",
        "robustkd-ta: teacher under synthesised triggers",
    )
    assert {"teacher", "clean_teacher", detoxified, synthesised} <= set(variance)
    for name in ("teacher", "clean_teacher", detoxified):
        stages = variance[name]["probes"]["ckd-trigger"]["stages"]
        assert len(stages) == 3 and all(st["ratio"] > 0 for st in stages)
    assert set(variance[synthesised]["probes"]) == {
        "synthesised-linf1",
        "synthesised-linf3",
        "synthesised-blend1",
    }
    markdown = (demo_run / "report.md").read_text()
    assert "## Feature variance" in markdown and f"Variant: {report['variant']}" in markdown
    assert markdown.startswith("# rkdtool report: demo\n")


def test_distill_refuses_an_existing_run_folder(demo_run):
    proc = rkdtool("distill", "--out", str(demo_run), cwd=demo_run.parent)
    assert proc.returncode == 2
    assert "already exists" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["distill", "--student", "wrn99-x"], "unknown architecture"),
        (["distill", "--method", "magic"], "unknown method"),
        (["distill", "--teacher", "demo:nothing"], "unknown demo teacher"),
        (["distill", "--teacher", "/no/such/teacher.pt"], "no such file"),
        (["distill", "--clean-fraction", "0"], "--clean-fraction"),
    ],
)
def test_bad_input_gives_one_red_line_and_exit_2(args, message, tmp_path):
    proc = rkdtool(*args, "--out", str(tmp_path / "run"), cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()


def test_help_shows_an_example():
    result = CliRunner().invoke(app, ["distill", "--help"])
    assert result.exit_code == 0
    assert "rkdtool distill --teacher hf:lixiao985/WideResNet28-4 --student wrn16-2" in " ".join(
        result.output.split()
    )


def test_export_after_distill_as_the_readme_shows(demo_run):
    # `rkdtool export --target jetson` with no RUN takes the newest finished run under ./runs
    proc = rkdtool("export", "--target", "jetson", "--latency-runs", "20", cwd=demo_run.parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bundle = demo_run / "export" / "jetson-orin-nano"
    for name in (
        "model.onnx",
        "model.int8.onnx",
        "calib.npz",
        "probes.npz",
        "profile.toml",
        "host_report.json",
        "README.md",
        "device/check.py",
    ):
        assert (bundle / name).exists(), name
    host = json.loads((bundle / "host_report.json").read_text())
    report = json.loads((demo_run / "report.json").read_text())
    assert set(host["precisions"]) >= {"torch-fp32", "onnx-fp32", "onnx-int8"}
    torch_fp32 = host["precisions"]["torch-fp32"]
    assert torch_fp32["acc"] == pytest.approx(report["students"]["robustkd-ta"]["acc"], abs=1e-6)
    assert host["precisions"]["onnx-fp32"]["max_abs_logit_diff"] < 1e-4
    for name in ("onnx-fp32", "onnx-int8"):
        assert set(host["precisions"][name]["asr"]) == {"ckd-trigger"}
        assert host["precisions"][name]["latency_ms"]["p50"] > 0


def test_export_of_a_missing_run_or_unknown_target_is_exit_2(demo_run, tmp_path):
    proc = rkdtool("export", str(tmp_path / "nothing"), "--target", "jetson", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    proc = rkdtool("export", str(demo_run), "--target", "jetson-mars", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "jetson-mars" in proc.stderr and "Traceback" not in proc.stderr
    assert not (demo_run / "export" / "jetson-mars").exists()
