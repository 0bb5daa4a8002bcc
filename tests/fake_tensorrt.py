"""A recording stand-in for `tensorrt`, `pycuda.driver` and the CUDA driver's graph calls, for the tests of
the device runtime (export/). No machine here has TensorRT or a GPU.

It mimics the Python API surface of one TensorRT version (pyCore.cpp at 8.2.1, 8.5.2 and 10.3.0):
- bindings API (`num_bindings`, `set_binding_shape`, `execute_async_v2`) before 8.5, named tensors
  (`num_io_tensors`, `set_input_shape`, `set_tensor_address`, `execute_async_v3`) from 8.5;
- `set_memory_pool_limit`/`MemoryPoolType` from 8.4, `max_workspace_size` before;
- `EXPLICIT_BATCH` on 8.x, `STRONGLY_TYPED` from 10, no INT8/FP16 builder flags and no calibrator on 11;
- `IBuilderConfig.set_flag/clear_flag/get_flag` with TF32 on by default (NvInfer.h), profiles whose
  `set_shape` is recorded, `DeviceType`, `ProfilingVerbosity`, `LayerInformationFormat`, timing caches;
- `Builder.num_DLA_cores`, `platform_has_fast_int8/fp16`; `Runtime.DLA_core`; the engine inspector;
- the bool results TensorRT uses for failure (set_input_shape, set_tensor_address, execute_async_v2/v3),
  configurable per test.
Every call of interest is appended to `trt.calls`. The "engine" is a JSON record of what was built, and it
computes logits with numpy: logit k of an image = its pixel sum times (k - 4.5). This shows which API each
version gets and what the runtime does with the results, not that a real engine builds.
"""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from pathlib import Path

import numpy as np

ENGINE_MAGIC = b"fake-engine:"
CLASSES = 10


def compute_logits(x: np.ndarray, classes: int = CLASSES) -> np.ndarray:
    """The fake engine's arithmetic: logit k of an image = its pixel sum times (k - 4.5)."""
    return x.reshape(len(x), -1).sum(1, keepdims=True) * (np.arange(classes) - 4.5)


class FakeGpu:
    """State the fake pycuda, TensorRT and CUDA driver share: device memory, capture mode, the call log."""

    def __init__(self, name: str = "Orin", sm: tuple = (8, 7), event_ms: float = 0.25):
        self.name, self.sm, self.event_ms = name, sm, event_ms
        self.memory: dict[int, np.ndarray] = {}
        self.capturing = False
        self.captured: list = []
        self.calls: list = []


def fake_pycuda(gpu: FakeGpu) -> types.ModuleType:
    """A pycuda.driver stand-in: device memory is a dict of numpy buffers keyed by pointer."""
    cuda = types.ModuleType("pycuda.driver")
    cuda.memory = gpu.memory

    class Error(Exception):
        pass

    class Allocation:
        def __init__(self, nbytes):
            self.ptr = 0x1000 * (len(gpu.memory) + 1)
            gpu.memory[self.ptr] = np.zeros(max(1, nbytes // 4), np.float32)

        def __int__(self):
            return self.ptr

    def htod(dev, host, stream=None):
        gpu.memory[int(dev)][: host.size] = np.asarray(host, np.float32).ravel()

    def dtoh(host, dev, stream=None):
        host[...] = gpu.memory[int(dev)][: host.size].reshape(host.shape)

    class Stream:
        handle = 7

        def synchronize(self):
            return None

    class Event:
        def record(self, stream=None):
            return None

        def synchronize(self):
            return None

        def time_till(self, other):
            return gpu.event_ms

    class Device:
        def __init__(self, index):
            self.index = index

        def name(self):
            return gpu.name

        def compute_capability(self):
            return gpu.sm

    cuda.Error, cuda.Device = Error, Device
    cuda.mem_alloc = Allocation
    cuda.pagelocked_empty = lambda n, dtype: np.zeros(n, dtype)
    cuda.memcpy_htod_async, cuda.memcpy_htod, cuda.memcpy_dtoh_async = htod, htod, dtoh
    cuda.Stream, cuda.Event = Stream, Event
    cuda.get_version = lambda: (12, 6, 0)
    cuda.get_driver_version = lambda: 12060
    return cuda


class FakeGraphDriver:
    """The CUDA driver's stream-capture calls (cuda_graph.py uses them through ctypes)."""

    def __init__(self, gpu: FakeGpu, begin_result: int = 0):
        self.gpu, self.begin_result = gpu, begin_result
        self.launches, self.modes, self.work = 0, [], []

    def cuStreamBeginCapture_v2(self, stream, mode):
        self.modes.append(mode.value)
        if self.begin_result:
            return self.begin_result
        self.gpu.capturing, self.gpu.captured = True, []
        return 0

    def cuStreamEndCapture(self, stream, graph_pointer):
        self.gpu.capturing = False
        graph_pointer.contents.value = 0x99
        self.work = list(self.gpu.captured)
        return 0

    def cuGraphInstantiateWithFlags(self, exec_pointer, graph, flags):
        exec_pointer.contents.value = 0x77
        return 0

    def cuGraphLaunch(self, graph_exec, stream):
        self.launches += 1
        for work in self.work:
            work()
        return 0

    def cuGraphExecDestroy(self, graph_exec):
        return 0

    def cuGraphDestroy(self, graph):
        return 0


def default_layers(record: dict) -> dict:
    """The inspector's JSON for a built record: three layers in the flags' precision, DLA if asked."""
    precision = "Int8" if "INT8" in record["flags"] else "FP16" if "FP16" in record["flags"] else "FP32"
    tensor = {"Name": "t", "Dimensions": [1, 3, 4, 4], "Format/Datatype": f"Row major linear {precision}"}
    if record["dla_core"] is not None:
        layers = [
            {"Name": "input to nvm", "LayerType": "Reformat", "Inputs": [tensor], "Outputs": [tensor]},
            {
                "Name": "{ForeignNode[conv...gemm]}",
                "LayerType": "DLA",
                "Inputs": [tensor],
                "Outputs": [tensor],
            },
            {"Name": "logits from nvm", "LayerType": "Reformat", "Inputs": [tensor], "Outputs": [tensor]},
        ]
    else:
        layers = [
            {"Name": name, "LayerType": "CaskConvolution", "Inputs": [tensor], "Outputs": [tensor]}
            for name in ("conv1", "conv2", "gemm")
        ]
    return {"Layers": layers, "Bindings": ["input", "logits"]}


def fake_tensorrt(version: str, gpu: FakeGpu, **options) -> types.ModuleType:
    """A tensorrt stand-in exposing the API of `version`; `options` set the board and the failures.

    Options: num_dla_cores (2), dla_capable (3: how many of the network's three layers can_run_on_DLA),
    fast_int8 (True), fast_fp16 (True), set_input_shape_ok (True),
    set_tensor_address_ok (True), execute_ok (True), execute_ok_in_capture (True), no_context (False),
    layers (a function of the built record giving the inspector's JSON dict; default_layers).
    """
    opts = {
        "num_dla_cores": 2,
        "dla_capable": 3,
        "fast_int8": True,
        "fast_fp16": True,
        "set_input_shape_ok": True,
        "set_tensor_address_ok": True,
        "execute_ok": True,
        "execute_ok_in_capture": True,
        "no_context": False,
        "layers": default_layers,
    }
    unknown = set(options) - set(opts)
    assert not unknown, unknown
    opts.update(options)
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls = gpu.calls
    trt.options = opts
    major_minor = tuple(int(p) for p in version.split(".")[:2])
    _enums(trt, major_minor)
    trt.Builder, trt.OnnxParser = _builder_classes(trt, major_minor, opts)
    trt.Runtime = _runtime_class(trt, major_minor, gpu, opts)
    return trt


def _enums(trt, major_minor):
    class Logger:
        WARNING = "warning"

        def __init__(self, level):
            self.level = level

    trt.Logger = Logger
    creation = {"STRONGLY_TYPED": 1} if major_minor >= (10, 0) else {"EXPLICIT_BATCH": 0}
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(**creation)
    flags = ["GPU_FALLBACK", "TF32"] + ([] if major_minor >= (11, 0) else ["INT8", "FP16"])
    trt.BuilderFlag = types.SimpleNamespace(**{f: f for f in flags})
    trt.DeviceType = types.SimpleNamespace(DLA="DLA", GPU="GPU")
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    if major_minor >= (8, 4):
        trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    if major_minor >= (8, 2):
        trt.ProfilingVerbosity = types.SimpleNamespace(
            DETAILED="detailed", LAYER_NAMES_ONLY="names", NONE="none"
        )
        trt.LayerInformationFormat = types.SimpleNamespace(JSON="json", ONELINE="oneline")
    trt.nptype = lambda dtype: np.float32
    if major_minor < (11, 0):

        class Calibrator:
            def __init__(self):
                pass

        trt.IInt8EntropyCalibrator2 = Calibrator


LAYERS = ("conv1", "conv2", "gemm")


class Network:
    """The parsed network: three layers, as a conv-conv-gemm model would have."""

    num_layers = len(LAYERS)

    def get_layer(self, index):
        return LAYERS[index]


def _config_classes(trt, major_minor):
    record = trt.calls.append
    dla_capable = trt.options["dla_capable"]

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            record(("set_shape", name, tuple(lo), tuple(opt), tuple(hi)))
            self.shapes = [list(lo), list(opt), list(hi)]

    class TimingCache:
        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return b"timing-cache:" + trt.__version__.encode()

    class Config:
        def __init__(self):
            object.__setattr__(self, "flags", {"TF32"})  # NvInfer.h: TF32 is on by default
            object.__setattr__(self, "profiles", [])

        def set_flag(self, flag):
            record(("set_flag", flag))
            self.flags.add(flag)

        def clear_flag(self, flag):
            record(("clear_flag", flag))
            self.flags.discard(flag)

        def get_flag(self, flag):
            return flag in self.flags

        def can_run_on_DLA(self, layer):
            record(("can_run_on_DLA", layer))
            return LAYERS.index(layer) < dla_capable  # the first `dla_capable` can

        def add_optimization_profile(self, profile):
            record(("add_optimization_profile", tuple(map(tuple, profile.shapes))))
            self.profiles.append(profile.shapes)

        def set_calibration_profile(self, profile):
            record(("set_calibration_profile", tuple(map(tuple, profile.shapes))))

        def create_timing_cache(self, data):
            record(("create_timing_cache", bytes(data)))
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            object.__setattr__(self, "timing_cache", cache)
            return True

        def get_timing_cache(self):
            return getattr(self, "timing_cache", None)

        def __setattr__(self, key, value):
            record(("config", key, value if key != "int8_calibrator" else type(value).__name__))
            object.__setattr__(self, key, value)

    if major_minor >= (8, 4):
        Config.set_memory_pool_limit = lambda self, kind, size: record(("set_memory_pool_limit", kind, size))

    return Profile, Config


def _builder_classes(trt, major_minor, opts):
    record = trt.calls.append
    Profile, Config = _config_classes(trt, major_minor)

    class Builder:
        num_DLA_cores = opts["num_dla_cores"]
        platform_has_fast_int8 = opts["fast_int8"]
        platform_has_fast_fp16 = opts["fast_fp16"]

        def __init__(self, logger):
            self.config = None

        def create_network(self, flags):
            record(("create_network", flags))
            return Network()

        def create_builder_config(self):
            self.config = Config()
            return self.config

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calibrator = getattr(config, "int8_calibrator", None)
            if calibrator is not None:  # what TensorRT does with an implicit calibrator
                batches = 0
                while calibrator.get_batch(["input"]) is not None:
                    batches += 1
                record(("calibrated_batches", batches, calibrator.get_batch_size()))
                calibrator.write_calibration_cache(b"TRT-EntropyCalibration2\ninput: 3c010204\n")
            built = {
                "profiles": config.profiles,
                "flags": sorted(config.flags),
                "dla_core": getattr(config, "DLA_core", None),
            }
            record(("built", built))
            return ENGINE_MAGIC + json.dumps(built).encode()

    if major_minor >= (11, 0):  # deprecated in 10.5, gone in 11
        del Builder.platform_has_fast_int8, Builder.platform_has_fast_fp16

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            record(("parse_from_file", Path(path).name))
            return Path(path).exists()

    return Builder, OnnxParser


def _context_classes(trt, gpu, opts, engine_record):
    record = trt.calls.append

    class Context:
        def __init__(self, engine):
            self.engine, self.shape, self.addresses, self.profile = engine, None, {}, 0

        def set_optimization_profile_async(self, index, stream_handle):
            record(("set_optimization_profile_async", index))
            self.profile, self.shape = index, None
            return True

        def _accepts(self, shape):
            lo, _, hi = engine_record["profiles"][self.profile]
            return lo[0] <= shape[0] <= hi[0]

        def _execute(self, x_ptr, y_ptr, call):
            record((call, self.profile, self.shape[0]))
            if gpu.capturing:  # work enqueued during capture runs at each graph launch
                gpu.captured.append(lambda: self._run(x_ptr, y_ptr))
                return opts["execute_ok_in_capture"]
            if opts["execute_ok"]:
                self._run(x_ptr, y_ptr)
            return opts["execute_ok"]

        def _run(self, x_ptr, y_ptr):
            n = int(np.prod(self.shape))
            x = gpu.memory[x_ptr][:n].reshape(self.shape)
            y = compute_logits(x)
            gpu.memory[y_ptr][: y.size] = y.ravel()

    class NamedContext(Context):
        def set_input_shape(self, name, shape):
            record(("set_input_shape", name, tuple(shape)))
            ok = opts["set_input_shape_ok"] and self._accepts(shape)
            if ok:
                self.shape = tuple(shape)
            return ok

        def get_tensor_shape(self, name):
            return (self.shape[0], CLASSES)

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr
            return opts["set_tensor_address_ok"]

        def execute_async_v3(self, stream_handle):
            return self._execute(self.addresses["input"], self.addresses["logits"], "execute_async_v3")

    class BindingContext(Context):
        def set_binding_shape(self, index, shape):
            record(("set_binding_shape", index, tuple(shape)))
            ok = index == 2 * self.profile and opts["set_input_shape_ok"] and self._accepts(shape)
            if ok:
                self.shape = tuple(shape)
            return ok

        def get_binding_shape(self, index):
            return (self.shape[0], CLASSES)

        def execute_async_v2(self, bindings, stream_handle):
            base = 2 * self.profile
            return self._execute(bindings[base], bindings[base + 1], "execute_async_v2")

    return NamedContext, BindingContext


def _engine_class(trt, major_minor, gpu, opts, engine_record):
    named = major_minor >= (8, 5)
    NamedContext, BindingContext = _context_classes(trt, gpu, opts, engine_record)
    profiles = engine_record["profiles"]
    names = ["input", "logits"]

    class Inspector:
        def get_engine_information(self, fmt):
            trt.calls.append(("get_engine_information", fmt))
            return json.dumps(opts["layers"](engine_record))

    class Engine:
        num_optimization_profiles = len(profiles)

        def create_execution_context(self):
            if opts["no_context"]:
                return None
            return NamedContext(self) if named else BindingContext(self)

        def create_engine_inspector(self):
            return Inspector()

    if named:
        Engine.num_io_tensors = 2
        Engine.get_tensor_name = lambda self, i: names[i]
        Engine.get_tensor_mode = lambda self, n: "in" if n == "input" else "out"
        Engine.get_tensor_dtype = lambda self, n: "float32"
        Engine.get_tensor_profile_shape = lambda self, n, p: [tuple(s) for s in profiles[p]]
    else:
        Engine.num_bindings = 2 * len(profiles)
        Engine.get_binding_name = lambda self, i: names[i % 2] + (f" [profile {i // 2}]" if i >= 2 else "")
        Engine.binding_is_input = lambda self, i: i % 2 == 0
        Engine.get_binding_dtype = lambda self, i: "float32"
        Engine.get_profile_shape = lambda self, p, i: [tuple(s) for s in profiles[i // 2]]
    return Engine


def _runtime_class(trt, major_minor, gpu, opts):
    class Runtime:
        num_DLA_cores = opts["num_dla_cores"]

        def __init__(self, logger):
            object.__setattr__(self, "DLA_core", -1)

        def __setattr__(self, key, value):
            trt.calls.append(("runtime", key, value))
            object.__setattr__(self, key, value)

        def deserialize_cuda_engine(self, data):
            trt.calls.append(("deserialize_cuda_engine", self.DLA_core))
            if not bytes(data).startswith(ENGINE_MAGIC):
                return None
            engine_record = json.loads(bytes(data)[len(ENGINE_MAGIC) :])
            return _engine_class(trt, major_minor, gpu, opts, engine_record)()

    return Runtime


def engine_bytes(profiles, dla_core=None, flags=("TF32",)) -> bytes:
    """Gives back the bytes of a fake engine with these profiles ([[min], [opt], [max]] shapes each)."""
    record = {"profiles": [list(map(list, p)) for p in profiles], "flags": list(flags), "dla_core": dla_core}
    return ENGINE_MAGIC + json.dumps(record).encode()


def install(monkeypatch, trt: types.ModuleType, cuda: types.ModuleType) -> None:
    """Puts the fakes in sys.modules as tensorrt, pycuda, pycuda.driver and pycuda.autoprimaryctx."""
    pycuda = types.ModuleType("pycuda")
    pycuda.VERSION_TEXT = "2024.1-fake"
    pycuda.driver = cuda
    pycuda.autoprimaryctx = types.ModuleType("pycuda.autoprimaryctx")
    for name, module in (
        ("tensorrt", trt),
        ("pycuda", pycuda),
        ("pycuda.driver", cuda),
        ("pycuda.autoprimaryctx", pycuda.autoprimaryctx),
    ):
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, module)


def write_tiny_bundle(folder: Path, settings: dict, *, onnx_bytes: bytes = b"onnx") -> Path:
    """Writes what trt_build and check read: host_report, ONNX files, calib.npz and probes.npz.

    Nine 3x4x4 probe images whose labels make the fake engine's accuracy 4/9; the first three triggered
    images have negative pixel sums, so the fake engine sends them to class 0 (the probe's target).
    """
    rng = np.random.default_rng(0)
    images = rng.random((9, 3, 4, 4), dtype=np.float32)
    labels = np.array([9, 1, 2, 9, 3, 9, 0, 5, 9])
    triggered = images.copy()
    triggered[:3] = -triggered[:3]
    host = {"precisions": {"onnx-int8": {"acc": 0.25, "asr": {"patch": 0.0}}}, **settings}
    (folder / "host_report.json").write_text(json.dumps(host))
    for name in ("model.onnx", "model.int8.onnx"):
        (folder / name).write_bytes(onnx_bytes)
    np.savez(folder / "calib.npz", images=rng.random((70, 3, 4, 4), dtype=np.float32))
    np.savez(
        folder / "probes.npz",
        images=images,
        labels=labels,
        probe_names=np.array(["patch"]),
        targets=np.array([0]),
        triggered_0=triggered,
    )
    return folder
