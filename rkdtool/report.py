"""report.json (+ every export's host, benchmark and device reports) -> report.md and report.html with plots,
for people to read.

Under RUN/export/TARGET/ the report reads host_report.json (`rkdtool export`), benchmark.json (or the older
bench.json, `rkdtool bench`) and device_report*.json (`device/check.py` on the board, copied back): ACC/ASR
per precision, the device's re-check beside the host's, and one latency table per backend and batch size,
host and device.
"""

from __future__ import annotations

import base64
import html
import json
import re
from dataclasses import dataclass
from pathlib import Path

from rkdtool.deploy.bench_report import (
    BENCHMARK_JSON,
    LATENCY_HEADER,
    LEGACY_JSON,
    LatencyRow,
    latency_rows,
    machine_line,
)
from rkdtool.errors import DataError, NotFoundError
from rkdtool.weights import write_text_atomic


@dataclass
class RenderedReport:
    markdown: Path
    html: Path
    plots: list[Path]


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def model_rows(report: dict) -> list[tuple[str, dict]]:
    """Gives back (label, row) for the teacher, controls, the detoxified teacher and every student."""
    rows = [("teacher", report["teacher"])]
    if "controls" in report:
        rows.append(("clean teacher (control)", report["controls"]["clean_teacher"]))
    detox = report.get("diagnostics", {}).get("detox")
    if detox:
        rows.append(("detoxified teacher", detox["detoxified_teacher"]))
    rows += [(f"{method} student", row) for method, row in report.get("students", {}).items()]
    return rows


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(
            f"{path} is not JSON ({exc}); re-run the command that wrote it, or remove it"
        ) from exc


def export_reports(run_dir: Path) -> dict[str, dict]:
    """Gives back {target: host_report} for every bundle, each with what came back merged in: `devices`
    ({file name: device_report} for every device_report*.json) and `benchmark` (benchmark.json, or the
    older bench.json, when present)."""
    found = {}
    for host in sorted((run_dir / "export").glob("*/host_report.json")):
        bundle = host.parent
        merged = _read_json(host)
        merged["devices"] = {p.name: _read_json(p) for p in sorted(bundle.glob("device_report*.json"))}
        bench = next((bundle / n for n in (BENCHMARK_JSON, LEGACY_JSON) if (bundle / n).exists()), None)
        if bench is not None:
            merged["benchmark"] = {"file": bench.name, **_read_json(bench)}
        found[bundle.name] = merged
    return found


def _machine(run_dir: Path) -> str:
    """Gives back 'DEVICE, MACHINE' from the run's config.json, for figure titles."""
    config_path = run_dir / "config.json"
    if not config_path.exists():
        return "unknown machine"
    config = json.loads(config_path.read_text())
    return f"{config.get('device', '?')}, {config.get('machine', '?')}"


def _pyplot():
    """Gives back matplotlib.pyplot on the non-interactive Agg backend (reports render without a screen)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, ax, path: Path, title: str, ylabel: str, *, legend_size: int) -> Path:
    """Labels a percentage plot, writes it to `path` and closes it; gives back `path`."""
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _bar_plot(path: Path, labels: list[str], series: dict[str, list[float]], title: str, ylabel: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(labels)), 3.6))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [x + i * width for x in range(len(labels))]
        ax.bar(xs, [100 * v for v in values], width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels, rotation=20, ha="right")
    return _finish(fig, ax, path, title, ylabel, legend_size=8)


def _curve_plot(path: Path, metrics: list[dict], probes: list[str], title: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for task in dict.fromkeys(r["task"] for r in metrics):
        rows = [r for r in metrics if r["task"] == task and "acc" in r]  # --eval-every skips some epochs
        epochs = [r["epoch"] for r in rows]
        ax.plot(epochs, [100 * r["acc"] for r in rows], "-o", ms=3, label=f"{task} ACC")
        for probe in probes:
            ax.plot(epochs, [100 * r["asr"][probe] for r in rows], "--x", ms=3, label=f"{task} ASR {probe}")
    ax.set_xlabel("epoch")
    return _finish(fig, ax, path, title, "%", legend_size=7)


def _plots(run_dir: Path, report: dict, rows, probes: list[str], exports: dict[str, dict]) -> list[Path]:
    """Gives back the plots written into `run_dir/plots`: ACC/ASR per model, the training curves, and for
    every export ACC/ASR per precision (the device's too, where its report is back) and throughput per
    batch size."""
    plots_dir = run_dir / "plots"
    plots_dir.mkdir(exist_ok=True)
    plots = [
        _bar_plot(
            plots_dir / "acc_asr.png",
            [label for label, _ in rows],
            {
                "ACC": [r["acc"] for _, r in rows],
                **{f"ASR {p}": [r["asr"].get(p, 0) for _, r in rows] for p in probes},
            },
            f"ACC and ASR per model ({report.get('data', '?')}, trained on {_machine(run_dir)})",
            "%",
        )
    ]
    metrics_path = run_dir / "metrics.jsonl"
    if metrics_path.exists():
        metrics = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        if metrics:
            plots.append(
                _curve_plot(plots_dir / "training.png", metrics, probes, "Students per epoch (test split)")
            )
    for target, host in exports.items():
        checked = list(host.get("precisions", {}).items())
        checked += [
            (f"device {d.get('precision', '?')}", d) for d in host.get("devices", {}).values() if "acc" in d
        ]
        series = {"ACC": [r["acc"] for _, r in checked]}
        for probe in probes:
            series[f"ASR {probe}"] = [(r.get("asr") or {}).get(probe, 0) for _, r in checked]
        plots.append(
            _bar_plot(
                plots_dir / f"export_{target}.png",
                [name for name, _ in checked],
                series,
                f"{target}: ACC and ASR per precision",
                "%",
            )
        )
        timings = latency_rows(target, host)
        if timings:
            title = f"{target}: throughput per batch size"
            plots.append(_latency_plot(plots_dir / f"latency_{target}.png", timings, title))
    return plots


def summary_section(run_dir: Path, report: dict, rows, probes: list[str]) -> list[str]:
    """Gives back the report's title, what ran, and the ACC/ASR table of every model."""
    md = [f"# rkdtool report: {run_dir.name.removesuffix('.partial')}", ""]  # rendered before the rename
    md.append(
        f"Teacher `{report['teacher'].get('ref', '?')}` ({report['teacher'].get('arch', '?')}), "
        f"data `{report.get('data', '?')}`, method `{report.get('method', '?')}`."
    )
    if report.get("variant"):
        md += ["", f"Variant: {report['variant']}."]
    md.append("")
    md.append(f"ASR: {report.get('asr_definition', '')}.")
    md.append("")
    header = ["model", "arch", "params", "ACC", *[f"ASR {p}" for p in probes]]
    md.append("| " + " | ".join(header) + " |")
    md.append("|" + "---|" * len(header))
    for label, row in rows:
        params = f"{row['params']:,}" if row.get("params") else ""
        cells = [
            label,
            row.get("arch", ""),
            params,
            _pct(row["acc"]),
            *[_pct(row["asr"].get(p)) for p in probes],
        ]
        md.append("| " + " | ".join(cells) + " |")
    md.append("")
    for note in report.get("notes", []):
        md.append(f"- Note: {note}")
    return md


def detox_section(detox: dict | None) -> list[str]:
    """Gives back the detox-mask section: settings and mask statistics per stage."""
    if not detox:
        return []
    md = [
        "",
        "## Detox masks",
        "",
        f"tau {detox['tau']}, form {detox['form']}, stages {detox['stages']}, loss {detox['loss']}, "
        f"{detox['epochs']} epochs.",
        "",
        "| stage | M at tau | M at 0 | mean M | P std | P min | P max |",
        "|---|---|---|---|---|---|---|",
    ]
    for stage, st in detox["mask_statistics"].items():
        md.append(
            f"| {stage} | {_pct(st['mask_at_tau'])} | {_pct(st['mask_at_zero'])} | {st['mask_mean']:.3f} "
            f"| {st['pattern_std']:.2f} | {st['pattern_min']:.2f} | {st['pattern_max']:.2f} |"
        )
    return md


def synthesis_section(synthesis: dict | None) -> list[str]:
    """Gives back where the synthesised triggers send clean images, and the suspected target."""
    if not synthesis:
        return []
    sinks = ", ".join(
        f"{s['kind']} -> class {s['dominant_class']} ({_pct(s['share'])})" for s in synthesis["perturbations"]
    )
    every = synthesis["refresh_every"]
    refresh = "never refreshed"
    if every:  # reports written before the refresh kind was recorded refreshed a grey L-inf one
        kind = synthesis.get("refresh_kind", "linf1")
        budget = synthesis.get("refresh_budget", synthesis["budget"])
        refresh = f"a {kind} of budget {budget} refreshed against the student every {every} epoch(s)"
    return [
        "",
        "## Synthesised triggers",
        "",
        f"Pool `{synthesis['pool']}` ({synthesis['stand_ins']} stand-ins, budget {synthesis['budget']}, "
        f"{refresh}). "
        f"Where the synthesised perturbations send clean test images on the teacher: {sinks or '-'}. "
        f"Suspected target: {synthesis['suspected_target']}.",
    ]


def export_section(target: str, host: dict, probes: list[str]) -> list[str]:
    """Gives back one export's host re-check table (and its device report, when merged)."""
    md = [
        "",
        f"## Export: {target}",
        "",
        "| precision | ACC | "
        + " | ".join(f"ASR {p}" for p in probes)
        + " | p50 ms | max abs logit diff | top-1 agreement |",
        "|---" * (4 + len(probes)) + "|---|",
    ]
    for name, p in host.get("precisions", {}).items():
        lat = (p.get("latency_ms") or {}).get("p50")  # None where a precision was not timed
        md.append(
            f"| {name} | {_pct(p['acc'])} | "
            + " | ".join(_pct(p["asr"].get(q)) for q in probes)
            + f" | {lat if lat is None else round(lat, 3)} | {p.get('max_abs_logit_diff')} "
            f"| {_pct(p.get('top1_agreement'))} |"
        )
    for name, device in host.get("devices", {}).items():
        md += device_section(name, device, host, probes)
    return md


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Gives back a Markdown table's lines."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def _points(delta: float | None) -> str:
    return "-" if delta is None else f"{100 * delta:+.1f} pt"


def device_section(name: str, device: dict, host: dict, probes: list[str]) -> list[str]:
    """Gives back one device report (device/check.py on the board) beside the host's numbers for the same
    precision: the board and its software, ACC and ASR on both, the differences and the latency budget."""
    board = device.get("platform") or {}
    facts = [
        f"board {board.get('model') or board.get('machine') or '?'}",
        f"L4T {board['l4t_release']}" if board.get("l4t_release") else "",
        f"power mode {board['power_mode']}" if board.get("power_mode") else "power mode not read",
        f"backend {device.get('backend', '?')}",
        f"TensorRT {device['tensorrt_version']}" if device.get("tensorrt_version") else "",
        f"engine {device['engine']}" if device.get("engine") else "",
        f"measured {device.get('created', '?')}",
    ]
    precision = device.get("precision", "?")
    md = ["", f"### Device check: `{name}` ({precision})", "", ", ".join(f for f in facts if f) + "."]
    vs = device.get("vs_host") or {}
    rows = []
    reference = host.get("precisions", {}).get(vs.get("precision", ""))
    if reference:
        rows.append([f"host ({vs['precision']})", _pct(reference["acc"])])
        rows[-1] += [_pct(reference["asr"].get(p)) for p in probes]
    rows.append([f"device ({precision})", _pct(device.get("acc"))])
    rows[-1] += [_pct((device.get("asr") or {}).get(p)) for p in probes]
    md += [""] + _md_table(["where", "ACC", *[f"ASR {p}" for p in probes]], rows)
    if vs.get("acc_delta") is not None:
        deltas = "".join(f", ASR {p} {_points((vs.get('asr_delta') or {}).get(p))}" for p in probes)
        md += ["", f"Device minus host: ACC {_points(vs['acc_delta'])}{deltas}."]
    budget, batch_1 = device.get("latency_budget_ms"), (device.get("latency") or {}).get("batch_1") or {}
    headline = batch_1.get("gpu_ms") or batch_1.get("host_ms")  # check.py's headline timer
    if budget is not None and headline:
        verdict = "within" if headline["p50"] <= budget else "over"
        md.append(f"Batch-1 p50 {headline['p50']:.3f} ms: {verdict} the profile's {budget:g} ms budget.")
    return md


def latency_section(exports: dict[str, dict]) -> list[str]:
    """Gives back the latency section: per bundle, its timings per backend and batch size, host and device,
    with the host machine named."""
    found = {target: latency_rows(target, host) for target, host in exports.items()}
    if not any(found.values()):
        return []
    md = [
        "",
        "## Latency",
        "",
        "Per bundle, backend and batch size. Host rows come from host_report.json (the export's batch-1 "
        "check) and benchmark.json (`rkdtool bench`); device rows from each device_report*.json "
        "(`device/check.py` on the board, copied back into the bundle). End-to-end: the wall clock around "
        "one inference; GPU compute: CUDA events around the execution alone.",
    ]
    for target, rows in found.items():
        if not rows:
            continue
        host = exports[target]
        machine = (host.get("benchmark") or {}).get("machine") or (host.get("latency") or {}).get("machine")
        md += ["", f"### Latency: {target}", ""]
        if machine:
            md += [f"Host: {machine_line(machine)}.", ""]
        md += _md_table(LATENCY_HEADER, [r.cells() for r in rows])
    return md


def _latency_plot(path: Path, rows: list[LatencyRow], title: str) -> Path:
    """Writes images per second against batch size, one line per (where, backend, precision, timer)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    series: dict[str, list[LatencyRow]] = {}
    for r in rows:
        series.setdefault(f"{r.where} {r.backend} {r.precision} ({r.timer})", []).append(r)
    for label, points in series.items():
        points = sorted((r for r in points if r.throughput_ips), key=lambda r: r.batch)
        ax.plot([r.batch for r in points], [r.throughput_ips for r in points], "-o", ms=3, label=label)
    ax.set_xscale("log", base=2)
    batches = sorted({r.batch for r in rows})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("images / s (from p50)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _inline(text: str) -> str:
    """Gives back escaped text with `code` spans as <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def markdown_to_html(md: list[str], run_dir: Path) -> str:
    """Gives back the HTML page of the report's markdown lines (headings, paragraphs, lists, tables with a
    header row), plots embedded as data URLs; the page's title is the report's first heading."""
    body = []
    for i, line in enumerate(md):
        if line.startswith("!["):
            name = line[line.index("(") + 1 : -1]
            data = base64.b64encode((run_dir / name).read_bytes()).decode()
            body.append(f'<img alt="{html.escape(name)}" src="data:image/png;base64,{data}">')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{_inline(line.lstrip('# '))}</h{level}>")
        elif line.startswith("|---"):
            continue  # the separator under a header row
        elif line.startswith("|"):
            tag = "th" if i + 1 < len(md) and md[i + 1].startswith("|---") else "td"
            cells = [c.strip() for c in line.strip("|").split("|")]
            body.append("<tr>" + "".join(f"<{tag}>{_inline(c)}</{tag}>" for c in cells) + "</tr>")
        elif line.startswith("- "):
            body.append(f"<li>{_inline(line[2:])}</li>")
        elif line:
            body.append(f"<p>{_inline(line)}</p>")
    page = _wrap_runs(_wrap_runs(body, "<tr>", "table"), "<li>", "ul")
    title = html.escape(md[0].lstrip("# ")) if md and md[0].startswith("# ") else "rkdtool report"
    return (
        f"<!doctype html><meta charset='utf-8'><title>{title}</title>"
        "<style>body{font-family:sans-serif;max-width:72em}td,th{border:1px solid #ccc;padding:2px 6px}"
        "th{background:#f3f3f3}table{border-collapse:collapse}img{max-width:100%}</style>\n"
        + "\n".join(page)
        + "\n"
    )


def render_report(run_dir: Path) -> RenderedReport:
    """Writes report.md, report.html and plots/*.png into a run folder from its JSON; gives back the paths."""
    run_dir = Path(run_dir)
    source = run_dir / "report.json"
    if not source.exists():
        raise NotFoundError(f"{source} does not exist: run `rkdtool distill --out {run_dir}` first")
    report = json.loads(source.read_text())
    probes = [p["name"] for p in report["probes"]]
    rows = model_rows(report)
    exports = export_reports(run_dir)
    plots = _plots(run_dir, report, rows, probes, exports)
    diagnostics = report.get("diagnostics", {})
    md = summary_section(run_dir, report, rows, probes)
    md += detox_section(diagnostics.get("detox"))
    md += variance_section(diagnostics)
    md += tau_search_section(diagnostics.get("tau_search"))
    md += synthesis_section(diagnostics.get("synthesis"))
    for target, host in exports.items():
        md += export_section(target, host, probes)
    md += latency_section(exports)
    md += ["", "## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    md_path = run_dir / "report.md"
    write_text_atomic(md_path, "\n".join(md) + "\n")
    html_path = run_dir / "report.html"
    write_text_atomic(html_path, markdown_to_html(md, run_dir))
    return RenderedReport(md_path, html_path, plots)


def variance_section(diagnostics: dict) -> list[str]:
    """Gives back report.md lines: per-stage feature variance, clean vs triggered, for every model measured.

    Each row is one model under one input; the ratio is triggered over clean variance on the same images
    (the paper's Finding 2: a backdoor shows as extra variance on triggered inputs).
    """
    profiles = diagnostics.get("feature_variance")
    if not profiles:
        return []
    lines = [
        "",
        "## Feature variance",
        "",
        "Per-sample variance over C x H x W of each stage's output (raw, before the distilled BN), mean over "
        "test images; triggered rows use the non-target images and give the ratio to the same images clean.",
        "",
    ]
    stages = [st["stage"] for st in next(iter(profiles.values()))["clean"]["stages"]]
    lines.append("| model | input | " + " | ".join(stages) + " | ratio (last stage) |")
    lines.append("|---|---|" + "---|" * len(stages) + "---|")
    for model, profile in profiles.items():
        clean = [f"{st['clean']['mean']:.3g}" for st in profile["clean"]["stages"]]
        lines.append(f"| {model} | clean | " + " | ".join(clean) + " | |")
        for name, prof in profile["probes"].items():
            cells = [f"{st['triggered']['mean']:.3g}" for st in prof["stages"]]
            ratio = prof["stages"][-1].get("ratio")
            lines.append(
                f"| {model} | {name} | "
                + " | ".join(cells)
                + f" | {'-' if ratio is None else f'{ratio:.2f}x'} |"
            )
    return lines


def tau_search_section(search: dict | None) -> list[str]:
    """Gives back report.md lines for Algorithm 1's trials (tau, proxy ACC and selection ASR)."""
    if not search:
        return []
    lines = [
        "",
        "## Threshold search (Algorithm 1)",
        "",
        f"Chosen tau {search['chosen']}. Each tau: masks, then {search['proxy_epochs']} proxy epochs; "
        f"scored on "
        f"{search['held_out_images']} held-out training images with {search['selection_probes']}; accepted "
        f"when ACC is within {100 * search['delta_acc']:.0f} points of the teacher's "
        f"({_pct(search['teacher_acc_held_out'])}) and ASR <= {_pct(search['delta_asr'])}.",
        "",
        "| tau | ACC | selection ASR | accepted |",
        "|---|---|---|---|",
    ]
    for t in search["trials"]:
        lines.append(
            f"| {t['tau']} | {_pct(t['acc'])} | {_pct(t['asr'])} | {'yes' if t['accepted'] else 'no'} |"
        )
    return lines


def _wrap_runs(lines: list[str], prefix: str, tag: str) -> list[str]:
    """Gives back `lines` with every run of consecutive lines starting with `prefix` wrapped in <tag>."""
    out: list[str] = []
    for k, line in enumerate(lines):
        inside = line.startswith(prefix)
        if inside and (k == 0 or not lines[k - 1].startswith(prefix)):
            line = f"<{tag}>{line}"
        if inside and (k + 1 == len(lines) or not lines[k + 1].startswith(prefix)):
            line = f"{line}</{tag}>"
        out.append(line)
    return out
