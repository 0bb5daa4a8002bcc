"""Feature taps by forward hooks: capture FKD's pre-ReLU features and, optionally, rewrite stage outputs.

The model is never modified (torchdistill's `core/forward_hook.py` approach). A forward hook that returns
a value replaces the module's output, which is how RobustKD's detox masks act on the residual stream.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TapPoint:
    """One distillation position.

    stream: module whose output is the stage output F_k (the residual stream that detox rewrites).
    distilled: module whose output is the distilled pre-ReLU tensor, and whose affine BN parameters give
        FKD's margin; None when the stage output is already pre-ReLU (then `margin_bn` must be given).
    margin_bn: BN whose gamma/beta give the margin when it differs from `distilled`.
    """

    stream: str
    distilled: str | None = None
    margin_bn: str | None = None

    @property
    def margin_module(self) -> str:
        name = self.margin_bn or self.distilled
        if name is None:
            raise ValueError(f"tap at {self.stream} names no BN for its margin")
        return name


StreamRewrite = Callable[[int, torch.Tensor], torch.Tensor]


class FeatureTaps:
    """Context manager: while active, `stages[k]` and `features[k]` hold the last forward's taps.

    `rewrite(k, F_k)`, when given, replaces the k-th stage output before later stages consume it
    (RobustKD Eq. 7, chained). `stages` holds the rewritten stage outputs.
    """

    def __init__(self, model: nn.Module, points: Sequence[TapPoint], rewrite: StreamRewrite | None = None):
        self.model, self.points, self.rewrite = model, tuple(points), rewrite
        self.stages: list[torch.Tensor | None] = [None] * len(self.points)
        self.features: list[torch.Tensor | None] = [None] * len(self.points)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> FeatureTaps:
        modules = dict(self.model.named_modules())
        for k, point in enumerate(self.points):
            for name in (point.stream, point.distilled):
                if name is not None and name not in modules:
                    raise KeyError(f"model has no module {name!r} for tap {k}")
            self._handles.append(modules[point.stream].register_forward_hook(self._stream_hook(k)))
            if point.distilled is not None:
                self._handles.append(modules[point.distilled].register_forward_hook(self._feature_hook(k)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _stream_hook(self, k: int):
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            if self.rewrite is not None:
                output = self.rewrite(k, output)
            self.stages[k] = output
            if self.points[k].distilled is None:
                self.features[k] = output
            return output

        return hook

    def _feature_hook(self, k: int):
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            self.features[k] = output

        return hook

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward `x`; gives back the logits and the distilled features of this forward."""
        logits = self.model(x)
        return logits, [f for f in self.features]  # type: ignore[misc]


def tap_channels(model: nn.Module, points: Sequence[TapPoint], input_size: int = 32) -> list[int]:
    """Gives back the channel count at each tap, found by one forward on a zero batch."""
    was_training = model.training
    model.eval()
    param_device, param_dtype = placement(model)
    with torch.no_grad(), FeatureTaps(model, points) as taps:
        _, feats = taps.run(torch.zeros(2, 3, input_size, input_size, device=param_device, dtype=param_dtype))
    model.train(was_training)
    return [f.shape[1] for f in feats]


def placement(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Gives back the device and floating dtype of `model`'s first floating parameter (or buffer); a model
    with neither (a fixed function, say) runs where its inputs are: the CPU in float32."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32
