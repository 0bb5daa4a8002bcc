"""INT8 Q/DQ ONNX from ONNX Runtime's static quantisation, with TensorRT's rules (edge.md §1.3-1.4, §8).

Symmetric int8 activations and weights (zero point 0), per-channel weights on axis 0, bias left in float, Conv
and Gemm inputs only (their outputs, the `logits` included, stay float), entropy or percentile calibration on
clean training images (never test images).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from rkdtool.deploy.onnx import INPUT_NAME
from rkdtool.errors import DataError, UsageError

QUANTIZED_OP_TYPES = ("Conv", "Gemm")  # edge.md §1.4: keeps Q/DQ off BN scale/bias, Flatten, pooling
# ORT's QDQ quantizer also quantises the outputs of the ops it quantises unless told not to
# (onnxruntime/python/tools/quantization/quantize.py, extra_options "OpTypesToExcludeOutputQuantization"); the
# graph output `logits` then comes out of a DequantizeLinear, 63 distinct values where FP32 has 400 (device
# review defect 16). TensorRT's rule is the same: do not quantise weighted ops' outputs, it fuses the next
# consumer's Q into the conv epilogue (edge.md §1.3).
UNQUANTIZED_OUTPUT_OP_TYPES = ("Conv", "Gemm")


def calibration_reader(images: np.ndarray, input_name: str = INPUT_NAME, batch_size: int = 32):
    """Gives back an ONNX Runtime CalibrationDataReader feeding `images` (clean training images).

    Every batch has the same size: ORT's entropy and percentile collectors stack per-batch outputs and fail
    on a short last batch, so the remainder (fewer than `batch_size` images) is left out.
    """
    from onnxruntime.quantization import CalibrationDataReader

    batch_size = max(1, min(batch_size, len(images)))
    usable = (len(images) // batch_size) * batch_size

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.starts = iter(range(0, usable, batch_size))

        def get_next(self) -> dict | None:
            start = next(self.starts, None)
            return None if start is None else {input_name: images[start : start + batch_size]}

        def rewind(self) -> None:
            self.starts = iter(range(0, usable, batch_size))

    return _Reader()


def quantize_int8(fp32_path: Path, int8_path: Path, calib_images: np.ndarray, *, method: str) -> None:
    """Writes the INT8 Q/DQ model: ORT pre-processing, then static quantisation with TensorRT's rules.

    Symmetric int8 activations and weights (zero point 0), per-channel weights (axis 0), bias left in float,
    Q/DQ on the inputs of Conv and Gemm only, never on their outputs, entropy or percentile calibration
    (edge.md §1.3-1.4).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise UsageError(f"calibration must be entropy or percentile, got {method!r}")
    pre_path = int8_path.with_name(int8_path.stem + ".pre.onnx")
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink):  # ORT's calibrators print progress
        warnings.simplefilter("ignore")
        quant_pre_process(str(fp32_path), str(pre_path))
        quantize_static(
            str(pre_path),
            str(int8_path),
            calibration_reader(calib_images),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=list(QUANTIZED_OP_TYPES),
            calibrate_method=methods[method],
            extra_options={
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                "QuantizeBias": False,
                "OpTypesToExcludeOutputQuantization": list(UNQUANTIZED_OUTPUT_OP_TYPES),
                "CalibPercentile": 99.99,
            },
        )
    pre_path.unlink()
    model = onnx.load(str(int8_path))
    prune_unused_opsets(model)
    onnx.save(model, str(int8_path))
    onnx.checker.check_model(str(int8_path), full_check=True)


def prune_unused_opsets(model: onnx.ModelProto) -> None:
    """Drops opset imports of domains no node uses (ORT's pre-processing adds com.microsoft and others)."""
    used = {n.domain for n in model.graph.node} | {""}
    kept = [o for o in model.opset_import if o.domain in used or o.domain == "ai.onnx"]
    del model.opset_import[:]
    model.opset_import.extend(kept)


def qdq_summary(path: Path) -> dict:
    """Gives back the Q/DQ facts TensorRT cares about (edge.md §8): zero points, scales, bias DQ, opset."""
    model = onnx.load(str(path))
    init = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producers = {out: node for node in model.graph.node for out in node.output}
    zero_points, conv_weight_scales, bias_dq, bn_dq, weighted_out_q = [], [], 0, 0, 0
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        producer = producers.get(node.input[0])
        if node.op_type == "QuantizeLinear" and producer is not None and producer.op_type in ("Conv", "Gemm"):
            weighted_out_q += 1
        if len(node.input) > 2 and node.input[2] in init:
            zp = init[node.input[2]]
            zero_points.append((str(zp.dtype), bool(np.all(zp == 0))))
        if node.op_type != "DequantizeLinear":
            continue
        for user in consumers.get(node.output[0], []):
            if user.op_type in ("Conv", "Gemm") and len(user.input) > 2 and user.input[2] == node.output[0]:
                bias_dq += 1
            if user.op_type == "Conv" and user.input[1] == node.output[0]:
                weight = init.get(node.input[0])
                scale = init.get(node.input[1])
                c_out = None if weight is None else int(weight.shape[0])
                conv_weight_scales.append({"c_out": c_out, "scale_shape": list(np.shape(scale))})
            if user.op_type == "BatchNormalization" and node.output[0] in user.input[1:]:
                bn_dq += 1
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return {
        "opset": opset,
        "quantize_nodes": sum(n.op_type == "QuantizeLinear" for n in model.graph.node),
        "dequantize_nodes": sum(n.op_type == "DequantizeLinear" for n in model.graph.node),
        "zero_point_dtypes": sorted({dt for dt, _ in zero_points}),
        "all_zero_points_zero": all(z for _, z in zero_points) and bool(zero_points),
        "conv_weight_scales": conv_weight_scales,
        "per_channel_conv_weights": bool(conv_weight_scales)
        and all(s["scale_shape"] == [s["c_out"]] for s in conv_weight_scales),
        "bias_dequantize_nodes": bias_dq,
        "batchnorm_param_dequantize_nodes": bn_dq,
        "quantized_conv_gemm_outputs": weighted_out_q,
        "dequantized_graph_outputs": sum(
            producers[o.name].op_type == "DequantizeLinear" for o in model.graph.output if o.name in producers
        ),
        "domains": sorted({o.domain or "ai.onnx" for o in model.opset_import}),
    }


def select_calibration(data, count: int, seed: int) -> np.ndarray:
    """Gives back `count` seeded-random clean *training* images (never test images) for INT8 calibration."""
    n = len(data.train_labels)
    if n == 0:
        raise DataError("the run's dataset has no training images to calibrate INT8 with")
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))[: min(count, n)]
    return data.train_images[idx].numpy().astype(np.float32)
