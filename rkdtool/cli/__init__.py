"""The command line: parse, call the library, render with Rich. No logic of its own.

One module per command or group (`distill`, `probe` (+ inspect), `attack`, `export` (+ bench, report),
`catalogue` (models, targets, info)), the Rich tables apart in `tables`, the app in `app`.
Each command function is long only by its Typer option declarations (a signature of 45-112 lines, a body
of at most about 50): splitting them would scatter one command's options over several places.
Exit codes: 0 success, 2 user error (one red line), 1 a failed check (such as --fail-asr), other codes
only for bugs.
"""

from __future__ import annotations

import sys

from rkdtool.cli import attack, catalogue, distill, export, probe  # noqa: F401  (register the commands)
from rkdtool.cli.app import app, err_console
from rkdtool.errors import RkdError

__all__ = ["app", "main"]


def main() -> None:
    """Entry point: runs the app; an RkdError becomes one red line and its exit code (2, or 1 for gates)."""
    try:
        app()  # standalone: click turns usage errors into exit code 2 itself
    except RkdError as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(getattr(exc, "exit_code", 2))


if __name__ == "__main__":
    main()
