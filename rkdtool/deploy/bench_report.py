"""benchmark.json and benchmark.md: a latency report people compare, in the spirit of Ultralytics' benchmark
table (format, precision, size, ACC, ASR, latency percentiles, throughput: `ultralytics/utils/benchmarks.py`),
the machine named on top, and with `--compare` the change of every row against an earlier report.

A row is one (model, backend, precision, batch). Two reports' rows match on those four; latency and
throughput change as a share of the earlier value, ACC and ASR in percentage points.

`latency_rows` gathers every timing a bundle's reports hold (host_report.json, benchmark.json, and the
device_report*.json that come back from the board) into one list, for `rkdtool report`'s latency section.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rkdtool.errors import DataError, NotFoundError, UsageError
from rkdtool.weights import write_json, write_text_atomic

BENCHMARK_JSON, BENCHMARK_MD = "benchmark.json", "benchmark.md"
LEGACY_JSON = "bench.json"  # what `rkdtool bench` wrote before benchmark.json; still read


def benchmark_paths(out: Path | None, target: Path) -> tuple[Path, Path] | None:
    """Gives back (benchmark.json, benchmark.md) paths for `--out`: inside a folder (an existing one, or a
    new path without a suffix), or a .json file with the .md beside it; by default inside a bundle. None
    where nothing is to be written (a model file benchmarked without --out)."""
    if out is None:
        if target.is_dir() and (target / "model.onnx").exists():
            return target / BENCHMARK_JSON, target / BENCHMARK_MD
        return None
    out = Path(out)
    if out.is_dir() or (not out.suffix and not out.exists()):
        return out / BENCHMARK_JSON, out / BENCHMARK_MD
    if out.suffix == ".json":
        return out, out.with_suffix(".md")
    raise UsageError(f"--out {out}: give a folder or a .json file path (benchmark.md is written beside it)")


def benchmark_file(path: Path) -> Path:
    """Gives back the benchmark JSON a path names: the file itself, or the one inside a folder."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in (BENCHMARK_JSON, LEGACY_JSON) if (path / name).exists()]
        if not found:
            raise NotFoundError(f"{path} holds no {BENCHMARK_JSON}: run rkdtool bench on it first")
        return found[0]
    if not path.exists():
        raise NotFoundError(f"{path} does not exist (give a benchmark.json written by rkdtool bench)")
    return path


def load_benchmark(path: Path) -> dict:
    """Gives back a benchmark report read from JSON (benchmark.json, or an older bench.json; a folder holding
    one will do)."""
    path = benchmark_file(path)
    try:
        report = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(
            f"{path} is not JSON ({exc}); give a benchmark.json written by rkdtool bench"
        ) from exc
    if not isinstance(report, dict) or not isinstance(report.get("results"), list):
        raise DataError(f"{path} has no 'results' list: it is not a benchmark.json written by rkdtool bench")
    needed = ("model", "backend", "precision", "batch", "latency_ms", "throughput_ips")
    for k, row in enumerate(report["results"]):
        missing = [key for key in needed if not isinstance(row, dict) or key not in row]
        if missing:
            raise DataError(
                f"{path}: result {k} lacks {', '.join(missing)}; not a benchmark written by rkdtool bench"
            )
    return report


def row_key(row: dict) -> tuple:
    """Gives back what identifies a row across reports: (model, backend, precision, batch)."""
    return row["model"], row["backend"], row["precision"], row["batch"]


def _relative(now: float | None, then: float | None) -> float | None:
    return None if not now or not then else now / then - 1.0


def _points(now: float | None, then: float | None) -> float | None:
    return None if now is None or then is None else now - then


def row_change(row: dict, then: dict | None) -> dict | None:
    """Gives back how `row` differs from the earlier report's matching row (None where it had none):
    p50 and img/s relative to the earlier value, ACC and ASR per probe in points (fractions of 1)."""
    if then is None:
        return None
    asr, asr_then = row.get("asr") or {}, then.get("asr") or {}
    return {
        "p50_ms": _relative(row["latency_ms"]["p50"], then["latency_ms"]["p50"]),
        "p99_ms": _relative(row["latency_ms"]["p99"], then["latency_ms"]["p99"]),
        "throughput_ips": _relative(row["throughput_ips"], then["throughput_ips"]),
        "size_bytes": _relative(row.get("size_bytes"), then.get("size_bytes")),
        "acc": _points(row.get("acc"), then.get("acc")),
        "asr": {name: _points(value, asr_then.get(name)) for name, value in asr.items()},
    }


def compare_reports(report: dict, other: dict, other_path: Path) -> dict:
    """Gives back the `compared_with` block of benchmark.json: what the other report was, and one change
    per row of `report` (in its order; None for a row the other report lacks)."""
    earlier = {row_key(r): r for r in other["results"]}
    return {
        "path": str(other_path),
        "target": other.get("target"),
        "created": other.get("created"),
        "machine": other.get("machine", {}),
        "changes": [row_change(r, earlier.get(row_key(r))) for r in report["results"]],
    }


def format_relative(change: float | None) -> str:
    """Gives back a relative change as '+3.1%' ('-' where unknown)."""
    return "-" if change is None else f"{100 * change:+.1f}%"


def format_points(change: float | None) -> str:
    """Gives back a change of a share as '+0.5 pt' (percentage points; '-' where unknown)."""
    return "-" if change is None else f"{100 * change:+.1f} pt"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def size_mb(size_bytes: int | None) -> str:
    """Gives back a size in MB (10^6 bytes) to three significant digits, or '-'."""
    if size_bytes is None:
        return "-"
    mb = size_bytes / 1e6
    return f"{mb:.3g}" if mb < 1000 else f"{mb:,.0f}"


def machine_line(machine: dict) -> str:
    """Gives back the machine in one line: CPU with cores, torch threads and numeric flags (VNNI, AMX: they
    set ONNX Runtime's INT8 speed), GPU, library versions, and kernel-selecting variables that were set."""
    flags = ", ".join(machine.get("cpu_flags") or []) or "no flags read"
    gpu = machine.get("cuda_device") or "none seen by torch"
    versions = ", ".join(
        f"{name} {machine[key]}"
        for name, key in (
            ("rkdtool", "rkdtool"),
            ("Python", "python"),
            ("torch", "torch"),
            ("onnxruntime", "onnxruntime"),
            ("TensorRT", "tensorrt"),
        )
        if machine.get(key)
    )
    threads = f", {machine['torch_threads']} torch threads" if machine.get("torch_threads") else ""
    cpu = f"CPU {machine.get('cpu', '?')} ({machine.get('cpu_cores', '?')} cores{threads}; {flags})"
    env = ", ".join(f"{k}={v}" for k, v in (machine.get("numerics_env") or {}).items())
    return f"{cpu}; GPU {gpu}; {versions}" + (f"; kernel settings {env}" if env else "")


def probe_names(results: list[dict]) -> list[str]:
    """Gives back the probes any row has an ASR for, in first-seen order."""
    return list(dict.fromkeys(name for r in results for name in (r.get("asr") or {})))


def benchmark_markdown(report: dict) -> str:
    """Gives back benchmark.md: the machine, the method, and one table row per (model, backend, batch)."""
    results = report["results"]
    probes = probe_names(results)
    compared = report.get("compared_with")
    lines = [
        f"# rkdtool bench: {report.get('target') or '?'}",
        "",
        f"Machine: {machine_line(report['machine'])}.",
    ]
    if results:
        warmup, runs = results[0]["warmup"], results[0]["runs"]
        timers = ", ".join(sorted({f"{r['backend']} by {r['timer']}" for r in results}))
        lines.append(
            f"Measured {report.get('created', '?')}: {warmup} warm-up runs, then {runs} timed runs per row "
            f"({timers})."
        )
    if report.get("probe_images"):
        lines.append(
            f"ACC and ASR: the timed session or engine itself, on the bundle's {report['probe_images']} "
            f"probe images (probes.npz). ASR: {report['asr_definition']}."
        )
    if compared:
        lines.append(
            f"Change against `{compared['path']}` ({compared.get('created') or '?'}; machine: "
            f"{machine_line(compared['machine'])}): latency and img/s as a share of that report's value, ACC "
            "and ASR in percentage points; 'new' where it has no such row."
        )
    header = ["model", "backend", "precision", "size MB", "ACC", *[f"ASR {p}" for p in probes]]
    header += ["batch", "p50 ms", "p90 ms", "p99 ms", "mean ms", "img/s"]
    if compared:
        header += ["p50 change", "img/s change", "ACC change", *[f"ASR {p} change" for p in probes]]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    changes = compared["changes"] if compared else [None] * len(results)
    for row, change in zip(results, changes, strict=True):
        lines.append("| " + " | ".join(_markdown_cells(row, change, probes, bool(compared))) + " |")
    return "\n".join(lines) + "\n"


def _markdown_cells(row: dict, change: dict | None, probes: list[str], compared: bool) -> list[str]:
    lat, asr = row["latency_ms"], row.get("asr") or {}
    cells = [
        row["model"],
        row["backend"],
        row["precision"],
        size_mb(row.get("size_bytes")),
        _pct(row.get("acc")),
    ]
    cells += [_pct(asr.get(p)) for p in probes]
    cells += [str(row["batch"]), *(f"{lat[k]:.3f}" for k in ("p50", "p90", "p99", "mean"))]
    cells.append(f"{row['throughput_ips']:,.0f}")
    if compared and change is None:
        cells += ["new"] * (3 + len(probes))
    elif compared:
        cells += [format_relative(change["p50_ms"]), format_relative(change["throughput_ips"])]
        cells += [format_points(change["acc"]), *(format_points(change["asr"].get(p)) for p in probes)]
    return cells


def write_benchmark(report: dict, json_path: Path, md_path: Path) -> None:
    """Writes benchmark.json and benchmark.md (atomically), making their folder if needed."""
    for path in (json_path, md_path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(json_path), report)
    write_text_atomic(Path(md_path), benchmark_markdown(report))


# How each report names its timer, in the latency table's words (check.py's gpu_ms/host_ms, trtexec's
# exported times, the host's perf_counter and CUDA events).
TIMERS = {
    "perf_counter": "end-to-end",
    "host_ms": "end-to-end",
    "host_latency_ms": "end-to-end (trtexec)",
    "cuda-events": "GPU compute",
    "gpu_ms": "GPU compute",
    "gpu_compute_ms": "GPU compute (trtexec)",
}


@dataclass
class LatencyRow:
    """One timing of one bundle: where it ran, on what, how it was timed, at which batch size."""

    bundle: str
    where: str  # host or device
    machine: str
    backend: str
    precision: str
    timer: str
    batch: int
    latency_ms: dict  # p50, p90, p99 (ms)
    source: str  # the file it was read from

    @property
    def throughput_ips(self) -> float | None:
        p50 = self.latency_ms.get("p50")
        return self.batch * 1e3 / p50 if p50 else None

    def cells(self) -> list[str]:
        """Gives back the row as `LATENCY_HEADER` names its cells."""
        ms = [
            "-" if self.latency_ms.get(k) is None else f"{self.latency_ms[k]:.3f}"
            for k in ("p50", "p90", "p99")
        ]
        ips = "-" if self.throughput_ips is None else f"{self.throughput_ips:,.0f}"
        named = [f"{self.where} ({self.machine})", self.backend, self.precision, self.timer]
        return [*named, str(self.batch), *ms, ips, self.source]


LATENCY_HEADER = [
    "where",
    "backend",
    "precision",
    "timer",
    "batch",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "img/s",
    "from",
]


def latency_rows(target: str, host: dict) -> list[LatencyRow]:
    """Gives back every timing a bundle's reports hold: host_report.json's batch-1 check, benchmark.json's
    batch sweep, and each device report's timings per batch size (end-to-end and GPU compute). `host` is
    host_report.json with `benchmark` and `devices` merged in (`rkdtool.report.export_reports`)."""
    rows = []
    latency = host.get("latency") or {}
    machine, batch = latency.get("machine") or {}, int(latency.get("batch", 1))
    for name, p in host.get("precisions", {}).items():
        if p.get("latency_ms"):
            gpu = p.get("backend") == "tensorrt"
            on = machine.get("cuda_device" if gpu else "cpu") or "?"
            timer = TIMERS["cuda-events" if gpu else "perf_counter"]
            where = (target, "host", on, p.get("backend", "?"), name, timer)
            rows.append(LatencyRow(*where, batch, p["latency_ms"], "host_report.json"))
    bench = host.get("benchmark") or {}
    for r in bench.get("results", []):
        on, timer = r.get("device") or "?", TIMERS.get(r.get("timer"), "?")
        where = (target, "host", on, r["backend"], f"{r['precision']} ({r['model']})", timer)
        rows.append(LatencyRow(*where, int(r["batch"]), r["latency_ms"], bench["file"]))
    for file, device in host.get("devices", {}).items():
        rows += _device_rows(target, file, device)
    return rows


def _device_rows(target: str, file: str, device: dict) -> list[LatencyRow]:
    """Gives back a device report's timings: `latency` holds {"batch_N": {"host_ms"|"gpu_ms": stats, ...}}
    (device/check.py); entries without percentiles (a skipped batch, the timer's name) are passed over."""
    board = device.get("platform") or {}
    on = board.get("model") or board.get("machine") or "?"
    rows = []
    for key, timings in (device.get("latency") or {}).items():
        if not (key.startswith("batch_") and key[6:].isdigit() and isinstance(timings, dict)):
            continue
        for timer, stats in timings.items():
            if isinstance(stats, dict) and "p50" in stats:
                label = TIMERS.get(timer, timer)
                if timer == "gpu_ms" and timings.get("gpu_timer") == "cuda-graph":
                    label += " (CUDA graph)"
                where = (target, "device", on, device.get("backend", "?"), device.get("precision", "?"))
                rows.append(LatencyRow(*where, label, int(key[6:]), stats, file))
    return rows
