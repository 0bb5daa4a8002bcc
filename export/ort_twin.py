"""The host twin: the device check run with ONNX Runtime on the CPU, for every bundle's precision.

int8 runs model.int8.onnx (Q/DQ), fp32 runs model.onnx, fp16 (the Nano and TX2 profiles) runs an FP16 copy of
model.onnx made here by `half_precision`: float weights and constants rounded to FP16 (clamped to its range,
as TensorRT clamps FP16 weights), every float tensor typed FP16, casts at the graph's input and output so the
I/O stays float32 - the layout onnxconverter-common's convert_float_to_float16(keep_io_types=True) makes,
without that dependency. ONNX Runtime's CPU provider runs it, inserting casts to FP32 around ops it has no
FP16 kernel for (its InsertCastTransformer), so activations are rounded to FP16 between ops: FP16 rounding,
not TensorRT's FP16 kernels. Where the conversion cannot be made (no `onnx` module, a graph with subgraphs)
or ONNX Runtime refuses it, the FP32 model runs and the report says so (`precision_run`, `note`). rkdtool's
host re-check runs this same class for its onnx-fp16 row, so the twin reproduces that row.

ACC/ASR run the graph as written (ORT_DISABLE_ALL: Q/DQ as float quantise-dequantise, the semantics TensorRT
implements, as rkdtool's host re-check does); latency runs it with all optimisations (ORT's fused kernels).
Needs numpy and onnxruntime (and onnx for fp16); Python 3.6 syntax.
"""

import os
import time

import numpy as np

from trt_plan import DeviceError
from trt_run import warm_up

MODEL_FILES = {"fp32": "model.onnx", "fp16": "model.onnx", "int8": "model.int8.onnx"}
FP32_FALLBACK = (
    "the bundle's precision is fp16 but ONNX Runtime ran the FP32 model ({}); "
    "its numbers are the host report's onnx-fp32 row, not FP16"
)
FP16_NOTE = (
    "FP16 copy of model.onnx (FP16 weights and activations, FP32 inputs and outputs) on ONNX Runtime's CPU "
    "provider, which computes ops without FP16 kernels in FP32 between casts: FP16 rounding, not TensorRT's "
    "FP16 kernels"
)
FLOAT, FLOAT16 = 1, 10  # onnx.TensorProto.FLOAT / FLOAT16
ATTRIBUTE_TENSOR, ATTRIBUTE_GRAPH, ATTRIBUTE_GRAPHS = 4, 5, 10  # onnx.AttributeProto types
FP16_MAX = 65504.0
# Inputs the ONNX operator schemas type as tensor(float) whatever the op's T (Resize and Upsample scales).
FLOAT_ONLY_INPUTS = {"Resize": (2,), "Upsample": (1,)}


def first_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _half_tensor(tensor, numpy_helper):
    array = numpy_helper.to_array(tensor).astype(np.float32)
    half = np.clip(array, -FP16_MAX, FP16_MAX).astype(np.float16)
    tensor.CopyFrom(numpy_helper.from_array(half, tensor.name))


def _half_nodes(graph, numpy_helper):
    """Retypes the nodes' float constants and casts to FP16; raises ValueError on subgraphs."""
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type in (ATTRIBUTE_GRAPH, ATTRIBUTE_GRAPHS):
                raise ValueError(f"{node.op_type} node {node.name!r} holds a subgraph, not converted")
            if node.op_type == "Constant" and attribute.name in ("value_float", "value_floats"):
                raise ValueError(f"Constant node {node.name!r} holds a float attribute, not converted")
            if attribute.type == ATTRIBUTE_TENSOR and attribute.t.data_type == FLOAT:
                _half_tensor(attribute.t, numpy_helper)
            if node.op_type == "Cast" and attribute.name == "to" and attribute.i == FLOAT:
                attribute.i = FLOAT16


def _rename_uses(graph, old, new):
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def half_precision(model):
    """Gives back an FP16 copy of an FP32 ONNX model whose inputs and outputs stay float32."""
    import onnx
    from onnx import helper, numpy_helper

    half = onnx.ModelProto()
    half.CopyFrom(model)
    graph = half.graph
    keep = {
        node.input[i]
        for node in graph.node
        for i in FLOAT_ONLY_INPUTS.get(node.op_type, ())
        if i < len(node.input)
    }
    for tensor in graph.initializer:
        if tensor.data_type == FLOAT and tensor.name not in keep:
            _half_tensor(tensor, numpy_helper)
    _half_nodes(graph, numpy_helper)
    initializers = {t.name for t in graph.initializer}
    first, last = [], []
    for value in graph.input:
        if value.type.tensor_type.elem_type == FLOAT and value.name not in initializers:
            _rename_uses(graph, value.name, value.name + ".fp16")
            first.append(helper.make_node("Cast", [value.name], [value.name + ".fp16"], to=FLOAT16))
    for value in graph.output:
        if value.type.tensor_type.elem_type == FLOAT:
            for node in graph.node:
                node.output[:] = [value.name + ".fp16" if o == value.name else o for o in node.output]
            _rename_uses(graph, value.name, value.name + ".fp16")
            last.append(helper.make_node("Cast", [value.name + ".fp16"], [value.name], to=FLOAT))
    nodes = first + list(graph.node) + last
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]  # float32 types recorded by shape inference no longer hold
    return half


def fp16_model(path):
    """Gives back (serialised FP16 copy of the model at `path`, None) or (None, why it cannot be made)."""
    try:
        import onnx
    except ImportError:
        return None, "the onnx module is not installed (pip3 install onnx makes the FP16 copy)"
    try:
        return half_precision(onnx.load(path)).SerializeToString(), None
    except ValueError as exc:
        return None, f"its FP16 copy could not be made: {first_line(exc)}"


class OrtBackend:
    """ONNX Runtime on the CPU: `infer(images)` gives back float32 logits, `time()` host latency."""

    def __init__(self, bundle, precision):
        import onnxruntime as ort

        if precision not in MODEL_FILES:
            raise DeviceError(f"the onnxruntime backend runs fp32, fp16 or int8, not {precision}")
        self.ort = ort
        self.model_file = MODEL_FILES[precision]
        path = os.path.join(bundle, self.model_file)
        if not os.path.isfile(path):
            raise DeviceError(f"{path} is missing from the bundle")
        self.precision_run, self.note, self.sessions = precision, None, None
        if precision == "fp16":
            self._open_fp16(path)
        if self.sessions is None:
            self.sessions = self._sessions(path)
        self.input_name = self.sessions["ORT_DISABLE_ALL"].get_inputs()[0].name
        self.version = ort.__version__

    def _open_fp16(self, path):
        """Opens the FP16 conversion, or records why the FP32 model runs instead."""
        model, why_not = fp16_model(path)
        if model is not None:
            try:
                self.sessions, self.note = self._sessions(model), FP16_NOTE
                self.model_file = "model.onnx (FP16 copy)"
                return
            except Exception as exc:  # ORT raises its own Fail/NotImplemented types
                why_not = f"ONNX Runtime could not run the FP16 model: {first_line(exc)}"
        self.precision_run, self.note = "fp32", FP32_FALLBACK.format(why_not)

    def _sessions(self, model):
        ort, sessions = self.ort, {}
        for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_ALL"):
            options = ort.SessionOptions()
            options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
            sessions[level] = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        return sessions

    def infer(self, images, batch=256):
        session = self.sessions["ORT_DISABLE_ALL"]
        outs = [
            session.run(None, {self.input_name: images[i : i + batch]})[0]
            for i in range(0, len(images), batch)
        ]
        return np.concatenate(outs).astype(np.float32)

    def time(self, images, warmup=10, runs=1000, warmup_ms=2000.0, repeats=1):
        """Gives back {"host_ms", "warmup", "repeat_p50"}: `runs` inferences of one batch per repeat."""
        session, feed = self.sessions["ORT_ENABLE_ALL"], {self.input_name: images}
        warm = warm_up(lambda: session.run(None, feed), warmup, warmup_ms)
        host_ms, medians = [], []
        for _ in range(max(1, repeats)):
            samples = []
            for _ in range(runs):
                t0 = time.perf_counter()
                session.run(None, feed)
                samples.append((time.perf_counter() - t0) * 1e3)
            host_ms += samples
            medians.append(float(np.median(samples)))
        return {"host_ms": host_ms, "warmup": warm, "repeat_p50": {"host_ms": medians}}
