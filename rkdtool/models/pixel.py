"""A model that takes pixel-space images in [0, 1] and normalises inside, and the input shape weights declare.

What the ONNX bundle, the latency benchmarks and the INT8 simulation all run: the board needs no mean/std.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class PixelSpaceModel(nn.Module):
    """Wraps a model taking normalised input so that it takes pixel-space [0, 1] images instead."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def input_chw(meta: dict) -> tuple[int, int, int]:
    """Gives back (C, H, W) from weights metadata (`input_size` as an int or [H, W]); 3x32x32 by default."""
    size = meta.get("input_size", 32)
    if isinstance(size, int):
        return (3, size, size)
    if len(size) == 2:
        return (3, int(size[0]), int(size[1]))
    return tuple(int(s) for s in size[-3:])  # type: ignore[return-value]
