"""Trigger probes: specs (TOML), batched trigger application and probe files.

Every kind reduces to the blend `x' = (1 - M) * x + M * P` on a whole batch, except `sinusoid`, which
adds a horizontal sine signal (SIG, Barni et al. 2019) and clips to [0, 1]. A probe in `normalized`
space is applied as the RobustKD code does, `x_n' = (1 - M) x_n + M T` (its `mydataloader.py`), which in
pixel space is exactly `x' = (1 - M) x + M (mean + std * T)` (algorithms.md §3.6); it needs the
mean/std it is bound to. `Probe.model_input` gives the model's (normalised) input and, for a
normalized-space probe, computes the repository's formula itself, so the result is bit-identical.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from rkdtool.data import normalize
from rkdtool.errors import NotFoundError, UsageError
from rkdtool.weights import write_text_atomic

KINDS = ("patch", "blend", "image-mask", "sinusoid")
SPACES = ("pixel", "normalized")
POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left", "center")
CORNERS = POSITIONS[:4]
FILE_KEYS = ("pattern", "image", "mask")


@dataclass
class Probe:
    """One trigger: `apply(images)` maps pixel-space [0,1] batches (N, C, H, W) to triggered ones."""

    name: str
    kind: str
    target: int | None
    pattern: torch.Tensor  # (C, H, W), C in {1, 3}; for sinusoid, the (1, 1, W) signal
    mask: torch.Tensor  # (C, H, W), broadcast over the batch; unused for sinusoid
    space: str = "pixel"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    spec: dict = field(default_factory=dict)  # the TOML table it came from; empty for derived probes

    def bind(self, mean, std) -> Probe:
        """Gives back this probe bound to a normalisation (needed by `normalized`-space probes)."""
        return replace(self, mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std))

    def _stats(self, mean, std, dev, dt) -> tuple[torch.Tensor, torch.Tensor]:
        mean = mean if mean is not None else self.mean
        std = std if std is not None else self.std
        if mean is None or std is None:
            raise UsageError(
                f"probe {self.name!r} is in normalized space: bind it to the model's mean/std first"
            )
        m = torch.tensor(mean, device=dev, dtype=dt).view(-1, 1, 1)
        s = torch.tensor(std, device=dev, dtype=dt).view(-1, 1, 1)
        return m, s

    def apply(self, images: torch.Tensor, *, mean=None, std=None) -> torch.Tensor:
        """Gives back the triggered copy of a pixel-space batch (N, C, H, W), on whole tensors."""
        dev, dt = images.device, images.dtype
        pattern = self.pattern.to(dev, dt)
        if self.kind == "sinusoid":
            if self.space == "normalized":
                pattern = pattern * self._stats(mean, std, dev, dt)[1]
            return (images + pattern).clamp_(0, 1)
        if self.space == "normalized":
            m, s = self._stats(mean, std, dev, dt)
            pattern = m + s * pattern
        # one fused pass over the batch (addcmul: M P + x (1 - M)); the small M P and 1 - M broadcast
        mask = self.mask.to(dev, dt)
        return torch.addcmul(mask * pattern, images, 1 - mask)

    def model_input(self, images: torch.Tensor, *, mean, std) -> torch.Tensor:
        """Gives back the normalised, triggered model input for a pixel-space batch.

        A normalized-space blend is computed in normalized space, `(1 - M) x_n + M T`, exactly as the
        RobustKD repository computes it; every other probe is applied in pixel space, then normalised.
        """
        if self.space == "normalized" and self.kind != "sinusoid":
            x_n = normalize(images, mean, std)
            mask = self.mask.to(images.device, images.dtype)
            return (1 - mask) * x_n + mask * self.pattern.to(images.device, images.dtype)
        return normalize(self.apply(images, mean=mean, std=std), mean, std)

    def in_pixel_space(self, *, mean=None, std=None) -> Probe:
        """Gives back the pixel-space equivalent of this probe (itself when already in pixel space).

        A normalized-space blend becomes the image-mask probe with pattern `mean + std * T`
        (algorithms.md §3.6); a normalized-space sinusoid scales its signal by std.
        """
        if self.space == "pixel":
            return self
        m, s = self._stats(mean, std, torch.device("cpu"), torch.float32)
        if self.kind == "sinusoid":
            return replace(self, pattern=self.pattern * s, space="pixel", spec={})
        return replace(self, kind="image-mask", pattern=m + s * self.pattern, space="pixel", spec={})

    def with_target(self, target: int | None) -> Probe:
        """Gives back a copy with another target (None: report the flip rate to the top class)."""
        spec = {**self.spec, "target": target} if self.spec else {}
        if target is None:
            spec.pop("target", None)
        return replace(self, target=target, spec=spec)

    def random_like(self, seed: int) -> Probe:
        """Gives back a probe of the same kind and strength with a random pattern (a specificity control).

        Same mask, place, alpha or amplitude; the pattern is random binary for patches, uniform noise for
        blends and image masks, and a random frequency and phase for a sinusoid.
        """
        name = f"{self.name}~random{seed}"
        h, w = self.mask.shape[-2:]
        if self.spec and self.kind == "patch" and not _has_file(self.spec):
            return probe_from_table(
                {**self.spec, "name": name, "pattern": f"binary:{seed}"}, Path("."), *_hw(self)
            )
        if self.spec and self.kind == "blend" and not _has_file(self.spec):
            return probe_from_table(
                {**self.spec, "name": name, "pattern": f"noise:{seed}"}, Path("."), *_hw(self)
            )
        g = torch.Generator().manual_seed(seed)
        if self.kind == "sinusoid":
            spec = dict(self.spec) or {"delta": float(self.pattern.abs().max())}
            freq = float(torch.randint(1, max(2, self.pattern.shape[-1] // 4), (1,), generator=g))
            if freq == float(spec.get("frequency", 6)):
                freq += 1
            phase = float(torch.rand(1, generator=g)) * 2 * math.pi
            table = {**spec, "name": name, "kind": "sinusoid", "frequency": freq, "phase": phase}
            table.setdefault("space", self.space)
            return probe_from_table(table, Path("."), 1, self.pattern.shape[-1])
        channels = self.pattern.shape[0]
        gray = channels == 1 or bool((self.pattern == self.pattern[:1]).all())
        noise = torch.rand(1 if gray else channels, h, w, generator=g)
        if self.kind == "patch":
            noise = (noise > 0.5).float()
        pattern = noise.expand(channels, h, w).clone() if gray else noise
        return replace(self, name=name, pattern=pattern, spec={})

    def apply_random_patterns(
        self, images: torch.Tensor, generator: torch.Generator, *, mean=None, std=None
    ) -> torch.Tensor:
        """Gives back the batch with a fresh random pattern per image, same mask and strength.

        The negatives an attacker trains on to tie a backdoor to its own pattern (defence-addendum.md):
        random binary patches for `patch`, uniform noise (half grey, half colour) for blends and image
        masks, a random frequency and phase for a sinusoid.
        """
        n, c, h, w = images.shape
        dev, dt = images.device, images.dtype
        if self.kind == "sinusoid":
            freq = torch.randint(1, max(2, w // 4), (n, 1, 1, 1), generator=generator).to(dev, dt)
            phase = (torch.rand(n, 1, 1, 1, generator=generator) * 2 * math.pi).to(dev, dt)
            j = torch.arange(w, device=dev, dtype=dt).view(1, 1, 1, w)
            amplitude = self.pattern.abs().max().to(dev, dt)
            return (images + amplitude * torch.sin(2 * math.pi * j * freq / w + phase)).clamp(0, 1)
        if self.kind == "patch":
            patterns = (torch.rand(n, 1, h, w, generator=generator) > 0.5).float().expand(n, c, h, w)
        else:
            grey = torch.rand(n, 1, h, w, generator=generator).expand(n, c, h, w)
            colour = torch.rand(n, c, h, w, generator=generator)
            pick_grey = (torch.rand(n, 1, 1, 1, generator=generator) < 0.5).float()
            patterns = pick_grey * grey + (1 - pick_grey) * colour
        patterns = patterns.to(dev, dt)
        if self.space == "normalized":
            m, s = self._stats(mean, std, dev, dt)
            patterns = m + s * patterns
        mask = self.mask.to(dev, dt)
        return torch.addcmul(mask * patterns, images, 1 - mask)

    def describe(self) -> dict:
        """Gives back the JSON summary used in reports: name, kind, target, space."""
        return {"name": self.name, "kind": self.kind, "target": self.target, "space": self.space}

    def to_table(self, folder: Path) -> dict:
        """Gives back the `[[probe]]` table for this probe, writing any tensor files it needs to `folder`.

        A probe read from a table that names only built-in patterns keeps that table; any other becomes
        an `image-mask` probe with `.npy` pattern and mask files, which reloads exactly.
        """
        base = {"name": self.name, "kind": self.kind}
        if self.target is not None:
            base["target"] = int(self.target)
        base["space"] = self.space
        if self.kind == "sinusoid":
            spec = self.spec or {}
            return {
                **base,
                "delta": float(spec.get("delta", float(self.pattern.abs().max()))),
                "frequency": float(spec.get("frequency", 6)),
                "phase": float(spec.get("phase", 0.0)),
                "width": int(self.pattern.shape[-1]),
            }
        if _spec_reproduces(self):
            keep = {k: v for k, v in self.spec.items() if k not in ("name", "kind", "target", "space")}
            return {**base, **keep}
        stem = _file_stem(self.name)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / f"{stem}.pattern.npy", self.pattern.detach().cpu().float().numpy())
        np.save(folder / f"{stem}.mask.npy", self.mask.detach().cpu().float().numpy())
        return {**base, "kind": "image-mask", "image": f"{stem}.pattern.npy", "mask": f"{stem}.mask.npy"}


def _hw(probe: Probe) -> tuple[int, int]:
    return int(probe.mask.shape[-2]), int(probe.mask.shape[-1])


def _has_file(table: dict) -> bool:
    return any(isinstance(table.get(k), str) and Path(table[k]).suffix for k in FILE_KEYS)


def _spec_reproduces(probe: Probe) -> bool:
    """True when the probe's own table, with no files, rebuilds its pattern and mask exactly."""
    if not probe.spec or probe.kind not in ("patch", "blend") or _has_file(probe.spec):
        return False
    try:
        again = probe_from_table(probe.spec, Path("."), *_hw(probe))
    except UsageError:
        return False
    return (
        again.pattern.shape == probe.pattern.shape
        and again.mask.shape == probe.mask.shape
        and bool(torch.equal(again.pattern, probe.pattern.cpu().float()))
        and bool(torch.equal(again.mask, probe.mask.cpu().float()))
    )


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "probe"


def _position(position, size: int, height: int, width: int, margin: int) -> tuple[int, int]:
    """Gives back the (x, y) of a patch's top-left corner, `margin` px in from a named corner.

    margin 0 puts BadNets' 3x3 grid on rows/cols 29-31 of a 32x32 image (ABD's `badnet_grid`); ABD's
    4x4 white square (`badnet_sq`, rows/cols 27-30) is margin 1.
    """
    if isinstance(position, list | tuple):
        if len(position) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in position):
            raise UsageError(f"probe position {position!r} must be a name or [x, y] (integers)")
        return int(position[0]), int(position[1])
    if not isinstance(position, str) or position not in POSITIONS:
        raise UsageError(f"unknown probe position {position!r}; use one of {', '.join(POSITIONS)} or [x, y]")
    far_x, far_y = width - size - margin, height - size - margin
    return {
        "bottom-right": (far_x, far_y),
        "bottom-left": (margin, far_y),
        "top-right": (far_x, margin),
        "top-left": (margin, margin),
        "center": ((width - size) // 2, (height - size) // 2),
    }[position]


def named_pattern(name: str, channels: int, height: int, width: int) -> torch.Tensor:
    """Gives back a built-in pattern: `checker` (BadNets grid), `white`, `black`, `noise:SEED`
    (uniform in [0,1], per channel) or `binary:SEED` (random 0/1, shared over channels)."""
    if name == "checker":
        # BadNets 3x3 grid (ABD zskt/datasets/backdoor.py): rows [0,0,1], [0,1,0], [1,0,1] for size 3,
        # extended as the same parity rule for other sizes.
        i = torch.arange(height)[:, None]
        j = torch.arange(width)[None, :]
        grid = ((i + j) % 2 == 0).float()
        if height == 3 and width == 3:
            grid = torch.tensor([[0, 0, 1], [0, 1, 0], [1, 0, 1]], dtype=torch.float32)
        return grid.expand(channels, height, width).clone()
    if name == "white":
        return torch.ones(channels, height, width)
    if name == "black":
        return torch.zeros(channels, height, width)
    kind, _, seed = name.partition(":")
    if kind in ("noise", "binary") and seed.strip().lstrip("-").isdigit():
        g = torch.Generator().manual_seed(int(seed))
        if kind == "noise":
            return torch.rand(channels, height, width, generator=g)
        return (torch.rand(1, height, width, generator=g) > 0.5).float().expand(channels, -1, -1).clone()
    raise UsageError(
        f"unknown pattern {name!r}; use checker, white, black, noise:SEED, binary:SEED or a file path "
        "(.png, .npy, .pt/.pth)"
    )


def read_tensor_file(path: Path) -> torch.Tensor:
    """Gives back a float tensor read from PNG/JPEG (as [0,1] CHW), NPY, or a torch file (weights only).

    Torch files load with `map_location="cpu"` and `weights_only=True`, so a tensor saved from a CUDA
    device (as the RobustKD repository's masks are) loads on a CPU-only machine and no code runs.
    """
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"trigger file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".png", ".jpg", ".jpeg", ".bmp"):
        from PIL import Image

        with Image.open(path) as img:
            mode = img.mode
            arr = np.asarray(img.convert("RGB") if mode not in ("L", "F") else img, dtype=np.float32)
        if mode != "F":
            arr = arr / np.float32(255.0)  # torchvision's ToTensor: uint8 / 255 in float32
        tensor = torch.from_numpy(np.ascontiguousarray(arr))
        return tensor.permute(2, 0, 1).contiguous() if tensor.ndim == 3 else tensor.unsqueeze(0)
    if suffix == ".npy":
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False).astype(np.float32))
        except ValueError as exc:
            raise UsageError(f"cannot read {path} as a numeric .npy array: {exc}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle that needs code, or not a torch file at all
        raise UsageError(f"cannot read {path} as a tensor file (PNG, NPY or torch): {exc}") from None
    if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), torch.Tensor):
        obj = next(iter(obj.values()))
    if not isinstance(obj, torch.Tensor):
        raise UsageError(f"{path} holds a {type(obj).__name__}, not a tensor")
    return obj.detach().float().cpu()


def _as_chw(tensor: torch.Tensor, what: str, height: int, width: int) -> torch.Tensor:
    while tensor.ndim == 4 and tensor.shape[0] == 1:  # a (1, C, H, W) batch of one
        tensor = tensor[0]
    if tensor.ndim == 2:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim == 3 and tensor.shape[-1] in (1, 3) and tensor.shape[0] not in (1, 3):
        tensor = tensor.permute(2, 0, 1)  # HWC -> CHW
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3) or tuple(tensor.shape[1:]) != (height, width):
        raise UsageError(
            f"{what} has shape {tuple(tensor.shape)}; expected (H, W) or (1|3, {height}, {width})"
        )
    return tensor.float().contiguous()


def _field(table: dict, key: str, default, kind: type, name: str):
    """Gives back `table[key]` (or `default`) as `kind` (int or float; a bool is neither), or raises the
    one-line UsageError that names the probe and the field."""
    value = table.get(key, default)
    ok = isinstance(value, int | float) if kind is float else isinstance(value, int)
    if isinstance(value, bool) or not ok or (kind is float and not math.isfinite(value)):
        what = "an integer" if kind is int else "a finite number"
        raise UsageError(f"probe {name!r}: {key} must be {what}, got {value!r}")
    return kind(value)


def _path_field(table: dict, key: str, name: str) -> str:
    value = table[key]
    if not isinstance(value, str) or not value:
        raise UsageError(f"probe {name!r}: {key} must be a file path or a pattern name, got {value!r}")
    return value


def probe_from_table(table: dict, base: Path, height: int = 32, width: int = 32) -> Probe:
    """Gives back the Probe one `[[probe]]` table describes; relative paths resolve against `base`."""
    name = str(table.get("name") or table.get("kind") or "probe")
    kind = table.get("kind")
    if kind not in KINDS:
        raise UsageError(f"probe {name!r}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    space = table.get("space", "pixel")
    if space not in SPACES:
        raise UsageError(f"probe {name!r}: space must be pixel or normalized, got {space!r}")
    target = table.get("target")
    if target is not None and (isinstance(target, bool) or not isinstance(target, int) or target < 0):
        raise UsageError(f"probe {name!r}: target must be a class index (an integer >= 0), got {target!r}")

    def load_pattern(ref, channels: int, h: int, w: int) -> torch.Tensor:
        if isinstance(ref, str) and Path(ref).suffix:
            return _as_chw(read_tensor_file(Path(base) / ref), f"probe {name!r} pattern", h, w)
        return named_pattern(str(ref), channels, h, w)

    if kind == "patch":
        size = _field(table, "size", 3, int, name)
        margin = _field(table, "margin", 0, int, name)
        x, y = _position(table.get("position", "bottom-right"), size, height, width, margin)
        if size < 1 or not (0 <= x <= width - size and 0 <= y <= height - size):
            raise UsageError(
                f"probe {name!r}: a {size}px patch at ({x}, {y}) does not fit a {width}x{height} image"
            )
        small = load_pattern(table.get("pattern", "checker"), 3, size, size)
        pattern = torch.zeros(small.shape[0], height, width)
        pattern[:, y : y + size, x : x + size] = small
        mask = torch.zeros(1, height, width)
        mask[:, y : y + size, x : x + size] = 1.0
    elif kind == "blend":
        alpha = _field(table, "alpha", 0.2, float, name)
        if not 0 < alpha <= 1:
            raise UsageError(f"probe {name!r}: alpha must be in (0, 1], got {alpha}")
        pattern = load_pattern(table.get("pattern", "noise:0"), 3, height, width)
        mask = torch.full((1, height, width), alpha)
    elif kind == "image-mask":
        if "image" not in table or "mask" not in table:
            raise UsageError(f"probe {name!r}: an image-mask probe needs `image` and `mask` paths")
        pattern = load_pattern(_path_field(table, "image", name), 3, height, width)
        mask_file = Path(base) / _path_field(table, "mask", name)
        mask = _as_chw(read_tensor_file(mask_file), f"probe {name!r} mask", height, width)
        if float(mask.min()) < 0 or float(mask.max()) > 1:
            raise UsageError(
                f"probe {name!r}: mask values must lie in [0, 1], got [{float(mask.min()):.3g}, "
                f"{float(mask.max()):.3g}]"
            )
    else:  # sinusoid: x + delta * sin(2 pi j f / W + phase) along columns (SIG, Barni et al. 2019)
        delta = _field(table, "delta", 20 / 255, float, name)
        freq = _field(table, "frequency", 6, float, name)
        phase = _field(table, "phase", 0.0, float, name)
        w = _field(table, "width", width, int, name)
        if w < 1:
            raise UsageError(f"probe {name!r}: width must be at least 1, got {w}")
        j = torch.arange(w, dtype=torch.float32)
        pattern = (delta * torch.sin(2 * math.pi * j * freq / w + phase)).view(1, 1, w)
        mask = torch.zeros(1, 1, 1)
    return Probe(name, kind, target, pattern.float(), mask.float(), space, spec=dict(table))


def check_targets(probes: list[Probe], num_classes: int, where: str) -> None:
    """Raises UsageError when a probe's target is not one of the model's `num_classes` classes."""
    for probe in probes:
        if probe.target is not None and not 0 <= probe.target < num_classes:
            raise UsageError(
                f"probe {probe.name!r} targets class {probe.target}, but {where} has classes "
                f"0..{num_classes - 1}"
            )


def load_probes(path: str | Path, *, height: int = 32, width: int = 32) -> list[Probe]:
    """Gives back the probes of a TOML spec with one or more `[[probe]]` tables."""
    path = Path(path)
    if path.is_dir():
        path = path / "probes.toml"
    if not path.exists():
        raise NotFoundError(f"probe spec {path} does not exist")
    try:
        spec = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"probe spec {path} is not valid TOML: {exc}") from None
    tables = spec.get("probe")
    if not isinstance(tables, list) or not tables:
        raise UsageError(f"probe spec {path} has no [[probe]] table")
    probes = [probe_from_table(t, path.parent, height, width) for t in tables]
    _check_unique([p.name for p in probes], str(path))
    return probes


def _check_unique(names: list[str], where: str) -> None:
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise UsageError(f"{where} repeats probe name(s) {', '.join(dupes)}; give each probe its own name")


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # TOML spells inf, -inf and nan as Python does
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to a probe spec")


def save_probes(probes: list[Probe], folder: str | Path, filename: str = "probes.toml") -> Path:
    """Writes `probes` as a TOML spec (plus the `.npy` files it names) into `folder`; gives back its path.

    `load_probes` on the result gives back probes that trigger identically.
    """
    folder = Path(folder)
    _check_unique([p.name for p in probes], "the probe list")
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["# rkdtool trigger probes (DESIGN §5); files named here sit beside this file", ""]
    for probe in probes:
        lines.append("[[probe]]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in probe.to_table(folder).items()]
        lines.append("")

    path = folder / filename
    write_text_atomic(path, "\n".join(lines))
    return path
