"""What an engine was built from and on, kept beside it (`<engine>.json`) and checked before it is reused.

An engine only runs on the GPU model and exact TensorRT build that made it (edge.md §3, "Engine
portability"), and it is only the model it was built from while the ONNX file has not changed: a bundle
copied over an old one keeps old engines with the same name. So every engine gets a sidecar with the GPU name
and SM, L4T/JetPack, CUDA, the full TensorRT version, the ONNX (and calibration set) sha256, builder flags,
profiles and workspace; any difference means rebuild, with the reason printed. The implicit calibration cache
gets the same treatment (caches do not carry across TensorRT releases, NVIDIA/TensorRT#3612), and the timing
cache is one file per TensorRT version and GPU.

Standard library only (pycuda is passed in), Python 3.6 syntax.
"""

import datetime
import hashlib
import json
import os
import re

import board_state  # a sibling in device/

# Fields that must match for an engine to be reused; the rest of a sidecar (layers, build time) is a record.
ENGINE_KEYS = (
    "tensorrt",
    "gpu_name",
    "gpu_sm",
    "l4t",
    "jetpack",
    "cuda",
    "cuda_driver",
    "onnx",
    "onnx_sha256",
    "calib_sha256",
    "precision",
    "int8_mode",
    "flags",
    "clear_flags",
    "strongly_typed",
    "dla_core",
    "profiles",
    "workspace_bytes",
)
CALIBRATION_KEYS = ("tensorrt", "onnx_sha256", "calib_sha256", "calibration_batch", "dla")


def write_bytes_atomic(path, data):
    """Writes `data` to `path` through a temporary file and a rename (never a half-written file)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_json_atomic(path, obj):
    """Writes `obj` as indented JSON to `path` atomically."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))


def read_json(path):
    """Gives back the JSON object in `path`, or None when it is missing or unreadable."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def sha256_file(path):
    """Gives back the hex sha256 of a file, or None when it does not exist."""
    if not os.path.isfile(path):
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def gpu_identity(cuda):
    """Gives back (GPU name, SM "8.7") of device 0 through pycuda.driver, or (None, None) without it."""
    if cuda is None or not hasattr(cuda, "Device"):
        return None, None
    try:
        device = cuda.Device(0)
        major, minor = device.compute_capability()
        return str(device.name()), f"{major}.{minor}"
    except Exception:  # pycuda raises its own error types; the sidecar then says "unknown"
        return None, None


def pycuda_versions(cuda):
    """Gives back (CUDA version pycuda was built for, driver API version) or Nones."""
    toolkit = driver = None
    if cuda is not None:
        if hasattr(cuda, "get_version"):
            toolkit = ".".join(str(v) for v in cuda.get_version())
        if hasattr(cuda, "get_driver_version"):
            raw = int(cuda.get_driver_version())  # 12060 = 12.6 (cuDriverGetVersion)
            driver = f"{raw // 1000}.{(raw % 1000) // 10}"
    return toolkit, driver


def build_environment(trt, cuda=None, root="/", run=None):
    """Gives back what the engine depends on besides the model: TensorRT, GPU, L4T, JetPack, CUDA."""
    name, sm = gpu_identity(cuda)
    toolkit, driver = pycuda_versions(cuda)
    l4t = board_state.l4t_release(root)
    return {
        "tensorrt": str(trt.__version__),
        "gpu_name": name,
        "gpu_sm": sm,
        "l4t": l4t["release"] if l4t else None,
        "jetpack": board_state.jetpack_version(root, run),
        "cuda": board_state.cuda_version(root) or toolkit,
        "cuda_driver": driver,
    }


def engine_record(plan, bundle, environment):
    """Gives back the sidecar fields an engine built from `plan` in `bundle` on `environment` must have."""
    record = dict(environment)
    record.update(
        {
            "onnx": plan["onnx"],
            "onnx_sha256": sha256_file(os.path.join(bundle, plan["onnx"])),
            "calib_sha256": (
                sha256_file(os.path.join(bundle, "calib.npz")) if plan["int8_mode"] == "implicit" else None
            ),
        }
    )
    for key in ("precision", "int8_mode", "flags", "clear_flags", "strongly_typed", "dla_core"):
        record[key] = plan[key]
    record["profiles"] = plan["profiles"]
    record["workspace_bytes"] = plan["workspace_bytes"]
    return record


def sidecar_path(engine_path):
    return engine_path + ".json"


def _short(value):
    text = json.dumps(value)
    return text if len(text) <= 24 else text[:20] + '..."'


def differences(stored, wanted, keys):
    """Gives back "key: old -> new" for every key in `keys` whose value differs (missing counts)."""
    reasons = []
    for key in keys:
        if key not in stored:
            reasons.append(f"{key}: not recorded")
        elif stored[key] != wanted.get(key):
            reasons.append(f"{key}: {_short(stored[key])} -> {_short(wanted.get(key))}")
    return reasons


def stale_reasons(engine_path, wanted):
    """Gives back why the engine at `engine_path` must be (re)built for `wanted`; [] means reuse it."""
    if not os.path.isfile(engine_path):
        return ["no engine file yet"]
    stored = read_json(sidecar_path(engine_path))
    if stored is None:
        return [f"no sidecar {os.path.basename(sidecar_path(engine_path))} (an engine of unknown provenance)"]
    return differences(stored, wanted, ENGINE_KEYS)


def write_sidecar(engine_path, record, layers=None):
    """Writes the engine's sidecar: its record, the layer summary and when it was built."""
    data = dict(record)
    data["layers"] = layers
    data["built"] = datetime.datetime.now().isoformat(timespec="seconds")
    write_json_atomic(sidecar_path(engine_path), data)


def calibration_record(plan, bundle, environment):
    """Gives back the fields a reusable implicit-INT8 calibration cache must have been made with."""
    return {
        "tensorrt": environment["tensorrt"],
        "onnx_sha256": sha256_file(os.path.join(bundle, plan["onnx"])),
        "calib_sha256": sha256_file(os.path.join(bundle, "calib.npz")),
        "calibration_batch": plan["calibration_batch"],
        "dla": plan["dla_core"] is not None,
    }


def drop_stale_calibration_cache(cache_path, wanted):
    """Deletes a calibration cache not made from `wanted`; gives back why (or None when kept or absent)."""
    if not os.path.isfile(cache_path):
        return None
    stored = read_json(cache_path + ".json")
    reasons = (
        ["no record of how it was made"] if stored is None else differences(stored, wanted, CALIBRATION_KEYS)
    )
    if not reasons:
        return None
    os.remove(cache_path)
    return "; ".join(reasons)


def timing_cache_name(environment):
    """Gives back the timing-cache file name for this TensorRT version and GPU."""
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", environment.get("gpu_name") or "unknown-gpu").strip("-").lower()
    sm = (environment.get("gpu_sm") or "unknown").replace(".", "")
    return "timing.trt{}.{}.sm{}.cache".format(environment["tensorrt"], gpu, sm)
