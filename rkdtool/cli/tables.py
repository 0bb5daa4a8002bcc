"""The Rich tables every command prints, built from the plain results (dicts, dataclasses) the library gives
back. Name columns never truncate (`overflow="fold"`); numbers are right-aligned.
"""

from __future__ import annotations

from rich.table import Table

from rkdtool.cli.app import pct


def distill_table(report: dict) -> Table:
    """Gives back the teacher / control / students table of a distill report."""
    probes = [p["name"] for p in report["probes"]]
    table = Table(title=f"rkdtool distill on {report['data']} (ASR: non-target test images)")
    for column in ("model", "arch", "params", "ACC", *[f"ASR {p}" for p in probes]):
        table.add_column(column, justify="left" if column in ("model", "arch") else "right")
    rows = [("teacher", report["teacher"])]
    if "controls" in report:
        rows.append(
            ("clean teacher (control)", {**report["controls"]["clean_teacher"], "arch": "", "params": None})
        )
    detox = report.get("diagnostics", {}).get("detox")
    if detox:
        rows.append(("detoxified teacher", {**detox["detoxified_teacher"], "arch": "", "params": None}))
    rows += [(f"{m} student", s) for m, s in report["students"].items()]
    for label, row in rows:
        params = f"{row['params']:,}" if row.get("params") else ""
        table.add_row(
            label, row.get("arch", ""), params, pct(row["acc"]), *[pct(row["asr"].get(p)) for p in probes]
        )
    return table


def variance_table(profile: dict) -> Table:
    """Gives back the per-stage feature variance table: clean, and triggered / clean per probe."""
    table = Table(title=f"feature variance per stage (mean over {profile['clean']['images']} images)")
    table.add_column("stage")
    table.add_column("clean", justify="right")
    for name in profile["probes"]:
        table.add_column(f"{name} (x clean)", justify="right")
    for k, stage in enumerate(profile["clean"]["stages"]):
        cells = []
        for p in profile["probes"].values():
            row = p["stages"][k]
            cells.append(f"{row['triggered']['mean']:.3f} ({row['ratio']:.2f}x)")
        table.add_row(stage["stage"], f"{stage['clean']['mean']:.3f}", *cells)
    return table


def probe_tables(result: dict) -> list[Table]:
    """Gives back the ASR table (and the reverse-engineering table) of a `probe` result."""
    table = Table(title=f"{result['model']} ({result['arch']}) on {result['data']}: ACC {pct(result['acc'])}")
    for column in ("probe", "source", "kind", "target", "ASR", "ASR all images"):
        table.add_column(column, justify="right" if column.startswith("ASR") else "left")
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
        per = Table(title="bundle: ACC and ASR per precision")
        per.add_column("precision")
        per.add_column("ACC", justify="right")
        for p in result["probes"]:
            per.add_column(f"ASR {p['name']}", justify="right")
        for name, row in result["precisions"].items():
            per.add_row(name, pct(row["acc"]), *[pct(row["asr"][p["name"]]) for p in result["probes"]])
        tables.append(per)
    reverse = result.get("reverse")
    if reverse:
        rev = Table(
            title=f"Neural Cleanse ({reverse['statistic']} statistic, {reverse['scale']} norms, flag above "
            f"{reverse['threshold']}): "
            f"flagged {reverse['flagged'] or 'none'}"
        )
        for column in ("class", "mask L1", "anomaly index", "flagged"):
            rev.add_column(column, justify="right")
        for cls, index in reverse["anomaly_index"].items():
            rev.add_row(
                cls,
                f"{reverse['norms'][cls]:.1f}",
                f"{index:.2f}",
                "yes" if int(cls) in reverse["flagged"] else "",
            )
        tables.append(rev)
    for name, profile in result.get("feature_variance", {}).items():
        var = Table(title=f"feature variance per stage under {name} ({profile['images']} images)")
        for column in ("stage", "clean", "triggered", "triggered / clean"):
            var.add_column(column, justify="right")
        for stage in profile["stages"]:
            var.add_row(
                stage["stage"],
                f"{stage['clean']['mean']:.3f}",
                f"{stage['triggered']['mean']:.3f}",
                f"{stage['ratio']:.2f}x",
            )
        tables.append(var)
    return tables


def export_table(report: dict) -> Table:
    """Gives back the per-precision table of a host report: ACC, ASR per probe, p50 latency, parity."""
    probes = [p["name"] for p in report["probes"]]
    table = Table(
        title=f"rkdtool export {report['target']}: host re-check on {report['probe_images']} test images "
        "(latency: batch 1, this machine)"
    )
    columns = (
        "precision",
        "backend",
        "ACC",
        *[f"ASR {p}" for p in probes],
        "p50 ms",
        "max |dlogit|",
        "top-1",
    )
    for column in columns:
        table.add_column(column, justify="left" if column in ("precision", "backend") else "right")
    for name, row in report["precisions"].items():
        latency = row.get("latency_ms")
        table.add_row(
            name,
            row["backend"],
            pct(row["acc"]),
            *[pct(row["asr"].get(p)) for p in probes],
            f"{latency['p50']:.3f}" if latency else "-",
            f"{row['max_abs_logit_diff']:.2e}",
            pct(row["top1_agreement"]),
        )
    return table


def models_table(rows: list[dict]) -> Table:
    """Gives back the architecture zoo table of `rkdtool models`."""
    table = Table(title="rkdtool models (parameters with 100 classes)")
    table.add_column("name")
    table.add_column("params", justify="right")
    table.add_column("tap channels")
    for row in rows:
        name = row["arch"] if row["canonical"] == row["arch"] else f"{row['arch']} = {row['canonical']}"
        table.add_row(name, f"{row['params']:,}", ", ".join(map(str, row["tap_channels"])))
    return table


def targets_table(profiles: list) -> Table:
    """Gives back the target profiles table of `rkdtool targets`."""
    table = Table(title="rkdtool targets (latency budget: a batch-1 p50 target, not a measurement)")
    for column in ("name", "SM", "TensorRT", "DLA", "precision", "opset", "batch", "budget ms"):
        table.add_column(column, justify="right" if column in ("DLA", "opset", "budget ms") else "left")
    for p in profiles:
        table.add_row(
            p.name,
            p.sm or "-",
            p.tensorrt or "-",
            str(p.dla_cores),
            f"{p.precision} ({p.fallback_precision})",
            f"{p.opset} {p.exporter}",
            f"{p.batch.min}/{p.batch.opt}/{p.batch.max}",
            f"{p.latency_budget_ms:g}",
        )
    return table


def info_table(info: dict) -> Table:
    """Gives back the environment table of `rkdtool info`."""
    table = Table(title="rkdtool info", show_header=False)
    table.add_column("what")
    table.add_column("value")
    for key, value in info.items():
        shown = ", ".join(value) if isinstance(value, list) else "-" if value is None else str(value)
        table.add_row(key, shown)
    return table


def attack_table(summary: dict, kind: str, arch: str, data: str, target: int) -> Table:
    """Gives back the teacher / clean start / INT8 table of `rkdtool attack`."""
    table = Table(title=f"rkdtool attack --kind {kind}: {arch} on {data} (target {target})")
    for column in ("model", "ACC", *[f"ASR {n}" for n in summary["asr"]], "random patterns (max)"):
        table.add_column(column, justify="left" if column == "model" else "right")
    names = list(summary["asr"])
    table.add_row(
        "clean teacher" if kind == "none" else "poisoned teacher",
        pct(summary["acc"]),
        *[pct(summary["asr"][n]) for n in names],
        pct(max(summary["random_pattern_asr"].values(), default=None)),
    )
    if summary["clean_acc"] is not None:
        table.add_row(
            "clean start", pct(summary["clean_acc"]), *[pct(summary["clean_asr"][n]) for n in names], ""
        )
    for precision, row in (summary.get("int8") or {}).items():
        table.add_row(precision, pct(row["acc"]), *[pct(row["asr"][n]) for n in names], "")
    return table


def bench_table(report, name: str) -> Table:
    """Gives back the latency table of `rkdtool bench`: per model, backend, precision and batch."""
    machine = report.machine
    table = Table(title=f"rkdtool bench {name} on {machine['cpu']} ({machine['cpu_cores']} cores)")
    for column in (
        "model",
        "backend",
        "precision",
        "batch",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "mean ms",
        "img/s",
    ):
        table.add_column(column, justify="left" if column in ("model", "backend", "precision") else "right")
    for r in report.results:
        lat = r.latency_ms
        table.add_row(
            r.model,
            r.backend,
            r.precision,
            str(r.batch),
            f"{lat.p50:.3f}",
            f"{lat.p90:.3f}",
            f"{lat.p99:.3f}",
            f"{lat.mean:.3f}",
            f"{r.throughput_ips:,.0f}",
        )
    return table


def inspect_table(info: dict, ref: str) -> Table:
    """Gives back the teacher description table of `rkdtool inspect`."""
    table = Table(title=f"rkdtool inspect {ref}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
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
