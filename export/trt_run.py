"""Run a TensorRT engine on pycuda buffers: logits for a batch, and timed runs for latency.

Two execution APIs, chosen by what the runtime offers (feature detection, not version strings; edge.md §2.2):
- named tensors (TensorRT 8.5+, the only API in 10.x/11.x): `num_io_tensors`, `get_tensor_name`,
  `set_input_shape`, `set_tensor_address`, `execute_async_v3(stream_handle)`;
- bindings (TensorRT 8.x before 8.5, e.g. 8.2 on JetPack 4.6): `num_bindings`, `binding_is_input`,
  `set_binding_shape`, `execute_async_v2(bindings, stream_handle)`.

Device side: numpy, tensorrt and pycuda only, Python 3.6+. Nothing is imported at module level beyond the
standard library, so this file imports cleanly where TensorRT is absent.
"""

import os
import time

from trt_build import DeviceError, import_pycuda, import_tensorrt  # a sibling: device/ is on sys.path


def select_api(engine, context):
    """Gives back "tensors" when the named-tensor API (execute_async_v3) is there, else "bindings"."""
    if hasattr(engine, "num_io_tensors") and hasattr(context, "execute_async_v3"):
        return "tensors"
    if hasattr(engine, "num_bindings") and hasattr(context, "execute_async_v2"):
        return "bindings"
    raise DeviceError("this TensorRT offers neither execute_async_v3 nor execute_async_v2")


class EngineRunner:
    """One engine, one execution context, one stream; `infer(images)` gives back float32 logits."""

    def __init__(self, engine_path, trt=None, cuda=None):
        self.trt = trt or import_tensorrt()
        self.cuda = cuda or import_pycuda()
        import numpy as np

        self.np = np
        if not os.path.isfile(engine_path):
            raise DeviceError(f"engine {engine_path} does not exist; build it with device/trt_build.py")
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.runtime = self.trt.Runtime(self.logger)
        with open(engine_path, "rb") as f:
            self.engine = self.runtime.deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise DeviceError(
                f"TensorRT could not load {engine_path}: engines only load on the GPU model and TensorRT "
                "version that built them; rebuild with device/trt_build.py --rebuild"
            )
        self.context = self.engine.create_execution_context()
        self.api = select_api(self.engine, self.context)
        self.stream = self.cuda.Stream()
        self._discover()
        self._buffers_batch = 0

    def _discover(self):
        trt, engine = self.trt, self.engine
        if self.api == "tensors":
            names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
            inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
            outputs = [n for n in names if n not in inputs]
            self.dtypes = {n: self.np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
            self.index = {}
        else:
            names = [engine.get_binding_name(i) for i in range(engine.num_bindings)]
            inputs = [n for i, n in enumerate(names) if engine.binding_is_input(i)]
            outputs = [n for n in names if n not in inputs]
            self.dtypes = {
                n: self.np.dtype(trt.nptype(engine.get_binding_dtype(i))) for i, n in enumerate(names)
            }
            self.index = {n: i for i, n in enumerate(names)}
        if len(inputs) != 1 or len(outputs) != 1:
            raise DeviceError(f"expected one input and one output, the engine has {inputs} and {outputs}")
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.names = names
        self.max_batch = self._profile_max_batch()

    def _profile_max_batch(self):
        """Gives back the largest batch the engine's optimisation profile 0 accepts."""
        engine = self.engine
        if self.api == "tensors" and hasattr(engine, "get_tensor_profile_shape"):
            return int(engine.get_tensor_profile_shape(self.input_name, 0)[2][0])
        if hasattr(engine, "get_profile_shape"):
            return int(engine.get_profile_shape(0, self.index.get(self.input_name, 0))[2][0])
        return 1

    def _set_batch(self, batch):
        """Sets the input shape for `batch` images; (re)allocates pinned host and device buffers as needed."""
        shape = (batch,) + tuple(self.input_chw)
        if self.api == "tensors":
            self.context.set_input_shape(self.input_name, shape)
            out_shape = tuple(self.context.get_tensor_shape(self.output_name))
        else:
            self.context.set_binding_shape(self.index[self.input_name], shape)
            out_shape = tuple(self.context.get_binding_shape(self.index[self.output_name]))
        if batch > self._buffers_batch:
            cuda, np = self.cuda, self.np
            self.host_in = cuda.pagelocked_empty(int(np.prod(shape)), self.dtypes[self.input_name])
            self.host_out = cuda.pagelocked_empty(int(np.prod(out_shape)), self.dtypes[self.output_name])
            self.dev_in = cuda.mem_alloc(self.host_in.nbytes)
            self.dev_out = cuda.mem_alloc(self.host_out.nbytes)
            self._buffers_batch = batch
            if self.api == "tensors":
                self.context.set_tensor_address(self.input_name, int(self.dev_in))
                self.context.set_tensor_address(self.output_name, int(self.dev_out))
        self.out_shape = out_shape
        self.batch = batch

    def _enqueue(self):
        if self.api == "tensors":
            self.context.execute_async_v3(stream_handle=self.stream.handle)
        else:
            bindings = [0] * len(self.names)
            bindings[self.index[self.input_name]] = int(self.dev_in)
            bindings[self.index[self.output_name]] = int(self.dev_out)
            self.context.execute_async_v2(bindings=bindings, stream_handle=self.stream.handle)

    def _run_loaded(self):
        """Copies the loaded input in, executes, copies the output back and waits: one host-side inference."""
        cuda = self.cuda
        n_in = self.batch * int(self.np.prod(self.input_chw))
        cuda.memcpy_htod_async(self.dev_in, self.host_in[:n_in], self.stream)
        self._enqueue()
        n_out = int(self.np.prod(self.out_shape))
        cuda.memcpy_dtoh_async(self.host_out[:n_out], self.dev_out, self.stream)
        self.stream.synchronize()
        return self.host_out[:n_out].reshape(self.out_shape)

    def _load(self, images):
        self.input_chw = images.shape[1:]
        self._set_batch(len(images))
        flat = self.np.ascontiguousarray(images, dtype=self.dtypes[self.input_name]).ravel()
        self.host_in[: flat.size] = flat

    def infer(self, images):
        """Gives back float32 logits for float32 NCHW images, in chunks of at most the engine's max batch."""
        out = []
        for start in range(0, len(images), self.max_batch):
            self._load(images[start : start + self.max_batch])
            out.append(self.np.array(self._run_loaded(), dtype=self.np.float32))
        return self.np.concatenate(out) if out else self.np.zeros((0,), self.np.float32)

    def time(self, images, warmup=100, runs=1000):
        """Gives back {"host_ms": [...], "gpu_ms": [...]} for `runs` inferences of one batch after `warmup`.

        host_ms: perf_counter around copy-in + execute + copy-out + synchronise (end-to-end);
        gpu_ms: CUDA events on the stream around the execution alone (device compute), as trtexec
        separates "Host Latency" from "GPU Compute Time" (edge.md §4.2, §7).
        """
        self._load(images)
        cuda = self.cuda
        start, end = cuda.Event(), cuda.Event()
        host_ms, gpu_ms = [], []
        for _ in range(warmup):
            self._run_loaded()
        for _ in range(runs):
            t0 = time.perf_counter()
            self._run_loaded()
            host_ms.append((time.perf_counter() - t0) * 1e3)
            start.record(self.stream)
            self._enqueue()
            end.record(self.stream)
            end.synchronize()
            gpu_ms.append(start.time_till(end))
        return {"host_ms": host_ms, "gpu_ms": gpu_ms}
