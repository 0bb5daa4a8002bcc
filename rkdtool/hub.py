"""Teacher references, safe loading and architecture inference: `load_resolved(resolve(ref)) -> LoadedModel`.

References (DESIGN §4):
- `hf:OWNER/REPO[@REVISION][/FILE]`: a Hugging Face model repository, through huggingface_hub and its
  cache (HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE are honoured). Without FILE the repository's single weights
  file is taken, safetensors first; several candidates are an error that names them.
- `file:PATH` or a bare path: a local checkpoint.
- `demo:KIND`: parsed here; the attack kit's demo teachers (`rkdtool.attacks.demo`), resolved by
  `rkdtool.teachers`, which sits above both.

Loading never runs code from the file: safetensors, or `torch.load(weights_only=True, map_location='cpu')`.
A pickle that needs code is refused unless the caller passes `trust_pickle=True` (`--trust-pickle`), and
the result records that it did. The architecture comes from the weights' metadata when rkdtool wrote them,
else from the key layout (each zoo family's `infer`), and the weights are then loaded strictly.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from rkdtool.data import CIFAR_MEAN, CIFAR_STD, Stats
from rkdtool.errors import NotFoundError, UnsafeCheckpointError, UsageError
from rkdtool.models import count_parameters, families, parse_arch
from rkdtool.weights import load_weights

ProgressFn = Callable[[str, int, int], None]

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
# Keys under which training scripts nest the state dict: FKD's WRN teacher is {'model': sd}, the PyramidNet
# one {'state_dict': sd} (algorithms.md §1.7); the others are common in the wild.
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net", "state_dict_ema")
# torch.nn.DataParallel / DistributedDataParallel and torch.compile prefixes.
KEY_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class KnownTeacher:
    """What a hub repository's weights do not say: the dataset and normalisation they were trained with."""

    dataset: str
    mean: Stats
    std: Stats
    note: str


# Keyed by lower-case repo id. lixiao985/WideResNet28-4: algorithms.md §7 (backdoored, CIFAR-100).
KNOWN_TEACHERS: dict[str, KnownTeacher] = {
    "lixiao985/wideresnet28-4": KnownTeacher(
        "cifar100",
        CIFAR_MEAN,
        CIFAR_STD,
        "the RobustKD paper's backdoored WRN-28-4 (CIFAR-100, 78.37% clean accuracy, trigger target 0)",
    ),
}


@dataclass(frozen=True)
class TeacherRef:
    """A parsed teacher reference."""

    text: str
    scheme: str  # "hf", "file" or "demo"
    repo: str | None = None
    revision: str | None = None
    filename: str | None = None
    path: Path | None = None
    demo_kind: str | None = None


_HF_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def parse_ref(ref: str | Path) -> TeacherRef:
    """Gives back the parsed form of `hf:OWNER/REPO[@REVISION][/FILE]`, `file:PATH`, `demo:KIND` or a path."""
    if isinstance(ref, Path):
        return TeacherRef(str(ref), "file", path=ref)
    text = ref.strip()
    scheme, sep, body = text.partition(":")
    if sep and scheme == "hf":
        owner, _, rest = body.partition("/")
        repo_rev, _, filename = rest.partition("/")
        name, at, revision = repo_rev.partition("@")
        if not (_HF_NAME.fullmatch(owner) and _HF_NAME.fullmatch(name)) or (at and not revision):
            raise UsageError(f"bad Hugging Face reference {text!r}; expected hf:OWNER/REPO[@REVISION][/FILE]")
        return TeacherRef(
            text, "hf", repo=f"{owner}/{name}", revision=revision or None, filename=filename or None
        )
    if sep and scheme == "demo":
        if not body:
            raise UsageError("a demo reference names its kind: demo:ckd, demo:lba or demo:badnets")
        return TeacherRef(text, "demo", demo_kind=body)
    if sep and scheme == "file":
        return TeacherRef(text, "file", path=_expand_user(body))
    return TeacherRef(text, "file", path=_expand_user(text))


def _expand_user(text: str) -> Path:
    """Gives back the path with a leading ~ or ~USER expanded, or raises UsageError naming it."""
    try:
        return Path(text).expanduser()
    except RuntimeError:  # ~USER of no such user, or no home directory
        raise UsageError(f"cannot expand {text.split('/')[0]!r} in {text!r}: no such user's home") from None


@dataclass
class ResolvedFile:
    """A reference made concrete: the local weights file and where it came from."""

    path: Path
    source: dict  # ref, repo, revision, file (+ demo artifacts for demo: references)


# ---------------------------------------------------------------------------------------------------------
# hf: references


def hf_cache_dir() -> Path:
    """Gives back huggingface_hub's model cache folder as the environment names it now.

    Read at call time (huggingface_hub reads its constants once, at import): HF_HUB_CACHE, else HF_HOME/hub,
    else $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub.
    """
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def hf_offline() -> bool:
    """Gives back whether HF_HUB_OFFLINE is set (now, or when huggingface_hub was imported)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return env in {"1", "ON", "YES", "TRUE"} or bool(constants.HF_HUB_OFFLINE)


def pick_weights_file(files: list[str], ref_text: str) -> str:
    """Gives back the one weights file among a repository's files, safetensors first; refuses to guess.

    `ref_text` is the reference without a FILE part (`hf:OWNER/REPO[@REVISION]`), used in the messages.
    """
    candidates = sorted(f for f in files if f.lower().endswith(WEIGHT_SUFFIXES))
    safetensors = [f for f in candidates if f.lower().endswith(".safetensors")]
    pool = safetensors or candidates
    if len(pool) == 1:
        return pool[0]
    if not pool:
        shown = ", ".join(sorted(files)[:8]) or "no files"
        raise NotFoundError(
            f"teacher {ref_text} has no .safetensors, .pt, .pth or .bin file (it has: {shown}); "
            f"pass {ref_text}/FILE"
        )
    raise UsageError(
        f"teacher {ref_text} has {len(pool)} weights files ({', '.join(pool)}); name one, "
        f"e.g. {ref_text}/{pool[0]}"
    )


def _hub_unreachable_reason(exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"[:160]


def _cached_snapshot(cache: Path, repo: str, revision: str | None) -> tuple[str, Path] | None:
    """Gives back (commit sha, snapshot folder) for a repo revision in huggingface_hub's cache, or None.

    Layout (huggingface_hub's cache): models--OWNER--REPO/{refs/REVISION, snapshots/SHA/FILE, blobs/}.
    """
    folder = cache / ("models--" + repo.replace("/", "--"))
    revision = revision or "main"
    if re.fullmatch(r"[0-9a-f]{40}", revision) and (folder / "snapshots" / revision).is_dir():
        return revision, folder / "snapshots" / revision
    ref_file = folder / "refs" / revision
    if ref_file.is_file():
        sha = ref_file.read_text().strip()
        if (folder / "snapshots" / sha).is_dir():
            return sha, folder / "snapshots" / sha
    return None


def _download_progress(progress: ProgressFn | None, label: str) -> dict:
    """Gives back hf_hub_download keyword arguments that route its progress to `progress`, if supported."""
    from huggingface_hub import hf_hub_download

    if progress is None or "tqdm_class" not in inspect.signature(hf_hub_download).parameters:
        return {}
    from tqdm.auto import tqdm

    class _Report(tqdm):  # huggingface_hub draws bars with this class; we forward and draw nothing
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)  # some huggingface_hub versions pass their logger name
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self._done, self._total = int(kwargs.get("initial") or 0), int(kwargs.get("total") or 0)

        def update(self, n=1):
            self._done += int(n or 0)
            progress(label, self._done, self._total)

    return {"tqdm_class": _Report}


def resolve_hf(ref: TeacherRef, progress: ProgressFn | None = None) -> ResolvedFile:
    """Gives back the local file of an hf: reference, downloading it when online and not cached."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    assert ref.repo is not None
    cache = hf_cache_dir()
    reason = "HF_HUB_OFFLINE is set"
    if not hf_offline():
        try:
            info = HfApi().model_info(ref.repo, revision=ref.revision, timeout=15)
        except GatedRepoError as exc:
            raise NotFoundError(
                f"{ref.text}: the repository is gated; accept its terms on the Hub, then `hf auth login`"
            ) from exc
        except RevisionNotFoundError as exc:
            raise NotFoundError(
                f"{ref.text}: repository {ref.repo} has no revision {ref.revision!r}"
            ) from exc
        except RepositoryNotFoundError as exc:
            raise NotFoundError(
                f"{ref.text}: no such Hugging Face repository (or it is private: log in with `hf auth login`)"
            ) from exc
        except Exception as exc:  # no network, DNS, proxy, timeout, 5xx: fall back to the cache below
            reason = f"the Hub is unreachable ({_hub_unreachable_reason(exc)})"
        else:
            files = [s.rfilename for s in (info.siblings or [])]
            filename = ref.filename or pick_weights_file(files, ref.text)
            if filename not in files:
                raise NotFoundError(
                    f"{ref.text}: no file {filename!r} in {ref.repo} (it has: {', '.join(sorted(files)[:8])})"
                )
            try:
                path = hf_hub_download(
                    ref.repo,
                    filename,
                    revision=info.sha,
                    cache_dir=cache,
                    **_download_progress(progress, f"download {filename}"),
                )
            except Exception as exc:  # the connection dropped, the disk filled: one line, not a traceback
                raise NotFoundError(
                    f"{ref.text}: downloading {filename} failed ({_hub_unreachable_reason(exc)}); try again"
                ) from exc
            return ResolvedFile(Path(path), _hf_source(ref, info.sha, filename))

    snapshot = _cached_snapshot(cache, ref.repo, ref.revision)
    fetch = f"`hf download {ref.repo}" + (f" --revision {ref.revision}" if ref.revision else "") + "`"
    if snapshot is None:
        raise NotFoundError(
            f"{ref.text} is not in the Hugging Face cache ({cache}) and {reason}; fetch it on a connected "
            f"machine with {fetch} (or `rkdtool inspect {ref.text}`) and copy that cache here, "
            "or pass file:PATH"
        )
    sha, folder = snapshot
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    filename = ref.filename or pick_weights_file(files, ref.text)
    if filename not in files:
        raise NotFoundError(
            f"{ref.text}: {filename!r} is not in the cached snapshot {sha[:12]} ({cache}) and {reason}; "
            f"fetch it with `hf download {ref.repo} {filename}`"
        )
    path = hf_hub_download(ref.repo, filename, revision=sha, cache_dir=cache, local_files_only=True)
    return ResolvedFile(Path(path), _hf_source(ref, sha, filename))


def _hf_source(ref: TeacherRef, sha: str | None, filename: str) -> dict:
    return {"ref": ref.text, "repo": ref.repo, "revision": sha, "file": filename}


# ---------------------------------------------------------------------------------------------------------
# file: and demo: references


def resolve_file(ref: TeacherRef) -> ResolvedFile:
    """Gives back the local file of a path reference, or raises NotFoundError saying what was meant."""
    assert ref.path is not None
    path = ref.path
    if not path.exists():
        hint = ""
        if (
            ref.scheme == "file"
            and not ref.text.startswith("file:")
            and re.fullmatch(r"[\w.-]+/[\w.-]+", ref.text)
        ):
            hint = f"; for a Hugging Face repository write hf:{ref.text}"
        raise NotFoundError(f"teacher {ref.text}: no such file {path}{hint}")
    source = {"ref": ref.text, "repo": None, "revision": None}
    if path.is_dir():  # an `rkdtool attack` folder: its teacher, and its probe spec
        if not (path / "teacher.safetensors").is_file():
            raise UsageError(
                f"teacher {ref.text} is a folder without teacher.safetensors; name the weights file inside it"
            )
        if (path / "probes.toml").is_file():
            source["probes"] = str((path / "probes.toml").resolve())
        path = path / "teacher.safetensors"
    return ResolvedFile(path, {**source, "file": str(path.resolve())})


def resolve(ref: TeacherRef, progress: ProgressFn | None = None) -> ResolvedFile:
    """Gives back the local weights file an `hf:` or file reference names, fetching it when needed.

    `demo:` references are made by the attack kit, which sits above this module: `rkdtool.teachers`
    resolves them.
    """
    if ref.scheme == "hf":
        return resolve_hf(ref, progress)
    if ref.scheme == "file":
        return resolve_file(ref)
    raise UsageError(f"{ref.text}: resolve {ref.scheme}: references with rkdtool.teachers")


# ---------------------------------------------------------------------------------------------------------
# Safe reading


def sha256_file(path: Path) -> str:
    """Gives back the hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Checkpoint:
    """What a weights file holds: a flat state dict, rkdtool metadata (if any), how it was read."""

    state: dict[str, torch.Tensor]
    metadata: dict = field(default_factory=dict)
    format: str = "safetensors"  # or "torch"
    trusted_pickle: bool = False  # True only when code in the pickle was allowed to run


def read_checkpoint(path: Path, *, trust_pickle: bool = False) -> Checkpoint:
    """Gives back the state dict in a weights file, read without running code unless `trust_pickle`."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError

        try:
            state, meta = load_weights(path)
        except (SafetensorError, OSError) as exc:
            raise UsageError(f"could not read {path} as safetensors: {exc}") from exc
        return Checkpoint(unwrap_state_dict(state, path), meta, "safetensors")
    trusted = False
    try:
        with _numpy_data_allowed():
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        offending = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if offending is None:  # not a code reference: a damaged file or not a pickle at all
            detail = re.search(r"WeightsUnpickler error: \s*(.+?)\n", str(exc) + "\n")
            reason = detail.group(1).strip() if detail else "unreadable pickle"
            raise UsageError(f"could not read {path} as a PyTorch checkpoint: {reason}") from exc
        what = f" (it references {offending.group(1)})"
        if not trust_pickle:
            raise UnsafeCheckpointError(
                f"refusing to load {path}: it is a pickle that needs code to load{what}, and unpickling runs "
                "that code with your privileges, so a hub checkpoint can carry malware this way; pass "
                "--trust-pickle (trust_pickle=True) only if you trust its author"
            ) from exc
        obj = torch.load(path, map_location="cpu", weights_only=False)
        trusted = True
    except Exception as exc:  # an untrusted file: whatever the unpickler trips on means "not a checkpoint"
        first = (str(exc).splitlines() or [""])[0]
        reason = (
            first
            if isinstance(exc, (RuntimeError, EOFError, OSError, ValueError))
            else (f"{type(exc).__name__} {first}".strip())
        )
        raise UsageError(f"could not read {path} as a PyTorch checkpoint: {reason}") from exc
    return Checkpoint(unwrap_state_dict(obj, path), {}, "torch", trusted)


def _numpy_data_allowed():
    """Gives back a context in which weights-only unpickling also accepts NumPy arrays and scalars.

    Training scripts often store `best_acc` as a NumPy scalar; these globals only rebuild data (an object
    array's elements still pass through the same restricted unpickler). The numpy.core names are how
    NumPy 1.x pickles spell them.
    """
    import contextlib

    import numpy as np

    safe_globals = getattr(torch.serialization, "safe_globals", None)
    multiarray = getattr(np, "_core", None) or np.core  # NumPy 2 / 1
    if safe_globals is None:
        return contextlib.nullcontext()
    allowed: list = [np.ndarray, np.dtype, multiarray.multiarray.scalar, multiarray.multiarray._reconstruct]
    allowed += [
        (multiarray.multiarray.scalar, "numpy.core.multiarray.scalar"),
        (multiarray.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
    ]
    allowed += [type(np.dtype(code)) for code in ("float64", "float32", "int64", "int32", "bool")]
    return safe_globals(allowed)


def unwrap_state_dict(obj: object, path: Path | str = "checkpoint") -> dict[str, torch.Tensor]:
    """Gives back the flat tensor dict inside {'model': ...} / {'state_dict': ...}, prefixes stripped."""
    for _ in range(4):
        if isinstance(obj, nn.Module):
            obj = obj.state_dict()
        if not isinstance(obj, Mapping) or not obj:
            raise UsageError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        key = next((k for k in WRAPPER_KEYS if k in obj), None)
        if key is None:
            shown = ", ".join(map(str, list(obj)[:8]))
            raise UsageError(
                f"{path} is a dict ({shown}) with no state dict under {', '.join(map(repr, WRAPPER_KEYS))}"
            )
        obj = obj[key]
    else:
        raise UsageError(f"{path}: state dict nested too deeply")
    state = {str(k): v for k, v in obj.items()}
    for prefix in KEY_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


# ---------------------------------------------------------------------------------------------------------
# Architecture


def infer_arch(state: Mapping[str, torch.Tensor]) -> tuple[str, int] | None:
    """Gives back (architecture name, num_classes) read off a state dict's layout, or None."""
    for family in families():
        if family.infer is not None:
            found = family.infer(state)
            if found is not None:
                return found
    return None


def _classifier_classes(state: Mapping[str, torch.Tensor]) -> int | None:
    # The last 2-D weight in a state dict is the classifier in every zoo layout.
    matrices = [v for k, v in state.items() if k.endswith(".weight") and v.ndim == 2]
    return int(matrices[-1].shape[0]) if matrices else None


def load_state_strict(
    model: nn.Module, state: Mapping[str, torch.Tensor], arch: str, guess: str | None
) -> None:
    """Loads `state` into `model`, or raises UsageError listing what does not fit (missing, extra, shapes).

    A missing `num_batches_tracked` is tolerated: checkpoints from PyTorch < 0.4.1 do not have it.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = [
            f"{len(items)} {label} (e.g. {items[0]})"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("mismatched", mismatched))
            if items
        ]
        looks = f"; the weights look like {guess}" if guess and guess != arch else ""
        raise UsageError(f"the weights do not fit {arch}: {', '.join(parts)}{looks}")
    model.load_state_dict(state, strict=False)


# ---------------------------------------------------------------------------------------------------------
# The public API


@dataclass
class LoadedModel:
    """A teacher (or any zoo model) loaded from a reference, with what is known about it.

    `model` is in eval mode, on the CPU, and takes normalised inputs; `mean`/`std` are that normalisation
    in pixel units, or None when neither the file's metadata nor a known-teacher entry says (then the
    dataset's own statistics apply); `dataset` is a dataset spec such as "cifar100", or None.
    """

    model: nn.Module
    arch: str
    num_classes: int
    mean: Stats | None
    std: Stats | None
    sha256: str
    source: dict
    dataset: str | None
    params: int
    path: Path
    trusted_pickle: bool = False
    input_size: int = 32
    metadata: dict = field(default_factory=dict)
    arch_from: str = "layout"  # "metadata", "layout" or "argument"

    def summary(self) -> dict:
        """Gives back the JSON-ready description `rkdtool inspect --json` prints (DESIGN §5)."""
        return {
            "ref": self.source.get("ref"),
            "file": str(self.path),
            "sha256": self.sha256,
            "arch": self.arch,
            "num_classes": self.num_classes,
            "params": self.params,
            "source": self.source,
            "dataset": self.dataset,
            "mean": list(self.mean) if self.mean else None,
            "std": list(self.std) if self.std else None,
            "input_size": self.input_size,
            "arch_from": self.arch_from,
            "trusted_pickle": self.trusted_pickle,
        }


def _stats(value: object) -> Stats | None:
    if value is None:
        return None
    values = tuple(float(v) for v in value)  # type: ignore[union-attr]
    return values if len(values) == 3 else None  # type: ignore[return-value]


def load_resolved(
    resolved: ResolvedFile, *, arch: str | None = None, trust_pickle: bool = False
) -> LoadedModel:
    """Gives back the model in a resolved weights file, loaded safely, with its architecture found or checked.

    `arch` overrides inference (the weights must then fit it exactly); `trust_pickle` allows a pickle that
    needs code to run it (refused otherwise). `rkdtool.teachers.load_model` resolves a reference first.
    """
    ckpt = read_checkpoint(resolved.path, trust_pickle=trust_pickle)
    meta = ckpt.metadata
    guess = infer_arch(ckpt.state)
    if arch is not None:
        spec, arch_from = parse_arch(arch), "argument"
        if meta.get("num_classes") is not None:
            num_classes = int(meta["num_classes"])
        else:
            num_classes = guess[1] if guess else _classifier_classes(ckpt.state)
    elif meta.get("arch"):
        spec, arch_from, num_classes = parse_arch(str(meta["arch"])), "metadata", int(meta["num_classes"])
    elif guess is not None:
        spec, arch_from, num_classes = parse_arch(guess[0]), "layout", guess[1]
    else:
        shown = ", ".join(list(ckpt.state)[:4])
        raise UsageError(
            f"cannot tell the architecture of {resolved.path.name} from its {len(ckpt.state)} keys "
            f"({shown}, ...); pass --arch NAME (see `rkdtool models`)"
        )
    if num_classes is None:
        raise UsageError(f"cannot find the classifier in {resolved.path.name}")
    try:
        model = spec.build(num_classes)
    except ValueError as exc:
        raise UsageError(f"{spec.name}: {exc}") from exc
    load_state_strict(model, ckpt.state, spec.name, guess[0] if guess else None)
    model.eval()

    known = KNOWN_TEACHERS.get((resolved.source.get("repo") or "").lower())
    mean = _stats(meta.get("mean")) or (known.mean if known else None)
    std = _stats(meta.get("std")) or (known.std if known else None)
    dataset = meta.get("dataset") or (known.dataset if known else None)
    return LoadedModel(
        model=model,
        arch=spec.name,
        num_classes=num_classes,
        mean=mean,
        std=std,
        sha256=sha256_file(resolved.path),
        source=resolved.source,
        dataset=str(dataset) if dataset else None,
        params=count_parameters(model),
        path=resolved.path,
        trusted_pickle=ckpt.trusted_pickle,
        input_size=int(meta.get("input_size", 32)),
        metadata=meta,
        arch_from=arch_from,
    )
