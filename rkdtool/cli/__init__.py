"""The command line: parse, call the library, render with Rich. No logic of its own.

One module per command or group (`distill`, `probe` (+ inspect), `attack`, `export` (+ bench, report),
`catalogue` (models, targets, info)), the Rich tables apart in `tables`, the app in `app`.
Each command function is long only by its Typer option declarations (a signature of 45-112 lines, a body
of at most about 50): splitting them would scatter one command's options over several places.
Exit codes: 0 success, 2 user error (one red line), 1 a failed check (such as --fail-asr), other codes
only for bugs.
"""

from __future__ import annotations

import os
import sys

import click
import typer

from rkdtool.cli import attack, catalogue, distill, export, probe  # noqa: F401  (register the commands)
from rkdtool.cli.app import app, err_console
from rkdtool.errors import RkdError

__all__ = ["app", "main"]


def _click_kinds(name: str) -> tuple[type[BaseException], ...]:
    """click's exception class `name`, and the copy Typer vendors (typer._click, Typer >= 0.26) if any."""
    kinds = [getattr(click.exceptions, name)]
    try:
        from typer._click import exceptions as vendored
    except ImportError:  # Typer before it vendored click raises click's own classes
        pass
    else:
        kinds.append(getattr(vendored, name, kinds[0]))
    return tuple(kinds)


USAGE_ERRORS = _click_kinds("UsageError")
ABORTS = (*_click_kinds("Abort"), typer.Abort, KeyboardInterrupt)


def _fail(message: str, code: int) -> None:
    err_console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True, markup=True)
    sys.exit(code)


def main() -> None:
    """Entry point: runs the app. A usage error, an RkdError or a file the system refuses becomes one red
    line and exit code 2 (1 for failed gates such as --fail-asr); RKDTOOL_DEBUG=1 shows the traceback."""
    try:
        code = app(standalone_mode=False)
    except USAGE_ERRORS as exc:  # unknown option, missing argument, bad value: click's three lines, as one
        if type(exc).__name__ == "NoArgsIsHelpError":  # `rkdtool` alone: the help, as click shows it
            exc.show()
            sys.exit(2)
        where = exc.ctx.command_path if exc.ctx is not None else "rkdtool"
        _fail(f"{exc.format_message()} (see `{where} --help`)", 2)
    except ABORTS:
        _fail("interrupted", 130)
    except RkdError as exc:
        if os.environ.get("RKDTOOL_DEBUG"):
            raise
        _fail(str(exc), getattr(exc, "exit_code", 2))
    except OSError as exc:  # the file system's refusal (a folder where a file goes, no permission, disk full)
        if os.environ.get("RKDTOOL_DEBUG"):
            raise
        what = f": {exc.filename}" if exc.filename else ""
        _fail(f"{exc.strerror or exc}{what}", 2)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
