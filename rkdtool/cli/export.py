"""`rkdtool export` (the bundle for a board), `rkdtool bench` (latency) and `rkdtool report` (md/html)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rkdtool.cli.app import app, console, print_json, progress_bars
from rkdtool.cli.tables import (
    bench_tables,
    export_table,
    split_agreement_line,
)


@app.command(epilog="Example: rkdtool report runs/distill-20261126-120000")
def report(
    run: Annotated[Path, typer.Argument(help="Run folder written by `rkdtool distill`.")],
) -> None:
    """Render report.md and report.html (with plots) from a run folder's JSON, merging export reports."""
    from rkdtool.report import render_report

    rendered = render_report(run)
    console.print(f"wrote {rendered.markdown} and {rendered.html} ({len(rendered.plots)} plots)")


@app.command(
    epilog="Examples: rkdtool export runs/demo --target jetson | "
    "rkdtool export runs/demo --target jetson-nano --out bundles/nano --json | "
    "rkdtool export runs/demo --target my-board.toml"
)
def export(
    run: Annotated[
        Path | None,
        typer.Argument(help="Run folder (written by rkdtool distill). [default: the newest under ./runs]"),
    ] = None,
    target: Annotated[
        str,
        typer.Option(
            help="Target profile: a name from `rkdtool targets` (jetson = jetson-orin-nano) or a TOML path."
        ),
    ] = "jetson",
    out: Annotated[Path | None, typer.Option(help="Bundle folder. [default: RUN/export/TARGET]")] = None,
    probe_images: Annotated[
        int, typer.Option(help="At most this many test images in probes.npz and the host re-check.")
    ] = 2000,
    latency_runs: Annotated[int, typer.Option(help="Timed batch-1 runs per precision on the host.")] = 200,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print host_report.json instead of the table.")
    ] = False,
) -> None:
    """Bundle a run's student for a target and re-check ACC/ASR after every conversion.

    Writes model.onnx, model.int8.onnx (Q/DQ, calibrated on clean training images), calib.npz, probes.npz,
    profile.toml, device/ (the board's runtime), host_report.json and README.md. Builds and checks the
    TensorRT engine here too when TensorRT, pycuda and a CUDA GPU are present.
    """
    from rkdtool.deploy.bundle import default_bundle_dir, export_bundle
    from rkdtool.resources import load_profile
    from rkdtool.runs import latest_run, open_run

    run_folder = open_run(run if run is not None else latest_run(Path("runs")))
    profile = load_profile(target)
    with progress_bars(not json_output) as progress:
        report = export_bundle(
            run_folder,
            profile,
            out,
            progress=progress,
            max_probe_images=probe_images,
            latency_runs=latency_runs,
        )
    if json_output:
        print_json(report)
        return
    console.print(export_table(report))
    if line := split_agreement_line(report):
        console.print(line, highlight=False)
    if not report["tensorrt"]["checked"]:
        console.print(f"[dim]TensorRT not checked here: {report['tensorrt']['reason']}[/dim]")
    bundle = out or default_bundle_dir(run_folder, profile)
    console.print(f"bundle: {bundle}  (on the board: python3 device/check.py .)")


@app.command(
    epilog="Examples: rkdtool bench runs/demo/export/jetson-orin-nano | "
    "rkdtool bench model.onnx --batch 1 --batch 64 --json | rkdtool bench runs/demo --device cuda | "
    "rkdtool bench BUNDLE --out today --compare yesterday/benchmark.json"
)
def bench(
    target: Annotated[
        Path,
        typer.Argument(help="A bundle folder, a run folder, or a .onnx, .safetensors or .engine file."),
    ],
    batch: Annotated[
        list[int] | None, typer.Option("--batch", help="Batch size; repeatable. [default: 1, 8, 32, 64]")
    ] = None,
    runs: Annotated[int, typer.Option(help="Timed runs per batch size.")] = 200,
    warmup: Annotated[int, typer.Option(help="Untimed runs first.")] = 20,
    device: Annotated[
        str, typer.Option(help="torch device for run folders and .safetensors: cpu or cuda.")
    ] = "cpu",
    out: Annotated[
        Path | None,
        typer.Option(
            help="Write benchmark.json and benchmark.md into this folder (made if missing), or to this "
            ".json file and the .md beside it. [default: into the bundle, for a bundle]"
        ),
    ] = None,
    compare: Annotated[
        Path | None,
        typer.Option(
            help="An earlier benchmark.json (or the folder holding it): show each row's change against it."
        ),
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the JSON report instead of the tables.")
    ] = False,
) -> None:
    """Latency per backend and batch size (warm-up, then timed runs; p50/p90/p99, throughput), with each
    model's size on disk and, for a bundle, its ACC and ASR on the bundle's probe images."""
    from rkdtool.deploy.bench import bench_path
    from rkdtool.deploy.bench_report import (
        benchmark_file,
        benchmark_paths,
        compare_reports,
        load_benchmark,
        write_benchmark,
    )

    paths = benchmark_paths(out, target)  # bad --out or --compare fail before the timing, not after
    compare = benchmark_file(compare) if compare is not None else None
    earlier = load_benchmark(compare) if compare is not None else None
    with progress_bars(not json_output) as progress:
        report = bench_path(
            target,
            batch_sizes=batch or [1, 8, 32, 64],
            warmup=warmup,
            runs=runs,
            device=device,
            progress=progress,
        ).to_dict()
    if earlier is not None:
        report["compared_with"] = compare_reports(report, earlier, compare)
    if paths is not None:
        write_benchmark(report, *paths)
    if json_output:
        print_json(report)
        return
    for table in bench_tables(report):
        console.print(table)
    if paths is not None:
        console.print(f"wrote {paths[0]} and {paths[1]}", highlight=False, soft_wrap=True)
