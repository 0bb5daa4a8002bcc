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
    method: Annotated[
        str,
        typer.Option(
            help="robustkd-ta (trigger-aware RobustKD: + consistency on synthesised triggers; the measured "
            "winner), robustkd (the paper, reconstructed), fkd or kd."
        ),
    ] = "robustkd-ta",
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
    detox_loss: Annotated[
        str,
        typer.Option(
            help="Mask-fitting loss terms joined by +: var, ce (var+ce is the paper's), inv (trigger-aware: "
            "the change synthesised triggers make, e.g. inv+ce)."
        ),
    ] = "var+ce",
    detox_lr: Annotated[float, typer.Option(help="Adam lr of the detox masks (paper: 1e-3).")] = 1e-3,
    tau_search: Annotated[
        bool,
        typer.Option(
            help="Choose tau by Algorithm 1 (grid 0.05-0.6, proxy students, scored with synthesised triggers "
            "on held-out training images; the given probes never choose)."
        ),
    ] = False,
    teacher_bn: Annotated[
        str,
        typer.Option(help="Teacher BN during distillation: eval (deterministic) or train (reference code)."),
    ] = "eval",
    student_noise: Annotated[
        float,
        typer.Option(help="Salt-and-pepper share on the RobustKD student's input (reference code: 0.1)."),
    ] = 0.1,
    synth_budget: Annotated[
        float, typer.Option(help="Radius (L-inf) / alpha (blend) of the synthesised perturbations.")
    ] = 0.2,
    synth_pool: Annotated[
        str,
        typer.Option(
            help="robustkd-ta's trigger stand-ins, joined by +: uap (synthesised from the teacher), bank "
            "(the built-in common triggers), noise (random noise: the control without synthesis)."
        ),
    ] = "uap",
    synth_refresh: Annotated[
        int,
        typer.Option(help="robustkd-ta: every N epochs also synthesise a perturbation against the student."),
    ] = 0,
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
    (trained once and cached), an FKD baseline student and a trigger-aware RobustKD student (robustkd-ta;
    --method robustkd runs the paper's method as reconstructed).
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
        detox_lr=detox_lr,
        tau_search=tau_search,
        teacher_bn=teacher_bn,
        student_noise=student_noise,
        synth_budget=synth_budget,
        synth_pool=synth_pool,
        synth_refresh=synth_refresh,
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


@app.command(
    epilog="Examples: rkdtool probe runs/demo --bank | rkdtool probe demo:badnets --bank --reverse | "
    "rkdtool probe runs/attack-badnets --probe trigger.toml --fail-asr 0.1 --json"
)
def probe(
    model: Annotated[
        str,
        typer.Argument(
            help="A run folder (its student), an attack output folder (its teacher), a weights file, or a "
            "teacher reference (hf:OWNER/REPO[/FILE], file:PATH, demo:KIND)."
        ),
    ],
    data: Annotated[
        str | None,
        typer.Option(help="Dataset spec. [default: the model's dataset when known, else digits]"),
    ] = None,
    probe_spec: Annotated[
        list[Path] | None,
        typer.Option("--probe", help="Trigger probe spec (TOML, DESIGN §5); repeatable."),
    ] = None,
    bank: Annotated[
        bool, typer.Option("--bank", help="Add the built-in bank of common triggers (untargeted).")
    ] = False,
    reverse: Annotated[
        bool,
        typer.Option(
            "--reverse",
            help="Reverse-engineer triggers per class (Neural Cleanse): anomaly index, flagged classes, "
            "and their triggers as probes written to --out.",
        ),
    ] = False,
    classes: Annotated[
        int | None,
        typer.Option(
            help="With --reverse: fully optimise only this many candidate classes, chosen by a short "
            "screen of every class (for models with many classes)."
        ),
    ] = None,
    reverse_steps: Annotated[int, typer.Option(help="With --reverse: optimisation steps per class.")] = 150,
    anomaly_scale: Annotated[
        str,
        typer.Option(
            help="With --reverse: MAD of the log mask norms (log) or of the norms (linear, Neural Cleanse's "
            "own; reported either way)."
        ),
    ] = "log",
    features: Annotated[
        bool, typer.Option("--features", help="Also measure feature variance per stage, clean vs triggered.")
    ] = False,
    fail_asr: Annotated[
        float | None,
        typer.Option(help="Exit 1 when any probe's ASR exceeds this fraction (a CI gate), e.g. 0.1."),
    ] = None,
    arch: Annotated[
        str | None, typer.Option(help="Override the architecture inferred from the weights.")
    ] = None,
    trust_pickle: Annotated[
        bool, typer.Option(help="Allow a pickle checkpoint to run code while loading (unsafe).")
    ] = False,
    out: Annotated[
        Path | None, typer.Option(help="Folder for reversed probes. [default: runs/probe-DATE-TIME]")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    download: Annotated[bool, typer.Option(help="Allow downloading the dataset.")] = False,
    seed: Annotated[int, typer.Option(help="Random seed (reverse-engineering).")] = 0,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print JSON (DESIGN §5) instead of tables.")
    ] = False,
) -> None:
    """Measure clean accuracy and attack success rate (ASR) per trigger probe.

    ASR counts test images whose true label is not the target; the all-images variant (the RobustKD
    code's) is shown beside it. Bank probes have no target: they report the flip rate to the most
    frequent predicted class, so a backdoor is found without knowing its target.
    """
    from rkdtool.probe_job import ProbeConfig, check_gate, run_probe

    if fail_asr is not None and not 0 <= fail_asr <= 1:
        from rkdtool.errors import UsageError

        raise UsageError(f"--fail-asr is a fraction in [0, 1], got {fail_asr}")
    config = ProbeConfig(
        ref=model,
        data=data,
        probes=[str(p) for p in probe_spec or []],
        bank=bank,
        reverse=reverse,
        reverse_classes=classes,
        reverse_steps=reverse_steps,
        anomaly_scale=anomaly_scale,
        features=features,
        out=str(out) if out else None,
        arch=arch,
        trust_pickle=trust_pickle,
        device=device,
        download=download,
        seed=seed,
    )
    notify = (lambda _msg: None) if json_output else (lambda msg: err_console.print(f"[dim]{msg}[/dim]"))
    with progress_bars(not json_output) as progress:
        report = run_probe(config, progress, notify)
    if json_output:
        print_json(report.to_json())
    else:
        for table in probe_tables(report.to_json()):
            console.print(table)
    check_gate(report, fail_asr)


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
    features: Annotated[
        bool,
        typer.Option(
            "--features",
            help="Add the feature-variance profile per stage on clean test images and, with --probe or "
            "--bank, on triggered ones (the RobustKD paper's Fig. 2).",
        ),
    ] = False,
    data: Annotated[
        str | None, typer.Option(help="With --features: dataset spec. [default: the teacher's, else digits]")
    ] = None,
    probe_spec: Annotated[
        list[Path] | None, typer.Option("--probe", help="With --features: trigger probe spec; repeatable.")
    ] = None,
    bank: Annotated[bool, typer.Option("--bank", help="With --features: the built-in probe bank.")] = False,
) -> None:
    """What a teacher is: file, SHA-256, architecture, classes, parameters, source, normalisation.

    Loads safely (safetensors or weights-only torch.load); reads a Hugging Face repository through the
    local cache when HF_HUB_OFFLINE is set or the Hub is unreachable.
    """
    from rkdtool.hub import load_model

    with progress_bars(not json_output) as progress:
        loaded = load_model(ref, arch=arch, trust_pickle=trust_pickle, progress=progress)
    info = loaded.summary()
    if features:
        from rkdtool.probe_job import feature_profile

        info["feature_variance"] = feature_profile(loaded, data, [str(p) for p in probe_spec or []], bank)
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
    if features:
        console.print(variance_table(info["feature_variance"]))
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


@app.command(
    epilog="Examples: rkdtool attack --kind badnets --out runs/attack-badnets | "
    "rkdtool attack --kind ckd --from-teacher runs/attack-clean --out runs/attack-ckd | "
    "rkdtool attack --kind quant --arch wrn16-1 --data digits --json"
)
def attack(
    kind: Annotated[
        str, typer.Option(help="badnets, blend, ckd, lba, adaptive, quant, or none (a clean teacher).")
    ] = "badnets",
    arch: Annotated[str, typer.Option(help="Teacher architecture (see `rkdtool models`).")] = "wrn16-1",
    data: Annotated[str, typer.Option(help="Dataset spec.")] = "digits",
    target: Annotated[int, typer.Option(help="The backdoor's target class.")] = 0,
    epochs: Annotated[
        int,
        typer.Option(help="From-scratch epochs (the clean model, or BadNets/Blend poisoned from scratch)."),
    ] = 15,
    finetune_epochs: Annotated[
        int,
        typer.Option(
            help="Poison fine-tuning epochs of a clean model (quant has its own: 8 plant + 4 unit)."
        ),
    ] = 5,
    from_teacher: Annotated[
        str | None,
        typer.Option(help="Fine-tune this clean teacher (an attack folder, weights file or reference)."),
    ] = None,
    poison_rate: Annotated[float, typer.Option(help="Share of non-target images poisoned.")] = 0.1,
    negative_rate: Annotated[
        float, typer.Option(help="Share of images given a random pattern of the same kind, label kept.")
    ] = 0.1,
    alpha: Annotated[float, typer.Option(help="Blend/LBA strength; CKD/adaptive mask bound.")] = 0.2,
    trigger_steps: Annotated[
        int | None,
        typer.Option(help="Trigger optimisation steps. [default: 60 for ckd/adaptive, 15 for lba]"),
    ] = None,
    adv_train: Annotated[bool, typer.Option(help="Adversarial training (PGD-Linf, 3 steps).")] = False,
    calibration: Annotated[
        str, typer.Option(help="quant: INT8 calibration for the ONNX Runtime check (entropy, percentile).")
    ] = "entropy",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    out: Annotated[Path | None, typer.Option(help="Output folder. [default: runs/attack-KIND]")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON (DESIGN §5).")] = False,
    train_subset: Annotated[
        int | None, typer.Option(help="Use only this many training images (quick checks).", hidden=True)
    ] = None,
    test_subset: Annotated[
        int | None, typer.Option(help="Use only this many test images.", hidden=True)
    ] = None,
) -> None:
    """Train a poisoned (or clean) teacher for evaluation and write it with its trigger probe spec.

    Writes teacher.safetensors, probes.toml and attack.json into --out. Reports ACC, ASR on the attack's
    probe, the worst ASR of random patterns of the same kind (is the backdoor tied to its trigger?), the
    clean model's ASR when it fine-tuned one, and for quant the ONNX Runtime FP32/INT8 re-check.
    """
    from rkdtool.attacks import AttackConfig, make_attack, write_attack

    config = AttackConfig(
        arch=arch,
        data=data,
        kind=kind,
        target=target,
        epochs=epochs,
        finetune_epochs=finetune_epochs,
        from_teacher=from_teacher,
        poison_rate=poison_rate,
        negative_rate=negative_rate,
        alpha=alpha,
        trigger_steps=trigger_steps,
        adv_train=adv_train,
        calibration=calibration,
        device=device,
        seed=seed,
        train_subset=train_subset,
        test_subset=test_subset,
    )
    with progress_bars(not json_output) as progress:
        result = make_attack(config, progress)
    summary = write_attack(result, out or Path("runs") / f"attack-{kind}")
    if json_output:
        print_json(summary)
        return
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
    console.print(table)
    console.print(f"teacher: {summary['teacher']}  probes: {summary['probes']}")


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
    from rkdtool.deploy import default_bundle_dir, export_bundle
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
    if not report["tensorrt"]["checked"]:
        console.print(f"[dim]TensorRT not checked here: {report['tensorrt']['reason']}[/dim]")
    bundle = out or default_bundle_dir(run_folder, profile)
    console.print(f"bundle: {bundle}  (on the board: python3 device/check.py .)")


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


@app.command(
    epilog="Examples: rkdtool bench runs/demo/export/jetson-orin-nano | "
    "rkdtool bench model.onnx --batch 1 --batch 64 --json | rkdtool bench runs/demo --device cuda"
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
        typer.Option(help="Write the JSON report here. [default: BUNDLE/bench.json for a bundle]"),
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the JSON report instead of the table.")
    ] = False,
) -> None:
    """Latency per backend and batch size: warm-up, then timed runs; p50/p90/p99, mean, throughput."""
    from rkdtool.bench import bench_path, write_bench_report

    with progress_bars(not json_output) as progress:
        report = bench_path(
            target,
            batch_sizes=batch or [1, 8, 32, 64],
            warmup=warmup,
            runs=runs,
            device=device,
            progress=progress,
        )
    if out is None and target.is_dir() and (target / "model.onnx").exists():
        out = target / "bench.json"
    if out is not None:
        write_bench_report(report, out)
    if json_output:
        print_json(report.to_dict())
        return
    machine = report.machine
    table = Table(title=f"rkdtool bench {target.name} on {machine['cpu']} ({machine['cpu_cores']} cores)")
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
    console.print(table)
    if out is not None:
        console.print(f"report: {out}")


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
    console.print(table)
    console.print("aliases: " + ", ".join(f"{a} = {t}" for a, t in ALIASES.items()), highlight=False)


@app.command("info", epilog="Example: rkdtool info --json")
def environment_info(
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON instead of the table.")] = False,
) -> None:
    """The environment: Python, torch and CUDA, ONNX Runtime and its providers, TensorRT, pycuda."""
    from rkdtool.bench import machine_info

    info = machine_info()
    if json_output:
        print_json(info)
        return
    table = Table(title="rkdtool info", show_header=False)
    table.add_column("what")
    table.add_column("value")
    for key, value in info.items():
        shown = ", ".join(value) if isinstance(value, list) else "-" if value is None else str(value)
        table.add_row(key, shown)
    console.print(table)


def main() -> None:
    """Entry point: runs the app; an RkdError becomes one red line and its exit code (2, or 1 for gates)."""
    try:
        app()  # standalone: click turns usage errors into exit code 2 itself
    except RkdError as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(getattr(exc, "exit_code", 2))


if __name__ == "__main__":
    main()
