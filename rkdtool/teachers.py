"""Teacher references made concrete: `load_model(ref) -> LoadedModel` for `hf:`, `file:`/paths and `demo:`.

`hub` resolves and safely loads `hf:` and file references; `demo:KIND` teachers are the attack kit's own
(`attacks.demo` trains them once on the embedded dataset and caches them, with the clean teacher they started
from and their probes). This module sits above both, so neither imports the other.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from rkdtool.attacks.demo import ensure_demo
from rkdtool.hub import LoadedModel, ProgressFn, ResolvedFile, load_resolved, parse_ref
from rkdtool.hub import resolve as resolve_hub
from rkdtool.weights import build_from_weights


def resolve(ref: str | Path, progress: ProgressFn | None = None) -> ResolvedFile:
    """Gives back the local weights file a reference names, fetching (hf:) or training (demo:) it when
    needed. A demo teacher's source also names its clean teacher and its probe spec."""
    parsed = parse_ref(ref)
    if parsed.scheme != "demo":
        return resolve_hub(parsed, progress)
    kwargs = {} if progress is None else {"progress": progress}
    artifacts = ensure_demo(parsed.demo_kind, **kwargs)
    return ResolvedFile(
        Path(artifacts.teacher),
        {
            "ref": parsed.text,
            "repo": None,
            "revision": None,
            "file": str(artifacts.teacher),
            "demo": parsed.demo_kind,
            "clean_teacher": str(artifacts.clean_teacher),
            "probes": str(artifacts.probes),
        },
    )


def load_model(
    ref: str | Path,
    *,
    arch: str | None = None,
    trust_pickle: bool = False,
    progress: ProgressFn | None = None,
) -> LoadedModel:
    """Gives back the model a reference names, loaded safely, with its architecture found or checked.

    `arch` overrides inference (the weights must then fit it exactly); `trust_pickle` allows a pickle that
    needs code to run it (refused otherwise).
    """
    return load_resolved(resolve(ref, progress), arch=arch, trust_pickle=trust_pickle)


def load_teacher_with_arch(ref: str) -> tuple[nn.Module, str]:
    """Gives back (model, architecture name) of what an attack folder (its teacher.safetensors), a weights
    file or a reference names (how `--from-teacher` is read)."""
    path = Path(ref)
    if path.is_dir() and (path / "teacher.safetensors").exists():
        path = path / "teacher.safetensors"
    if path.suffix == ".safetensors" and path.exists():
        model, meta = build_from_weights(path)
        return model, str(meta["arch"])
    loaded = load_model(ref)
    return loaded.model, loaded.arch
