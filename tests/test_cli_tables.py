"""Every command's table read in an 80-column terminal (what Rich assumes where output is piped): no line
wider than 80, nothing cut with an ellipsis, every row's name in full on one line. The catalogues use the
real profiles, zoo and machine; the result tables use results shaped as the library gives them back, with
one probe and with three (where one column per probe no longer fits and the ASR column takes a line each).
"""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from rkdtool.cli import tables
from rkdtool.machine import machine_info
from rkdtool.models.zoo import zoo_summary
from rkdtool.resources import list_profiles

ONE = ["lba-blend"]
THREE = ["lba-blend", "patch-white", "blend-noise3"]


def render80(table) -> str:
    console = Console(width=80, file=io.StringIO(), color_system=None)
    console.print(table)
    return console.file.getvalue()


def assert_readable(table, names: list[str]) -> str:
    text = render80(table)
    assert max(len(line) for line in text.splitlines()) <= 80, text
    assert "…" not in text, text
    for name in names:
        assert f"│ {name} " in text or f"┃ {name} " in text, f"{name!r} is not shown in full:\n{text}"
    return text


def asr(probes: list[str], value: float) -> dict:
    return {p: value / (k + 1) for k, p in enumerate(probes)}


def test_targets_shows_every_profile_name_in_full():
    profiles = list_profiles()
    text = assert_readable(tables.targets_table(profiles), [p.name for p in profiles])
    flat = " ".join(text.split())
    assert "opset 13 torchscript (jetson-nano, jetson-tx2)" in flat  # the caption says what each exports
    assert len(profiles) >= 9


def test_models_and_info_read_in_80_columns():
    rows = zoo_summary(num_classes=100)
    names = [r["arch"] if r["canonical"] == r["arch"] else f"{r['arch']} = {r['canonical']}" for r in rows]
    assert_readable(tables.models_table(rows), names)
    info = machine_info()
    assert_readable(tables.info_table(info), list(info))


@pytest.mark.parametrize("probes", [ONE, THREE], ids=["one probe", "three probes"])
def test_distill_table_reads_in_80_columns(probes):
    row = {"arch": "wrn16-2", "params": 703_284, "acc": 0.97, "asr": asr(probes, 0.9)}
    report = {
        "data": "digits",
        "probes": [{"name": p} for p in probes],
        "teacher": {**row, "arch": "wrn28-4", "params": 5_872_180},
        "controls": {"clean_teacher": {"acc": 0.97, "asr": asr(probes, 0.02)}},
        "diagnostics": {"detox": {"detoxified_teacher": {"acc": 0.95, "asr": asr(probes, 0.5)}}},
        "students": {"fkd": row, "robustkd-ta": {**row, "asr": asr(probes, 0.01)}},
    }
    labels = [
        "teacher",
        "clean teacher (control)",
        "detoxified teacher",
        "fkd student",
        "robustkd-ta student",
    ]
    text = assert_readable(tables.distill_table(report), labels)
    for p in probes:
        assert p in text
    assert "PGD" not in text
    robust = {**report, "pgd": {"eps": 8 / 255}, "teacher": {**report["teacher"], "pgd_acc": 0.4321}}
    text = assert_readable(tables.distill_table(robust), labels)
    assert "PGD" in text and "43.2%" in text


@pytest.mark.parametrize("probes", [ONE, THREE], ids=["one probe", "three probes"])
def test_export_table_reads_in_80_columns(probes):
    backends = {"torch-fp32": "torch-cpu", "onnx-fp32": "onnxruntime-cpu", "onnx-int8": "onnxruntime-cpu"}
    report = {
        "target": "jetson-orin-nano",
        "probe_images": 360,
        "probes": [{"name": p} for p in probes],
        "precisions": {
            name: {
                "backend": backend,
                "acc": 0.97,
                "asr": asr(probes, 0.1),
                "latency_ms": {"p50": 1.234},
                "max_abs_logit_diff": 1.2e-5,
                "top1_agreement": 0.995,
            }
            for name, backend in backends.items()
        },
    }
    text = assert_readable(tables.export_table(report), list(backends))
    assert "onnxruntime-cpu" in text and "1.20e-05" in text


@pytest.mark.parametrize("probes", [ONE, THREE], ids=["one probe", "three probes"])
def test_attack_and_probe_tables_read_in_80_columns(probes):
    summary = {
        "acc": 0.97,
        "asr": asr(probes, 0.9),
        "random_pattern_asr": {"checker": 0.1},
        "clean_acc": 0.98,
        "clean_asr": asr(probes, 0.01),
        "int8": {"onnx-int8": {"acc": 0.96, "asr": asr(probes, 0.8)}},
    }
    table = tables.attack_table(summary, "badnets", "wrn16-1", "digits", 0)
    assert_readable(table, ["poisoned teacher", "clean start", "onnx-int8"])
    result = {
        "model": "student.safetensors",
        "arch": "wrn16-2",
        "data": "digits",
        "acc": 0.97,
        "probes": [{"name": p, "source": "probes.toml", "kind": "blend", "target": 0} for p in probes],
        "targets": {p: 0 for p in probes},
        "asr": asr(probes, 0.5),
        "asr_all_images": asr(probes, 0.45),
        "precisions": {"onnx-fp32": {"acc": 0.97, "asr": asr(probes, 0.5)}},
    }
    first, per_precision = tables.probe_tables(result)
    assert_readable(first, probes)
    assert_readable(per_precision, ["onnx-fp32"])


def test_a_wide_console_gets_one_column_per_probe_a_narrow_one_a_line_each():
    report = {
        "data": "digits",
        "probes": [{"name": p} for p in THREE],
        "teacher": {"arch": "wrn16-1", "params": 175_000, "acc": 0.98, "asr": asr(THREE, 0.9)},
        "students": {"fkd": {"arch": "wrn10-1", "params": 78_000, "acc": 0.97, "asr": asr(THREE, 0.8)}},
    }
    wide = Console(width=200, file=io.StringIO(), color_system=None)
    wide.print(tables.distill_table(report))
    header = next(line for line in wide.file.getvalue().splitlines() if "model" in line)
    assert all(f"ASR {p}" in header for p in THREE)
    narrow = render80(tables.distill_table(report))
    assert "ASR lba-blend" not in narrow and "patch-white 45.0%" in narrow  # 0.9 / 2
