"""Run a TensorRT engine on pycuda buffers: logits for a batch, and timed runs for latency.

Two execution APIs, chosen by what the runtime offers (feature detection, not version strings; edge.md §2.2):
- named tensors (TensorRT 8.5+, the only API in 10.x/11.x): `num_io_tensors`, `get_tensor_name`,
  `set_input_shape`, `set_tensor_address`, `execute_async_v3(stream_handle)`;
- bindings (TensorRT 8.x before 8.5, e.g. 8.2 on JetPack 4.6): `num_bindings`, `binding_is_input`,
  `set_binding_shape`, `execute_async_v2(bindings, stream_handle)`; with several optimisation profiles each
  profile has its own slice of binding indices (TensorRT 8.x developer guide, "Binding For Multiple
  Optimization Profiles"), num_bindings / num_optimization_profiles of them.
Those calls report failure by returning False, never by raising (NvInferRuntime.h: "True on success"), so
every result is checked: a silent failure would give garbage logits or near-zero timings.

Device side: numpy, tensorrt and pycuda only, Python 3.6+. Nothing is imported at module level beyond the
standard library and siblings, so this file imports cleanly where TensorRT is absent.
"""

import os
import time

import cuda_graph  # siblings in device/
import trt_sidecar
from trt_plan import DeviceError, import_pycuda, import_tensorrt


def select_api(engine, context):
    """Gives back "tensors" when the named-tensor API (execute_async_v3) is there, else "bindings"."""
    if hasattr(engine, "num_io_tensors") and hasattr(context, "execute_async_v3"):
        return "tensors"
    if hasattr(engine, "num_bindings") and hasattr(context, "execute_async_v2"):
        return "bindings"
    raise DeviceError("this TensorRT offers neither execute_async_v3 nor execute_async_v2")


def warm_up(run_once, iterations, milliseconds):
    """Runs `run_once` until at least `iterations` runs and `milliseconds` have passed; gives back both.

    Time-based like trtexec's --warmUp (milliseconds, default 200; edge.md §7.3 says 2 s): Jetson clocks
    ramp up under load, so a count of fast iterations (20 ms for a small net) warms nothing.
    """
    start = time.perf_counter()
    count = 0
    while count < iterations or (time.perf_counter() - start) * 1e3 < milliseconds:
        run_once()
        count += 1
    return {"iterations": count, "ms": (time.perf_counter() - start) * 1e3}


class EngineRunner:
    """One engine, one execution context, one stream; `infer(images)` gives back float32 logits."""

    def __init__(self, engine_path, trt=None, cuda=None, dla_core=None, graph_driver=None):
        self.trt = trt or import_tensorrt()
        self.cuda = cuda or import_pycuda()
        import numpy as np

        self.np = np
        if not os.path.isfile(engine_path):
            raise DeviceError(f"engine {engine_path} does not exist; build it with device/trt_build.py")
        if dla_core is None:  # the sidecar says which DLA core the engine was built for
            dla_core = (trt_sidecar.read_json(trt_sidecar.sidecar_path(engine_path)) or {}).get("dla_core")
        self.dla_core = dla_core
        self.graph_driver = graph_driver
        self._deserialise(engine_path)
        self.api = select_api(self.engine, self.context)
        self.stream = self.cuda.Stream()
        self._discover()
        self.active_profile = 0
        self._buffers = (0, 0)  # (input elements, output elements) allocated

    def _deserialise(self, engine_path):
        trt = self.trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        if self.dla_core is not None:
            cores = getattr(self.runtime, "num_DLA_cores", None)
            if cores is not None and self.dla_core >= cores:
                raise DeviceError(
                    f"this board has {cores} DLA core(s) (IRuntime.num_DLA_cores); "
                    f"the engine wants core {self.dla_core}"
                )
            # IRuntime::setDLACore: "the DLA core that the deserialized engine must execute on"; set before.
            self.runtime.DLA_core = int(self.dla_core)
        with open(engine_path, "rb") as f:
            self.engine = self.runtime.deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise DeviceError(
                f"TensorRT could not load {engine_path}: engines only load on the GPU model and TensorRT "
                "version that built them; rebuild with device/trt_build.py --rebuild"
            )
        self.context = self.engine.create_execution_context()
        if self.context is None:  # ICudaEngine::createExecutionContext returns nullptr on failure
            raise DeviceError(
                f"TensorRT could not create an execution context for {engine_path} (out of GPU memory? "
                "close other programs, or build with a smaller batch range)"
            )

    def _discover(self):
        trt, engine, np = self.trt, self.engine, self.np
        self.num_profiles = int(getattr(engine, "num_optimization_profiles", 1) or 1)
        if self.api == "tensors":
            names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
            inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
            self.dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
            self.index, self.per_profile = {}, len(names)
        else:
            self.per_profile = engine.num_bindings // self.num_profiles
            names = [engine.get_binding_name(i) for i in range(self.per_profile)]
            inputs = [n for i, n in enumerate(names) if engine.binding_is_input(i)]
            self.dtypes = {n: np.dtype(trt.nptype(engine.get_binding_dtype(i))) for i, n in enumerate(names)}
            self.index = {n: i for i, n in enumerate(names)}
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or len(outputs) != 1:
            raise DeviceError(f"expected one input and one output, the engine has {inputs} and {outputs}")
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.names = names
        self.profiles = [self._profile_batches(p) for p in range(self.num_profiles)]
        self.max_batch = self.profiles[0][2]

    def _binding(self, name, profile=None):
        """Gives back the binding index of `name` in a profile (the active one by default)."""
        profile = self.active_profile if profile is None else profile
        return self.index[name] + profile * self.per_profile

    def _profile_batches(self, profile):
        """Gives back (min, opt, max) batch of optimisation profile `profile`."""
        engine = self.engine
        if self.api == "tensors" and hasattr(engine, "get_tensor_profile_shape"):
            shapes = engine.get_tensor_profile_shape(self.input_name, profile)
        elif hasattr(engine, "get_profile_shape"):
            shapes = engine.get_profile_shape(profile, self._binding(self.input_name, profile))
        else:
            return (1, 1, 1)
        return tuple(int(s[0]) for s in shapes)

    def profile_for(self, batch):
        """Gives back the profile to time `batch` on: one tuned at it (opt == batch), else one holding it."""
        for wanted in (lambda lo, opt, hi: opt == batch, lambda lo, opt, hi: lo <= batch <= hi):
            for index, (lo, opt, hi) in enumerate(self.profiles):
                if wanted(lo, opt, hi):
                    return index
        ranges = ", ".join(f"{lo}-{hi}" for lo, _, hi in self.profiles)
        raise DeviceError(
            f"batch {batch} is outside this engine's profiles (batches {ranges}): infer() chunks larger "
            "batches, but a chunked run has no single latency; time a batch inside the range"
        )

    def _activate(self, profile):
        """Switches the context to profile `profile` (IExecutionContext::setOptimizationProfileAsync)."""
        if profile == self.active_profile:
            return
        try:
            ok = self.context.set_optimization_profile_async(profile, self.stream.handle)
        except RuntimeError as exc:  # the Python binding raises where the C++ call returns false
            ok, why = False, str(exc)
        else:
            why = "it returned False"
        if not ok:
            raise DeviceError(f"TensorRT refused optimisation profile {profile} ({why})")
        self.stream.synchronize()
        self.active_profile = profile

    def _set_batch(self, batch):
        """Sets the input shape for `batch` images; (re)allocates pinned host and device buffers as needed."""
        lo, _, hi = self.profiles[self.active_profile]
        shape = (batch,) + tuple(self.input_chw)
        if self.api == "tensors":
            ok = self.context.set_input_shape(self.input_name, shape)
            call = "set_input_shape"
        else:
            ok = self.context.set_binding_shape(self._binding(self.input_name), shape)
            call = "set_binding_shape"
        if not ok:
            raise DeviceError(
                f"TensorRT rejected input shape {shape} ({call} returned False; "
                f"profile {self.active_profile} takes batches {lo}-{hi})"
            )
        if self.api == "tensors":
            out_shape = tuple(self.context.get_tensor_shape(self.output_name))
        else:
            out_shape = tuple(self.context.get_binding_shape(self._binding(self.output_name)))
        self._allocate(shape, out_shape)
        if self.api == "tensors":  # addresses are per context; set them for the buffers now in use
            for name, memory in ((self.input_name, self.dev_in), (self.output_name, self.dev_out)):
                if not self.context.set_tensor_address(name, int(memory)):
                    raise DeviceError(f"TensorRT rejected the device address of {name} (set_tensor_address)")
        self.out_shape = out_shape
        self.batch = batch

    def _allocate(self, shape, out_shape):
        cuda, np = self.cuda, self.np
        need = (int(np.prod(shape)), int(np.prod(out_shape)))
        if need[0] <= self._buffers[0] and need[1] <= self._buffers[1]:
            return
        self.host_in = cuda.pagelocked_empty(need[0], self.dtypes[self.input_name])
        self.host_out = cuda.pagelocked_empty(need[1], self.dtypes[self.output_name])
        self.dev_in = cuda.mem_alloc(self.host_in.nbytes)
        self.dev_out = cuda.mem_alloc(self.host_out.nbytes)
        self._buffers = need

    def _enqueue_raw(self):
        """Enqueues one execution; gives back TensorRT's bool."""
        if self.api == "tensors":
            return self.context.execute_async_v3(stream_handle=self.stream.handle)
        bindings = [0] * (self.per_profile * self.num_profiles)
        bindings[self._binding(self.input_name)] = int(self.dev_in)
        bindings[self._binding(self.output_name)] = int(self.dev_out)
        return self.context.execute_async_v2(bindings=bindings, stream_handle=self.stream.handle)

    def _enqueue(self):
        if not self._enqueue_raw():
            call = "execute_async_v3" if self.api == "tensors" else "execute_async_v2"
            raise DeviceError(
                f"TensorRT's {call} returned False for batch {self.batch}: the enqueue failed "
                "(TensorRT's log above says why), so there is no result"
            )

    def _run_loaded(self, launch=None):
        """Copies the loaded input in, executes, copies the output back and waits: one host-side inference."""
        cuda = self.cuda
        n_in = self.batch * int(self.np.prod(self.input_chw))
        cuda.memcpy_htod_async(self.dev_in, self.host_in[:n_in], self.stream)
        (launch or self._enqueue)()
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
        """Gives back float32 logits for float32 NCHW images, in order.

        Chunks of at most profile 0's maximum batch; a last chunk below its minimum (a static DLA batch) is
        padded with copies of its last image and the padded rows are dropped.
        """
        np = self.np
        self._activate(0)
        lo, _, hi = self.profiles[0]
        out = []
        for start in range(0, len(images), hi):
            chunk = images[start : start + hi]
            real = len(chunk)
            if real < lo:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], lo - real, axis=0)])
            self._load(chunk)
            out.append(np.array(self._run_loaded(), dtype=np.float32)[:real])
        return np.concatenate(out) if out else np.zeros((0,), np.float32)

    def _capture(self):
        """Gives back (CudaGraph, None) for the loaded batch, or (None, why not)."""
        if self.graph_driver is None:
            try:
                self.graph_driver = cuda_graph.load_driver()
            except cuda_graph.CaptureError as exc:
                return None, str(exc)
        self._enqueue()  # once outside capture, so TensorRT's lazy set-up is not captured (trtexec does this)
        self.stream.synchronize()
        try:
            return cuda_graph.capture(self.graph_driver, self.stream.handle, self._enqueue_raw), None
        except cuda_graph.CaptureError as exc:
            return None, str(exc)

    def _launcher(self, graph):
        def launch():
            if not graph.launch(self.stream.handle):
                raise DeviceError(f"cuGraphLaunch failed for batch {self.batch}")

        return launch

    def _timed_runs(self, launch, runs):
        """Gives back (host_ms, gpu_ms) lists of `runs` timed inferences of the loaded batch."""
        start, end = self.cuda.Event(), self.cuda.Event()
        host_ms, gpu_ms = [], []
        for _ in range(runs):
            t0 = time.perf_counter()
            self._run_loaded(launch)
            host_ms.append((time.perf_counter() - t0) * 1e3)
            start.record(self.stream)
            launch()
            end.record(self.stream)
            end.synchronize()
            gpu_ms.append(start.time_till(end))
        return host_ms, gpu_ms

    def time(self, images, warmup=10, runs=1000, warmup_ms=2000.0, repeats=1, use_graph=True):
        """Gives back timings of one batch: {"host_ms", "gpu_ms", "gpu_timer", "cuda_graph", ...}.

        host_ms: perf_counter around copy-in + execute + copy-out + synchronise (end-to-end); gpu_ms: CUDA
        events around the execution alone, as trtexec separates "Host Latency" from "GPU Compute Time"
        (edge.md §4.2, §7). The execution is a CUDA graph replay where capture works (what trtexec
        --useCudaGraph times), else one plain enqueue: then gpu_timer says "enqueue+GPU" and cuda_graph why.
        The batch runs on the profile tuned for it when there is one (the batch-1 profile for batch 1).
        """
        profile = self.profile_for(len(images))
        self._activate(profile)
        self._load(images)
        graph, why_not = self._capture() if use_graph else (None, "CUDA graph not requested")
        launch = self._launcher(graph) if graph is not None else self._enqueue
        warm = warm_up(lambda: self._run_loaded(launch), warmup, warmup_ms)
        host_ms, gpu_ms, medians = [], [], {"host_ms": [], "gpu_ms": []}
        try:
            for _ in range(max(1, repeats)):
                host, gpu = self._timed_runs(launch, runs)
                host_ms += host
                gpu_ms += gpu
                medians["host_ms"].append(float(self.np.median(host)))
                medians["gpu_ms"].append(float(self.np.median(gpu)))
        finally:
            if graph is not None:
                graph.close()
        return {
            "host_ms": host_ms,
            "gpu_ms": gpu_ms,
            "gpu_timer": "cuda-graph" if graph is not None else "enqueue+GPU",
            "cuda_graph": why_not,
            "profile": profile,
            "warmup": warm,
            "repeat_p50": medians,
        }
