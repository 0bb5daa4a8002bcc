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


def main() -> None:
    """Entry point: runs the app; an RkdError becomes one red line and its exit code (2, or 1 for gates)."""
    try:
        app()  # standalone: click turns usage errors into exit code 2 itself
    except RkdError as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(getattr(exc, "exit_code", 2))


if __name__ == "__main__":
    main()
