"""The HTML/Markdown report's sections, on report.json fragments, and on a tiny run folder with a bundle
(`report_run`): the device report merged beside the host's, the latency section per backend and batch size
(host and device), the plots and the HTML.
"""

from __future__ import annotations

import json

import pytest
from report_run import TARGET, device_report, write_report_run
from typer.testing import CliRunner

from rkdtool.cli.app import app
from rkdtool.errors import DataError
from rkdtool.machine import machine_info
from rkdtool.report import export_reports, render_report, synthesis_section


def test_synthesis_section_says_whether_the_stand_ins_are_refreshed():
    synthesis = {
        "pool": "uap",
        "stand_ins": 2,
        "budget": 0.2,
        "refresh_every": 0,
        "perturbations": [{"kind": "linf", "dominant_class": 0, "share": 0.9}],
        "suspected_target": 0,
    }
    never = " ".join(synthesis_section(synthesis))
    assert "never refreshed" in never and "every" not in never.replace("every 0", "")
    every = " ".join(synthesis_section({**synthesis, "refresh_every": 3}))
    assert "a linf1 of budget 0.2 refreshed against the student every 3 epoch(s)" in every
    blend = {**synthesis, "refresh_every": 1, "refresh_kind": "blend1", "refresh_budget": 0.5}
    assert "a blend1 of budget 0.5 refreshed against the student every 1 epoch(s)" in " ".join(
        synthesis_section(blend)
    )
    assert synthesis_section({}) == []


# ------------------------------------------------------------------ exports: devices and latency


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """The tiny run folder of `report_run`, rendered; gives back (run folder, its report.md text)."""
    run = write_report_run(tmp_path_factory.mktemp("report") / "run")
    result = render_report(run)
    return run, result, result.markdown.read_text()


def section(md: str, heading: str) -> str:
    """Gives back the lines of report.md from `heading` to the next heading of the same or a higher level."""
    level = heading.split(" ")[0]
    lines = md.splitlines()
    start = lines.index(heading)
    end = next(
        (
            k
            for k in range(start + 1, len(lines))
            if lines[k].startswith("#") and lines[k].split(" ")[0] <= level
        ),
        len(lines),
    )
    return "\n".join(lines[start:end])


def test_latency_section_has_every_backend_and_batch_host_and_device(rendered):
    run, _, md = rendered
    latency = section(md, f"### Latency: {TARGET}")
    rows = [line for line in latency.splitlines() if line.startswith("| ") and not line.startswith("| where")]
    cpu = machine_info()["cpu"]
    board = "device (NVIDIA Jetson Orin Nano Developer Kit)"
    # host_report.json: the export's batch-1 check, quoted exactly (p50 0.125 ms -> 8,000 img/s)
    assert (
        f"| host ({cpu}) | onnxruntime-cpu | onnx-int8 | end-to-end | 1 | 0.125 | 0.188 | 0.250 | 8,000 "
        "| host_report.json |" in rows
    )
    # benchmark.json: one row per batch size rkdtool bench timed
    bench = json.loads((run / "export" / TARGET / "benchmark.json").read_text())
    assert [r for r in rows if r.endswith("| benchmark.json |")] == [
        f"| host ({cpu}) | onnxruntime-cpu | fp32 (model.onnx) | end-to-end | {r['batch']} | "
        f"{r['latency_ms']['p50']:.3f} | {r['latency_ms']['p90']:.3f} | {r['latency_ms']['p99']:.3f} | "
        f"{r['batch'] * 1e3 / r['latency_ms']['p50']:,.0f} | benchmark.json |"
        for r in bench["results"]
    ]
    # device_report.json: both timers per batch; the skipped batch 256 is not a row
    assert (
        f"| {board} | tensorrt | int8 | GPU compute (CUDA graph) | 8 | 1.000 | 1.500 | 2.000 | 8,000 "
        "| device_report.json |" in rows
    )
    assert (
        f"| {board} | tensorrt | int8 | end-to-end | 1 | 0.800 | 1.200 | 1.600 | 1,250 | device_report.json |"
        in rows
    )
    assert len(rows) == 3 + len(bench["results"]) + 4 and "| 256 |" not in latency
    assert f"Host: CPU {cpu} (" in latency


def test_device_report_is_merged_beside_the_host_numbers(rendered):
    _, result, md = rendered
    device = section(md, "### Device check: `device_report.json` (int8)")
    assert "board NVIDIA Jetson Orin Nano Developer Kit, power mode NV Power Mode: MAXN_SUPER" in device
    assert "TensorRT 10.3.0, engine model.int8.trt10.3.0.engine" in device
    assert "| host (onnx-int8) | 96.5% | 3.0% |" in device and "| device (int8) | 96.0% | 4.0% |" in device
    assert "Device minus host: ACC -0.5 pt, ASR lba-blend +1.0 pt." in device
    assert "Batch-1 p50 0.500 ms: within the profile's 2 ms budget." in device
    names = [p.name for p in result.plots]
    assert names == ["acc_asr.png", "training.png", f"export_{TARGET}.png", f"latency_{TARGET}.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in result.plots)


def test_every_device_report_and_an_older_bench_json_are_read(tmp_path):
    run = write_report_run(tmp_path / "run")
    bundle = run / "export" / TARGET
    fp16 = {**device_report(), "precision": "fp16", "latency": {"batch_1": {"host_ms": {"p50": 4.0}}}}
    (bundle / "device_report.fp16.json").write_text(json.dumps(fp16))
    (bundle / "benchmark.json").rename(bundle / "bench.json")
    exports = export_reports(run)
    assert list(exports[TARGET]["devices"]) == ["device_report.fp16.json", "device_report.json"]
    assert exports[TARGET]["benchmark"]["file"] == "bench.json"
    md = render_report(run).markdown.read_text()
    assert "### Device check: `device_report.fp16.json` (fp16)" in md
    assert "Batch-1 p50 4.000 ms: over the profile's 2 ms budget." in md
    assert "| end-to-end | 1 | 4.000 | - | - | 250 | device_report.fp16.json |" in md
    assert "| bench.json |" in md


def test_no_timings_no_latency_section(tmp_path):
    run = write_report_run(tmp_path / "run")
    bundle = run / "export" / TARGET
    host = json.loads((bundle / "host_report.json").read_text())
    for row in host["precisions"].values():
        row["latency_ms"] = None
    (bundle / "host_report.json").write_text(json.dumps(host))
    for name in ("benchmark.json", "device_report.json"):
        (bundle / name).unlink()
    md = render_report(run).markdown.read_text()
    assert "## Export: jetson-orin-nano" in md and "## Latency" not in md and "Device check" not in md
    (bundle / "device_report.json").write_text("{ not json")
    with pytest.raises(DataError, match="device_report.json is not JSON"):
        render_report(run)


def test_html_has_header_cells_lists_and_the_report_title(rendered):
    _, result, md = rendered
    page = result.html.read_text()
    assert "<title>rkdtool report: run</title>" in page and "<h1>rkdtool report: run</h1>" in page
    assert "<th>where</th>" in page and "|---" not in page and "<td>---</td>" not in page
    assert "<code>device_report.json</code>" in page
    assert page.count("<table>") == page.count("</table>") == md.count("\n|---")
    assert page.count('<img alt="plots/') == len(result.plots)


def test_report_cli_names_what_it_wrote(rendered):
    run, _, _ = rendered
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert "report.md" in result.output and "(4 plots)" in result.output
