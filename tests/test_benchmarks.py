"""The prepared GPU check (benchmarks/gpu_check.py, issue 14 item 5) runs end to end on the CPU at tiny
sizes, so that the script a CUDA machine is lent for does not fail on its first line there."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

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


def _efficacy():
    spec = importlib.util.spec_from_file_location("efficacy", REPO / "benchmarks" / "efficacy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_efficacy_refuses_to_reuse_a_teacher_trained_the_other_way(tmp_path):
    """--adv-teachers must not quietly measure robust accuracy on teachers that were never adversarially
    trained (nor the plain table on ones that were): attack.json says how each was made."""
    efficacy = _efficacy()
    (tmp_path / "clean").mkdir()
    (tmp_path / "clean" / "attack.json").write_text(json.dumps({"kind": "none", "adv_train": False}))
    assert efficacy.teacher_folder("none", tmp_path, "cpu", adv=False) == tmp_path / "clean"
    with pytest.raises(SystemExit, match="not adversarially trained"):
        efficacy.teacher_folder("none", tmp_path, "cpu", adv=True)
    (tmp_path / "clean" / "attack.json").write_text(json.dumps({"kind": "none", "adv_train": True}))
    with pytest.raises(SystemExit, match="adversarially trained"):
        efficacy.teacher_folder("none", tmp_path, "cpu", adv=False)


def test_efficacy_refuses_a_teacher_made_with_another_carry_check(tmp_path):
    """--carry-check: a teacher folder made without the check (or with another goal) is not quietly taken
    for one that passed it; the clean teacher is never checked, whatever the flag."""
    efficacy = _efficacy()
    for kind, made in (("none", None), ("ckd", None), ("lba", {"goal": 0.5, "attempts": []})):
        folder = tmp_path / efficacy.folder_name(kind)
        folder.mkdir()
        record = {"kind": kind, "adv_train": False, **({"carry_check": made} if made else {})}
        (folder / "attack.json").write_text(json.dumps(record))
    assert efficacy.teacher_folder("none", tmp_path, "cpu", carry_check=0.8) == tmp_path / "clean"
    assert efficacy.teacher_folder("ckd", tmp_path, "cpu") == tmp_path / "ckd"
    with pytest.raises(SystemExit, match="carry check None \\(here: 0.8\\)"):
        efficacy.teacher_folder("ckd", tmp_path, "cpu", carry_check=0.8)
    with pytest.raises(SystemExit, match="carry check 0.5 \\(here: 0.8\\)"):
        efficacy.teacher_folder("lba", tmp_path, "cpu", carry_check=0.8)
    carry = {
        "goal": 0.8,
        "passed": False,
        "chosen": 1,
        "seed": 1000,
        "attempts": [{"student_held_asr": 0.1}, {"student_held_asr": 0.42}],
    }
    assert efficacy._plantings(carry) == "2, not passed (seed 1000: check 42.0%)"
    assert efficacy._plantings(None) == "-"


def test_efficacy_parses_the_pgd_budget_and_names_it_in_the_table():
    efficacy = _efficacy()
    args = argparse.Namespace(pgd_eps=efficacy._fraction("16/255"))
    budget = efficacy.pgd_budget(args)
    assert budget.eps == 16 / 255 and budget.step == 4 / 255 and budget.steps == 20
    assert efficacy._fraction("0.5") == 0.5
    assert efficacy._pgd_words(budget.describe()) == "PGD-Linf 16/255, step 4/255, 20 steps"
    row = {"pgd_acc": 0.6, "pgd_acc_per_seed": [0.5, 0.7]}
    assert efficacy._pgd_cell(row) == "60.0 +- 14.1"


def test_efficacy_merge_refuses_rows_measured_another_way():
    """--merge must not put rows from plain teachers, or from another PGD budget, into a table whose budget
    line names adversarially trained ones: the table would say something none of its runs measured."""
    efficacy = _efficacy()
    pgd = efficacy.pgd_budget(argparse.Namespace(pgd_eps=16 / 255)).describe()
    old = {"attacks": {"none": {}}, "rows": [{"attack": "none"}]}
    old["budget"] = {"seeds": [0], "student_epochs": 10, "adv_teachers": True, "pgd": pgd}
    new = {"attacks": {"ckd": {}}, "rows": [{"attack": "ckd"}]}
    new["budget"] = {**old["budget"], "command": "c", "wall_seconds": 1.0, "attacks": ["ckd"], "jobs": 2}
    args = argparse.Namespace(epochs=10, ablations=False)
    merged = efficacy.merge_reports(old, new, args)
    assert [r["attack"] for r in merged["rows"]] == ["none", "ckd"]
    with pytest.raises(SystemExit, match="adv_teachers"):
        efficacy.merge_reports(old, {**new, "budget": {**new["budget"], "adv_teachers": False}}, args)
    other_pgd = efficacy.pgd_budget(argparse.Namespace(pgd_eps=8 / 255)).describe()
    with pytest.raises(SystemExit, match="pgd"):
        efficacy.merge_reports(old, {**new, "budget": {**new["budget"], "pgd": other_pgd}}, args)
    # a table from before these keys existed was measured on plain teachers at the default budget
    plain = {
        **new,
        "budget": {**new["budget"], "adv_teachers": False, "pgd": efficacy.PgdBudget().describe()},
    }
    legacy = {**old, "budget": {"seeds": [0], "student_epochs": 10}}
    assert len(efficacy.merge_reports(legacy, plain, args)["rows"]) == 2
    with pytest.raises(SystemExit, match="adv_teachers"):
        efficacy.merge_reports(legacy, new, args)
