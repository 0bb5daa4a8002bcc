"""The Typer app every command registers on, the consoles, progress bars and value formatting they share.

Commands import the library lazily inside their function, so `rkdtool --help` does not import torch.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from typer.core import TyperGroup

from rkdtool import __version__

# The order `rkdtool --help` lists the commands in: the main job, then its checks, then deployment, then
# the catalogues. Commands live in several modules, so registration order would not say this.
COMMAND_ORDER = (
    "distill",
    "probe",
    "inspect",
    "models",
    "attack",
    "report",
    "export",
    "bench",
    "targets",
    "info",
)


class OrderedCommands(TyperGroup):
    def list_commands(self, ctx) -> list[str]:
        known = [name for name in COMMAND_ORDER if name in self.commands]
        return known + [name for name in self.commands if name not in known]


app = typer.Typer(
    cls=OrderedCommands,
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
