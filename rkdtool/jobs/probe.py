"""`rkdtool probe`: ACC and per-probe ASR of a model, a run's student or an attack's teacher.

Probes come from specs (`--probe`), the built-in bank (`--bank`, untargeted: the flip rate to the most
frequent class), the subject's own spec (a run's or an attack folder's `probes.toml`, a demo teacher's),
and Neural Cleanse (`--reverse`), whose flagged classes' triggers are written as a probe spec into the
output folder and measured like the others.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
from torch import nn

from rkdtool.data import ImageData, load_dataset
from rkdtool.errors import CheckFailed, UsageError
from rkdtool.models import parse_arch, placement
from rkdtool.probes.bank import probe_bank
from rkdtool.probes.features import VarianceProfile, feature_variance, variance_profiles
from rkdtool.probes.metrics import ASR_DEFINITION, AsrResult, accuracy, asr_from_predictions, probe_results
from rkdtool.probes.pgd import PgdBudget, robust_accuracy
from rkdtool.probes.reverse import ReverseConfig, ReverseResult, estimate_seconds, reverse_engineer
from rkdtool.probes.spec import Probe, check_targets, load_probes, save_probes
from rkdtool.runs import open_run
from rkdtool.teachers import load_model
from rkdtool.training import ProgressFn, no_progress, resolve_device
from rkdtool.weights import build_from_weights

Notify = Callable[[str], None]


@dataclass
class ProbeSubject:
    """A model to measure, with what it knows about its data and its own probes."""

    model: nn.Module
    arch: str
    num_classes: int
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    dataset: str | None
    kind: str  # "model", "run" or "attack"
    ref: str
    probe_spec: Path | None = None


def open_subject(ref: str, *, arch: str | None = None, trust_pickle: bool = False) -> ProbeSubject:
    """Gives back the model `ref` names: a run folder (its student), an attack folder (its teacher), a
    weights file or a teacher reference (`hf:`, `file:`, `demo:`)."""
    path = Path(ref)
    if path.is_dir():
        if (path / "student.safetensors").exists():
            run = open_run(path)
            model, meta = run.student()
            config = run.config
            return ProbeSubject(
                model,
                str(meta["arch"]),
                int(meta["num_classes"]),
                _stats(meta.get("mean")),
                _stats(meta.get("std")),
                config.get("data") or meta.get("dataset"),
                "run",
                ref,
                path / "probes.toml" if (path / "probes.toml").exists() else None,
            )
        if (path / "teacher.safetensors").exists():
            model, meta = build_from_weights(path / "teacher.safetensors")
            return ProbeSubject(
                model,
                str(meta["arch"]),
                int(meta["num_classes"]),
                _stats(meta.get("mean")),
                _stats(meta.get("std")),
                meta.get("dataset"),
                "attack",
                ref,
                path / "probes.toml" if (path / "probes.toml").exists() else None,
            )
        raise UsageError(
            f"{path} is a folder but neither a run (student.safetensors), an attack output "
            "(teacher.safetensors) nor a bundle (model.onnx)"
        )

    loaded = load_model(ref, arch=arch, trust_pickle=trust_pickle)
    spec = loaded.source.get("probes")
    return ProbeSubject(
        loaded.model,
        loaded.arch,
        loaded.num_classes,
        loaded.mean,
        loaded.std,
        loaded.dataset,
        "model",
        ref,
        Path(spec) if spec else None,
    )


def _stats(value) -> tuple[float, ...] | None:
    return None if value is None else tuple(float(v) for v in value)


@dataclass
class ProbeConfig:
    ref: str
    data: str | None = None  # default: the subject's dataset when known, else digits
    probes: list[str] = field(default_factory=list)
    bank: bool = False
    reverse: bool = False
    reverse_classes: int | None = None
    reverse_steps: int = ReverseConfig.steps
    anomaly_scale: str = ReverseConfig.scale
    anomaly_threshold: float = ReverseConfig.threshold
    features: bool = False
    out: str | None = None  # where reversed probes are written; default runs/probe-DATE-TIME
    arch: str | None = None
    trust_pickle: bool = False
    device: str = "auto"
    download: bool = False
    seed: int = 0
    test_subset: int | None = None
    pgd: PgdBudget | None = None  # also robust accuracy under PGD-Linf with this budget


@dataclass
class ProbeReport:
    subject: ProbeSubject
    data: str
    acc: float
    probes: list[Probe]
    results: dict[str, AsrResult]
    sources: dict[str, str]  # probe name -> "spec", "bank", "subject" or "reverse"
    reverse: ReverseResult | None = None
    reverse_probes: Path | None = None
    variance: dict[str, VarianceProfile] = field(default_factory=dict)
    pgd_acc: float | None = None
    pgd: PgdBudget | None = None

    def to_json(self) -> dict:
        """Gives back the DESIGN §5 `probe --json` object (acc, asr, asr_all_images, reverse) and more."""
        out: dict = {
            "model": self.subject.ref,
            "arch": self.subject.arch,
            "data": self.data,
            "asr_definition": ASR_DEFINITION,
            "acc": self.acc,
            "asr": {n: r.asr for n, r in self.results.items()},
            "asr_all_images": {n: r.asr_all_images for n, r in self.results.items()},
            "targets": {n: r.target for n, r in self.results.items()},
            "probes": [{**p.describe(), "source": self.sources[p.name]} for p in self.probes],
        }
        if self.reverse is not None:
            out["reverse"] = {
                **self.reverse.to_json(),
                "probes": str(self.reverse_probes) if self.reverse_probes else None,
            }
        if self.pgd is not None:
            out["pgd_acc"] = self.pgd_acc
            out["pgd"] = self.pgd.describe()
        if self.variance:
            out["feature_variance"] = {n: v.to_json() for n, v in self.variance.items()}
        return out

    def failing(self, threshold: float) -> list[str]:
        """Gives back the probes whose ASR exceeds `threshold`."""
        return [n for n, r in self.results.items() if r.asr > threshold]


def _dataset(config: ProbeConfig, subject: ProbeSubject) -> ImageData:
    spec = config.data or subject.dataset or "digits"
    data = load_dataset(spec, download=config.download)
    if data.num_classes != subject.num_classes:
        raise UsageError(
            f"{subject.ref} has {subject.num_classes} classes but {spec} has {data.num_classes}; "
            "pass the dataset it was trained on with --data"
        )
    if config.test_subset:
        data = data.subset(test=config.test_subset, seed=config.seed)
    return data


@dataclass
class BundleReport:
    """ACC and ASR per probe of every ONNX model in an export bundle, on the bundle's own probes.npz."""

    path: Path
    precisions: dict[str, dict]  # onnx-fp32 / onnx-int8 -> {acc, asr, asr_all_images, targets}
    probes: list[dict]

    @property
    def results(self) -> dict[str, AsrResult]:
        """The worst precision per probe: INT8 can wake a backdoor that FP32 keeps dormant."""
        worst: dict[str, AsrResult] = {}
        for row in self.precisions.values():
            for name, value in row["asr"].items():
                if name not in worst or value > worst[name].asr:
                    worst[name] = AsrResult(value, row["asr_all_images"][name], row["targets"][name])
        return worst

    def to_json(self) -> dict:
        first = next(iter(self.precisions.values()))
        return {
            "model": str(self.path),
            "arch": "onnx bundle",
            "data": "probes.npz",
            "asr_definition": ASR_DEFINITION,
            "acc": first["acc"],
            "asr": first["asr"],
            "asr_all_images": first["asr_all_images"],
            "targets": first["targets"],
            "probes": self.probes,
            "precisions": self.precisions,
        }

    def failing(self, threshold: float) -> list[str]:
        return [n for n, r in self.results.items() if r.asr > threshold]


def probe_bundle(path: Path) -> BundleReport:
    """Gives back ACC/ASR of a bundle's model.onnx and model.int8.onnx on its probes.npz (pixel-space
    images with the triggers already applied; the models normalise inside)."""
    import numpy as np
    import onnxruntime as ort

    npz_path = path / "probes.npz"
    if not npz_path.exists():
        raise UsageError(f"{path} has model.onnx but no probes.npz; re-export it with `rkdtool export`")
    with np.load(npz_path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    names = [str(n) for n in arrays["probe_names"]]
    targets = [None if int(t) < 0 else int(t) for t in arrays["targets"]]
    labels = torch.from_numpy(arrays["labels"].astype(np.int64))
    precisions = {}
    for label, file in (("onnx-fp32", "model.onnx"), ("onnx-int8", "model.int8.onnx")):
        if not (path / file).exists():
            continue
        session = ort.InferenceSession(str(path / file), providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name

        def predict(images: np.ndarray, session=session, input_name=input_name) -> torch.Tensor:
            out = [
                session.run(None, {input_name: images[i : i + 256]})[0] for i in range(0, len(images), 256)
            ]
            return torch.from_numpy(np.concatenate(out).argmax(1))

        row = {
            "acc": float((predict(arrays["images"]) == labels).float().mean()),
            "asr": {},
            "asr_all_images": {},
            "targets": {},
        }
        for i, (name, target) in enumerate(zip(names, targets, strict=True)):
            result = asr_from_predictions(predict(arrays[f"triggered_{i}"]), labels, target)
            row["asr"][name], row["asr_all_images"][name], row["targets"][name] = (
                result.asr,
                result.asr_all_images,
                result.target,
            )
        precisions[label] = row
    probes = [
        {"name": n, "kind": "bundled", "target": t, "space": "pixel", "source": "bundle"}
        for n, t in zip(names, targets, strict=True)
    ]
    return BundleReport(path, precisions, probes)


def reverse_probes(
    config: ProbeConfig, subject: ProbeSubject, model: nn.Module, data: ImageData, mean, std, progress, notify
) -> tuple[ReverseResult, Path | None]:
    """Gives back Neural Cleanse's result on the subject and where its flagged triggers' spec was written."""
    rcfg = ReverseConfig(
        steps=config.reverse_steps,
        classes=config.reverse_classes,
        seed=config.seed,
        scale=config.anomaly_scale,
        threshold=config.anomaly_threshold,
    )
    seconds = estimate_seconds(
        model,
        num_classes=subject.num_classes,
        image_shape=tuple(data.train_images.shape[1:]),
        mean=mean,
        std=std,
        config=rcfg,
    )
    device = placement(model)[0]
    notify(
        f"reverse-engineering {rcfg.classes or subject.num_classes} of {subject.num_classes} classes, "
        f"{rcfg.steps} steps each: about {seconds:.0f} s on {device}"
    )
    reverse = reverse_engineer(
        model,
        data.train_images,
        data.train_labels,
        num_classes=subject.num_classes,
        mean=mean,
        std=std,
        config=rcfg,
        progress=progress,
    )
    found = reverse.probes()
    out = Path(config.out) if config.out else Path("runs") / datetime.now().strftime("probe-%Y%m%d-%H%M%S")
    return reverse, (save_probes(found, out, "reverse-probes.toml") if found else None)


def run_probe(
    config: ProbeConfig, progress: ProgressFn = no_progress, notify: Notify = lambda _: None
) -> ProbeReport | BundleReport:
    """Gives back ACC and per-probe ASR of the subject (`check_gate` applies `--fail-asr`)."""
    bundle = Path(config.ref)
    if bundle.is_dir() and (bundle / "model.onnx").exists() and not (bundle / "student.safetensors").exists():
        if config.probes or config.bank or config.reverse or config.features:
            raise UsageError(
                f"{bundle} is an export bundle, probed with the probes.npz it carries; --probe, --bank, "
                "--reverse and --features need the run folder it came from"
            )
        return probe_bundle(bundle)
    subject = open_subject(config.ref, arch=config.arch, trust_pickle=config.trust_pickle)
    data = _dataset(config, subject)
    mean, std = subject.mean or data.mean, subject.std or data.std
    device = resolve_device(config.device)
    model = subject.model.to(device).eval()
    size = data.test_images.shape[-2:]

    probes: list[Probe] = []
    sources: dict[str, str] = {}

    def add(new: list[Probe], source: str) -> None:
        check_targets(new, subject.num_classes, subject.ref)
        for p in new:
            if p.name in sources:
                raise UsageError(f"two probes are named {p.name!r}; rename one in its spec")
            sources[p.name] = source
            probes.append(p.bind(mean, std))

    for spec in config.probes:
        add(load_probes(spec, height=size[0], width=size[1]), "spec")
    if not config.probes and subject.probe_spec is not None:
        add(load_probes(subject.probe_spec, height=size[0], width=size[1]), "subject")
    if config.bank:
        add(probe_bank(*size), "bank")

    reverse, reverse_path = None, None
    if config.reverse:
        reverse, reverse_path = reverse_probes(config, subject, model, data, mean, std, progress, notify)
        add(reverse.probes(), "reverse")
    if not probes and config.pgd is None:
        raise UsageError("no trigger probes: pass --probe SPEC.toml, --bank or --reverse (or --pgd alone)")

    acc = accuracy(model, data.test_images, data.test_labels, mean=mean, std=std)
    results = probe_results(model, data.test_images, data.test_labels, probes, mean=mean, std=std)
    pgd_acc = None
    if config.pgd is not None:
        pgd_acc = robust_accuracy(
            model,
            data.test_images,
            data.test_labels,
            mean=mean,
            std=std,
            budget=config.pgd,
            generator=torch.Generator().manual_seed(config.seed),
        )
    variance = {}
    if config.features:
        taps = parse_arch(subject.arch).taps
        for p in probes:
            variance[p.name] = feature_variance(
                model, taps, data.test_images, data.test_labels, p, mean=mean, std=std
            )
    report = ProbeReport(
        subject,
        config.data or subject.dataset or "digits",
        acc,
        probes,
        results,
        sources,
        reverse,
        reverse_path,
        variance,
        pgd_acc,
        config.pgd,
    )
    return report


def check_gate(report: ProbeReport | BundleReport, threshold: float | None) -> None:
    """Raises CheckFailed naming the probes whose ASR exceeds `threshold` (the `--fail-asr` gate)."""
    if threshold is None:
        return
    failing = report.failing(threshold)
    if failing:
        shown = ", ".join(f"{n} {100 * report.results[n].asr:.1f}%" for n in failing)
        raise CheckFailed(f"ASR above {100 * threshold:.1f}% on {len(failing)} probe(s): {shown}")


__all__ = [
    "BundleReport",
    "ProbeConfig",
    "ProbeReport",
    "ProbeSubject",
    "check_gate",
    "open_subject",
    "probe_bundle",
    "run_probe",
]


def feature_profile(loaded, data_spec: str | None, specs: list[str], bank: bool) -> dict:
    """Gives back `rkdtool inspect --features`: the variance profile of a loaded teacher (hub.LoadedModel)
    on clean test images and under the given probes."""
    data = load_dataset(data_spec or loaded.dataset or "digits")
    if data.num_classes != loaded.num_classes:
        raise UsageError(
            f"the teacher has {loaded.num_classes} classes, {data.name} has {data.num_classes}: pass --data"
        )
    mean, std = loaded.mean or data.mean, loaded.std or data.std
    size = data.test_images.shape[-2:]
    probes = [p.bind(mean, std) for spec in specs for p in load_probes(spec, height=size[0], width=size[1])]
    check_targets(probes, loaded.num_classes, data.name)
    probes += probe_bank(*size) if bank else []
    return variance_profiles(
        loaded.model, loaded.arch, data.test_images, data.test_labels, probes, mean=mean, std=std
    )
