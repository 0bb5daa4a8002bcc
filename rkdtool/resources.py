"""Target profiles and the device runtime: found in a checkout (`profiles/`, `export/` beside the package) or
in an installed wheel (hatch force-includes both under `rkdtool/_data/`, DESIGN §2).
"""

from __future__ import annotations

import importlib
import json
import re
import sys
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType

from rkdtool.errors import NotFoundError, UsageError

PACKAGE_DIR = Path(__file__).resolve().parent
ALIASES = {"jetson": "jetson-orin-nano"}
PRECISIONS = ("fp32", "fp16", "int8")
EXPORTERS = ("torchscript", "dynamo")
CALIBRATIONS = ("entropy", "percentile")
# Per-channel DequantizeLinear needs opset >= 13; torch's TorchScript exporter stops at 20; the dynamo
# exporter cannot down-convert below 18 (edge.md §6.1).
MIN_OPSET, TORCHSCRIPT_MAX_OPSET, DYNAMO_MIN_OPSET = 13, 20, 18


def _resource_dir(name: str) -> Path:
    """Gives back `rkdtool/_data/NAME` in an installed wheel, else `NAME/` of the checkout."""
    for candidate in (PACKAGE_DIR / "_data" / name, PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise NotFoundError(
        f"rkdtool's {name}/ folder is missing (looked in {PACKAGE_DIR / '_data'} and {PACKAGE_DIR.parent}); "
        "reinstall rkdtool"
    )


def profiles_dir() -> Path:
    """Gives back the folder holding one TOML per target."""
    return _resource_dir("profiles")


def export_dir() -> Path:
    """Gives back the device-side runtime folder that every bundle copies to `device/`."""
    return _resource_dir("export")


@dataclass(frozen=True)
class BatchRange:
    """TensorRT optimisation profile over the batch axis."""

    min: int
    opt: int
    max: int


_VERSION_CLAUSE = re.compile(r"\s*(>=|<=|==|<|>)\s*(\d+(?:\.\d+)*)\s*\Z")


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


def version_in_range(version: str, spec: str) -> bool:
    """Gives back whether a version ("10.3.0.30") meets a comma-joined range (">=10.3,<11")."""
    have = _version_tuple(version)
    for clause in spec.split(","):
        op, bound = _VERSION_CLAUSE.match(clause).groups()  # type: ignore[union-attr]  # validated on load
        want = _version_tuple(bound)
        width = len(want)
        cmp = (have[:width] > want) - (have[:width] < want)
        if not {">=": cmp >= 0, "<=": cmp <= 0, "==": cmp == 0, "<": cmp < 0, ">": cmp > 0}[op]:
            return False
    return True


@dataclass(frozen=True)
class Profile:
    """One deployment target (DESIGN §5): what to export, how to quantise, how TensorRT should build."""

    name: str
    family: str
    sm: str | None  # CUDA compute capability ("8.7"), None for CPU targets
    tensorrt: str | None  # version range (">=10.3,<11"), None where TensorRT does not run
    dla_cores: int
    precision: str
    fallback_precision: str
    opset: int
    exporter: str
    workspace_mb: int
    batch: BatchRange
    calib_samples: int
    calibration: str
    latency_budget_ms: float
    notes: str = ""
    jetpack: str | None = None
    path: Path | None = field(default=None, compare=False)

    def tensorrt_allows(self, version: str) -> bool:
        """Gives back whether a TensorRT version is one this profile was exported for."""
        return self.tensorrt is not None and version_in_range(version, self.tensorrt)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["path"] = str(self.path) if self.path else None
        return out

    def to_toml(self) -> str:
        """Gives back the profile as TOML text that `parse_profile` reads back to an equal Profile."""
        lines, table = [], {k: v for k, v in self.to_dict().items() if k not in ("path", "batch")}
        for key, value in table.items():
            if value is None:
                if key in ("sm", "tensorrt"):
                    lines.append(f'{key} = "none"')
                continue
            lines.append(f"{key} = {json.dumps(value)}")  # a JSON string or number is valid TOML
        lines += ["", "[batch]", *(f"{k} = {v}" for k, v in asdict(self.batch).items())]
        return "\n".join(lines) + "\n"


_REQUIRED = (
    "name",
    "family",
    "sm",
    "tensorrt",
    "dla_cores",
    "precision",
    "fallback_precision",
    "opset",
    "exporter",
    "workspace_mb",
    "batch",
    "calib_samples",
    "calibration",
    "latency_budget_ms",
)
_OPTIONAL = ("notes", "jetpack")


def parse_profile(table: dict, source: str, path: Path | None = None) -> Profile:
    """Gives back the Profile a TOML table describes, or raises UsageError naming the bad field."""

    def bad(message: str) -> UsageError:
        return UsageError(f"profile {source}: {message}")

    missing = [k for k in _REQUIRED if k not in table]
    if missing:
        raise bad(f"missing field(s) {', '.join(missing)}")
    unknown = sorted(set(table) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise bad(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(_REQUIRED + _OPTIONAL)}")
    for key in ("precision", "fallback_precision"):
        if table[key] not in PRECISIONS:
            raise bad(f"{key} must be one of {', '.join(PRECISIONS)}, got {table[key]!r}")
    if table["exporter"] not in EXPORTERS:
        raise bad(f"exporter must be one of {', '.join(EXPORTERS)}, got {table['exporter']!r}")
    if table["calibration"] not in CALIBRATIONS:
        raise bad(f"calibration must be one of {', '.join(CALIBRATIONS)}, got {table['calibration']!r}")
    opset = table["opset"]
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise bad(f"opset must be an integer >= {MIN_OPSET} (per-channel Q/DQ), got {opset!r}")
    if table["exporter"] == "dynamo" and opset < DYNAMO_MIN_OPSET:
        raise bad(
            f'the dynamo exporter cannot write opset {opset} (it keeps 18); use exporter = "torchscript"'
        )
    if table["exporter"] == "torchscript" and opset > TORCHSCRIPT_MAX_OPSET:
        raise bad(f'the TorchScript exporter stops at opset {TORCHSCRIPT_MAX_OPSET}; use exporter = "dynamo"')
    batch = table["batch"]
    if not isinstance(batch, dict) or set(batch) != {"min", "opt", "max"}:
        raise bad("[batch] must have exactly min, opt and max")
    if (
        not all(isinstance(v, int) for v in batch.values())
        or not 1 <= batch["min"] <= batch["opt"] <= batch["max"]
    ):
        raise bad(f"[batch] needs integers 1 <= min <= opt <= max, got {batch}")
    for key in ("dla_cores", "workspace_mb", "calib_samples"):
        if not isinstance(table[key], int) or table[key] < 0:
            raise bad(f"{key} must be a non-negative integer, got {table[key]!r}")
    if table["calib_samples"] < 1:
        raise bad("calib_samples must be at least 1")
    if not isinstance(table["latency_budget_ms"], int | float) or table["latency_budget_ms"] <= 0:
        raise bad(f"latency_budget_ms must be a positive number, got {table['latency_budget_ms']!r}")
    tensorrt = None if table["tensorrt"] in ("none", "") else str(table["tensorrt"])
    if tensorrt is not None and not all(_VERSION_CLAUSE.match(c) for c in tensorrt.split(",")):
        raise bad(f'tensorrt must be a version range such as ">=10.3,<11" or "none", got {tensorrt!r}')
    return Profile(
        name=str(table["name"]),
        family=str(table["family"]),
        sm=None if table["sm"] in ("none", "") else str(table["sm"]),
        tensorrt=tensorrt,
        dla_cores=table["dla_cores"],
        precision=table["precision"],
        fallback_precision=table["fallback_precision"],
        opset=opset,
        exporter=table["exporter"],
        workspace_mb=table["workspace_mb"],
        batch=BatchRange(**batch),
        calib_samples=table["calib_samples"],
        calibration=table["calibration"],
        latency_budget_ms=float(table["latency_budget_ms"]),
        notes=str(table.get("notes", "")).strip(),
        jetpack=table.get("jetpack"),
        path=path,
    )


def read_profile(path: Path) -> Profile:
    """Gives back the Profile stored in a TOML file."""
    try:
        table = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"profile {path} is not valid TOML: {exc}") from None
    return parse_profile(table, str(path), path)


def profile_names() -> list[str]:
    """Gives back the names of the built-in target profiles, sorted."""
    return sorted(p.stem for p in profiles_dir().glob("*.toml"))


def list_profiles() -> list[Profile]:
    """Gives back every built-in target profile, sorted by name."""
    return [read_profile(profiles_dir() / f"{name}.toml") for name in profile_names()]


def load_profile(name_or_path: str | Path) -> Profile:
    """Gives back a built-in profile by name or alias (`jetson`), or the profile in a TOML file."""
    text = str(name_or_path)
    if text.endswith(".toml") or "/" in text or "\\" in text:
        path = Path(text)
        if not path.is_file():
            raise NotFoundError(f"profile file {path} does not exist")
        return read_profile(path)
    name = ALIASES.get(text.strip().lower(), text.strip().lower())
    path = profiles_dir() / f"{name}.toml"
    if not path.is_file():
        aliases = ", ".join(f"{a} = {t}" for a, t in ALIASES.items())
        raise UsageError(
            f"unknown target {text!r}; known: {', '.join(profile_names())} (aliases: {aliases}), "
            "or a path to a profile TOML"
        )
    return read_profile(path)


DEVICE_MODULES = (
    "trt_plan",
    "trt_sidecar",
    "trt_layers",
    "board_state",
    "cuda_graph",
    "trt_build",
    "trt_run",
    "ort_twin",
    "trt_compare",
    "check",
)


def load_device_module(name: str, folder: Path | None = None) -> ModuleType:
    """Gives back one module of the device runtime (a name in DEVICE_MODULES) from `folder`.

    `export/` is not a package: on the board its scripts run as `python3 device/check.py` and import their
    siblings by plain name (`import trt_build`). Here they are imported the same way, with the folder on
    sys.path while they load, and all from one folder so that they share their classes (DeviceError).
    Their imports of tensorrt/pycuda are deferred, so this works where those are absent.
    """
    folder = (folder or export_dir()).resolve()
    path = folder / f"{name}.py"
    if name not in DEVICE_MODULES or not path.is_file():
        raise NotFoundError(f"device runtime module {path} does not exist")
    for sibling in DEVICE_MODULES:  # drop siblings loaded from another folder (an older bundle, say)
        loaded = sys.modules.get(sibling)
        if loaded is not None and Path(getattr(loaded, "__file__", "")).resolve().parent != folder:
            sys.modules.pop(sibling)
    sys.path.insert(0, str(folder))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(folder))
