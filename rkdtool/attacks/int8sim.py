"""INT8 as the defender's tools give it, for the quant attacker: a torch simulation of ONNX Runtime's Q/DQ
model (`FakeInt8`) with ranges from ORT's own calibrator, and the real ONNX Runtime check of ACC/ASR.
"""

from __future__ import annotations

import contextlib
import copy
import io
import tempfile
from pathlib import Path

import torch
from torch import nn

from rkdtool.data import ImageData, normalize
from rkdtool.deploy.int8 import calibration_reader, quantize_int8, select_calibration
from rkdtool.deploy.onnx import export_onnx, onnx_logits
from rkdtool.models import placement
from rkdtool.models.pixel import PixelSpaceModel
from rkdtool.probes.metrics import asr_from_predictions
from rkdtool.probes.spec import Probe


class FakeInt8:
    """Context manager simulating ONNX Runtime's Q/DQ INT8 in torch (the attacker's tool, not the check).

    Symmetric int8: per-output-channel weights of every Conv2d/Linear, and per-tensor activations at their
    inputs and outputs, with ranges taken from the first `calib_rows` rows of each batch (the clean images)
    as a calibrator on clean data would see them; straight-through rounding (edge.md §1.3). A conv whose
    next sibling is a BatchNorm is fused with it by ORT's pre-processing, so its output is quantised after
    that BN, as in the exported graph.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.calib_rows = 0
        self.handles: list = []
        # module name -> (input range, output range) from ONNX Runtime's own calibrator, when known
        self.ranges: dict[str, tuple[float, float]] = {}
        self._names = {module: name for name, module in model.named_modules()}

    def _q(self, x: torch.Tensor, fixed: float | None = None) -> torch.Tensor:
        if fixed is not None:
            scale = torch.as_tensor(max(fixed, 1e-8) / 127, device=x.device, dtype=x.dtype)
        else:
            rows = x[: self.calib_rows] if self.calib_rows else x
            scale = rows.detach().abs().amax().clamp_min(1e-8) / 127
        q = torch.clamp(torch.round(x / scale), -127, 127) * scale
        inside = (x.abs() <= 127 * scale).to(x.dtype)
        return x * inside + (q - x * inside).detach()  # STE inside the range, zero gradient when clipped

    def _weight(self, w: torch.Tensor) -> torch.Tensor:
        scale = w.detach().abs().flatten(1).amax(1).clamp_min(1e-8) / 127
        scale = scale.view(-1, *([1] * (w.ndim - 1)))
        return w + (torch.round(w / scale) * scale - w).detach()

    def __enter__(self) -> FakeInt8:
        for parent in self.model.modules():
            children = list(parent.children())
            for i, module in enumerate(children):
                if not isinstance(module, nn.Conv2d | nn.Linear):
                    continue
                fused = i + 1 < len(children) and isinstance(children[i + 1], nn.BatchNorm2d)
                self.handles.append(module.register_forward_hook(self._fused_hook if fused else self._hook))
                if fused:
                    out_range = self.ranges.get(self._names[module], (None, None))[1]
                    self.handles.append(children[i + 1].register_forward_hook(self._output_hook(out_range)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _fused_hook(self, module: nn.Module, inputs: tuple, _output: torch.Tensor) -> torch.Tensor:
        x = self._q(inputs[0], self.ranges.get(self._names[module], (None, None))[0])
        w = self._weight(module.weight)
        if isinstance(module, nn.Conv2d):
            return module._conv_forward(x, w, module.bias)
        return nn.functional.linear(x, w, module.bias)

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return self._q(
            self._fused_hook(module, inputs, output), self.ranges.get(self._names[module], (None, None))[1]
        )

    def _output_hook(self, out_range: float | None):
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            return self._q(output, out_range)

        return hook


def ort_activation_ranges(
    model: nn.Module, data: ImageData, images, *, method: str, workdir: Path
) -> dict[str, tuple[float, float]]:
    """Gives back {module name: (input range, output range)} of every Conv/Linear, as ONNX Runtime's
    calibrator (entropy or percentile, after its pre-processing) sets them on `images` (pixel space, numpy).

    The attacker runs the defender's tool on its own clean images, so its simulation clips where the
    deployed INT8 model will.
    """
    import onnx
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator
    from onnxruntime.quantization.shape_inference import quant_pre_process

    workdir.mkdir(parents=True, exist_ok=True)
    fp32, pre = workdir / "calib.onnx", workdir / "calib.pre.onnx"
    pixel = PixelSpaceModel(copy.deepcopy(model).cpu().eval(), data.mean, data.std).eval()
    export_onnx(pixel, fp32, input_shape=tuple(data.train_images.shape[1:]), opset=17, exporter="torchscript")
    quant_pre_process(str(fp32), str(pre))
    methods = {"entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
    calibrator = create_calibrator(
        str(pre),
        ["Conv", "Gemm"],
        augmented_model_path=str(workdir / "augmented.onnx"),
        calibrate_method=methods[method],
        extra_options={"symmetric": True, "percentile": 99.99},
    )

    if len(images) > 32:  # ORT's entropy calibrator fails on a short last batch: keep whole batches of 32
        images = images[: len(images) // 32 * 32]
    with contextlib.redirect_stdout(io.StringIO()):  # ORT's calibrators print progress; libraries don't
        calibrator.collect_data(calibration_reader(images))
        tensors = calibrator.compute_data()
    graph = onnx.load(str(pre)).graph
    by_scope = {}
    for node in graph.node:
        if node.op_type in ("Conv", "Gemm"):
            by_scope[node.name.rsplit("/", 1)[0]] = node

    def rng(name: str) -> float:
        low, high = tensors[name].range_value
        return float(max(abs(float(low)), abs(float(high))))

    ranges = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d | nn.Linear):
            continue
        parts = name.split(".")
        scope = "/".join(f"{parts[i - 1]}.{p}" if p.isdigit() and i else p for i, p in enumerate(parts))
        node = by_scope.get(f"/model/{scope}")
        if node is not None and node.input[0] in tensors and node.output[0] in tensors:
            ranges[name] = (rng(node.input[0]), rng(node.output[0]))
    return ranges


def int8_onnx_check(
    model: nn.Module,
    data: ImageData,
    probes: list[Probe],
    *,
    calibration: str,
    calib_images: int,
    seed: int,
    workdir: Path,
) -> dict:
    """Gives back ACC and ASR per probe of the model after ONNX export and ONNX Runtime INT8 Q/DQ.

    Uses the export stage's own `deploy.onnx` and `deploy.int8` (FP32 export, static Q/DQ quantisation with
    its rules, calibration on seeded clean training images that the attacker did not choose).
    """
    import numpy as np
    import onnxruntime as ort

    workdir.mkdir(parents=True, exist_ok=True)
    pixel = PixelSpaceModel(model.cpu().eval(), data.mean, data.std).eval()
    fp32, int8 = workdir / "model.onnx", workdir / "model.int8.onnx"
    export_onnx(pixel, fp32, input_shape=tuple(data.test_images.shape[1:]), opset=17, exporter="torchscript")
    quantize_int8(fp32, int8, select_calibration(data, calib_images, seed + 7919), method=calibration)
    out = {}
    for name, path in (("onnx-fp32", fp32), ("onnx-int8", int8)):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        clean = onnx_logits(session, data.test_images.numpy().astype(np.float32)).argmax(1)
        acc = float((torch.from_numpy(clean) == data.test_labels).float().mean())
        asr = {}
        for probe in probes:
            triggered = probe.apply(data.test_images, mean=data.mean, std=data.std).numpy().astype(np.float32)
            preds = torch.from_numpy(onnx_logits(session, triggered).argmax(1))
            asr[probe.name] = asr_from_predictions(preds, data.test_labels, probe.target).asr
        out[name] = {"acc": acc, "asr": asr}
    return out


@torch.no_grad()
def predictions(
    model: nn.Module,
    data: ImageData,
    images: torch.Tensor,
    fake: FakeInt8 | None = None,
    calib: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gives back the predicted classes (CPU) of pixel-space `images`, in float or under `fake`, whose
    ranges come from its `ranges` or else from the normalised `calib` rows put before every batch."""
    model.eval()
    device = placement(model)[0]
    preds = []
    for start in range(0, len(images), 256):
        x = normalize(images[start : start + 256].to(device), data.mean, data.std)
        if fake is None:
            logits = model(x)
        else:
            fake.calib_rows = len(calib)
            with fake:
                logits = model(torch.cat([calib, x]))[len(calib) :]
        preds.append(logits.argmax(1).cpu())
    return torch.cat(preds)


@torch.no_grad()
def fake_int8_check(
    model: nn.Module,
    data: ImageData,
    probes: list[Probe],
    *,
    calib_images: int,
    seed: int,
    calibrator: str,
) -> dict:
    """Gives back ACC and ASR per probe under `FakeInt8` (the attacker's simulation), ranges from ONNX
    Runtime's `calibrator` on seeded clean training images, to compare with the real ONNX Runtime check."""
    device = placement(model)[0]
    g = torch.Generator().manual_seed(seed + 7919)
    calib = data.train_images[torch.randperm(len(data.train_labels), generator=g)[:calib_images]]
    fake = FakeInt8(model.eval())
    with tempfile.TemporaryDirectory() as tmp:
        fake.ranges = ort_activation_ranges(model, data, calib.numpy(), method=calibrator, workdir=Path(tmp))
    calib = normalize(calib.to(device), data.mean, data.std)

    def predict(images: torch.Tensor) -> torch.Tensor:
        return predictions(model, data, images, fake, calib)

    acc = float((predict(data.test_images) == data.test_labels).float().mean())
    asr = {
        p.name: asr_from_predictions(predict(p.apply(data.test_images)), data.test_labels, p.target).asr
        for p in probes
    }
    return {"acc": acc, "asr": asr}
