"""report.json (+ host/device reports) -> report.md and report.html with plots, for people to read."""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from pathlib import Path

from rkdtool.errors import NotFoundError
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


def export_reports(run_dir: Path) -> dict[str, dict]:
    """Gives back {target: host_report merged with device_report when present} for every bundle."""
    found = {}
    for host in sorted((run_dir / "export").glob("*/host_report.json")):
        merged = json.loads(host.read_text())
        device = host.parent / "device_report.json"
        if device.exists():
            merged["device"] = json.loads(device.read_text())
        found[host.parent.name] = merged
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
        rows = [r for r in metrics if r["task"] == task]
        epochs = [r["epoch"] for r in rows]
        ax.plot(epochs, [100 * r["acc"] for r in rows], "-o", ms=3, label=f"{task} ACC")
        for probe in probes:
            ax.plot(epochs, [100 * r["asr"][probe] for r in rows], "--x", ms=3, label=f"{task} ASR {probe}")
    ax.set_xlabel("epoch")
    return _finish(fig, ax, path, title, "%", legend_size=7)


def _plots(run_dir: Path, report: dict, rows, probes: list[str], exports: dict[str, dict]) -> list[Path]:
    """Gives back the plots written into `run_dir/plots`: ACC/ASR per model, the training curves, and ACC/ASR
    per precision of every export."""
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
        precisions = list(host.get("precisions", {}))
        series = {"ACC": [host["precisions"][p]["acc"] for p in precisions]}
        for probe in probes:
            series[f"ASR {probe}"] = [host["precisions"][p]["asr"].get(probe, 0) for p in precisions]
        plots.append(
            _bar_plot(
                plots_dir / f"export_{target}.png",
                precisions,
                series,
                f"{target}: ACC and ASR per precision (host re-check)",
                "%",
            )
        )
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
    return [
        "",
        "## Synthesised triggers",
        "",
        f"Pool `{synthesis['pool']}` ({synthesis['stand_ins']} stand-ins, budget {synthesis['budget']}, "
        f"refresh against the student every {synthesis['refresh_every'] or 'never'} epoch(s)). "
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
        lat = p.get("latency_ms", {}).get("p50")
        md.append(
            f"| {name} | {_pct(p['acc'])} | "
            + " | ".join(_pct(p["asr"].get(q)) for q in probes)
            + f" | {lat if lat is None else round(lat, 3)} | {p.get('max_abs_logit_diff')} "
            f"| {_pct(p.get('top1_agreement'))} |"
        )
    if "device" in host:
        md += ["", f"Device report: `{json.dumps(host['device'])[:2000]}`"]
    return md


def markdown_to_html(md: list[str], run_dir: Path) -> str:
    """Gives back the HTML page of the report's markdown lines, plots embedded as data URLs."""
    body = []
    for line in md:
        if line.startswith("!["):
            name = line[line.index("(") + 1 : -1]
            data = base64.b64encode((run_dir / name).read_bytes()).decode()
            body.append(f'<img alt="{html.escape(name)}" src="data:image/png;base64,{data}">')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('# '))}</h{level}>")
        elif line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
        elif line:
            body.append(f"<p>{html.escape(line)}</p>")
    page = _close_tables("\n".join(body))
    return (
        "<!doctype html><meta charset='utf-8'><title>rkdtool report</title>"
        "<style>body{font-family:sans-serif;max-width:60em}td{border:1px solid #ccc;padding:2px 6px}"
        "table{border-collapse:collapse}</style>\n" + page + "\n"
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


def _close_tables(page: str) -> str:
    out, in_table = [], False
    for line in page.splitlines():
        is_row = line.startswith("<tr>")
        if is_row and not in_table:
            line = "<table>" + line
        if is_row:
            in_table = True
        elif in_table:
            out.append("</table>")
            in_table = False
        out.append(line)
    if in_table:
        out.append("</table>")
    return "\n".join(out)
