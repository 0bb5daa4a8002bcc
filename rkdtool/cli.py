"""The command line: parse, call the library, render with Rich. No logic of its own.

Exit codes: 0 success, 2 user error (one red line), 1 a failed check (such as --fail-asr), other codes
only for bugs.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from rkdtool import __version__
from rkdtool.errors import RkdError

app = typer.Typer(
    name="rkdtool",
    help="Distill a robust student from an untrusted teacher (RobustKD), prove the backdoor did not "
    "survive, and ship the student to an edge GPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts show [brackets] literally (hf:OWNER/REPO[@REV][/FILE])
)
console = Console()
err_console = Console(stderr=True)


@contextmanager
def progress_bars(enabled: bool = True):
    """Yields a progress(task, done, total) callback drawing one Rich bar per task."""
    if not enabled:
        yield lambda *_: None
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    ) as bars:
        tasks: dict[str, int] = {}

        def report(task: str, done: int, total: int) -> None:
            if task not in tasks:
                tasks[task] = bars.add_task(task, total=total)
            bars.update(tasks[task], completed=done, total=total)

        yield report


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        console.print(f"rkdtool {__version__}")
        raise typer.Exit(0)


@app.command(
    epilog="Examples: rkdtool distill (the embedded demo) | "
    "rkdtool distill --teacher hf:lixiao985/WideResNet28-4 --student wrn16-2 --data cifar100:data/"
)
def distill(
    teacher: Annotated[
        str,
        typer.Option(
            help="Teacher: hf:OWNER/REPO[@REV][/FILE], file:PATH or a path, or demo:lba|demo:badnets."
        ),
    ] = "demo:lba",
    student: Annotated[
        str | None,
        typer.Option(
            help="Student architecture (see `rkdtool models`). [default: wrn10-1 for demo "
            "teachers, else wrn16-2]"
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            help="Dataset spec: digits, cifar10[:ROOT], cifar100[:ROOT], gtsrb[:ROOT], "
            "imagefolder:PATH. [default: the teacher's dataset when known, else digits]"
        ),
    ] = None,
    method: Annotated[str, typer.Option(help="Distillation method: robustkd, fkd or kd.")] = "robustkd",
    baseline: Annotated[bool, typer.Option(help="Also train a plain FKD student for comparison.")] = True,
    probe: Annotated[
        list[Path] | None,
        typer.Option(help="Trigger probe spec (TOML); repeatable. Demo teachers bring theirs."),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(help="Student epochs. [default: 10 on digits, else 200]")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 64,
    lr: Annotated[float, typer.Option(help="Initial learning rate (x0.1 at 50%, x0.01 at 75%).")] = 0.1,
    clean_fraction: Annotated[
        float, typer.Option(help="Share of the clean training data the defender has (0, 1].")
    ] = 1.0,
    tau: Annotated[
        float, typer.Option(help="RobustKD mask threshold: 0 <= M <= tau (paper's best 0.1).")
    ] = 0.1,
    detox_epochs: Annotated[
        int | None, typer.Option(help="Mask-fitting epochs. [default: 5 on digits, else 40 (paper)]")
    ] = None,
    detox_form: Annotated[
        str, typer.Option(help="eq7: (1-M)F + MP (paper); eq15: F + MP (ablation).")
    ] = "eq7",
    detox_stages: Annotated[str, typer.Option(help="Stages to detoxify: all, last or last2.")] = "all",
    detox_loss: Annotated[str, typer.Option(help="Mask-fitting loss: var+ce (paper), var or ce.")] = "var+ce",
    teacher_bn: Annotated[
        str,
        typer.Option(help="Teacher BN during distillation: eval (deterministic) or train (reference code)."),
    ] = "eval",
    student_noise: Annotated[
        float,
        typer.Option(help="Salt-and-pepper share on the RobustKD student's input (reference code: 0.1)."),
    ] = 0.1,
    teacher_arch: Annotated[
        str | None, typer.Option(help="Override the architecture inferred from the teacher's weights.")
    ] = None,
    trust_pickle: Annotated[
        bool,
        typer.Option(
            help="Allow a teacher pickle to run code while loading (unsafe; recorded in the report)."
        ),
    ] = False,
    download: Annotated[bool, typer.Option(help="Allow downloading the dataset.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    out: Annotated[Path | None, typer.Option(help="Run folder. [default: runs/distill-DATE-TIME]")] = None,
    resume: Annotated[bool, typer.Option(help="Resume an interrupted run of the same --out.")] = False,
    train_subset: Annotated[
        int | None, typer.Option(help="Use only this many training images (quick checks).", hidden=True)
    ] = None,
    test_subset: Annotated[
        int | None, typer.Option(help="Use only this many test images.", hidden=True)
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print report.json instead of the table.")
    ] = False,
) -> None:
    """Distill a robust student from a (possibly backdoored) teacher and measure ACC/ASR on trigger probes.

    With no arguments it runs the embedded demo: a latent-backdoored WRN on scikit-learn's digits
    (trained once and cached), an FKD baseline student and a RobustKD student.
    """
    from rkdtool.distill.job import DistillConfig, run_distill

    config = DistillConfig(
        teacher=teacher,
        student=student,
        data=data,
        method=method,
        baseline=baseline,
        probes=[str(p) for p in probe or []],
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        clean_fraction=clean_fraction,
        device=device,
        seed=seed,
        out=str(out) if out else None,
        resume=resume,
        tau=tau,
        detox_epochs=detox_epochs,
        detox_form=detox_form,
        detox_stages=detox_stages,
        detox_loss=detox_loss,
        teacher_bn=teacher_bn,
        student_noise=student_noise,
        teacher_arch=teacher_arch,
        trust_pickle=trust_pickle,
        download=download,
        train_subset=train_subset,
        test_subset=test_subset,
    )
    with progress_bars(not json_output) as progress:
        run_dir, report = run_distill(config, progress)
    if json_output:
        print_json(report)
        return
    console.print(distill_table(report))
    for note in report.get("notes", []):
        console.print(f"[yellow]note:[/yellow] {note}")
    console.print(f"run folder: {run_dir}  (next: rkdtool export {run_dir} --target jetson)")


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


@app.command("inspect", epilog="Example: rkdtool inspect hf:lixiao985/WideResNet28-4")
def inspect_teacher(
    ref: Annotated[
        str,
        typer.Argument(help="Teacher: hf:OWNER/REPO[@REV][/FILE], file:PATH or a path, or demo:KIND."),
    ],
    arch: Annotated[
        str | None,
        typer.Option(
            help="Load the weights as this architecture (default: inferred); a mismatch is an error."
        ),
    ] = None,
    trust_pickle: Annotated[
        bool,
        typer.Option(
            "--trust-pickle",
            help="Allow a pickle that needs code to load; that code runs with your privileges (unsafe).",
        ),
    ] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON instead of the table.")] = False,
) -> None:
    """What a teacher is: file, SHA-256, architecture, classes, parameters, source, normalisation.

    Loads safely (safetensors or weights-only torch.load); reads a Hugging Face repository through the
    local cache when HF_HUB_OFFLINE is set or the Hub is unreachable.
    """
    from rkdtool.hub import load_model

    with progress_bars(not json_output) as progress:
        loaded = load_model(ref, arch=arch, trust_pickle=trust_pickle, progress=progress)
    info = loaded.summary()
    # A feature-variance profile (DESIGN §3) joins `info` here once it exists.
    if json_output:
        print_json(info)
        return
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
    console.print(table)
    if loaded.trusted_pickle:
        console.print(
            "[yellow]warning:[/yellow] this file is a pickle that ran code while loading (--trust-pickle)"
        )


@app.command("models", epilog="Example: rkdtool models --json")
def list_models(
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON instead of the table.")] = False,
) -> None:
    """The architecture zoo: name forms, parameters (100 classes) and FKD tap channels.

    Any architecture listed distils into any other: every family has three taps at 32x32, 16x16 and 8x8.
    """
    from rkdtool.models.zoo import zoo_summary

    rows = zoo_summary(num_classes=100)
    if json_output:
        print_json(rows)
        return
    table = Table(title="rkdtool models (parameters with 100 classes)")
    table.add_column("name")
    table.add_column("params", justify="right")
    table.add_column("tap channels")
    for row in rows:
        name = row["arch"] if row["canonical"] == row["arch"] else f"{row['arch']} = {row['canonical']}"
        table.add_row(name, f"{row['params']:,}", ", ".join(map(str, row["tap_channels"])))
    console.print(table)
    descriptions = {row["family"]: row["description"] for row in rows}
    for family, description in descriptions.items():
        console.print(f"[bold]{family}[/bold]: {description}", highlight=False)


def main() -> None:
    """Entry point: runs the app; an RkdError becomes one red line and its exit code (2, or 1 for gates)."""
    try:
        app()  # standalone: click turns usage errors into exit code 2 itself
    except RkdError as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(getattr(exc, "exit_code", 2))


if __name__ == "__main__":
    main()
