"""ONNX -> TensorRT engine, built on the board itself (engines are tied to the GPU and the TensorRT version).

    python3 device/trt_build.py BUNDLE [--precision int8|fp16|fp32] [--dla N] [--rebuild]

INT8 comes from the Q/DQ model (model.int8.onnx) on TensorRT >= 8.5; TensorRT 8.2, and DLA on TensorRT 8.x,
use the implicit entropy calibrator on calib.npz with a calibration cache instead (edge.md §1, §2.1).
API differences handled here: EXPLICIT_BATCH is needed on 8.x and gone from 10 on; the workspace is set
with `set_memory_pool_limit` (8.4+) or `max_workspace_size` (older); TensorRT 11 builds strongly typed
networks only.

Device side: needs numpy and tensorrt (pycuda for the implicit calibrator); runs on the Python of every
JetPack from 4.6 (3.6) on, so no dataclasses and no postponed annotations. tensorrt is imported inside the
functions that need it, so this file imports cleanly anywhere.
"""

import argparse
import json
import os
import re
import sys

MISSING_TENSORRT = (
    "TensorRT's Python bindings are not importable: on a Jetson they come with JetPack "
    "(sudo apt install python3-libnvinfer); on x86-64: pip install tensorrt"
)
MISSING_PYCUDA = (
    "pycuda is not importable: pip3 install pycuda (on JetPack 4.6 / CUDA 10.2: pip3 install 'pycuda<2021.1')"
)
ENGINE_PRECISIONS = ("fp32", "fp16", "int8")


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
    """Gives back pycuda.driver with a context made current (pycuda.autoinit), or raises DeviceError."""
    try:
        import pycuda.autoinit  # noqa: F401  (creates and pushes a CUDA context)
        import pycuda.driver as cuda
    except ImportError:
        raise DeviceError(MISSING_PYCUDA) from None
    return cuda


def version_tuple(text):
    """Gives back (major, minor, patch) of a version string such as "10.3.0.30"."""
    parts = [int(p) for p in re.findall(r"\d+", str(text))[:3]]
    return tuple(parts + [0] * (3 - len(parts)))


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
    """Gives back the bundle's settings: host_report.json's `profile` and `input` sections."""
    path = os.path.join(bundle, "host_report.json")
    if not os.path.isfile(path):
        raise DeviceError(f"{bundle} has no host_report.json: is it a bundle written by `rkdtool export`?")
    with open(path) as f:
        report = json.load(f)
    return {"profile": report["profile"], "input": report["input"], "target": report["target"]}


def int8_mode(trt_version, dla_core=None):
    """Gives back how INT8 is built: "qdq" (explicit, from Q/DQ) or "implicit" (entropy calibrator + cache).

    Explicit Q/DQ from TensorRT 8.5 on; the implicit calibrator for TensorRT < 8.5 and for DLA on 8.x
    (edge.md §1.1: implicit calibration is deprecated from 10.1 and removed in 11).
    """
    version = version_tuple(trt_version)
    if version < (8, 5, 0):
        return "implicit"
    if dla_core is not None and version[0] == 8:
        return "implicit"
    return "qdq"


def engine_name(precision, trt_version, dla_core=None):
    """Gives back the engine's file name, keyed by precision, DLA core and TensorRT version."""
    dla = f".dla{dla_core}" if dla_core is not None else ""
    return "model.{}{}.trt{}.engine".format(
        precision, dla, ".".join(str(v) for v in version_tuple(trt_version))
    )


def plan_build(settings, trt_version, precision=None, dla_core=None):
    """Gives back the build plan (a dict): which ONNX file, builder flags, shapes, workspace, files.

    Pure decisions with no TensorRT call, so they can be tested anywhere; `build_engine` carries them out.
    """
    profile, spec = settings["profile"], settings["input"]
    precision = precision or profile["precision"]
    version = version_tuple(trt_version)
    if precision not in ENGINE_PRECISIONS:
        raise DeviceError(
            "precision must be one of {}, got {!r}".format(", ".join(ENGINE_PRECISIONS), precision)
        )
    if dla_core is not None:
        if dla_core < 0 or dla_core >= int(profile["dla_cores"]):
            raise DeviceError(
                "target {} has {} DLA core(s); --dla {} is not one of them".format(
                    profile["name"], profile["dla_cores"], dla_core
                )
            )
        if precision == "fp32":
            raise DeviceError("DLA runs FP16 or INT8 only; pass --precision fp16 or int8 with --dla")
    strongly_typed = version >= (11, 0, 0)  # TensorRT 11 removed the precision builder flags
    if strongly_typed and precision == "fp16":
        raise DeviceError(
            f"TensorRT {trt_version} builds strongly typed networks only: FP16 needs a model cast to FP16 "
            "with ModelOpt AutoCast (python -m modelopt.onnx.autocast); use --precision int8 (Q/DQ) or fp32"
        )
    mode = int8_mode(trt_version, dla_core) if precision == "int8" else None
    flags = []
    if not strongly_typed:
        if precision == "int8":
            flags = ["INT8", "FP16"]  # FP16 lets the layers Q/DQ leaves in float run in half precision
        elif precision == "fp16":
            flags = ["FP16"]
    if dla_core is not None:
        flags.append("GPU_FALLBACK")
    chw = [int(d) for d in spec["shape"][1:]]
    batch = profile["batch"]
    onnx_file = "model.int8.onnx" if mode == "qdq" else "model.onnx"
    plan = {
        "trt_version": str(trt_version),
        "precision": precision,
        "int8_mode": mode,
        "onnx": onnx_file,
        "engine": engine_name(precision, trt_version, dla_core),
        "flags": flags,
        "explicit_batch_flag": version < (10, 0, 0),
        "strongly_typed": strongly_typed,
        "dla_core": dla_core,
        "workspace_bytes": int(profile["workspace_mb"]) << 20,
        "workspace_api": "set_memory_pool_limit" if version >= (8, 4, 0) else "max_workspace_size",
        "input_name": spec["name"],
        "shapes": {k: [int(batch[k])] + chw for k in ("min", "opt", "max")},
        "calibration_cache": None,
        "calibration_batch": None,
    }
    if mode == "implicit":
        plan["calibration_cache"] = "calib.{}.trt{}.cache".format(
            "dla" if dla_core is not None else "gpu", ".".join(str(v) for v in version[:2])
        )
        plan["calibration_batch"] = min(32, int(batch["max"]))
    return plan


def trtexec_commands(plan):
    """Gives back the trtexec command lines (lists) that build the same engine and time it at batch 1.

    Flags from the trtexec README (edge.md §4.1, §4.3): --memPoolSize from TensorRT 8.4 (--workspace before),
    no precision flags on TensorRT 11 (strongly typed), --useCudaGraph --noDataTransfers for device latency.
    """
    shape = lambda dims: "{}:{}".format(plan["input_name"], "x".join(str(d) for d in dims))  # noqa: E731
    build = ["trtexec", "--onnx=" + plan["onnx"], "--saveEngine=" + plan["engine"]]
    build += ["--" + f.lower() for f in plan["flags"] if f in ("INT8", "FP16")]
    build += [
        "--minShapes=" + shape(plan["shapes"]["min"]),
        "--optShapes=" + shape(plan["shapes"]["opt"]),
        "--maxShapes=" + shape(plan["shapes"]["max"]),
    ]
    megabytes = plan["workspace_bytes"] >> 20
    if plan["workspace_api"] == "set_memory_pool_limit":
        build.append(f"--memPoolSize=workspace:{megabytes}M")
    else:
        build.append(f"--workspace={megabytes}")
    if plan["dla_core"] is not None:
        build += ["--useDLACore={}".format(plan["dla_core"]), "--allowGPUFallback"]
    if plan["int8_mode"] == "implicit":
        build.append("--calib=" + plan["calibration_cache"])
    one = [1] + plan["shapes"]["min"][1:]
    time = [
        "trtexec",
        "--loadEngine=" + plan["engine"],
        "--shapes=" + shape(one),
        "--useCudaGraph",
        "--noDataTransfers",
        "--warmUp=2000",
        "--duration=30",
        "--percentile=50,90,99",
    ]
    return [build, time]


def set_workspace(trt, config, plan):
    """Sets the builder workspace limit through whichever API this TensorRT has."""
    if plan["workspace_bytes"] <= 0:
        return
    if hasattr(config, "set_memory_pool_limit") and hasattr(trt, "MemoryPoolType"):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan["workspace_bytes"])
    else:  # TensorRT < 8.4
        config.max_workspace_size = plan["workspace_bytes"]


def network_flags(trt, plan):
    """Gives back the create_network flags: EXPLICIT_BATCH on 8.x (ONNX needs it), STRONGLY_TYPED on 11."""
    flags = 0
    creation = trt.NetworkDefinitionCreationFlag
    if plan["explicit_batch_flag"]:
        flags |= 1 << int(creation.EXPLICIT_BATCH)
    if plan["strongly_typed"] and hasattr(creation, "STRONGLY_TYPED"):
        flags |= 1 << int(creation.STRONGLY_TYPED)
    return flags


def load_calibration_images(bundle):
    """Gives back calib.npz's images (float32 NCHW in [0, 1], clean training images)."""
    import numpy as np

    path = os.path.join(bundle, "calib.npz")
    if not os.path.isfile(path):
        raise DeviceError(f"{path} is missing: the implicit INT8 calibrator needs it")
    with np.load(path) as data:
        return np.ascontiguousarray(data["images"], dtype=np.float32)


def make_entropy_calibrator(trt, cuda, images, batch_size, cache_path):
    """Gives back an IInt8EntropyCalibrator2 feeding `images` in fixed-size batches, with a cache file.

    The cache is per TensorRT version (caches do not carry across releases, NVIDIA/TensorRT#3612).
    """
    import numpy as np

    usable = (len(images) // batch_size) * batch_size
    if usable == 0:
        raise DeviceError(f"calib.npz has {len(images)} images, fewer than one batch of {batch_size}")

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batches = [images[i : i + batch_size] for i in range(0, usable, batch_size)]
            self.device_input = cuda.mem_alloc(self.batches[0].nbytes)
            self.index = 0

        def get_batch_size(self):
            return batch_size

        def get_batch(self, names):
            if self.index >= len(self.batches):
                return None
            cuda.memcpy_htod(self.device_input, np.ascontiguousarray(self.batches[self.index]))
            self.index += 1
            return [int(self.device_input)]

        def read_calibration_cache(self):
            if os.path.isfile(cache_path):
                with open(cache_path, "rb") as f:
                    return f.read()
            return None

        def write_calibration_cache(self, cache):
            write_bytes_atomic(cache_path, bytes(cache))

    return EntropyCalibrator()


def write_bytes_atomic(path, data):
    """Writes `data` to `path` through a temporary file and a rename (never a half-written file)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def build_engine(trt, plan, bundle, cuda=None, logger=None):
    """Builds the engine `plan` describes from the bundle's ONNX file; gives back the engine's path."""
    logger = logger or trt.Logger(trt.Logger.WARNING)
    onnx_path = os.path.join(bundle, plan["onnx"])
    if not os.path.isfile(onnx_path):
        raise DeviceError(f"{onnx_path} is missing from the bundle")
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt, plan))
    parser = trt.OnnxParser(network, logger)
    if hasattr(parser, "parse_from_file"):
        parsed = parser.parse_from_file(onnx_path)
    else:
        with open(onnx_path, "rb") as f:
            parsed = parser.parse(f.read())
    if not parsed:
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise DeviceError("TensorRT could not parse {}: {}".format(plan["onnx"], "; ".join(errors)))
    config = builder.create_builder_config()
    set_workspace(trt, config, plan)
    for flag in plan["flags"]:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if plan["dla_core"] is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = plan["dla_core"]
    profile = builder.create_optimization_profile()
    shapes = plan["shapes"]
    profile.set_shape(plan["input_name"], tuple(shapes["min"]), tuple(shapes["opt"]), tuple(shapes["max"]))
    config.add_optimization_profile(profile)
    if plan["int8_mode"] == "implicit":
        cuda = cuda or import_pycuda()
        size = plan["calibration_batch"]
        calibration_shape = tuple([size] + shapes["min"][1:])
        # Calibration of a dynamic-shape network runs at the kOPT shape of the calibration profile.
        calibration_profile = builder.create_optimization_profile()
        calibration_profile.set_shape(
            plan["input_name"], calibration_shape, calibration_shape, calibration_shape
        )
        if hasattr(config, "set_calibration_profile"):
            config.set_calibration_profile(calibration_profile)
        config.int8_calibrator = make_entropy_calibrator(
            trt, cuda, load_calibration_images(bundle), size, os.path.join(bundle, plan["calibration_cache"])
        )
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise DeviceError("TensorRT failed to build {} (its log above says why)".format(plan["engine"]))
    engine_path = os.path.join(bundle, plan["engine"])
    write_bytes_atomic(engine_path, bytes(serialized))
    return engine_path


def add_common_arguments(parser):
    """Adds what trt_build.py and check.py share: the bundle folder, --precision and --dla."""
    bundle = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # device/.. is the bundle
    parser.add_argument("bundle", nargs="?", default=bundle, help="the bundle folder (default: device/..)")
    parser.add_argument("--precision", choices=ENGINE_PRECISIONS, help="default: the profile's precision")
    parser.add_argument("--dla", type=int, default=None, metavar="CORE", help="use this DLA core")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Build the TensorRT engine of an rkdtool bundle on this board.",
        epilog="example: python3 device/trt_build.py . --precision int8",
    )
    add_common_arguments(parser)
    parser.add_argument("--rebuild", action="store_true", help="build even if the engine file exists")
    parser.add_argument("--print-trtexec", action="store_true", help="print the trtexec commands and exit")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        settings = read_bundle(args.bundle)
        if args.print_trtexec:
            version = os.environ.get("TRT_VERSION") or import_tensorrt().__version__
            for command in trtexec_commands(plan_build(settings, version, args.precision, args.dla)):
                print(" ".join(command))
            return 0
        trt = import_tensorrt()
        plan = plan_build(settings, trt.__version__, args.precision, args.dla)
        path = os.path.join(args.bundle, plan["engine"])
        if os.path.isfile(path) and not args.rebuild:
            print(f"engine exists: {path} (pass --rebuild to build again)")
            return 0
        print("building {} from {} ({} INT8)".format(plan["engine"], plan["onnx"], plan["int8_mode"] or "no"))
        print(f"built {build_engine(trt, plan, args.bundle)}")
        return 0
    except DeviceError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
