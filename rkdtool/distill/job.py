"""The main job, `rkdtool distill`: teacher -> (FKD baseline) -> detox masks -> robust student, written as a
run folder (DESIGN §5) that is renamed into place only once everything is written.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
import tomllib
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import torch

from rkdtool import __version__
from rkdtool.data import ImageData, load_dataset
from rkdtool.distill.config import (
    DATA_FREE_METHODS,
    SV_METHODS,
    DistillConfig,
    default_detox_epochs,
    describe_variant,
    retrospects,
    student_name,
    synth_sources,
)
from rkdtool.distill.datafree import prepare_data_free, retrospection_length, train_data_free
from rkdtool.distill.diagnostics import teacher_variance
from rkdtool.distill.methods import METHODS
from rkdtool.distill.prepare import prepare_method
from rkdtool.distill.robustkd import DETOX_FORMS, STAGE_SETS, loss_terms
from rkdtool.distill.trainer import (
    StudentRecipe,
    default_channels_last,
    evaluate_student,
    retrospect,
    train_student,
)
from rkdtool.errors import RkdError, UsageError
from rkdtool.hub import LoadedModel
from rkdtool.machine import cpu_summary
from rkdtool.models import build_model, count_parameters, parse_arch
from rkdtool.probes.metrics import ASR_DEFINITION
from rkdtool.probes.pgd import PgdBudget, robust_accuracy
from rkdtool.probes.spec import Probe, check_targets, load_probes
from rkdtool.probes.uap import KINDS as UAP_KINDS
from rkdtool.probes.uap import Perturbation
from rkdtool.ranks import Ranks
from rkdtool.report import render_report
from rkdtool.teachers import load_model
from rkdtool.training import ProgressFn, no_progress, resolve_device, seed_everything
from rkdtool.weights import build_from_weights, save_weights, write_json, write_text_atomic

DEMO_STUDENT = "wrn10-1"
DEFAULT_STUDENT = "wrn16-2"
PROBE_FILE_KEYS = ("pattern", "image", "mask")


def default_run_dir() -> Path:
    return Path("runs") / datetime.now().strftime("distill-%Y%m%d-%H%M%S")


def copy_probe_specs(specs: list[Path], run_dir: Path) -> Path:
    """Writes one probes.toml into the run folder from several specs, copying the files they name."""
    tables = []
    for spec in specs:
        text = spec.read_text()
        for table in tomllib.loads(text).get("probe", []):
            for key in PROBE_FILE_KEYS:
                value = table.get(key)
                if isinstance(value, str) and Path(value).suffix and (spec.parent / value).exists():
                    dest = run_dir / "probes" / f"{table.get('name', 'probe')}-{key}{Path(value).suffix}"
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(spec.parent / value, dest)
                    table[key] = str(dest.relative_to(run_dir))
            tables.append(table)
    lines = []
    for table in tables:
        lines.append("[[probe]]")
        lines.extend(f"{k} = {json.dumps(v)}" for k, v in table.items())
        lines.append("")
    path = run_dir / "probes.toml"
    write_text_atomic(path, "\n".join(lines))
    return path


def _model_summary(model, arch: str, data: ImageData, probes: list[Probe]) -> dict:
    result = evaluate_student(model, data, probes)
    return {"arch": arch, "params": count_parameters(model), **result}


def _pgd_acc(model, data: ImageData, seed: int) -> float:
    """Robust accuracy on the test split under the default PGD budget (`--pgd`; `rkdtool probe --pgd`)."""
    generator = torch.Generator().manual_seed(seed)
    return robust_accuracy(
        model, data.test_images, data.test_labels, mean=data.mean, std=data.std, generator=generator
    )


def _check(config: DistillConfig) -> None:
    """Raises UsageError for any setting that cannot run, before anything is loaded, trained or written."""
    if config.method not in METHODS:
        raise UsageError(f"unknown method {config.method!r}; known: {', '.join(sorted(METHODS))}")
    if not 0 < config.clean_fraction <= 1:
        raise UsageError(f"--clean-fraction must be in (0, 1], got {config.clean_fraction}")
    ranges = [  # (option, value, lowest allowed, highest allowed, lowest included)
        ("--epochs", config.epochs, 1, None, True),
        ("--batch-size", config.batch_size, 1, None, True),
        ("--lr", config.lr, 0, None, False),
        ("--detox-lr", config.detox_lr, 0, None, False),
        ("--detox-epochs", config.detox_epochs, 1, None, True),
        ("--tau", config.tau, 0, 1, False),
        ("--student-noise", config.student_noise, 0, 1, True),
        ("--synth-budget", config.synth_budget, 0, 1, False),
        ("--synth-refresh", config.synth_refresh, 0, None, True),
        ("--refresh-budget", config.refresh_budget, 0, 1, False),
        ("--eval-every", config.eval_every, 1, None, True),
        ("--iga-lambda", config.iga_lambda, 0, None, True),
        ("--train-subset", config.train_subset, 1, None, True),
        ("--test-subset", config.test_subset, 1, None, True),
    ]
    for option, value, low, high, closed in ranges:
        if value is None:  # the default, resolved later
            continue
        if value < low or (value == low and not closed) or (high is not None and value > high):
            upper = f" and <= {high}" if high is not None else ""
            raise UsageError(f"{option} must be {'>=' if closed else '>'} {low}{upper}, got {value}")
    choices = [
        ("--detox-form", config.detox_form, DETOX_FORMS),
        ("--detox-stages", config.detox_stages, tuple(STAGE_SETS)),
        ("--teacher-bn", config.teacher_bn, ("eval", "train")),
        ("--refresh-kind", config.refresh_kind, UAP_KINDS),
    ]
    for option, value, allowed in choices:
        if value not in allowed:
            raise UsageError(f"{option} must be one of {', '.join(allowed)}, got {value!r}")
    try:
        loss_terms(config.detox_loss)
    except ValueError as exc:
        raise UsageError(f"--detox-loss: {exc}") from None
    synth_sources(config.synth_pool)
    if config.abd_sv and not config.data_free and config.method not in SV_METHODS:
        raise UsageError(
            f"--abd-sv re-weights the feature term of {', '.join(SV_METHODS)}, not {config.method} "
            "(abd is KD with the vaccine built in)"
        )
    if config.data_free:
        if config.method not in DATA_FREE_METHODS:
            raise UsageError(
                "--data-free distills by ZSKT (--method kd) or ZSKT + ABD (--method abd), "
                f"not {config.method}"
            )
        if config.abd_sv:
            raise UsageError(
                "--abd-sv re-weights training images; with --data-free, --method abd has the vaccine"
            )
        if config.clean_fraction < 1 or config.iga_lambda or config.amp or config.channels_last:
            raise UsageError(
                "--data-free uses no training images and takes no --clean-fraction, --iga-lambda, --amp or "
                "--channels-last"
            )


def load_job_data(config: DistillConfig, teacher: LoadedModel) -> tuple[ImageData, str]:
    """Gives back the defender's data (the teacher's normalisation, the subset and clean share asked for)
    and its spec."""
    data_spec = config.data or teacher.dataset or "digits"
    data = load_dataset(data_spec, download=config.download)
    if data.num_classes != teacher.num_classes:
        raise UsageError(
            f"teacher {config.teacher} has {teacher.num_classes} classes "
            f"but {data_spec} has {data.num_classes}"
        )
    if teacher.mean is not None:  # the teacher's own normalisation wins (DESIGN §4)
        data.mean, data.std = tuple(teacher.mean), tuple(teacher.std)
    if config.train_subset or config.test_subset:
        data = data.subset(train=config.train_subset, test=config.test_subset, seed=config.seed)
    if config.clean_fraction < 1:
        data = data.subset(
            train=max(1, int(config.clean_fraction * len(data.train_labels))), seed=config.seed + 1
        )
    return data, data_spec


def probe_specs(config: DistillConfig, teacher: LoadedModel) -> list[Path]:
    """Gives back the probe specs to measure: `--probe`, else the ones a demo teacher or an attack folder
    brings."""
    specs = [Path(p) for p in config.probes]
    if teacher.source.get("probes") and not specs:
        specs = [Path(teacher.source["probes"])]
    if not specs:
        raise UsageError(
            "no trigger probes: pass --probe SPEC.toml (see `rkdtool probe --help` for the format)"
        )
    for spec in specs:
        if not spec.exists():
            raise UsageError(f"probe spec {spec} does not exist")
    return specs


def trim_metrics(metrics: Path, checkpoint: Path) -> None:
    """Drops from an interrupted run's metrics.jsonl the epochs of the student in progress that its last
    checkpoint does not hold (logged, then killed before the checkpoint landed): they are trained again."""
    if not metrics.exists():
        return
    task, last = None, -1
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        task, last = state.get("task"), int(state.get("epoch", -1))
    finished = set()
    students = metrics.parent / "students"
    for done in students.glob("*.json") if students.exists() else []:
        finished.add(f"{done.stem} student")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    kept = [r for r in rows if r["task"] in finished or (r["task"] == task and r["epoch"] <= last + 1)]
    write_text_atomic(metrics, "".join(json.dumps(r) + "\n" for r in kept))


def student_seed(seed: int, method: str) -> int:
    """Gives back the seed of one student of a run: the run's seed and the method's name, stable across
    Python processes (zlib.crc32, not hash())."""
    return (seed * 1_000_003 + zlib.crc32(method.encode())) % 2**31


def check_student_size(student_arch: str, teacher: LoadedModel, num_classes: int) -> None:
    """Raises UsageError when the student has more parameters than its teacher: distillation here makes a
    smaller model for the board, and a larger student is almost always a swapped --teacher/--student."""
    student = count_parameters(build_model(student_arch, num_classes))
    teacher_params = count_parameters(teacher.model)
    if student > teacher_params:
        raise UsageError(
            f"student {student_arch} ({student / 1e6:.2f}M parameters) is larger than its teacher "
            f"{teacher.arch} ({teacher_params / 1e6:.2f}M); pass a smaller --student (see `rkdtool models`)"
        )


@dataclass
class DistillJob:
    """One run of the main job: where it writes, what it distills from, and the report it builds."""

    config: DistillConfig
    folder: Path  # the `.partial` folder, renamed to the run folder at the end
    teacher: LoadedModel
    teacher_model: torch.nn.Module
    data: ImageData
    data_spec: str
    probes: list[Probe]
    student_arch: str
    device: torch.device
    generator: torch.Generator
    progress: ProgressFn
    report: dict
    ranks: Ranks = Ranks()

    def write_records(self, epochs: int) -> None:
        """Writes config.json (every setting resolved, versions, machine) and teacher.json."""
        config, teacher = self.config, self.teacher
        resolved = {
            **asdict(config),
            "student": self.student_arch,
            "data": self.data_spec,
            "epochs": epochs,
            "detox_epochs": default_detox_epochs(config, self.data),
            "device": str(self.device),
            "subset": {"train": config.train_subset, "test": config.test_subset},
            "versions": {
                "rkdtool": __version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
            "machine": platform.machine(),
            "cpu": cpu_summary(),
            "ranks": self.ranks.describe(),
            "started": datetime.now(UTC).isoformat(),
        }
        write_json(self.folder / "config.json", resolved)
        teacher_info = {
            "ref": config.teacher,
            "arch": teacher.arch,
            "num_classes": teacher.num_classes,
            "params": count_parameters(self.teacher_model),
            "sha256": teacher.sha256,
            "source": teacher.source,
            "file": str(teacher.path) if teacher.path else None,
            "trusted_pickle": teacher.trusted_pickle,
        }
        write_json(self.folder / "teacher.json", teacher_info)

    def measure_teacher(self) -> None:
        """Fills the report's teacher, clean-teacher control and feature-variance sections."""
        config, teacher, data, probes, report = self.config, self.teacher, self.data, self.probes, self.report
        if not self.ranks.main:  # only rank 0 reports
            report["diagnostics"] = {"feature_variance": {}}
            return
        report["teacher"] = {
            **_model_summary(self.teacher_model, teacher.arch, data, probes),
            "ref": config.teacher,
            "trusted_pickle": teacher.trusted_pickle,
        }
        if config.pgd:
            report["pgd"] = PgdBudget().describe()
            report["teacher"]["pgd_acc"] = _pgd_acc(self.teacher_model, data, config.seed)
        variance = {"teacher": teacher_variance(self.teacher_model, teacher.arch, data, probes)}
        clean_teacher = teacher.source.get("clean_teacher")  # demo teachers bring their control and probes
        if clean_teacher:
            clean, clean_meta = build_from_weights(Path(clean_teacher))
            control = evaluate_student(clean.to(self.device), data, probes)
            report["controls"] = {"clean_teacher": control}
            variance["clean_teacher"] = teacher_variance(clean, clean_meta["arch"], data, probes)
            if max(control["asr"].values(), default=0) > 0.15:
                report["notes"].append(
                    "the demo trigger fools the clean teacher too (ASR above 15%): it acts partly as "
                    "an adversarial pattern, not only as a backdoor"
                )
        report["diagnostics"] = {"feature_variance": variance}

    def prepare(self, method: str, student: torch.nn.Module):
        """Gives back the method's distiller, with its diagnostics (and detox masks) in the report."""
        teacher, data, probes, report = self.teacher, self.data, self.probes, self.report
        distiller, diagnostics, masks = prepare_method(
            method,
            student,
            self.teacher_model,
            teacher.arch,
            self.student_arch,
            data,
            probes,
            self.config,
            generator=self.generator,
            device=self.device,
            progress=self.progress,
        )
        if self.ranks.distributed:  # every rank fitted them from the same seed; rank 0's are the ones used
            if getattr(distiller, "detox", None) is not None:
                self.ranks.broadcast_module(distiller.detox)
            if hasattr(distiller, "pool"):
                distiller.pool = self.ranks.from_main(distiller.pool)
            if not self.ranks.main:
                return distiller
        stand_ins = [p for p in getattr(distiller, "pool", []) if isinstance(p, Perturbation)]
        variance = dict(report["diagnostics"]["feature_variance"])
        if stand_ins:
            variance[f"{method}: teacher under synthesised triggers"] = teacher_variance(
                self.teacher_model, teacher.arch, data, [], stand_ins
            )
        if masks is not None:
            variance[f"{method}: detoxified teacher"] = teacher_variance(
                self.teacher_model, teacher.arch, data, probes, stand_ins, masks
            )
        diagnostics["feature_variance"] = variance
        report.setdefault("diagnostics", {}).update(diagnostics)
        if masks is not None:
            config = self.config
            save_weights(
                self.folder / "detox.safetensors",
                masks.tensors(),
                {
                    "tau": config.tau,
                    "form": config.detox_form,
                    "stages": config.detox_stages,
                    "loss": config.detox_loss,
                    "teacher_sha256": teacher.sha256,
                },
            )
        return distiller

    def train_data_free(self, method: str, student: torch.nn.Module, log_epoch) -> dict:
        """Trains one data-free student (ZSKT; with ABD for --method abd) and gives back its result."""
        config = self.config
        distiller, recipe, options = prepare_data_free(
            method,
            student,
            self.teacher_model,
            self.teacher.arch,
            self.student_arch,
            self.data,
            epochs=config.epochs,
            batch_size=config.batch_size,
            generator=self.generator,
        )
        name = student_name(method, config)
        if distiller.vaccine is not None:
            self.report.setdefault("diagnostics", {})["vaccine"] = distiller.vaccine.describe()
        result = train_data_free(
            distiller,
            self.data,
            recipe,
            self.probes,
            generator=self.generator,
            device=self.device,
            progress=self.progress,
            on_epoch=log_epoch,
            checkpoint=self.folder / "checkpoint.pt",
            task=f"{name} student",
            retrospection=options,
        )
        result["data_free"] = {
            "rounds": recipe.rounds,
            "batch_size": recipe.batch_size,
            "student_steps": recipe.student_steps,
            "class_balance": recipe.balance,
            "retrospection_rounds": recipe.retrospection_rounds,
        }
        return result

    def train(self, method: str, recipe: StudentRecipe, log_epoch) -> None:
        """Trains one student (or takes it from an interrupted run's folder) and writes its weights."""
        config, data, report = self.config, self.data, self.report
        finished = self.folder / "students" / f"{method}.json"
        if config.resume and finished.exists():  # trained before the interruption
            done = json.loads(finished.read_text())
            report["students"][done.get("name", method)] = done["result"]
            report.update({k: v for k, v in done.get("report", {}).items()})
            return
        # Each student draws from its own seed (the run's seed and its method), so a resumed run that skips
        # a finished student trains the next one exactly as an uninterrupted run would.
        self.generator = seed_everything(student_seed(config.seed, method))
        student = build_model(self.student_arch, data.num_classes)
        if config.data_free:
            return self.record(method, student, self.train_data_free(method, student, log_epoch), 0.0)
        distiller = self.prepare(method, student)
        result = train_student(
            distiller,
            self.data,
            recipe,
            self.probes,
            generator=self.generator,
            device=self.device,
            progress=self.progress,
            on_epoch=log_epoch,
            task=f"{method} student",
            checkpoint=self.folder / "checkpoint.pt",
            ranks=self.ranks,
        )
        if getattr(distiller, "vaccine", None) is not None and self.ranks.main:
            report.setdefault("diagnostics", {})["vaccine"] = {
                **distiller.vaccine.describe(),
                "flagged_share": float(distiller.flagged) / max(1, distiller.seen),
            }
        if retrospects(method, config) and self.ranks.main:
            result["before_retrospection"] = {"acc": result["acc"], "asr": result["asr"]}
            retrospect(
                distiller,
                data,
                recipe,
                epochs=retrospection_length(recipe.epochs),
                generator=self.generator,
                device=self.device,
                progress=self.progress,
                task=f"{student_name(method, config)} self-retrospection",
            )
            result.update(evaluate_student(student, data, self.probes))
        if self.ranks.distributed:
            difference = self.ranks.largest_difference(student)  # collective: every rank takes part
            report.setdefault("distributed", self.ranks.describe())
            report["distributed"].setdefault("largest_weight_difference", {})[method] = difference
            if not self.ranks.main:
                return
        self.record(method, student, result, distiller.options.student_noise)

    def record(self, method: str, student: torch.nn.Module, result: dict, noise: float) -> None:
        """Writes a trained student's weights and result into the run folder and the report."""
        config, data, report = self.config, self.data, self.report
        finished = self.folder / "students" / f"{method}.json"
        name = student_name(method, config)
        (self.folder / "checkpoint.pt").unlink(missing_ok=True)
        report["students"][name] = {
            "arch": self.student_arch,
            "params": count_parameters(student),
            **result,
            "student_noise": noise,
        }
        if config.pgd:
            report["students"][name]["pgd_acc"] = _pgd_acc(student, data, config.seed)
        meta = {
            "arch": self.student_arch,
            "num_classes": data.num_classes,
            "input_size": 32,
            "mean": list(data.mean),
            "std": list(data.std),
            "dataset": self.data_spec,
            "method": name,
            "provenance": {"teacher": config.teacher, "teacher_sha256": self.teacher.sha256},
        }
        save_weights(self.folder / "students" / f"{name}.safetensors", student, meta)
        if method == config.method:
            save_weights(self.folder / "student.safetensors", student, meta)
        extra = {"diagnostics": report["diagnostics"]} if "diagnostics" in report and method != "fkd" else {}
        write_json(finished, {"name": name, "result": report["students"][name], "report": extra})


@contextmanager
def _discarded_on_refusal(partial: Path, *, resumable: bool, main: bool = True):
    """Removes a fresh run's `.partial` folder when the job refuses its input (an RkdError) before any
    student or checkpoint was written there: nothing in it is worth resuming, so nothing half-made is left."""
    try:
        yield
    except RkdError:
        kept = (partial / "checkpoint.pt").exists() or any((partial / "students").glob("*.json"))
        if main and not resumable and not kept:
            shutil.rmtree(partial, ignore_errors=True)
        raise


def run_distill(config: DistillConfig, progress: ProgressFn = no_progress) -> tuple[Path, dict]:
    """Runs the main job; gives back the run folder and its report (report.json's content)."""
    _check(config)
    is_demo = config.teacher.startswith("demo:")
    student_arch = parse_arch(config.student or (DEMO_STUDENT if is_demo else DEFAULT_STUDENT)).name
    ranks = Ranks.from_env()
    device = ranks.join(resolve_device(config.device))
    if config.channels_last is None:  # resolved here, so that config.json and report.json name it
        config = replace(config, channels_last=default_channels_last(device) and not config.data_free)
    # Every rank names the run folder rank 0 names (the default holds the time, which may differ a second).
    out = ranks.from_main(Path(config.out) if config.out else default_run_dir())
    if out.exists():
        raise UsageError(f"run folder {out} already exists; pass another --out")
    partial = out.with_name(out.name + ".partial")  # renamed to `out` once everything is written
    started = time.perf_counter()

    if not ranks.main:  # rank 0 trains and caches a demo teacher first
        ranks.barrier()
    teacher = load_model(
        config.teacher, arch=config.teacher_arch, trust_pickle=config.trust_pickle, progress=progress
    )
    if ranks.main:
        ranks.barrier()
    data, data_spec = load_job_data(config, teacher)
    epochs = config.epochs or (10 if data.name == "digits" else 200)
    specs = probe_specs(config, teacher)
    for spec in specs:  # a spec's errors (TOML, fields, a target the data lacks) surface before any write
        check_targets(load_probes(spec), data.num_classes, data_spec)
    check_student_size(student_arch, teacher, data.num_classes)
    if ranks.main:
        if partial.exists() and not config.resume:
            shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
        for stale in partial.rglob(".*.tmp"):  # what a kill during an atomic write leaves behind
            stale.unlink()
    with _discarded_on_refusal(partial, resumable=config.resume, main=ranks.main):
        copied = ranks.from_main(copy_probe_specs(specs, partial) if ranks.main else None)
        probes = [p.bind(data.mean, data.std) for p in load_probes(copied)]

        generator = seed_everything(config.seed)
        report: dict = {
            "rkdtool_version": __version__,
            "asr_definition": ASR_DEFINITION,
            "data": data_spec,
            "method": student_name(config.method, config),
            "variant": describe_variant(config),
            "probes": [p.describe() for p in probes],
            "teacher": {},
            "students": {},
            "notes": [],
        }
        job = DistillJob(
            config,
            partial,
            teacher,
            teacher.model.to(device).eval(),
            data,
            data_spec,
            probes,
            student_arch,
            device,
            generator,
            progress,
            report,
            ranks,
        )
        if ranks.main:
            job.write_records(epochs)
        job.measure_teacher()

        metrics_path = partial / "metrics.jsonl"
        if ranks.main and not config.resume and metrics_path.exists():
            metrics_path.unlink()
        if ranks.main and config.resume:
            trim_metrics(metrics_path, partial / "checkpoint.pt")
        ranks.barrier()  # the other ranks read the checkpoint rank 0 has trimmed against

        def log_epoch(row: dict) -> None:
            with metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")

        recipe = StudentRecipe(
            epochs=epochs,
            batch_size=config.batch_size,
            lr=config.lr,
            eval_every=config.eval_every,
            amp=config.amp,
            channels_last=config.channels_last,
        )
        base = "kd" if config.data_free else "fkd"  # data-free: plain ZSKT is the comparison
        methods = ([base] if config.baseline and config.method != base else []) + [config.method]
        if ranks.main:
            (partial / "students").mkdir(exist_ok=True)
        for method in methods:
            job.train(method, recipe, log_epoch)
        report["seconds"] = time.perf_counter() - started
        if ranks.main:
            write_json(partial / "report.json", report)
            render_report(partial)
    if ranks.main:
        os.replace(partial, out)
    ranks.leave()
    return out, report
