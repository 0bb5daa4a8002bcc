"""The main job: teacher -> (FKD baseline) -> detox masks -> robust student, written as a run folder."""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
import tomllib
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import torch

from rkdtool import __version__
from rkdtool.data import ImageData, load_dataset, normalize
from rkdtool.distill.methods import METHODS, MethodOptions
from rkdtool.distill.robustkd import DetoxConfig, DetoxifiedTeacher, DetoxMasks, fit_detox_masks
from rkdtool.distill.trainer import StudentRecipe, evaluate_student, train_student
from rkdtool.distill.uap import Perturbation
from rkdtool.errors import UsageError
from rkdtool.metrics import ASR_DEFINITION
from rkdtool.models import build_model, count_parameters, parse_arch
from rkdtool.probes import Probe, load_probes
from rkdtool.report import render_report
from rkdtool.training import ProgressFn, no_progress, resolve_device, seed_everything
from rkdtool.weights import build_from_weights, save_weights, write_json, write_text_atomic

DEMO_STUDENT = "wrn10-1"
DEFAULT_STUDENT = "wrn16-2"
PROBE_FILE_KEYS = ("pattern", "image", "mask")


@dataclass
class DistillConfig:
    teacher: str = "demo:lba"
    student: str | None = None  # default: wrn10-1 for demo teachers (time budget), else wrn16-2
    data: str | None = None  # default: the teacher's dataset when known, else digits
    method: str = "robustkd-ta"  # the measured winner (benchmarks/results/efficacy.md); robustkd = the paper
    baseline: bool = True
    probes: list[str] = field(default_factory=list)
    epochs: int | None = None  # default: 10 on digits, 200 elsewhere (the FKD recipe)
    batch_size: int = 64
    lr: float = 0.1
    clean_fraction: float = 1.0
    device: str = "auto"
    seed: int = 0
    out: str | None = None
    resume: bool = False
    tau: float = 0.1
    detox_epochs: int | None = None  # default: 5 on digits (budget), 40 elsewhere (the paper)
    detox_form: str = "eq7"
    detox_stages: str = "all"
    detox_loss: str = "var+ce"
    teacher_bn: str = "eval"
    student_noise: float = 0.1
    temperature: float = 4.0
    detox_lr: float = 1e-3  # Adam lr of the masks (paper)
    tau_search: bool = False  # Algorithm 1: pick tau on a held-out split, with synthesised triggers
    synth_budget: float = 0.2  # L-inf radius / blend alpha of the synthesised perturbations
    synth_epochs: int = 3
    synth_pool: str = "uap"  # stand-ins: uap (synthesised), bank (common triggers), noise (control); +
    synth_refresh: int = 0  # robustkd-ta: every N epochs also synthesise a perturbation against the student
    teacher_arch: str | None = None
    trust_pickle: bool = False
    download: bool = False
    train_subset: int | None = None
    test_subset: int | None = None


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


def default_detox_epochs(config: DistillConfig, data: ImageData) -> int:
    """Gives back --detox-epochs, defaulting to 5 on digits (the demo's budget) and 40 elsewhere (paper)."""
    return config.detox_epochs or (5 if data.name == "digits" else 40)


def needs_pool(method: str, config: DistillConfig) -> bool:
    """True when the method or its detox loss uses synthesised trigger stand-ins."""
    return method == "robustkd-ta" or (method.startswith("robustkd") and "inv" in config.detox_loss)


def prepare_method(
    method: str,
    student,
    teacher_model,
    teacher_arch: str,
    student_arch: str,
    data: ImageData,
    probes: list[Probe],
    config: DistillConfig,
    *,
    generator: torch.Generator,
    device: torch.device,
    progress: ProgressFn = no_progress,
    pool: list | None = None,
):
    """Gives back (distiller, diagnostics, detox masks or None) for one method, fitting what it needs first.

    robustkd*: detox masks (Stage A; with --tau-search, tau chosen by Algorithm 1 first), reported with the
    detoxified teacher's own ACC/ASR and mask statistics; robustkd-ta and trigger-aware detox losses: also
    the pool of trigger stand-ins and where the synthesised ones sink images (the suspected target).
    """
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; known: {', '.join(sorted(METHODS))}")
    teacher_taps, student_taps = parse_arch(teacher_arch).taps, parse_arch(student_arch).taps
    options = MethodOptions(temperature=config.temperature, teacher_bn=config.teacher_bn)
    kwargs: dict = {}
    diagnostics: dict = {}
    masks = None
    if pool is None and needs_pool(method, config):
        pool, diagnostics["synthesis"] = synthesise_pool(
            teacher_model, data, config, generator, device, progress
        )
    pool = pool or []
    if method.startswith("robustkd"):
        if config.tau_search:
            diagnostics["tau_search"] = search_tau(
                method,
                teacher_model,
                teacher_arch,
                student_arch,
                data,
                config,
                pool,
                generator=generator,
                device=device,
                progress=progress,
            )
            config = replace(config, tau=diagnostics["tau_search"]["chosen"])
        detox_config = detox_config_for(config, data)
        masks = fit_detox_masks(
            teacher_model,
            teacher_taps,
            data,
            detox_config,
            generator=generator,
            device=device,
            progress=progress,
            pool=pool,
        )
        detoxified = DetoxifiedTeacher(teacher_model, teacher_taps, masks)
        diagnostics["detox"] = {
            **asdict(detox_config),
            "mask_statistics": masks.statistics(),
            "detoxified_teacher": evaluate_student(detoxified, data, probes),
        }
        kwargs["detox"] = masks
        options = MethodOptions(**{**asdict(options), "student_noise": config.student_noise})
    if method == "robustkd-ta":
        kwargs.update(pool=pool, refresh_every=config.synth_refresh, refresh_budget=config.synth_budget)
    distiller = METHODS[method](
        student, teacher_model, student_taps, teacher_taps, options, data.mean, data.std, **kwargs
    )
    return distiller, diagnostics, masks


def detox_config_for(config: DistillConfig, data: ImageData) -> DetoxConfig:
    return DetoxConfig(
        tau=config.tau,
        form=config.detox_form,
        stages=config.detox_stages,
        loss=config.detox_loss,
        epochs=default_detox_epochs(config, data),
        lr=config.detox_lr,
    )


TAU_GRID = (0.05, 0.1, 0.2, 0.3, 0.4, 0.6)


def search_tau(
    method: str,
    teacher_model,
    teacher_arch: str,
    student_arch: str,
    data: ImageData,
    config: DistillConfig,
    pool: list,
    *,
    generator: torch.Generator,
    device: torch.device,
    progress: ProgressFn = no_progress,
    grid: tuple[float, ...] = TAU_GRID,
    delta_acc: float = 0.05,
    delta_asr: float = 0.10,
) -> dict:
    """Algorithm 1 as a grid (algorithms.md §2.4 Stage C): gives back the tau to use and every trial.

    Each tau fits masks and runs a proxy distillation (a fifth of the epochs, at least 2) on 90% of the
    clean training split; the held-out 10% scores it. ASR for the choice comes from what a defender has:
    universal perturbations synthesised from the teacher (and the pool's other stand-ins), scored as the
    share of held-out images they send to the synthesised perturbations' suspected target, or to their
    dominant class when none is suspected. The given probes are never used to choose. Accept tau when the
    proxy student's ACC is within `delta_acc` of the teacher's and that ASR at most `delta_asr`; pick the
    accepted tau with the highest ACC (ties: the lower ASR), else the best ACC - ASR.
    """
    fit, held = data.split_holdout(0.1, seed=config.seed)
    if not pool:  # robustkd without a pool: synthesise the selection triggers on the teacher
        pool = synthesise_uaps(teacher_model, fit, config, generator, device, progress)
    on_teacher = selection_scores(teacher_model, held, pool, None)
    teacher_acc, target = on_teacher["acc"], on_teacher["sink"]
    proxy_epochs = max(2, (config.epochs or 10) // 5)
    trials = []
    for tau in grid:
        trial_config = replace(config, tau=tau, tau_search=False)
        student = build_model(student_arch, data.num_classes)
        distiller, _, _ = prepare_method(
            method,
            student,
            teacher_model,
            teacher_arch,
            student_arch,
            fit,
            [],
            replace(trial_config, synth_refresh=0),
            generator=generator,
            device=device,
            progress=progress,
            pool=pool,
        )
        train_student(
            distiller,
            fit,
            StudentRecipe(epochs=proxy_epochs, batch_size=config.batch_size, lr=config.lr),
            [],
            generator=generator,
            device=device,
            progress=progress,
            task=f"tau search ({tau})",
        )
        scores = selection_scores(student, held, pool, target)
        ok = teacher_acc - scores["acc"] <= delta_acc and scores["asr"] <= delta_asr
        scores.update(tau=tau, accepted=ok)
        trials.append(scores)
    accepted = [t for t in trials if t["accepted"]]
    if accepted:
        chosen = max(accepted, key=lambda t: (t["acc"], -t["asr"]))
    else:
        chosen = max(trials, key=lambda t: t["acc"] - t["asr"])
    return {
        "chosen": chosen["tau"],
        "grid": list(grid),
        "proxy_epochs": proxy_epochs,
        "held_out_images": len(held.train_labels),
        "teacher_acc_held_out": teacher_acc,
        "selection_target": target,
        "selection_probes": "synthesised perturbations (the given probes are not used to choose)",
        "delta_acc": delta_acc,
        "delta_asr": delta_asr,
        "trials": trials,
    }


@torch.no_grad()
def selection_scores(model, held: ImageData, pool: list, target: int | None) -> dict:
    """Gives back ACC on the held-out images and the worst share the pool sends to `target` (or, without
    one, to each stand-in's dominant class), with `sink` the class the first stand-in sends most images to.
    """
    model.eval()
    images, labels = held.train_images, held.train_labels
    param = next(model.parameters())
    x = images.to(param.device)
    acc = float((model(normalize(x, held.mean, held.std)).argmax(1).cpu() == labels).float().mean())
    worst, sink = 0.0, None
    for pert in pool:
        preds = model(normalize(pert.apply(x), held.mean, held.std)).argmax(1).cpu()
        goal = target
        if goal is None:
            goal = int(torch.bincount(preds, minlength=held.num_classes).argmax())
        sink = goal if sink is None else sink
        others = labels != goal
        if others.any():
            worst = max(worst, float((preds[others] == goal).float().mean()))
    return {"acc": acc, "asr": worst, "sink": sink}


def synthesise_uaps(teacher_model, data, config, generator, device, progress) -> list:
    """Gives back the untargeted universal perturbations of every kind (uap.KINDS) synthesised from the
    teacher on `data` at `--synth-budget` for `--synth-epochs`."""
    from rkdtool.distill.uap import KINDS, synthesise_uap

    return [
        synthesise_uap(
            teacher_model,
            data,
            kind=kind,
            budget=config.synth_budget,
            epochs=config.synth_epochs,
            generator=generator,
            device=device,
            progress=progress,
        )
        for kind in KINDS
    ]


def synthesise_pool(teacher_model, data, config, generator, device, progress) -> tuple[list, dict]:
    """Gives back the pool of trigger stand-ins `--synth-pool` names and where the synthesised ones sink
    images (their dominant class, when at least half of them agree at >= 50%, is the suspected target)."""
    from rkdtool.distill.uap import RandomNoise, perturbation_sink
    from rkdtool.probes import probe_bank

    sources = set(config.synth_pool.split("+"))
    if not sources or not sources <= {"uap", "bank", "noise"}:
        raise UsageError(f"--synth-pool joins uap, bank and noise with '+', got {config.synth_pool!r}")
    pool, sinks = [], []
    if "uap" in sources:
        pool = synthesise_uaps(teacher_model, data, config, generator, device, progress)
        sinks = [asdict(perturbation_sink(teacher_model, data, pert, device)) for pert in pool]
    if "bank" in sources:
        h, w = data.train_images.shape[-2:]
        pool.extend(probe_bank(h, w))
    if "noise" in sources:  # the control: no synthesis, fresh random noise of the same budget
        pool.append(RandomNoise(config.synth_budget))
    votes = [s["dominant_class"] for s in sinks if s["share"] >= 0.5]
    return pool, {
        "pool": config.synth_pool,
        "budget": config.synth_budget,
        "epochs": config.synth_epochs,
        "refresh_every": config.synth_refresh,
        "stand_ins": len(pool),
        "perturbations": sinks,
        "suspected_target": max(set(votes), key=votes.count) if votes else None,
    }


def describe_variant(config: DistillConfig) -> str:
    """Gives back a one-line label of the method variant and the settings that define it (for reports)."""
    if config.method in ("fkd", "kd"):
        return config.method
    tau = "tau by search (Algorithm 1)" if config.tau_search else f"tau {config.tau}"
    parts = [
        f"detox {config.detox_form} on {config.detox_stages} stages, loss {config.detox_loss}, {tau}",
        f"student noise {config.student_noise}",
    ]
    if needs_pool(config.method, config):
        refresh = f", refreshed against the student every {config.synth_refresh} epoch(s)"
        parts.append(
            f"trigger stand-ins {config.synth_pool} (budget {config.synth_budget}"
            f"{refresh if config.synth_refresh else ''})"
        )
    if config.method == "robustkd-ta":
        parts.append("trigger-consistency distillation")
    label = (
        "paper-faithful RobustKD" if config.method == "robustkd" and "inv" not in config.detox_loss else ""
    )
    return f"{config.method}{f' ({label})' if label else ''}: " + "; ".join(parts)


@dataclass
class StandInProbe:
    """A synthesised perturbation seen as an untargeted probe, for feature-variance diagnostics."""

    name: str
    perturbation: object
    target: int | None = None

    def model_input(self, images: torch.Tensor, *, mean, std) -> torch.Tensor:
        return normalize(self.perturbation.apply(images), mean, std)


def teacher_variance(
    model, arch: str, data: ImageData, probes: list, stand_ins: list = (), masks: DetoxMasks | None = None
) -> dict:
    """Gives back the per-stage feature variance of `model` (through `masks` when given) on clean test
    images, under each probe (targeted probes: non-target images only) and under each synthesised stand-in
    (paper Fig. 2, Finding 2)."""
    from rkdtool.features import variance_profiles

    named = list(probes) + [StandInProbe(f"synthesised-{p.kind}", p) for p in stand_ins]
    rewrite = masks.rewrite if masks is not None else None
    return variance_profiles(
        model, arch, data.test_images, data.test_labels, named, mean=data.mean, std=data.std, rewrite=rewrite
    )


def run_distill(config: DistillConfig, progress: ProgressFn = no_progress) -> tuple[Path, dict]:
    """Runs the main job; gives back the run folder and its report (report.json's content)."""
    from rkdtool.hub import load_model

    if config.method not in METHODS:
        raise UsageError(f"unknown method {config.method!r}; known: {', '.join(sorted(METHODS))}")
    if not 0 < config.clean_fraction <= 1:
        raise UsageError(f"--clean-fraction must be in (0, 1], got {config.clean_fraction}")
    is_demo = config.teacher.startswith("demo:")
    student_arch = parse_arch(config.student or (DEMO_STUDENT if is_demo else DEFAULT_STUDENT)).name
    device = resolve_device(config.device)
    out = Path(config.out) if config.out else default_run_dir()
    if out.exists():
        raise UsageError(f"run folder {out} already exists; pass another --out")
    partial = out.with_name(out.name + ".partial")  # renamed to `out` once everything is written
    started = time.perf_counter()

    teacher = load_model(
        config.teacher, arch=config.teacher_arch, trust_pickle=config.trust_pickle, progress=progress
    )
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
    epochs = config.epochs or (10 if data.name == "digits" else 200)
    detox_epochs = default_detox_epochs(config, data)

    specs = [Path(p) for p in config.probes]
    clean_teacher = teacher.source.get("clean_teacher")  # demo teachers bring their control and probes
    if teacher.source.get("probes") and not specs:
        specs = [Path(teacher.source["probes"])]
    if not specs:
        raise UsageError(
            "no trigger probes: pass --probe SPEC.toml (see `rkdtool probe --help` for the format)"
        )
    for spec in specs:
        if not spec.exists():
            raise UsageError(f"probe spec {spec} does not exist")
    if partial.exists() and not config.resume:
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    probes_path = copy_probe_specs(specs, partial)
    probes = [p.bind(data.mean, data.std) for p in load_probes(probes_path)]

    generator = seed_everything(config.seed)
    teacher_model = teacher.model.to(device).eval()
    resolved = {
        **asdict(config),
        "student": student_arch,
        "data": data_spec,
        "epochs": epochs,
        "detox_epochs": detox_epochs,
        "device": str(device),
        "subset": {"train": config.train_subset, "test": config.test_subset},
        "versions": {"rkdtool": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "machine": platform.machine(),
        "started": datetime.now(UTC).isoformat(),
    }
    write_json(partial / "config.json", resolved)
    teacher_info = {
        "ref": config.teacher,
        "arch": teacher.arch,
        "num_classes": teacher.num_classes,
        "params": count_parameters(teacher_model),
        "sha256": teacher.sha256,
        "source": teacher.source,
        "file": str(teacher.path) if teacher.path else None,
        "trusted_pickle": teacher.trusted_pickle,
    }
    write_json(partial / "teacher.json", teacher_info)

    report: dict = {
        "rkdtool_version": __version__,
        "asr_definition": ASR_DEFINITION,
        "data": data_spec,
        "method": config.method,
        "variant": describe_variant(config),
        "probes": [p.describe() for p in probes],
        "teacher": {
            **_model_summary(teacher_model, teacher.arch, data, probes),
            "ref": config.teacher,
            "trusted_pickle": teacher.trusted_pickle,
        },
        "students": {},
        "notes": [],
    }
    variance = {"teacher": teacher_variance(teacher_model, teacher.arch, data, probes)}
    if clean_teacher:
        clean, clean_meta = build_from_weights(Path(clean_teacher))
        control = evaluate_student(clean.to(device), data, probes)
        report["controls"] = {"clean_teacher": control}
        variance["clean_teacher"] = teacher_variance(clean, clean_meta["arch"], data, probes)
        if max(control["asr"].values(), default=0) > 0.15:
            report["notes"].append(
                "the demo trigger fools the clean teacher too (ASR above 15%): it acts partly as "
                "an adversarial pattern, not only as a backdoor"
            )
    report["diagnostics"] = {"feature_variance": variance}

    metrics_path = partial / "metrics.jsonl"
    if not config.resume and metrics_path.exists():
        metrics_path.unlink()

    def log_epoch(row: dict) -> None:
        with metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    recipe = StudentRecipe(epochs=epochs, batch_size=config.batch_size, lr=config.lr)
    methods = (["fkd"] if config.baseline and config.method != "fkd" else []) + [config.method]
    (partial / "students").mkdir(exist_ok=True)
    for method in methods:
        finished = partial / "students" / f"{method}.json"
        if config.resume and finished.exists():  # trained before the interruption
            done = json.loads(finished.read_text())
            report["students"][method] = done["result"]
            report.update({k: v for k, v in done.get("report", {}).items()})
            continue
        student = build_model(student_arch, data.num_classes)
        distiller, diagnostics, masks = prepare_method(
            method,
            student,
            teacher_model,
            teacher.arch,
            student_arch,
            data,
            probes,
            config,
            generator=generator,
            device=device,
            progress=progress,
        )
        stand_ins = [p for p in getattr(distiller, "pool", []) if isinstance(p, Perturbation)]
        variance = dict(report["diagnostics"]["feature_variance"])
        if stand_ins:
            variance[f"{method}: teacher under synthesised triggers"] = teacher_variance(
                teacher_model, teacher.arch, data, [], stand_ins
            )
        if masks is not None:
            variance[f"{method}: detoxified teacher"] = teacher_variance(
                teacher_model, teacher.arch, data, probes, stand_ins, masks
            )
        diagnostics["feature_variance"] = variance
        report.setdefault("diagnostics", {}).update(diagnostics)
        if masks is not None:
            save_weights(
                partial / "detox.safetensors",
                masks.tensors(),
                {
                    "tau": config.tau,
                    "form": config.detox_form,
                    "stages": config.detox_stages,
                    "loss": config.detox_loss,
                    "teacher_sha256": teacher.sha256,
                },
            )
        method_options = distiller.options
        result = train_student(
            distiller,
            data,
            recipe,
            probes,
            generator=generator,
            device=device,
            progress=progress,
            on_epoch=log_epoch,
            task=f"{method} student",
            checkpoint=partial / "checkpoint.pt",
        )
        (partial / "checkpoint.pt").unlink(missing_ok=True)
        report["students"][method] = {
            "arch": student_arch,
            "params": count_parameters(student),
            **result,
            "student_noise": method_options.student_noise,
        }
        meta = {
            "arch": student_arch,
            "num_classes": data.num_classes,
            "input_size": 32,
            "mean": list(data.mean),
            "std": list(data.std),
            "dataset": data_spec,
            "method": method,
            "provenance": {"teacher": config.teacher, "teacher_sha256": teacher.sha256},
        }
        save_weights(partial / "students" / f"{method}.safetensors", student, meta)
        if method == config.method:
            save_weights(partial / "student.safetensors", student, meta)
        extra = {"diagnostics": report["diagnostics"]} if "diagnostics" in report and method != "fkd" else {}
        write_json(finished, {"result": report["students"][method], "report": extra})
    report["seconds"] = time.perf_counter() - started
    write_json(partial / "report.json", report)
    render_report(partial)
    os.replace(partial, out)
    return out, report
