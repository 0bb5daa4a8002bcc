"""`rkdtool models`, `rkdtool targets`, `rkdtool info`: what the tool knows and the environment it runs in."""

from __future__ import annotations

from typing import Annotated

import typer

from rkdtool.cli.app import app, console, print_json
from rkdtool.cli.tables import (
    info_table,
    models_table,
    targets_table,
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
    table = models_table(rows)
    console.print(table)
    descriptions = {row["family"]: row["description"] for row in rows}
    for family, description in descriptions.items():
        console.print(f"[bold]{family}[/bold]: {description}", highlight=False)


@app.command("targets", epilog="Example: rkdtool targets --json")
def list_targets(
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON instead of the table.")] = False,
) -> None:
    """The deployment target profiles (profiles/*.toml) that `rkdtool export --target` takes."""
    from rkdtool.resources import ALIASES, list_profiles

    profiles = list_profiles()
    if json_output:
        print_json({"aliases": ALIASES, "targets": [{**p.to_dict(), "path": None} for p in profiles]})
        return
    table = targets_table(profiles)
    console.print(table)
    console.print("aliases: " + ", ".join(f"{a} = {t}" for a, t in ALIASES.items()), highlight=False)


@app.command("info", epilog="Example: rkdtool info --json")
def environment_info(
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON instead of the table.")] = False,
) -> None:
    """The environment: Python, torch and CUDA, ONNX Runtime and its providers, TensorRT, pycuda."""
    from rkdtool.machine import machine_info

    info = machine_info()
    if json_output:
        print_json(info)
        return
    table = info_table(info)
    console.print(table)
