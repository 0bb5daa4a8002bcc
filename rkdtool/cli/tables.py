"""The Rich tables every command prints, built from the plain results (dicts, dataclasses) the library gives
back. Every table reads in an 80-column terminal (where output is piped, Rich assumes 80): name columns never
wrap or truncate (`no_wrap`), other cells fold rather than cut, and a table with one column per probe falls
back, where the console is too narrow for those columns, to one ASR column holding a line per probe
(`FittedTable`). Numbers are right-aligned.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.table import Table

from rkdtool.cli.app import pct


class FittedTable:
    """A table in two layouts, chosen when printed: build(wide=True) where it fits the console unwrapped,
    else build(wide=False) (one ASR column, a line per probe)."""

    def __init__(self, build: Callable[[bool], Table]) -> None:
        self.build = build

    def choose(self, console: Console, options: ConsoleOptions) -> Table:
        wide = self.build(True)
        natural = Measurement.get(console, options.update_width(10_000), wide).maximum
        return wide if natural <= options.max_width else self.build(False)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.choose(console, options)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement.get(console, options, self.choose(console, options))


def _columns(table: Table, names: tuple[str, ...], *, left: tuple[str, ...] = (), name: str = "") -> None:
    """Adds columns: `name` (the row's name: never wraps), `left` left-aligned, the rest right-aligned;
    every column but the name folds instead of truncating."""
    for column in names:
        justify = "left" if column == name or column in left else "right"
        table.add_column(column, justify=justify, no_wrap=column == name, overflow="fold")


def _asr_columns(probes: list[str], wide: bool) -> tuple[str, ...]:
    """Gives back the ASR column headers: one per probe (wide), or one holding a line per probe."""
    return tuple(f"ASR {p}" for p in probes) if wide else ("ASR",)


def _asr_cells(asr: dict, probes: list[str], wide: bool) -> list[str]:
    """Gives back the ASR cells of a row for `_asr_columns`."""
    if wide:
        return [pct(asr.get(p)) for p in probes]
    return ["\n".join(f"{p} {pct(asr.get(p))}" for p in probes) or "-"]


def distill_table(report: dict) -> FittedTable:
    """Gives back the teacher / control / students table of a distill report."""
    probes = [p["name"] for p in report["probes"]]
    rows = [("teacher", report["teacher"])]
    if "controls" in report:
        rows.append(
            ("clean teacher (control)", {**report["controls"]["clean_teacher"], "arch": "", "params": None})
        )
    detox = report.get("diagnostics", {}).get("detox")
    if detox:
        rows.append(("detoxified teacher", {**detox["detoxified_teacher"], "arch": "", "params": None}))
    rows += [(f"{m} student", s) for m, s in report["students"].items()]

    def build(wide: bool) -> Table:
        table = Table(title=f"rkdtool distill on {report['data']} (ASR: non-target test images)")
        robust = ("PGD\nACC",) if "pgd" in report else ()
        _columns(
            table,
            ("model", "arch", "params", "ACC", *robust, *_asr_columns(probes, wide)),
            left=("arch", "ASR"),
            name="model",
        )
        for label, row in rows:
            params = f"{row['params']:,}" if row.get("params") else ""
            pgd = (pct(row["pgd_acc"]) if row.get("pgd_acc") is not None else "-",) if robust else ()
            table.add_row(
                label,
                row.get("arch", ""),
                params,
                pct(row["acc"]),
                *pgd,
                *_asr_cells(row["asr"], probes, wide),
            )
        return table

    return FittedTable(build)


def variance_table(profile: dict) -> FittedTable:
    """Gives back the per-stage feature variance table: clean, and triggered / clean per probe."""
    probes = list(profile["probes"])

    def build(wide: bool) -> Table:
        table = Table(title=f"feature variance per stage (mean over {profile['clean']['images']} images)")
        triggered = tuple(f"{name}\n(x clean)" for name in probes) if wide else ("triggered (x clean)",)
        _columns(table, ("stage", "clean", *triggered), left=("triggered (x clean)",), name="stage")
        for k, stage in enumerate(profile["clean"]["stages"]):
            cells = []
            for name, p in profile["probes"].items():
                row = p["stages"][k]
                value = f"{row['triggered']['mean']:.3f} ({row['ratio']:.2f}x)"
                cells.append(value if wide else f"{name} {value}")
            table.add_row(
                stage["stage"], f"{stage['clean']['mean']:.3f}", *(cells if wide else ["\n".join(cells)])
            )
        return table

    return FittedTable(build)


def probe_tables(result: dict) -> list[Table | FittedTable]:
    """Gives back the ASR table (and the reverse-engineering table) of a `probe` result."""
    robust = ""
    if result.get("pgd"):
        budget = result["pgd"]
        robust = (
            f", PGD-{budget['steps']} accuracy {pct(result['pgd_acc'])} (L-inf eps "
            f"{255 * budget['eps']:.3g}/255, step {255 * budget['step']:.3g}/255)"
        )
    table = Table(
        title=f"{result['model']} ({result['arch']}) on {result['data']}: ACC {pct(result['acc'])}{robust}"
    )
    _columns(
        table,
        ("probe", "source", "kind", "target", "ASR", "ASR all\nimages"),
        left=("source", "kind", "target"),
        name="probe",
    )
    for p in result["probes"]:
        name = p["name"]
        target = str(p["target"]) if p["target"] is not None else f"top class {result['targets'][name]}"
        table.add_row(
            name,
            p["source"],
            p["kind"],
            target,
            pct(result["asr"][name]),
            pct(result["asr_all_images"][name]),
        )
    tables = [table]
    if "precisions" in result:  # an export bundle: every precision, since INT8 can wake a backdoor
        tables.append(_precisions_table(result))
    reverse = result.get("reverse")
    if reverse:
        tables.append(_reverse_table(reverse))
    for name, profile in result.get("feature_variance", {}).items():
        var = Table(title=f"feature variance per stage under {name} ({profile['images']} images)")
        _columns(var, ("stage", "clean", "triggered", "triggered / clean"), name="stage")
        for stage in profile["stages"]:
            var.add_row(
                stage["stage"],
                f"{stage['clean']['mean']:.3f}",
                f"{stage['triggered']['mean']:.3f}",
                f"{stage['ratio']:.2f}x",
            )
        tables.append(var)
    return tables


def _precisions_table(result: dict) -> FittedTable:
    """Gives back ACC and ASR per precision of a bundle's `probe` result."""
    probes = [p["name"] for p in result["probes"]]

    def build(wide: bool) -> Table:
        table = Table(title="bundle: ACC and ASR per precision")
        _columns(table, ("precision", "ACC", *_asr_columns(probes, wide)), left=("ASR",), name="precision")
        for name, row in result["precisions"].items():
            table.add_row(name, pct(row["acc"]), *_asr_cells(row["asr"], probes, wide))
        return table

    return FittedTable(build)


def _reverse_table(reverse: dict) -> Table:
    """Gives back Neural Cleanse's mask norms and anomaly index per class."""
    table = Table(
        title=f"Neural Cleanse ({reverse['statistic']} statistic, {reverse['scale']} norms, flag above "
        f"{reverse['threshold']}): "
        f"flagged {reverse['flagged'] or 'none'}"
    )
    _columns(table, ("class", "mask L1", "anomaly index", "flagged"), name="class")
    for cls, index in reverse["anomaly_index"].items():
        table.add_row(
            cls,
            f"{reverse['norms'][cls]:.1f}",
            f"{index:.2f}",
            "yes" if int(cls) in reverse["flagged"] else "",
        )
    return table


def export_table(report: dict) -> FittedTable:
    """Gives back the per-precision table of a host report: ACC, ASR per probe, p50 latency, parity."""
    probes = [p["name"] for p in report["probes"]]

    def build(wide: bool) -> Table:
        table = Table(
            title=f"rkdtool export {report['target']}: host re-check on {report['probe_images']} test images "
            "(latency: batch 1, this machine)"
        )
        first = ("precision", "backend") if wide else ("precision\n(backend)",)
        columns = (*first, "ACC", *_asr_columns(probes, wide), "p50 ms", "max\n|dlogit|", "top-1")
        _columns(table, columns, left=("backend", "ASR"), name=first[0])
        for name, row in report["precisions"].items():
            latency = row.get("latency_ms")
            names = (name, row["backend"]) if wide else (f"{name}\n{row['backend']}",)
            table.add_row(
                *names,
                pct(row["acc"]),
                *_asr_cells(row["asr"], probes, wide),
                f"{latency['p50']:.3f}" if latency else "-",
                f"{row['max_abs_logit_diff']:.2e}",
                pct(row["top1_agreement"]),
            )
        return table

    return FittedTable(build)


def split_agreement_line(report: dict) -> str | None:
    """Gives back the host report's whole-test-split top-1 agreement as one line, or None (older bundles)."""
    split = report.get("test_split_agreement")
    if not split:
        return None
    from rkdtool.deploy.host_check import split_agreement_parts

    return f"top-1 agreement with torch-fp32 on all {split['images']} test images: " + split_agreement_parts(
        split, 1
    )


def models_table(rows: list[dict]) -> Table:
    """Gives back the architecture zoo table of `rkdtool models`."""
    table = Table(title="rkdtool models (parameters with 100 classes)")
    _columns(table, ("name", "params", "tap channels"), left=("tap channels",), name="name")
    for row in rows:
        name = row["arch"] if row["canonical"] == row["arch"] else f"{row['arch']} = {row['canonical']}"
        table.add_row(name, f"{row['params']:,}", ", ".join(map(str, row["tap_channels"])))
    return table


def targets_table(profiles: list) -> Table:
    """Gives back the target profiles table of `rkdtool targets`; its caption says which ONNX (opset and
    exporter) each profile exports. Cells break where a reader would, to fit 80 columns."""
    groups: dict[str, list[str]] = {}
    for p in profiles:
        groups.setdefault(f"opset {p.opset} {p.exporter}", []).append(p.name)
    caption = "ONNX export: " + "; ".join(f"{key} ({', '.join(names)})" for key, names in groups.items())
    table = Table(
        title="rkdtool targets (budget: a batch-1 p50 target, not a measurement)",
        caption=caption,
        caption_justify="left",
    )
    columns = ("name", "SM", "TensorRT", "DLA", "precision\n(fallback)", "batch", "budget\nms")
    _columns(table, columns, left=("SM", "TensorRT", "precision\n(fallback)", "batch"), name="name")
    for p in profiles:
        table.add_row(
            p.name,
            p.sm or "-",
            (p.tensorrt or "-").replace(",", ",\n"),
            str(p.dla_cores),
            f"{p.precision}\n({p.fallback_precision})",
            f"{p.batch.min}-{p.batch.max}\nopt {p.batch.opt}",
            f"{p.latency_budget_ms:g}",
        )
    return table


def info_table(info: dict) -> Table:
    """Gives back the environment table of `rkdtool info`."""
    table = Table(title="rkdtool info", show_header=False)
    _columns(table, ("what", "value"), left=("value",), name="what")
    for key, value in info.items():
        shown = ", ".join(value) if isinstance(value, list) else "-" if value is None else str(value)
        table.add_row(key, shown)
    return table


def attack_table(summary: dict, kind: str, arch: str, data: str, target: int) -> FittedTable:
    """Gives back the teacher / clean start / INT8 table of `rkdtool attack`."""
    names = list(summary["asr"])
    rows = [("clean teacher" if kind == "none" else "poisoned teacher", summary["acc"], summary["asr"])]
    if summary["clean_acc"] is not None:
        rows.append(("clean start", summary["clean_acc"], summary["clean_asr"]))
    rows += [(precision, row["acc"], row["asr"]) for precision, row in (summary.get("int8") or {}).items()]
    if shadow := summary.get("shadow_student"):  # the attacker's own FKD student of the finished teacher
        check = {name: shadow["check_student_asr"] for name in names}
        rows.append((f"FKD student ({shadow['arch']})", shadow["check_student_acc"], check))
    if carry := summary.get("carry_check"):  # the kept attempt's check student
        chosen = carry["attempts"][carry["chosen"]]
        check = {name: chosen["student_held_asr"] for name in names}
        rows.append((f"carry check ({carry['arch']}, held-out train)", chosen["student_held_acc"], check))
    random_max = pct(max(summary["random_pattern_asr"].values(), default=None))

    def build(wide: bool) -> Table:
        table = Table(title=f"rkdtool attack --kind {kind}: {arch} on {data} (target {target})")
        columns = ("model", "ACC", *_asr_columns(names, wide), "random\npatterns\n(max)")
        _columns(table, columns, left=("ASR",), name="model")
        for k, (label, acc, asr) in enumerate(rows):
            table.add_row(label, pct(acc), *_asr_cells(asr, names, wide), random_max if k == 0 else "")
        return table

    return FittedTable(build)


def _with_change(value: str, change: str | None) -> str:
    """Gives back a cell: the value, and under it (dim) its change against a compared report."""
    return value if change is None else f"{value}\n[dim]{change}[/dim]"


def _rows_and_changes(report: dict) -> list[tuple[dict, dict | None]]:
    """Gives back each result with its change against the compared report (None: not compared, or new)."""
    changes = (report.get("compared_with") or {}).get("changes") or [None] * len(report["results"])
    return list(zip(report["results"], changes, strict=True))


def bench_tables(report: dict) -> list[Table]:
    """Gives back the two tables of `rkdtool bench`: the models (backend, precision, size, ACC, ASR), then
    the latency of each per batch; with a compared report, each value's change under it. Two tables, since
    one row holding both would not fit 80 columns; benchmark.md has them side by side."""
    return [bench_models_table(report), bench_latency_table(report)]


def bench_models_table(report: dict) -> Table:
    """Gives back one row per model of a benchmark: what runs it, its size on disk, ACC and ASR per probe."""
    from rkdtool.deploy.bench_report import format_points, format_relative, size_mb

    on = f" (ACC/ASR on {report['probe_images']} probe images)" if report.get("probe_images") else ""
    table = Table(title=f"rkdtool bench {Path(report.get('target') or '?').name}: models{on}")
    _columns(table, ("model", "runs on", "MB", "ACC", "ASR"), left=("runs on", "ASR"), name="model")
    seen = set()
    for row, change in _rows_and_changes(report):
        if (row["model"], row["backend"], row["precision"]) in seen:
            continue  # size, ACC and ASR belong to the model, not the batch size
        seen.add((row["model"], row["backend"], row["precision"]))
        asr = row.get("asr") or {}
        size = size_mb(row.get("size_bytes"))
        acc = pct(row.get("acc"))
        if change is not None:
            size = _with_change(size, format_relative(change["size_bytes"]))
            acc = _with_change(acc, format_points(change["acc"])) if row.get("acc") is not None else acc
        cells = [
            _with_change(f"{name} {pct(value)}", format_points(change["asr"].get(name)) if change else None)
            for name, value in asr.items()
        ]
        table.add_row(
            row["model"], f"{row['backend']}\n{row['precision']}", size, acc, "\n".join(cells) or "-"
        )
    return table


def bench_latency_table(report: dict) -> Table:
    """Gives back the latency of every benchmark row: p50/p90/p99 ms and throughput per model and batch."""
    from rkdtool.deploy.bench_report import format_relative

    machine, compared = report["machine"], "compared_with" in report
    gpu = f", GPU {machine['cuda_device']}" if machine.get("cuda_device") else ""
    note = "; under each value, its change against the compared report" if compared else ""
    table = Table(title=f"latency in ms on {machine['cpu']} ({machine['cpu_cores']} cores{gpu}){note}")
    _columns(table, ("model", "batch", "p50", "p90", "p99", "img/s"), name="model")
    for row, change in _rows_and_changes(report):
        lat = row["latency_ms"]

        def changed(value: str, key: str, change=change) -> str:
            if not compared:
                return value
            return _with_change(value, "new" if change is None else format_relative(change[key]))

        table.add_row(
            row["model"],
            str(row["batch"]),
            changed(f"{lat['p50']:.3f}", "p50_ms"),
            f"{lat['p90']:.3f}",
            changed(f"{lat['p99']:.3f}", "p99_ms"),
            changed(f"{row['throughput_ips']:,.0f}", "throughput_ips"),
        )
    return table


def inspect_table(info: dict, ref: str) -> Table:
    """Gives back the teacher description table of `rkdtool inspect`."""
    table = Table(title=f"rkdtool inspect {ref}", show_header=False)
    _columns(table, ("field", "value"), left=("value",), name="field")
    table.columns[0].style = "bold"
    source = info["source"]
    if source.get("repo"):
        table.add_row("repository", f"{source['repo']} @ {source['revision']}")
    table.add_row("file", info["file"])
    table.add_row("sha256", info["sha256"])
    table.add_row("architecture", f"{info['arch']}  (from {info['arch_from']})")
    table.add_row("classes", str(info["num_classes"]))
    table.add_row("parameters", f"{info['params']:,}")
    table.add_row("dataset", info["dataset"] or "unknown (pass --data when distilling)")
    if info["mean"]:
        mean = ", ".join(f"{v:.4f}" for v in info["mean"])
        std = ", ".join(f"{v:.4f}" for v in info["std"])
        table.add_row("normalisation", f"mean ({mean})  std ({std})")
    return table
