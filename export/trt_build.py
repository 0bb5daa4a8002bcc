"""ONNX -> TensorRT engine, built on the board itself (engines are tied to the GPU and the TensorRT version).

    python3 device/trt_build.py BUNDLE [--precision int8|fp16|fp32] [--dla N] [--rebuild] [--print-trtexec]

The decisions (ONNX file, flags, profiles) are trt_plan.plan_build's; this file makes the TensorRT calls:
INT8 from the Q/DQ model on the GPU, and from the implicit entropy calibrator on calib.npz for DLA (edge.md
§1, §2.1); EXPLICIT_BATCH on 8.x only; the workspace through `set_memory_pool_limit` (8.4+) or
`max_workspace_size`; TF32 cleared for fp32; the board's own DLA core count and fast-INT8 flag checked; a
--dla build refused when no layer can run on the DLA (before the build, `can_run_on_DLA`) or none was put
there (after it, the layer report); a timing cache per TensorRT version and GPU; a layer report from the
engine inspector; a sidecar that says when an existing engine may be reused (trt_sidecar.py). Signatures
follow NVIDIA/TensorRT python/src/infer/pyCore.cpp at 8.2.1, 8.5.2, 8.6.1 and 10.3.0.

Device side: numpy and tensorrt (pycuda for the calibrator and the GPU's name); Python 3.6 syntax.
tensorrt is imported inside the functions that need it, so this file imports cleanly anywhere.
"""

import argparse
import os
import sys

import trt_layers  # siblings in device/
import trt_sidecar
from trt_plan import (  # noqa: F401  (re-exported: check.py, rkdtool's deploy and the tests use them here)
    DLA_BATCH,
    ENGINE_PRECISIONS,
    MISSING_PYCUDA,
    MISSING_TENSORRT,
    DeviceError,
    add_common_arguments,
    check_tensorrt_range,
    engine_name,
    import_pycuda,
    import_tensorrt,
    int8_mode,
    plan_build,
    read_bundle,
    trtexec_commands,
    version_in_range,
    version_tuple,
)
from trt_sidecar import write_bytes_atomic  # noqa: F401  (re-exported)


def log_to_stderr(message):
    sys.stderr.write(message + "\n")


def optional_pycuda(log=log_to_stderr):
    """Gives back pycuda.driver, or None (with a warning) where it cannot start: a Q/DQ build needs none."""
    try:
        return import_pycuda()
    except DeviceError as exc:
        log(f"warning: {exc}; the engine sidecar will not name the GPU")
        return None


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


def set_builder_flags(trt, config, plan):
    """Sets the plan's builder flags and clears its cleared ones (TF32 for fp32, clearFlag)."""
    for flag in plan["flags"]:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    for flag in plan["clear_flags"]:
        if hasattr(trt.BuilderFlag, flag):
            config.clear_flag(getattr(trt.BuilderFlag, flag))


def check_board(builder, plan, profile_cores=None, log=log_to_stderr):
    """Raises DeviceError when this board cannot build the plan: too few DLA cores, no fast INT8.

    The DLA core count is the board's (IBuilder::getNbDLACores, Python num_DLA_cores since 8.2), not the
    profile's: Orin NX 8 GB has one core where its family profile says two. platform_has_fast_int8 is False
    on Nano (Maxwell) and TX2 (Pascal GP10B); it is deprecated from 10.5 and absent on 11, then not checked.
    """
    core = plan["dla_core"]
    if core is not None:
        cores = getattr(builder, "num_DLA_cores", None)
        if cores is not None and core >= int(cores):
            said = "" if profile_cores is None else f" (the profile says {profile_cores})"
            raise DeviceError(
                f"this board has {cores} DLA core(s) (builder.num_DLA_cores){said}: "
                f"--dla {core} is not one of them"
            )
    if (
        plan["precision"] == "int8"
        and core is None
        and getattr(builder, "platform_has_fast_int8", True) is False
    ):
        raise DeviceError(
            "this GPU has no fast INT8 (builder.platform_has_fast_int8 is False, as on Nano and TX2): "
            "build with --precision fp16"
        )
    if plan["precision"] == "fp16" and getattr(builder, "platform_has_fast_fp16", True) is False:
        log("warning: this GPU has no fast FP16 (builder.platform_has_fast_fp16 is False); FP16 may be slow")


def add_profiles(builder, config, plan):
    """Adds the plan's optimisation profiles in order (profile 0 is the one infer() uses)."""
    for shapes in plan["profiles"]:
        profile = builder.create_optimization_profile()
        profile.set_shape(
            plan["input_name"], tuple(shapes["min"]), tuple(shapes["opt"]), tuple(shapes["max"])
        )
        config.add_optimization_profile(profile)


def configure(trt, builder, config, plan):
    """Applies the plan to a builder config: workspace, flags, DLA, profiles, detailed profiling."""
    set_workspace(trt, config, plan)
    set_builder_flags(trt, config, plan)
    if plan["dla_core"] is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = plan["dla_core"]
    add_profiles(builder, config, plan)
    verbosity = getattr(trt, "ProfilingVerbosity", None)
    if verbosity is not None and hasattr(
        verbosity, "DETAILED"
    ):  # DETAILED from 8.2 (IEngineInspector's detail)
        config.profiling_verbosity = verbosity.DETAILED


def check_dla_capable(config, network, plan):
    """Gives back how many network layers can run on the DLA (None without --dla or the API); raises
    DeviceError when none can, before a build that GPU_FALLBACK would silently put all on the GPU.

    IBuilderConfig::canRunOnDLA (Python can_run_on_DLA, TensorRT 8.2 to 10.x) answers for the config's DLA
    core and the network's shapes. A layer that can run there may still be placed on the GPU; the layer
    report after the build says where each one went.
    """
    if plan["dla_core"] is None or not hasattr(config, "can_run_on_DLA"):
        return None
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    capable = sum(1 for layer in layers if config.can_run_on_DLA(layer))
    if capable == 0:
        raise DeviceError(
            "none of the {} layers of {} can run on DLA core {} (IBuilderConfig.can_run_on_DLA): "
            "run without --dla".format(len(layers), plan["onnx"], plan["dla_core"])
        )
    return capable


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

    EntropyCalibrator2 is the one DLA needs (edge.md §1.2); its shape follows NVIDIA's
    samples/python/int8_caffe_mnist/calibrator.py.
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


def attach_calibrator(trt, builder, config, plan, bundle, cuda, environment, log):
    """Sets the implicit INT8 calibrator, after dropping a calibration cache made from other inputs."""
    cache_path = os.path.join(bundle, plan["calibration_cache"])
    wanted = trt_sidecar.calibration_record(plan, bundle, environment)
    stale = trt_sidecar.drop_stale_calibration_cache(cache_path, wanted)
    if stale:
        log("calibrating again: {} was made from other inputs ({})".format(plan["calibration_cache"], stale))
    size = plan["calibration_batch"]
    shape = tuple([size] + plan["shapes"]["min"][1:])
    # Calibration of a dynamic-shape network runs at the kOPT shape of the calibration profile (NvInfer.h
    # IBuilderConfig::setCalibrationProfile); a DLA engine's own profile is static at another batch.
    calibration_profile = builder.create_optimization_profile()
    calibration_profile.set_shape(plan["input_name"], shape, shape, shape)
    if hasattr(config, "set_calibration_profile"):
        config.set_calibration_profile(calibration_profile)
    config.int8_calibrator = make_entropy_calibrator(
        trt, cuda, load_calibration_images(bundle), size, cache_path
    )
    return cache_path, wanted


def load_timing_cache(config, path, log):
    """Gives back the ITimingCache set on `config` (from `path` when it exists), or None before 8.0."""
    if not hasattr(config, "create_timing_cache"):
        return None
    data = b""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            data = f.read()
    cache = config.create_timing_cache(data)
    # ignore_mismatch=False: TensorRT rejects a cache from another device or version (IBuilderConfig.h).
    if not config.set_timing_cache(cache, False):
        log(f"warning: TensorRT rejected the timing cache {os.path.basename(path)}; starting an empty one")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    return cache


def save_timing_cache(config, path):
    cache = config.get_timing_cache() if hasattr(config, "get_timing_cache") else None
    if cache is not None:
        write_bytes_atomic(path, bytes(cache.serialize()))


def parse_onnx(trt, network, logger, onnx_path, plan):
    parser = trt.OnnxParser(network, logger)
    if hasattr(parser, "parse_from_file"):  # resolves external weights beside the file (edge.md §2.1)
        parsed = parser.parse_from_file(onnx_path)
    else:
        with open(onnx_path, "rb") as f:
            parsed = parser.parse(f.read())
    if not parsed:
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise DeviceError("TensorRT could not parse {}: {}".format(plan["onnx"], "; ".join(errors)))
    return parser


def inspect_layers(trt, logger, serialized, plan):
    """Gives back (layer summary, inspector JSON text), or (None, why not) where there is no inspector."""
    if not hasattr(trt, "LayerInformationFormat"):
        return None, "this TensorRT has no engine inspector (it arrived in 8.2)"
    runtime = trt.Runtime(logger)
    if plan["dla_core"] is not None:
        runtime.DLA_core = plan["dla_core"]  # before deserialising (IRuntime::setDLACore)
    engine = runtime.deserialize_cuda_engine(serialized)
    if engine is None or not hasattr(engine, "create_engine_inspector"):
        return None, "the built engine could not be inspected"
    text = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    return trt_layers.summarise(text), text


def _record_layers(trt, logger, serialized, plan, engine_path, log):
    """Writes <engine>.layers.json; raises DeviceError (engine removed) for a DLA build with no DLA layer."""
    summary, text = inspect_layers(trt, logger, serialized, plan)
    if summary is None:
        log(f"warning: no layer report: {text}")
        return None
    trt_sidecar.write_bytes_atomic(engine_path + ".layers.json", text.encode("utf-8"))
    if plan["dla_core"] is not None and summary["dla"] == 0 and summary["dla_uncertain"]:
        log(
            "warning: the layer report does not say which layers run on DLA core {} (see {})".format(
                plan["dla_core"], engine_path + ".layers.json"
            )
        )
    elif plan["dla_core"] is not None and summary["dla"] == 0:
        os.remove(engine_path)
        raise DeviceError(
            "no layer of {} was placed on DLA core {}: GPU_FALLBACK put all {} on the GPU (see {}); "
            "run without --dla".format(
                plan["onnx"], plan["dla_core"], summary["layers"], engine_path + ".layers.json"
            )
        )
    return summary


def build_engine(
    trt, plan, bundle, cuda=None, logger=None, environment=None, log=log_to_stderr, profile_cores=None
):
    """Builds the engine `plan` describes from the bundle's ONNX file; gives back the engine's path.

    Beside it: <engine>.json (the sidecar), <engine>.layers.json (the inspector's report) and the
    timing cache of this TensorRT and GPU.
    """
    logger = logger or trt.Logger(trt.Logger.WARNING)
    onnx_path = os.path.join(bundle, plan["onnx"])
    if not os.path.isfile(onnx_path):
        raise DeviceError(f"{onnx_path} is missing from the bundle")
    if cuda is None:  # the calibrator needs pycuda; otherwise it only names the GPU in the sidecar
        cuda = import_pycuda() if plan["int8_mode"] == "implicit" else optional_pycuda(log)
    environment = environment or trt_sidecar.build_environment(trt, cuda)
    builder = trt.Builder(logger)
    check_board(builder, plan, profile_cores, log)
    network = builder.create_network(network_flags(trt, plan))
    parse_onnx(trt, network, logger, onnx_path, plan)
    config = builder.create_builder_config()
    configure(trt, builder, config, plan)
    capable = check_dla_capable(config, network, plan)
    timing_path = os.path.join(bundle, trt_sidecar.timing_cache_name(environment))
    load_timing_cache(config, timing_path, log)
    calibration = None
    if plan["int8_mode"] == "implicit":
        calibration = attach_calibrator(trt, builder, config, plan, bundle, cuda, environment, log)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise DeviceError("TensorRT failed to build {} (its log above says why)".format(plan["engine"]))
    save_timing_cache(config, timing_path)
    if calibration is not None and os.path.isfile(calibration[0]):
        trt_sidecar.write_json_atomic(calibration[0] + ".json", calibration[1])
    engine_path = os.path.join(bundle, plan["engine"])
    if os.path.isfile(trt_sidecar.sidecar_path(engine_path)):  # never a new engine beside an old record
        os.remove(trt_sidecar.sidecar_path(engine_path))
    write_bytes_atomic(engine_path, bytes(serialized))
    layers = _record_layers(trt, logger, serialized, plan, engine_path, log)
    if layers is not None and capable is not None:
        layers["dla_capable"] = capable
    trt_sidecar.write_sidecar(engine_path, trt_sidecar.engine_record(plan, bundle, environment), layers)
    return engine_path


def ensure_engine(trt, plan, bundle, cuda=None, rebuild=False, log=log_to_stderr, profile_cores=None):
    """Gives back (engine path, built now, why it was built): reuses an engine only if its sidecar matches."""
    environment = trt_sidecar.build_environment(trt, cuda)
    engine_path = os.path.join(bundle, plan["engine"])
    wanted = trt_sidecar.engine_record(plan, bundle, environment)
    reasons = ["--rebuild"] if rebuild else trt_sidecar.stale_reasons(engine_path, wanted)
    if not reasons:
        return engine_path, False, []
    log(
        "building {} from {} ({} INT8) because: {}".format(
            plan["engine"], plan["onnx"], plan["int8_mode"] or "no", "; ".join(reasons)
        )
    )
    build_engine(trt, plan, bundle, cuda, environment=environment, log=log, profile_cores=profile_cores)
    return engine_path, True, reasons


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Build the TensorRT engine of an rkdtool bundle on this board.",
        epilog="example: python3 device/trt_build.py . --precision int8",
    )
    add_common_arguments(parser)
    parser.add_argument("--rebuild", action="store_true", help="build even if the engine's sidecar matches")
    parser.add_argument("--print-trtexec", action="store_true", help="print the trtexec commands and exit")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        settings = read_bundle(args.bundle)
        if args.print_trtexec:
            version = os.environ.get("TRT_VERSION") or import_tensorrt().__version__
            plan = plan_build(settings, version, args.precision, args.dla, args.dla_batch)
            for command in trtexec_commands(plan, args.bundle):
                print(" ".join(command))
            return 0
        trt = import_tensorrt()
        if not args.any_tensorrt:
            check_tensorrt_range(settings, trt.__version__)
        plan = plan_build(settings, trt.__version__, args.precision, args.dla, args.dla_batch)
        cuda = import_pycuda() if plan["int8_mode"] == "implicit" else optional_pycuda()
        path, built, _ = ensure_engine(
            trt,
            plan,
            args.bundle,
            cuda,
            args.rebuild,
            log=print,
            profile_cores=settings["profile"].get("dla_cores"),
        )
        print(
            (
                "built {}" if built else "engine is current: {} (its sidecar matches; --rebuild builds again)"
            ).format(path)
        )
        return 0
    except DeviceError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
