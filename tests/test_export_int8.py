"""The INT8 Q/DQ model the bundle ships (rkdtool/deploy/int8.py) as TensorRT wants it: Q/DQ on the inputs of
Conv and Gemm, never on their outputs, so the graph output `logits` stays float (device review defect 16,
edge.md §1.3). A WRN-10-1 exported the way bundles are; ONNX Runtime's own default is checked too, so the test
shows the option is what makes the difference.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from rkdtool.deploy import int8
from rkdtool.deploy.onnx import export_onnx, onnx_logits, onnx_session
from rkdtool.models import build_model
from rkdtool.models.pixel import PixelSpaceModel


@pytest.fixture(scope="module")
def wrn_onnx(tmp_path_factory):
    torch.manual_seed(0)
    model = PixelSpaceModel(build_model("wrn10-1", 10), (0.5,) * 3, (0.25,) * 3).eval()
    path = tmp_path_factory.mktemp("int8") / "model.onnx"
    export_onnx(model, path, input_shape=(3, 32, 32), opset=13, exporter="torchscript", max_batch=64)
    return path


def quantized(path, monkeypatch, excluded):
    monkeypatch.setattr(int8, "UNQUANTIZED_OUTPUT_OP_TYPES", excluded)
    out = path.with_name(f"model.int8.{len(excluded)}.onnx")
    calib = np.random.default_rng(0).random((64, 3, 32, 32), dtype=np.float32)
    int8.quantize_int8(path, out, calib, method="entropy")
    return out


def logits_producer(path) -> str:
    graph = onnx.load(str(path)).graph
    return next(n.op_type for n in graph.node if graph.output[0].name in n.output)


def test_conv_and_gemm_outputs_are_not_quantized_and_logits_stay_float(wrn_onnx, monkeypatch):
    path = quantized(wrn_onnx, monkeypatch, int8.UNQUANTIZED_OUTPUT_OP_TYPES)
    summary = int8.qdq_summary(path)
    assert summary["quantized_conv_gemm_outputs"] == 0 and summary["dequantized_graph_outputs"] == 0
    assert summary["quantize_nodes"] > 0 and summary["all_zero_points_zero"]
    assert logits_producer(path) == "Gemm"
    x = np.random.default_rng(1).random((64, 3, 32, 32), dtype=np.float32)
    fp32 = onnx_logits(onnx_session(wrn_onnx), x)
    q = onnx_logits(onnx_session(path, optimize=False), x)
    # Float logits take about as many distinct values as FP32's; a quantised output takes a few hundred.
    assert len(np.unique(q)) > 0.9 * len(np.unique(fp32))


def test_without_the_option_onnx_runtime_quantizes_the_logits(wrn_onnx, monkeypatch):
    path = quantized(wrn_onnx, monkeypatch, ())
    summary = int8.qdq_summary(path)
    assert summary["quantized_conv_gemm_outputs"] > 0 and summary["dequantized_graph_outputs"] == 1
    assert logits_producer(path) == "DequantizeLinear"
