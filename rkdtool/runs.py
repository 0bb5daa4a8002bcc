"""The run folder (DESIGN §5): the record of truth between stages. A stage re-runs from it alone.

runs/NAME/
  config.json          everything resolved: teacher ref, data spec and subset, student arch, method, seed
  teacher.json         what the teacher is (ref, file, sha256, arch, classes, params, source)
  probes.toml (+ files) the trigger probes the run measured, with the files they name
  student.safetensors  the student's weights + metadata (arch, num_classes, input_size, mean, std, ...)
  detox.safetensors    RobustKD masks M_l and patterns P_l
  metrics.jsonl        one line per epoch
  report.json          teacher, students and controls: ACC and ASR per probe
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from rkdtool.data import ImageData, load_dataset
from rkdtool.errors import NotFoundError, UsageError
from rkdtool.weights import build_from_weights


@dataclass
class RunFolder:
    path: Path

    @property
    def config(self) -> dict:
        return json.loads((self.path / "config.json").read_text())

    @property
    def report(self) -> dict:
        return json.loads((self.path / "report.json").read_text())

    def student(self) -> tuple[nn.Module, dict]:
        """Gives back the trained student (eval mode) and its metadata."""
        return build_from_weights(self.path / "student.safetensors")

    def data(self) -> ImageData:
        """Gives back the dataset the run used, limited to the same subset."""
        config = self.config
        data = load_dataset(config["data"])
        subset = config.get("subset") or {}
        if subset.get("train") or subset.get("test"):
            data = data.subset(train=subset.get("train"), test=subset.get("test"), seed=config.get("seed", 0))
        return data

    @property
    def probe_spec(self) -> Path:
        """The run's trigger probe spec (probes.toml), with the files it names beside it."""
        return self.path / "probes.toml"


def open_run(path: str | Path) -> RunFolder:
    """Gives back the run folder at `path`, or raises NotFoundError saying what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise NotFoundError(
            f"run folder {path} does not exist (make one with `rkdtool distill --out {path}`)"
        )
    for name in ("config.json", "student.safetensors", "probes.toml"):
        if not (path / name).exists():
            raise UsageError(f"{path} is not a finished rkdtool run: {name} is missing")
    return RunFolder(path)


def latest_run(root: Path) -> Path:
    """Gives back the most recently finished run folder under `root` (one holding report.json)."""
    finished = [p.parent for p in Path(root).glob("*/report.json") if not p.parent.name.endswith(".partial")]
    if not finished:
        raise NotFoundError(
            f"no finished run under {root}/: run `rkdtool distill` first, or name the run folder"
        )
    return max(finished, key=lambda p: (p / "report.json").stat().st_mtime)
