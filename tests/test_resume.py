"""Interrupted runs: a real `rkdtool distill` killed with SIGKILL, resumed with --resume, ends where an
uninterrupted run with the same seed ends, with no corrupt artifact and no finished epoch trained twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rkdtool.weights import load_weights

REPO = Path(__file__).resolve().parents[1]
BUDGET = ["--epochs", "3", "--detox-epochs", "1", "--train-subset", "300", "--test-subset", "120"]


def distill(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "rkdtool", "distill", *BUDGET, "--json", "--out", str(out), *extra],
        cwd=out.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen) -> dict:
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-3000:]
    return json.loads(stdout)


def kill_when(proc: subprocess.Popen, partial: Path, task: str, epoch: int) -> None:
    """SIGKILLs `proc` once its checkpoint holds `epoch` (1-based) of `task`."""
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        checkpoint = partial / "checkpoint.pt"
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except (FileNotFoundError, RuntimeError, EOFError):  # not there yet, or replaced while read
            state = {}
        if state.get("task") == task and int(state.get("epoch", -1)) + 1 >= epoch:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.05)
    pytest.fail(f"{task} epoch {epoch} never reached")


def epochs_logged(run: Path) -> list[tuple[str, int]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["task"], r["epoch"]) for r in rows]


def test_sigkill_mid_epoch_and_mid_write_then_resume_equals_an_uninterrupted_run(tmp_path):
    reference = finish(distill(tmp_path / "whole"))

    out = tmp_path / "killed"
    partial = out.with_name(out.name + ".partial")
    # 1. killed during the FKD student, after its first epoch's checkpoint landed
    kill_when(distill(out), partial, "fkd student", 1)
    # 2. resumed, then killed again during the second student
    kill_when(distill(out, "--resume"), partial, "robustkd-ta student", 1)
    # and, as a kill during the checkpoint's own write leaves it, a half-written temporary sibling
    (partial / ".checkpoint.pt.x1y2.tmp").write_bytes(b"\x80\x02half a pickle")
    resumed = finish(distill(out, "--resume"))

    for method in ("fkd", "robustkd-ta"):
        for key in ("acc", "asr", "asr_all_images"):
            assert resumed["students"][method][key] == reference["students"][method][key], (method, key)
    logged = epochs_logged(out)
    assert len(logged) == len(set(logged)), "a finished epoch was trained (and logged) twice"
    assert logged == epochs_logged(tmp_path / "whole")
    assert not partial.exists() and not (out / "checkpoint.pt").exists()
    assert not list(out.rglob("*.tmp"))
    for weights in out.rglob("*.safetensors"):
        load_weights(weights)  # every artifact reads back
    assert json.loads((out / "report.json").read_text())["students"] == resumed["students"]
