"""Bad invocations across every command: each gives one red line on stderr, exit code 2, and writes nothing.

Run in-process through `rkdtool.cli.main` (the console script's entry point), in a folder holding a small
teacher, probe specs good and bad, a text file and an existing folder; every path the command would write
is inside that folder, so "writes nothing" is checked by comparing its contents before and after.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from rkdtool.cli import main
from rkdtool.models import build_model
from rkdtool.weights import save_weights

T = "file:teacher.safetensors"  # a WRN-16-1 on digits' 10 classes
FAST = ["--student", "wrn10-1", "--probe", "good.toml"]  # valid, so that only the bad option speaks

CASES = [
    # distill: names, ranges and choices
    (["distill", "--student", "wrn99-x"], "unknown architecture"),
    (["distill", "--method", "magic"], "unknown method"),
    (["distill", "--clean-fraction", "0"], "--clean-fraction"),
    (["distill", "--tau", "-1"], "--tau must be > 0"),
    (["distill", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["distill", "--lr", "-0.1"], "--lr must be > 0"),
    (["distill", "--eval-every", "0"], "--eval-every must be >= 1"),
    (["distill", "--iga-lambda", "-1"], "--iga-lambda must be >= 0"),
    (["distill", "--data-free", "--method", "fkd"], "--data-free distills by ZSKT"),
    (["distill", "--data-free", "--iga-lambda", "1"], "--data-free uses no training images"),
    (["distill", "--data-free", "--abd-sv"], "with --data-free, --method abd has the vaccine"),
    (["distill", "--method", "kdiga", "--abd-sv"], "--abd-sv re-weights the feature term"),
    (["distill", "--detox-form", "eq99"], "--detox-form must be one of eq7, eq15"),
    (["distill", "--detox-stages", "middle"], "--detox-stages must be one of"),
    (["distill", "--detox-loss", "var+magic"], "--detox-loss"),
    (["distill", "--teacher-bn", "frozen"], "--teacher-bn must be one of eval, train"),
    (["distill", "--synth-pool", "nonsense"], "--synth-pool joins uap, bank and noise"),
    (["distill", "--refresh-kind", "blend"], "--refresh-kind must be one of linf1, linf3, blend1"),
    (["distill", "--refresh-budget", "0"], "--refresh-budget must be > 0 and <= 1, got 0.0"),
    (["distill", "--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N"),
    (["distill", "--epochs", "x"], "Invalid value for '--epochs'"),
    (["distill", "--nope"], "No such option: --nope"),
    (["distill", "--out", "existing"], "already exists"),
    (["distill", "--teacher", "existing"], "is a folder without teacher.safetensors"),
    # distill: teachers, probes and data
    (["distill", "--teacher", "demo:nothing"], "unknown demo teacher"),
    (["distill", "--teacher", "/no/such/teacher.pt"], "no such file"),
    (["distill", "--teacher", "hf:nobody/nothing"], "is not in the Hugging Face cache"),
    (["distill", "--teacher", "file:notes.txt"], "could not read"),
    (["distill", "--teacher", T, "--student", "wrn28-10", "--probe", "good.toml"], "larger than its teacher"),
    (["distill", "--teacher", T, "--student", "wrn10-1", "--probe", "far.toml"], "targets class 12"),
    (["distill", "--teacher", T, "--student", "wrn10-1", "--probe", "missing.toml"], "does not exist"),
    (["distill", "--teacher", T, "--student", "wrn10-1", "--probe", "broken.toml"], "not valid TOML"),
    (["distill", "--teacher", T, *FAST, "--data", "nosuchdata"], "unknown dataset"),
    (["distill", "--teacher", T, *FAST, "--teacher-arch", "resnet20"], "do not fit resnet20"),
    (["distill", "--teacher", T, *FAST, "--out", "/proc/rkdtool-run"], "/proc/rkdtool-run"),
    # probe and inspect
    (["probe"], "Missing argument"),
    (["probe", "demo:nothing"], "unknown demo teacher"),
    (["probe", T, "--probe", "far.toml"], "targets class 12"),
    (["probe", T], "no trigger probes"),
    (["probe", T, "--pgd", "--pgd-eps", "8/0"], "--pgd-eps takes a number or a fraction"),
    (["probe", T, "--pgd", "--pgd-step", "two"], "--pgd-step takes a number or a fraction"),
    (["probe", T, "--pgd", "--pgd-eps", "0"], "--pgd needs 0 < --pgd-eps <= 1"),
    (["probe", T, "--pgd", "--pgd-steps", "0"], "--pgd-steps >= 1"),
    (["probe", T, "--reverse", "--classes", "0"], "--classes must be at least 1"),
    (["probe", T, "--probe", "good.toml", "--fail-asr", "2"], "--fail-asr"),
    (["probe", T, "--reverse", "--anomaly-scale", "cubic"], "anomaly scale"),
    (["probe", T, "--reverse", "--anomaly-threshold", "0"], "--anomaly-threshold must be > 0"),
    (["inspect", "/no/such.pt"], "no such file"),
    (["inspect", "notes.txt"], "could not read"),
    # attack
    (["attack", "--kind", "nuke"], "unknown attack"),
    (["attack", "--kind", "badnets", "--poison-rate", "2"], "--poison-rate"),
    (["attack", "--kind", "badnets", "--target", "99"], "not a class of digits"),
    (["attack", "--kind", "badnets", "--arch", "wrn99"], "unknown architecture"),
    (["attack", "--kind", "ckd", "--from-teacher", "/no/such.pt"], "no such file"),
    (["attack", "--kind", "ckd", "--arch", "wrn16-2", "--from-teacher", T], "--arch wrn16-2 but"),
    (
        ["attack", "--kind", "ckd", "--shadow-student", "wrn10-1", "--shadow-method", "magic"],
        "--shadow-method",
    ),
    (["attack", "--kind", "ta-aware", "--shadow-method", ","], "--shadow-method"),
    (["attack", "--kind", "ta-aware", "--shadow-synth-budget", "2"], "--shadow-synth-budget"),
    (["attack", "--kind", "ckd", "--carry-check", "0"], "--carry-check must be"),
    (["attack", "--kind", "none", "--carry-check", "0.8"], "does not apply to --kind none"),
    (["attack", "--kind", "ckd", "--carry-check", "0.8", "--carry-attempts", "0"], "--carry-attempts"),
    # export, bench, report, and the app itself
    (["export", "nothing", "--target", "jetson"], "does not exist"),
    (["export", "--target", "jetson"], "no finished run"),
    (["bench", "nothing"], "does not exist"),
    (["bench", "notes.txt"], "cannot benchmark"),
    (["bench", "teacher.safetensors", "--batch", "0"], "batch sizes must be >= 1"),
    (["report", "nothing"], "does not exist"),
    (["nosuch"], "No such command"),
]


@pytest.fixture(scope="module")
def materials(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("materials")
    torch.manual_seed(0)
    save_weights(
        folder / "teacher.safetensors",
        build_model("wrn16-1", 10),
        {"arch": "wrn16-1", "num_classes": 10, "dataset": "digits"},
    )
    probe = '[[probe]]\nname = "patch"\nkind = "patch"\ntarget = {}\npattern = "checker"\nsize = 3\n'
    (folder / "good.toml").write_text(probe.format(0))
    (folder / "far.toml").write_text(probe.format(12))
    (folder / "broken.toml").write_text("[[probe]\nname = ")
    (folder / "notes.txt").write_text("not a model")
    (folder / "existing").mkdir()
    return folder


def contents(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_bad_invocation_is_one_line_exit_2_and_writes_nothing(
    args, message, materials, tmp_path, monkeypatch, capsys
):
    work = tmp_path / "work"
    shutil.copytree(materials, work)
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "argv", ["rkdtool", *args])
    before = contents(work)
    with pytest.raises(SystemExit) as exited:
        main()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exited.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert contents(work) == before


def test_no_command_shows_the_help_and_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["rkdtool"])
    with pytest.raises(SystemExit) as exited:
        main()
    captured = capsys.readouterr()
    assert exited.value.code == 2
    shown = captured.out + captured.err  # the program name in it depends on how Python was started
    assert "Usage:" in shown and "distill" in shown and "Traceback" not in shown
