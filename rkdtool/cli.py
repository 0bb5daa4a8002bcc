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


def main() -> None:
    """Entry point: runs the app; an RkdError becomes one red line and its exit code (2, or 1 for gates)."""
    try:
        app()  # standalone: click turns usage errors into exit code 2 itself
    except RkdError as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(getattr(exc, "exit_code", 2))


if __name__ == "__main__":
    main()
