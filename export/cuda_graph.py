"""CUDA graph capture of one TensorRT enqueue, through the CUDA driver API (ctypes on libcuda).

pycuda has no stream-capture API, so this calls the driver directly on pycuda's stream handle (a CUstream)
in pycuda's current context. The sequence is trtexec's (samples/common/sampleInference.cpp and
sampleDevice.h TrtCudaGraph): enqueue once outside capture so TensorRT's lazy set-up is not captured, begin
a thread-local capture, enqueue, end the capture, instantiate; an enqueue that returns False while capturing
means the engine holds work not permitted under capture, and timing falls back to plain enqueues.

Driver entry points (cuda.h): cuStreamBeginCapture_v2(stream, mode) from CUDA 10.1,
CU_STREAM_CAPTURE_MODE_THREAD_LOCAL = 1, cuStreamEndCapture(stream, &graph), cuGraphInstantiateWithFlags
(CUDA 11.4+) or the five-argument cuGraphInstantiate(_v2) before it, cuGraphLaunch(exec, stream),
cuGraphExecDestroy, cuGraphDestroy. Standard library only, Python 3.6 syntax.
"""

import ctypes

THREAD_LOCAL = 1  # CUstreamCaptureMode CU_STREAM_CAPTURE_MODE_THREAD_LOCAL, as trtexec captures
LIBRARIES = ("libcuda.so.1", "libcuda.so")


class CaptureError(Exception):
    """The enqueue could not be captured in a CUDA graph (the message says why)."""


def load_driver():
    """Gives back libcuda through ctypes, or raises CaptureError when it cannot be loaded."""
    errors = []
    for name in LIBRARIES:
        try:
            return ctypes.CDLL(name)
        except OSError as exc:
            errors.append(str(exc))
    raise CaptureError("libcuda could not be loaded ({})".format("; ".join(errors)))


def _symbol(driver, *names):
    for name in names:
        if hasattr(driver, name):
            return getattr(driver, name)
    return None


def _instantiate(driver, graph):
    """Gives back a CUgraphExec for `graph` through whichever instantiate call this driver exports."""
    graph_exec = ctypes.c_void_p()
    with_flags = _symbol(driver, "cuGraphInstantiateWithFlags")
    if with_flags is not None:
        code = with_flags(ctypes.pointer(graph_exec), graph, ctypes.c_ulonglong(0))
    else:
        legacy = _symbol(driver, "cuGraphInstantiate_v2", "cuGraphInstantiate")
        if legacy is None:
            raise CaptureError("this CUDA driver exports no cuGraphInstantiate")
        code = legacy(ctypes.pointer(graph_exec), graph, None, None, ctypes.c_size_t(0))
    if code != 0:
        raise CaptureError(f"cuGraphInstantiate failed (CUresult {code})")
    return graph_exec


class CudaGraph:
    """An instantiated CUDA graph of one enqueue; `launch(stream_handle)` replays it."""

    def __init__(self, driver, graph_exec):
        self.driver, self.graph_exec = driver, graph_exec

    def launch(self, stream_handle):
        """Launches the graph on the stream; gives back True on success (cuGraphLaunch returned 0)."""
        return self.driver.cuGraphLaunch(self.graph_exec, ctypes.c_void_p(stream_handle)) == 0

    def close(self):
        if self.graph_exec is not None:
            self.driver.cuGraphExecDestroy(self.graph_exec)
            self.graph_exec = None


def capture(driver, stream_handle, enqueue):
    """Gives back a CudaGraph of `enqueue()` (TensorRT's bool) on the stream, or raises CaptureError.

    The caller has already run one enqueue outside capture and synchronised the stream.
    """
    stream = ctypes.c_void_p(stream_handle)
    begin = _symbol(driver, "cuStreamBeginCapture_v2")
    if begin is None:
        raise CaptureError("this CUDA driver has no cuStreamBeginCapture_v2 (CUDA < 10.1)")
    code = begin(stream, ctypes.c_int(THREAD_LOCAL))
    if code != 0:
        raise CaptureError(f"cuStreamBeginCapture failed (CUresult {code})")
    failure = ""
    try:
        enqueued = bool(enqueue())
    except Exception as exc:  # the capture must still be ended, or the stream stays in capture mode
        enqueued, failure = False, f": {exc}"
    graph = ctypes.c_void_p()
    ended = driver.cuStreamEndCapture(stream, ctypes.pointer(graph))
    if not enqueued or ended != 0:
        if graph.value:
            driver.cuGraphDestroy(graph)
        if not enqueued:
            raise CaptureError(
                f"the engine holds work not permitted under CUDA graph capture (enqueue failed{failure})"
            )
        raise CaptureError(f"cuStreamEndCapture failed (CUresult {ended})")
    try:
        return CudaGraph(driver, _instantiate(driver, graph))
    finally:
        driver.cuGraphDestroy(graph)
