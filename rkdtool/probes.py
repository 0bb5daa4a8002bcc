"""Trigger probes: specs (TOML), batched trigger application, and the probe files rkdtool writes.

Every kind reduces to the blend `x' = (1 - M) * x + M * P` on a whole batch, except `sinusoid`, which
adds a horizontal sine signal (SIG, Barni et al. 2019) and clips to [0, 1]. A probe in `normalized`
space is applied as the RobustKD code does, `x_n' = (1 - M) x_n + M T`, which in pixel space is exactly
`x' = (1 - M) x + M (mean + std * T)` (algorithms.md §3.6); it needs the mean/std it is bound to.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from rkdtool.errors import NotFoundError, UsageError

KINDS = ("patch", "blend", "image-mask", "sinusoid")
POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left", "center")


@dataclass
class Probe:
    """One trigger: `apply(images)` maps pixel-space [0,1] batches (N, 3, H, W) to triggered ones."""

    name: str
    kind: str
    target: int | None
    pattern: torch.Tensor  # (C, H, W), C in {1, 3}; for sinusoid, the (1, 1, W) signal
    mask: torch.Tensor  # (C, H, W), broadcast over the batch; unused for sinusoid
    space: str = "pixel"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    spec: dict = field(default_factory=dict)  # the TOML table it came from (for reports)

    def bind(self, mean, std) -> Probe:
        """Gives back this probe bound to a normalisation (needed by `normalized`-space probes)."""
        return replace(self, mean=tuple(mean), std=tuple(std))

    def apply(self, images: torch.Tensor, *, mean=None, std=None) -> torch.Tensor:
        """Gives back the triggered copy of a pixel-space batch."""
        dev, dt = images.device, images.dtype
        if self.kind == "sinusoid":
            return (images + self.pattern.to(dev, dt)).clamp(0, 1)
        pattern = self.pattern.to(dev, dt)
        if self.space == "normalized":
            mean = mean if mean is not None else self.mean
            std = std if std is not None else self.std
            if mean is None or std is None:
                raise UsageError(f"probe {self.name!r} is in normalized space: bind it to a mean/std first")
            m = torch.tensor(mean, device=dev, dtype=dt).view(-1, 1, 1)
            s = torch.tensor(std, device=dev, dtype=dt).view(-1, 1, 1)
            pattern = m + s * pattern
        mask = self.mask.to(dev, dt)
        return (1 - mask) * images + mask * pattern

    def describe(self) -> dict:
        """Gives back the JSON summary used in reports: name, kind, target."""
        return {"name": self.name, "kind": self.kind, "target": self.target}


def _position(position, size: int, height: int, width: int) -> tuple[int, int]:
    """Gives back the (x, y) of a patch's top-left corner; corner patches sit 1 px from the edge."""
    if isinstance(position, list | tuple):
        return int(position[0]), int(position[1])
    if position not in POSITIONS:
        raise UsageError(f"unknown probe position {position!r}; use one of {', '.join(POSITIONS)} or [x, y]")
    far_x, far_y = width - size - 1, height - size - 1
    return {
        "bottom-right": (far_x, far_y),
        "bottom-left": (1, far_y),
        "top-right": (far_x, 1),
        "top-left": (1, 1),
        "center": ((width - size) // 2, (height - size) // 2),
    }[position]


def named_pattern(name: str, channels: int, height: int, width: int) -> torch.Tensor:
    """Gives back a built-in pattern: `checker` (BadNets grid), `white`, `black` or `noise:SEED`."""
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
    if name.startswith("noise:"):
        seed = int(name.split(":", 1)[1])
        g = torch.Generator().manual_seed(seed)
        return torch.rand(channels, height, width, generator=g)
    raise UsageError(f"unknown pattern {name!r}; use checker, white, black, noise:SEED or a file path")


def read_tensor_file(path: Path) -> torch.Tensor:
    """Gives back a float tensor read from PNG/JPEG (as [0,1] CHW), NPY, or a torch file (weights only)."""
    if not path.exists():
        raise NotFoundError(f"trigger file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".png", ".jpg", ".jpeg", ".bmp"):
        from PIL import Image

        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB" if img.mode not in ("L", "F") else img.mode), dtype=np.float32)
        arr = arr / 255.0 if img.mode != "F" else arr
        tensor = torch.from_numpy(arr)
        return tensor.permute(2, 0, 1).contiguous() if tensor.ndim == 3 else tensor.unsqueeze(0)
    if suffix == ".npy":
        return torch.from_numpy(np.load(path, allow_pickle=False).astype(np.float32))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle that needs code, or not a torch file at all
        raise UsageError(f"cannot read {path} as a tensor file (PNG, NPY or torch): {exc}") from None
    if not isinstance(obj, torch.Tensor):
        raise UsageError(f"{path} holds a {type(obj).__name__}, not a tensor")
    return obj.detach().float().cpu()


def _as_chw(tensor: torch.Tensor, what: str, height: int, width: int) -> torch.Tensor:
    if tensor.ndim == 2:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim == 3 and tensor.shape[-1] in (1, 3) and tensor.shape[0] not in (1, 3):
        tensor = tensor.permute(2, 0, 1)  # HWC -> CHW
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3) or tensor.shape[1:] != (height, width):
        raise UsageError(f"{what} has shape {tuple(tensor.shape)}; expected (H, W) or (1|3, {height}, {width})")
    return tensor.contiguous()


def probe_from_table(table: dict, base: Path, height: int = 32, width: int = 32) -> Probe:
    """Gives back the Probe one `[[probe]]` table describes; relative paths resolve against `base`."""
    name = str(table.get("name") or table.get("kind") or "probe")
    kind = table.get("kind")
    if kind not in KINDS:
        raise UsageError(f"probe {name!r}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    space = table.get("space", "pixel")
    if space not in ("pixel", "normalized"):
        raise UsageError(f"probe {name!r}: space must be pixel or normalized, got {space!r}")
    target = table.get("target")
    if target is not None and (not isinstance(target, int) or target < 0):
        raise UsageError(f"probe {name!r}: target must be a class index, got {target!r}")

    def load_pattern(ref, channels: int, h: int, w: int) -> torch.Tensor:
        if isinstance(ref, str) and Path(ref).suffix:
            return _as_chw(read_tensor_file(base / ref), f"probe {name!r} pattern", h, w)
        return named_pattern(str(ref), channels, h, w)

    if kind == "patch":
        size = int(table.get("size", 3))
        x, y = _position(table.get("position", "bottom-right"), size, height, width)
        if not (0 <= x <= width - size and 0 <= y <= height - size):
            raise UsageError(f"probe {name!r}: a {size}px patch at ({x}, {y}) does not fit a {width}x{height} image")
        small = load_pattern(table.get("pattern", "checker"), 3, size, size)
        pattern = torch.zeros(small.shape[0], height, width)
        pattern[:, y : y + size, x : x + size] = small
        mask = torch.zeros(1, height, width)
        mask[:, y : y + size, x : x + size] = 1.0
    elif kind == "blend":
        alpha = float(table.get("alpha", 0.2))
        if not 0 < alpha <= 1:
            raise UsageError(f"probe {name!r}: alpha must be in (0, 1], got {alpha}")
        pattern = load_pattern(table.get("pattern", "noise:0"), 3, height, width)
        mask = torch.full((1, height, width), alpha)
    elif kind == "image-mask":
        if "image" not in table or "mask" not in table:
            raise UsageError(f"probe {name!r}: an image-mask probe needs `image` and `mask` paths")
        pattern = _as_chw(read_tensor_file(base / table["image"]), f"probe {name!r} image", height, width)
        mask = _as_chw(read_tensor_file(base / table["mask"]), f"probe {name!r} mask", height, width)
    else:  # sinusoid: x + delta * sin(2 pi j f / W) along columns (SIG)
        delta = float(table.get("delta", 20 / 255))
        freq = float(table.get("frequency", 6))
        j = torch.arange(width, dtype=torch.float32)
        pattern = (delta * torch.sin(2 * math.pi * j * freq / width)).view(1, 1, width)
        mask = torch.zeros(1, 1, 1)
    return Probe(name, kind, target, pattern.float(), mask.float(), space, spec=dict(table))


def load_probes(path: str | Path, *, height: int = 32, width: int = 32) -> list[Probe]:
    """Gives back the probes of a TOML spec with one or more `[[probe]]` tables."""
    path = Path(path)
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
    names = [p.name for p in probes]
    if len(set(names)) != len(names):
        raise UsageError(f"probe spec {path} repeats a probe name: {names}")
    return probes
