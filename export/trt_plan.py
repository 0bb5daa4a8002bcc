"""Build decisions with no TensorRT call: which ONNX file, flags, profiles and files an engine gets, and the
trtexec lines that do the same. Pure functions of the bundle and a TensorRT version string, so they run (and
are tested) anywhere; trt_build.py carries them out.

Device side: standard library only, Python 3.6 syntax (JetPack 4.6): no dataclasses, no postponed annotations.
"""

import json
import os
import re

MISSING_TENSORRT = (
    "TensorRT's Python bindings are not importable: on a Jetson they come with JetPack "
    "(sudo apt install python3-libnvinfer); on x86-64: pip install tensorrt"
)
MISSING_PYCUDA = (
    "pycuda is not importable: pip3 install pycuda (on JetPack 4.6 / CUDA 10.2: pip3 install 'pycuda<2021.1')"
)
ENGINE_PRECISIONS = ("fp32", "fp16", "int8")
# DLA takes no dynamic dimension (TensorRT developer guide, "DLA Supported Layers and Restrictions":
# min = opt = max), so a DLA engine has one static batch; infer() pads and chunks to it.
DLA_BATCH = 1


class DeviceError(Exception):
    """A problem the user can fix on the board (missing package, bad option, missing file)."""


def import_tensorrt():
    """Gives back the tensorrt module, or raises DeviceError saying how to install it."""
    try:
        import tensorrt
    except ImportError:
        raise DeviceError(MISSING_TENSORRT) from None
    return tensorrt


def import_pycuda():
    """Gives back pycuda.driver with the device's primary context current, or raises DeviceError.

    pycuda.autoprimaryctx (pycuda >= 2021.1) retains the primary context that TensorRT's own CUDA runtime
    calls use; pycuda.autoinit makes a second context (memory a 4 GB Nano cannot spare), so it is only the
    fallback for older pycuda (JetPack 4.6 pins pycuda < 2021.1). "No device" errors from cuInit are not
    ImportErrors (pycuda._driver.RuntimeError, or RuntimeError from make_default_context): they become one
    line.
    """
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        raise DeviceError(f"{MISSING_PYCUDA} ({exc})") from None
    try:
        try:
            import pycuda.autoprimaryctx  # noqa: F401  (retains and pushes the primary context)
        except ImportError:
            import pycuda.autoinit  # noqa: F401  (pycuda < 2021.1: a context of its own)
    except ImportError as exc:
        raise DeviceError(f"{MISSING_PYCUDA} ({exc})") from None
    except (cuda.Error, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DeviceError(
            f"no usable CUDA device: {first} (is this a Jetson or a machine with an NVIDIA GPU and driver?)"
        ) from None
    return cuda


def version_tuple(text):
    """Gives back (major, minor, patch) of a version string such as "10.3.0.30"."""
    parts = [int(p) for p in re.findall(r"\d+", str(text))[:3]]
    return tuple(parts + [0] * (3 - len(parts)))


def version_text(version):
    """Gives back "10.3.0" for a version string or tuple."""
    return ".".join(str(v) for v in version_tuple(str(version)))


def version_in_range(version, spec):
    """Gives back whether a version meets a comma-joined range such as ">=10.3,<11" (prefix comparison)."""
    have = version_tuple(version)
    for clause in spec.split(","):
        match = re.match(r"\s*(>=|<=|==|<|>)\s*(\d+(?:\.\d+)*)\s*$", clause)
        if not match:
            raise DeviceError(f"bad version range {spec!r}")
        want = tuple(int(p) for p in match.group(2).split(".")[:3])
        got = have[: len(want)]
        ok = {">=": got >= want, "<=": got <= want, "==": got == want, "<": got < want, ">": got > want}
        if not ok[match.group(1)]:
            return False
    return True


def read_bundle(bundle):
    """Gives back the bundle's settings: host_report.json's `profile`, `input` and `target` sections."""
    path = os.path.join(bundle, "host_report.json")
    if not os.path.isfile(path):
        raise DeviceError(f"{bundle} has no host_report.json: is it a bundle written by `rkdtool export`?")
    with open(path) as f:
        report = json.load(f)
    return {"profile": report["profile"], "input": report["input"], "target": report["target"]}


def check_tensorrt_range(settings, trt_version):
    """Raises DeviceError (one line) when this TensorRT is outside the range the bundle was exported for.

    Checked before the build: an opset-18 model on TensorRT 8.6 would otherwise fail deep in the ONNX parser
    (onnx-tensorrt docs/operators.md: 8.2 parses up to opset 13, 8.5/8.6 up to 17, 10.3 takes 9-20).
    """
    profile = settings["profile"]
    spec = profile.get("tensorrt")
    if spec and not version_in_range(trt_version, spec):
        raise DeviceError(
            "this bundle was exported for {} with TensorRT {} (ONNX opset {}), this board has TensorRT {}: "
            "export again with a profile for it, or pass --any-tensorrt to try anyway".format(
                profile.get("name", settings.get("target")), spec, profile.get("opset", "?"), trt_version
            )
        )


def int8_mode(trt_version, dla_core=None):
    """Gives back how INT8 is built: "qdq" (explicit, from the Q/DQ model) or "implicit" (calibrator + cache).

    GPU: explicit Q/DQ on every version; TensorRT parses per-axis Q/DQ since 8.0 (TensorRT CHANGELOG 8.0,
    onnx-tensorrt 8.2-GA operators.md), 8.2 included. DLA: implicit quantisation only (NVIDIA/TensorRT#2222,
    Model-Optimizer PR #1661 "DLA still only supports IQ") on every version that has a calibrator, 10.x
    included (deprecated from 10.1, still there). TensorRT 11 removed the calibrator and builds every network
    strongly typed, DLA ones too (TensorRT 11.4.1 "Strongly Typed Networks for DLA"): there INT8 can only come
    from Q/DQ, so 11 is the exception the review's "every version" cannot cover.
    """
    version = version_tuple(trt_version)
    if dla_core is not None and version < (11, 0, 0):
        return "implicit"
    return "qdq"


def engine_name(precision, trt_version, dla_core=None):
    """Gives back the engine's file name, keyed by precision, DLA core and TensorRT version.

    The name only keeps files apart; whether an engine may be reused is the sidecar's job (trt_sidecar.py).
    """
    dla = f".dla{dla_core}" if dla_core is not None else ""
    return f"model.{precision}{dla}.trt{version_text(trt_version)}.engine"


def batch_profiles(batch, chw, dla_core=None, dla_batch=DLA_BATCH):
    """Gives back the optimisation profiles [{"min", "opt", "max"} shapes] and the index of the batch-1 one.

    GPU: the profile's dynamic range, plus a second profile tuned at batch 1 when opt is not 1, so that the
    batch-1 latency runs kernels chosen for batch 1 and not for opt (TensorRT picks tactics at kOPT,
    NvInferRuntime.h IOptimizationProfile::setDimensions). DLA: one static shape (no dynamic dimensions).
    """
    if dla_core is not None:
        static = [int(dla_batch)] + list(chw)
        return [{"min": static, "opt": static, "max": static}], (0 if int(dla_batch) == 1 else None)
    main = {k: [int(batch[k])] + list(chw) for k in ("min", "opt", "max")}
    if int(batch["opt"]) == 1:
        return [main], 0
    one = [1] + list(chw)
    return [main, {"min": one, "opt": one, "max": one}], 1


def _precision_flags(precision, strongly_typed, dla_core):
    """Gives back (flags to set, flags to clear) for the builder config."""
    flags = []
    if not strongly_typed:
        if precision == "int8":
            flags = ["INT8", "FP16"]  # FP16 lets the layers Q/DQ leaves in float run in half precision
        elif precision == "fp16":
            flags = ["FP16"]
    if dla_core is not None:
        flags.append("GPU_FALLBACK")
    # TF32 is on by default (NvInfer.h BuilderFlag::kTF32), so an "fp32" engine would run TF32 tensor-core
    # math on Ampere and newer (Orin): cleared for fp32. Kept for fp16/int8, as trtexec keeps it without
    # --noTF32: there it only touches the layers that stay in float.
    clear = ["TF32"] if precision == "fp32" else []
    return flags, clear


def plan_build(settings, trt_version, precision=None, dla_core=None, dla_batch=DLA_BATCH):
    """Gives back the build plan (a dict): which ONNX file, builder flags, profiles, workspace, files.

    Pure decisions with no TensorRT call; `trt_build.build_engine` carries them out. The board's own limits
    (DLA core count, fast INT8) are checked at build time against the builder, not against the profile.
    """
    profile, spec = settings["profile"], settings["input"]
    precision = precision or profile["precision"]
    version = version_tuple(trt_version)
    if precision not in ENGINE_PRECISIONS:
        raise DeviceError(
            "precision must be one of {}, got {!r}".format(", ".join(ENGINE_PRECISIONS), precision)
        )
    if dla_core is not None:
        if dla_core < 0:
            raise DeviceError(f"--dla takes a DLA core number (0 or 1), got {dla_core}")
        if precision == "fp32":
            raise DeviceError("DLA runs FP16 or INT8 only; pass --precision fp16 or int8 with --dla")
    strongly_typed = version >= (11, 0, 0)  # TensorRT 11 removed the precision builder flags
    if strongly_typed and precision == "fp16":
        raise DeviceError(
            f"TensorRT {trt_version} builds strongly typed networks only: FP16 needs a model cast to FP16 "
            "with ModelOpt AutoCast (python -m modelopt.onnx.autocast); use --precision int8 (Q/DQ) or fp32"
        )
    mode = int8_mode(trt_version, dla_core) if precision == "int8" else None
    flags, clear = _precision_flags(precision, strongly_typed, dla_core)
    chw = [int(d) for d in spec["shape"][1:]]
    profiles, latency_profile = batch_profiles(profile["batch"], chw, dla_core, dla_batch)
    plan = {
        "trt_version": str(trt_version),
        "precision": precision,
        "int8_mode": mode,
        "onnx": "model.int8.onnx" if mode == "qdq" else "model.onnx",
        "engine": engine_name(precision, trt_version, dla_core),
        "flags": flags,
        "clear_flags": clear,
        "explicit_batch_flag": version < (10, 0, 0),
        "strongly_typed": strongly_typed,
        "dla_core": dla_core,
        "workspace_bytes": int(profile["workspace_mb"]) << 20,
        "workspace_api": "set_memory_pool_limit" if version >= (8, 4, 0) else "max_workspace_size",
        "input_name": spec["name"],
        "profiles": profiles,
        "shapes": profiles[0],
        "latency_profile": latency_profile,
        "calibration_cache": None,
        "calibration_batch": None,
    }
    if mode == "implicit":
        plan["calibration_cache"] = "calib.{}.trt{}.cache".format(
            "dla" if dla_core is not None else "gpu", ".".join(str(v) for v in version[:2])
        )
        plan["calibration_batch"] = min(32, int(profile["batch"]["max"]))
    return plan


def _shape_arg(plan, dims):
    return "{}:{}".format(plan["input_name"], "x".join(str(d) for d in dims))


def _trtexec_build(plan, engine, shapes):
    """Gives back one trtexec build line for `engine` over `shapes` (one profile)."""
    version = version_tuple(plan["trt_version"])
    build = ["trtexec", "--onnx=" + plan["onnx"], "--saveEngine=" + engine]
    build += ["--" + f.lower() for f in plan["flags"] if f in ("INT8", "FP16")]
    if "TF32" in plan["clear_flags"]:
        build.append("--noTF32")
    if shapes["min"] == shapes["max"]:
        build.append("--shapes=" + _shape_arg(plan, shapes["min"]))
    else:
        build += [f"--{k}Shapes={_shape_arg(plan, shapes[k])}" for k in ("min", "opt", "max")]
    megabytes = plan["workspace_bytes"] >> 20
    if plan["workspace_api"] == "set_memory_pool_limit":
        build.append(f"--memPoolSize=workspace:{megabytes}M")
    else:
        build.append(f"--workspace={megabytes}")
    if plan["dla_core"] is not None:
        build += ["--useDLACore={}".format(plan["dla_core"]), "--allowGPUFallback"]
    if plan["int8_mode"] == "implicit":
        # Without an existing cache trtexec --int8 would calibrate on random data (sampleOptions.cpp --calib).
        build.append("--calib=" + plan["calibration_cache"])
    build += ["--profilingVerbosity=detailed", f"--exportLayerInfo={engine}.trtexec-layers.json"]
    # --buildOnly up to 8.5, --skipInference from 8.6 (samples/common/sampleOptions.cpp at 8.5.2 and 8.6.1).
    build.append("--skipInference" if version >= (8, 6, 0) else "--buildOnly")
    return build


def trtexec_commands(plan, bundle=None):
    """Gives back the command lines (lists) that build the same engine with trtexec and time it at batch 1.

    Flags per version from samples/common/sampleOptions.cpp: --memPoolSize from 8.4 (--workspace before),
    --percentile takes one float before 8.5 and a list from 8.5, no precision flags on 11 (strongly typed),
    --useCudaGraph --noDataTransfers for device latency (edge.md §4.1). When the implicit INT8 cache does not
    exist yet, trt_build.py writes it first (it calibrates on calib.npz).
    """
    version = version_tuple(plan["trt_version"])
    commands = []
    cache = plan["calibration_cache"]
    if cache and not (bundle and os.path.isfile(os.path.join(bundle, cache))):
        precision = ["--precision", plan["precision"]]
        commands.append(
            ["python3", "device/trt_build.py", "."] + precision + ["--dla", str(plan["dla_core"])]
        )
    commands.append(_trtexec_build(plan, plan["engine"], plan["shapes"]))
    timed_engine = plan["engine"]
    if plan["latency_profile"] not in (None, 0):
        timed_engine = plan["engine"].replace(".engine", ".b1.engine")
        commands.append(_trtexec_build(plan, timed_engine, plan["profiles"][plan["latency_profile"]]))
    one = [1] + plan["shapes"]["min"][1:]
    if plan["dla_core"] is not None:
        one = plan["shapes"]["min"]
    timing = ["trtexec", "--loadEngine=" + timed_engine, "--shapes=" + _shape_arg(plan, one)]
    if plan["dla_core"] is not None:  # loading needs the DLA core too (IRuntime::setDLACore)
        timing.append("--useDLACore={}".format(plan["dla_core"]))
    timing += ["--useCudaGraph", "--noDataTransfers", "--warmUp=2000", "--duration=30"]
    # One percentile before 8.5 (the median is printed anyway), a list from 8.5 (sampleOptions.cpp).
    timing.append("--percentile=50,90,99" if version >= (8, 5, 0) else "--percentile=99")
    timing.append(f"--exportTimes={timed_engine}.times.json")
    commands.append(timing)
    return commands


def add_common_arguments(parser):
    """Adds what trt_build.py and check.py share: the bundle folder, --precision, --dla, --any-tensorrt."""
    bundle = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # device/.. is the bundle
    parser.add_argument("bundle", nargs="?", default=bundle, help="the bundle folder (default: device/..)")
    parser.add_argument("--precision", choices=ENGINE_PRECISIONS, help="default: the profile's precision")
    parser.add_argument("--dla", type=int, default=None, metavar="CORE", help="use this DLA core")
    parser.add_argument(
        "--dla-batch", type=int, default=DLA_BATCH, help="the DLA engine's static batch (default 1)"
    )
    parser.add_argument(
        "--any-tensorrt", action="store_true", help="build even if TensorRT is outside the profile's range"
    )
