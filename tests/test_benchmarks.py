"""The prepared GPU check (benchmarks/gpu_check.py, issue 14 item 5) runs end to end on the CPU at tiny
sizes, so that the script a CUDA machine is lent for does not fail on its first line there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_every_section_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.md"
    command = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick"]
    proc = subprocess.run(
        [*command, "--ddp", "on", "--out", str(out)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["errors"] == {}
    rows = report["throughput"]
    variants = {(r["method"], r["amp"], r["channels_last"]) for r in rows}
    assert len(variants) == 8 and all(r["images_per_s"] > 0 for r in rows)
    assert {r["amp_dtype"] for r in rows if r["amp"]} == {"bfloat16"}  # --amp on the CPU is bf16
    ddp = report["ddp"]
    assert ddp["world_size"] == 2 and ddp["backend"] == "gloo"
    assert ddp["largest_weight_difference"] == 0.0  # DDP kept the two ranks' students equal
    assert ddp["global_images_per_s"] > 0 and ddp["scaling"] > 0
    assert [(r["precision"], r["batch"]) for r in report["latency"]] == [("fp32", 1), ("fp32", 4)]
    text = out.read_text()
    assert "robustkd-ta step time / fkd" in text and "DDP, 2 ranks (gloo)" in text
    assert report["machine"]["cpu"] in text  # the machine is named
