"""DDP through torchrun (issue 14 item 3): two gloo ranks on the CPU train one student, identical on both
ranks, write one run folder, and land where one process on the same global batch lands (within the
tolerance per-shard BatchNorm statistics and per-rank noise draws leave)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BUDGET = ["--method", "fkd", "--no-baseline", "--epochs", "5", "--test-subset", "200"]


def run(out: Path, ranks: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
        if ranks > 1
        else [sys.executable]
    )
    proc = subprocess.run(
        [*launcher, "-m", "rkdtool", "distill", *BUDGET, "--device", "cpu", "--json", "--out", str(out)],
        cwd=out.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)  # printed once: by rank 0 only


def losses(out: Path) -> list[dict]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_two_gloo_ranks_train_the_one_process_student(tmp_path):
    one = run(tmp_path / "one", 1)
    two = run(tmp_path / "two", 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # one folder each, no .partial left
    assert two["distributed"]["world_size"] == 2 and two["distributed"]["backend"] == "gloo"
    # DDP kept the two ranks' students equal to the last bit (broadcast from rank 0 and compared).
    assert two["distributed"]["largest_weight_difference"] == {"fkd": 0.0}
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["ranks"] == {"world_size": 2, "backend": "gloo"}
    assert len(losses(tmp_path / "two")) == 5  # rank 0 logged each epoch once
    a, b = one["students"]["fkd"], two["students"]["fkd"]
    assert min(a["acc"], b["acc"]) >= 0.7  # both learnt (93.0% each, measured)
    assert abs(a["acc"] - b["acc"]) <= TOLERANCE_ACC, (a["acc"], b["acc"])
    for x, y in zip(losses(tmp_path / "one"), losses(tmp_path / "two"), strict=True):
        for name in x:
            assert abs(x[name] - y[name]) <= TOLERANCE_LOSS * max(abs(x[name]), 1e-3), (name, x, y)


# Measured (AMD EPYC, 1 thread per rank, this budget): ACC 93.0% in one process and on two ranks; epoch
# losses within 13.5% of each other (CE 0.607 vs 0.689 in epoch 3: two ranks normalise BatchNorm over
# 32-image shards, one process over 64). The bounds keep about twice that.
TOLERANCE_ACC = 0.06
TOLERANCE_LOSS = 0.3
