"""ONNX FP32 export with a dynamic batch axis (exporter and opset per profile), and ONNX Runtime sessions.

The exported graph takes pixel-space float32 images in [0, 1] (N, 3, H, W) and applies the student's mean/std
normalisation itself as its first ops (Sub, Div), so the board needs no preprocessing beyond scaling to [0, 1]
(edge.md §6).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from rkdtool.errors import RkdError, UsageError
from rkdtool.models.pixel import PixelSpaceModel, input_chw
from rkdtool.weights import build_from_weights

INPUT_NAME, OUTPUT_NAME = "input", "logits"


class ExportError(RkdError):
    """An export step failed on this run (checker, quantisation, parity) in a way the user can act on."""


def export_onnx(
    model: nn.Module,
    path: Path,
    *,
    input_shape: Sequence[int],
    opset: int,
    exporter: str,
    max_batch: int = 1024,
) -> None:
    """Writes `model` (pixel-space input) as one self-contained ONNX file with a dynamic batch axis.

    TorchScript exporter for opset <= 17 (TensorRT 8.2/8.5), dynamo for >= 18: the dynamo exporter cannot
    down-convert and would silently keep opset 18 (edge.md §6.1). Weights stay inside the file.
    """
    model = model.eval()
    example = torch.rand(2, *input_shape)
    sink = io.StringIO()
    # The exporters warn about their own deprecations and print progress; the library stays quiet.
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
        if exporter == "torchscript":
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                do_constant_folding=True,
            )
        elif exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=max(max_batch, 2))
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=True,
                opset_version=opset,
                external_data=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes={"x": {0: batch}},
                verbose=False,
            )
        else:
            raise UsageError(f"unknown exporter {exporter!r}; use torchscript or dynamo")
    written = onnx.load(str(path), load_external_data=False)
    version = next((o.version for o in written.opset_import if o.domain in ("", "ai.onnx")), None)
    if version != opset:
        raise ExportError(f"the {exporter} exporter wrote opset {version}, not the profile's {opset}")
    if Path(f"{path}.data").exists():
        raise ExportError(f"the exporter wrote external weights ({path}.data); the bundle needs one file")
    onnx.checker.check_model(str(path), full_check=True)


def onnx_logits(session, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Gives back the logits an ONNX Runtime session computes for pixel-space images, in batches."""
    name = session.get_inputs()[0].name
    outs = [
        session.run(None, {name: images[i : i + batch_size]})[0] for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(outs).astype(np.float32) if outs else np.zeros((0, 0), np.float32)


def onnx_session(path: Path, *, threads: int | None = None, optimize: bool = True):
    """Gives back an ONNX Runtime CPU session for a model file.

    optimize=True: all graph optimisations (ORT fuses Q/DQ into its int8 kernels: what runs fastest here).
    optimize=False: the graph runs as written, Q/DQ as float quantise-dequantise: the semantics TensorRT
    implements. ORT's fused int8 kernels can drift from it on x86 without VNNI (edge.md §1.4).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    level = "ORT_ENABLE_ALL" if optimize else "ORT_DISABLE_ALL"
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def load_pixel_model(path: Path) -> tuple[PixelSpaceModel, tuple[int, int, int]]:
    """Gives back the pixel-space student stored in a safetensors file and its input shape (C, H, W)."""
    model, meta = build_from_weights(path)
    if "mean" not in meta or "std" not in meta:
        raise UsageError(f"{path} carries no mean/std metadata; cannot bake its normalisation in")
    return PixelSpaceModel(model, meta["mean"], meta["std"]).eval(), input_chw(meta)
