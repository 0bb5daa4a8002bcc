"""On the board: build the engine if there is none, re-check ACC and ASR on probes.npz, time it, and write
device_report.json next to host_report.json.

    python3 device/check.py .                        # from inside the bundle folder
    python3 device/check.py BUNDLE --precision fp16 --dla 0 --runs 2000

ASR (DESIGN §5): the share of test images whose true label is not the probe's target that the model sends to
the target once triggered; `asr_all_images` counts every image (the RobustKD code's variant); a probe with no
target (stored as -1) reports the flip rate to the most frequent predicted class.

Backends: TensorRT + pycuda (the board), or ONNX Runtime when TensorRT is absent (`--backend onnxruntime`, the
`cpu` target, or a quick look on a workstation). Needs numpy plus the backend; Python 3.6+.
"""

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys

import numpy as np

import trt_run  # siblings in device/: neither imports tensorrt or pycuda until used
from trt_build import (
    DeviceError,
    add_common_arguments,
    build_engine,
    import_tensorrt,
    plan_build,
    read_bundle,
    trtexec_commands,
    version_in_range,
)

BACKENDS = ("auto", "tensorrt", "onnxruntime")


def accuracy(predictions, labels):
    """Gives back the share of predictions equal to the labels, in [0, 1]."""
    return float(np.mean(predictions == labels)) if len(labels) else 0.0


def attack_success_rate(predictions, labels, target):
    """Gives back (asr, asr_all_images, target) from predictions on triggered images.

    `target` < 0 means untargeted: the most frequent predicted class is used.
    """
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if target < 0:
        target = int(np.bincount(predictions).argmax()) if len(predictions) else 0
    hit = predictions == target
    non_target = labels != target
    asr = float(np.mean(hit[non_target])) if non_target.any() else 0.0
    return asr, (float(np.mean(hit)) if len(hit) else 0.0), int(target)


def latency_summary(samples_ms, batch):
    """Gives back p50/p90/p99/mean/min/max in ms and throughput (images/s = batch / median)."""
    samples = np.asarray(samples_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(samples, [50, 90, 99])
    return {
        "batch": int(batch),
        "runs": int(len(samples)),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "mean": float(samples.mean()),
        "min": float(samples.min()),
        "max": float(samples.max()),
        "throughput_ips": float(batch * 1e3 / p50) if p50 > 0 else None,
    }


def load_probes(bundle):
    """Gives back probes.npz as a dict: images, labels, probe_names, targets, triggered (list of arrays)."""
    path = os.path.join(bundle, "probes.npz")
    if not os.path.isfile(path):
        raise DeviceError(f"{path} is missing from the bundle")
    with np.load(path) as data:
        names = [str(n) for n in data["probe_names"]]
        return {
            "images": np.ascontiguousarray(data["images"], dtype=np.float32),
            "labels": data["labels"].astype(np.int64),
            "probe_names": names,
            "targets": [int(t) for t in data["targets"]],
            "triggered": [
                np.ascontiguousarray(data[f"triggered_{i}"], dtype=np.float32) for i in range(len(names))
            ],
        }


def evaluate(predict, probes):
    """Gives back {"acc", "asr", "asr_all_images", "targets"} of a predict(images) -> logits function."""
    labels = probes["labels"]
    result = {
        "acc": accuracy(predict(probes["images"]).argmax(1), labels),
        "asr": {},
        "asr_all_images": {},
        "targets": {},
    }
    for name, target, images in zip(probes["probe_names"], probes["targets"], probes["triggered"]):
        asr, asr_all, used = attack_success_rate(predict(images).argmax(1), labels, target)
        result["asr"][name], result["asr_all_images"][name], result["targets"][name] = asr, asr_all, used
    return result


def _run_text(command):
    """Gives back the stripped stdout of a command, or None when it is missing or fails."""
    if shutil.which(command[0]) is None:
        return None
    try:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.decode("utf-8", "replace").strip() if done.returncode == 0 else None


def _read_text(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace").replace("\x00", "").strip()
    except OSError:
        return None


def platform_info():
    """Gives back what the board is: model, L4T release, power mode (nvpmodel -q), Python, numpy."""
    return {
        "machine": platform.machine(),
        "system": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "model": _read_text("/proc/device-tree/model"),
        "l4t_release": _read_text("/etc/nv_tegra_release"),
        "power_mode": _run_text(["nvpmodel", "-q"]),
        # jetson_clocks --show needs root; None means it could not be read, not that clocks are unlocked.
        "clocks": _run_text(["jetson_clocks", "--show"]),
    }


def choose_backend(requested):
    """Gives back "tensorrt" or "onnxruntime": the requested one, or for auto the first one importable."""
    have_trt = (
        importlib.util.find_spec("tensorrt") is not None and importlib.util.find_spec("pycuda") is not None
    )
    have_ort = importlib.util.find_spec("onnxruntime") is not None
    if requested == "tensorrt" or (requested == "auto" and have_trt):
        return "tensorrt"
    if requested == "onnxruntime" or (requested == "auto" and have_ort):
        if not have_ort:
            raise DeviceError("onnxruntime is not importable: pip3 install onnxruntime")
        return "onnxruntime"
    raise DeviceError(
        "neither TensorRT + pycuda nor ONNX Runtime is importable here: on a Jetson install JetPack's "
        "python3-libnvinfer and `pip3 install pycuda`; elsewhere `pip install onnxruntime`"
    )


class OrtBackend:
    """ONNX Runtime on the CPU: model.onnx for fp32, model.int8.onnx (Q/DQ) for int8.

    ACC/ASR run the graph as written (Q/DQ as float quantise-dequantise, the semantics TensorRT implements,
    as rkdtool's host re-check does); latency runs it with all optimisations (ORT's fused int8 kernels).
    """

    def __init__(self, bundle, precision):
        import onnxruntime as ort

        files = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
        if precision not in files:
            raise DeviceError(f"the onnxruntime backend runs fp32 or int8, not {precision}")
        self.model_file = files[precision]
        path = os.path.join(bundle, self.model_file)
        self.sessions = {}
        for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_ALL"):
            options = ort.SessionOptions()
            options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
            self.sessions[level] = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input_name = self.sessions["ORT_DISABLE_ALL"].get_inputs()[0].name
        self.version = ort.__version__

    def infer(self, images, batch=256):
        session = self.sessions["ORT_DISABLE_ALL"]
        outs = [
            session.run(None, {self.input_name: images[i : i + batch]})[0]
            for i in range(0, len(images), batch)
        ]
        return np.concatenate(outs).astype(np.float32)

    def time(self, images, warmup, runs):
        import time

        session, feed = self.sessions["ORT_ENABLE_ALL"], {self.input_name: images}
        for _ in range(warmup):
            session.run(None, feed)
        host_ms = []
        for _ in range(runs):
            t0 = time.perf_counter()
            session.run(None, feed)
            host_ms.append((time.perf_counter() - t0) * 1e3)
        return {"host_ms": host_ms}


def host_reference(bundle, precision, backend):
    """Gives back the host_report precision this device run should agree with, and its numbers."""
    with open(os.path.join(bundle, "host_report.json")) as f:
        precisions = json.load(f)["precisions"]
    name = "onnx-int8" if precision == "int8" else "onnx-fp32"
    return name, precisions.get(name)


def compare(result, reference):
    """Gives back ACC and per-probe ASR differences (device minus host)."""
    if reference is None:
        return None
    return {
        "acc_delta": result["acc"] - reference["acc"],
        "asr_delta": {k: v - reference["asr"].get(k, float("nan")) for k, v in result["asr"].items()},
    }


def write_json_atomic(path, obj):
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def run_check(
    bundle,
    precision=None,
    dla_core=None,
    backend="auto",
    warmup=100,
    runs=1000,
    batches=(1,),
    rebuild=False,
    out=None,
):
    """Runs the whole device check and gives back the device report (also written to `out`)."""
    settings = read_bundle(bundle)
    profile = settings["profile"]
    precision = precision or profile["precision"]
    backend = choose_backend(backend)
    probes = load_probes(bundle)
    report = {
        "target": settings["target"],
        "backend": backend,
        "precision": precision,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "platform": platform_info(),
        "probe_images": int(len(probes["labels"])),
        "latency_budget_ms": profile["latency_budget_ms"],
    }
    if backend == "tensorrt":
        trt = import_tensorrt()
        plan = plan_build(settings, trt.__version__, precision, dla_core)
        engine_path = os.path.join(bundle, plan["engine"])
        built = rebuild or not os.path.isfile(engine_path)
        if built:
            build_engine(trt, plan, bundle)
        runner = trt_run.EngineRunner(engine_path, trt=trt)
        in_range = profile.get("tensorrt") is None or version_in_range(trt.__version__, profile["tensorrt"])
        report.update(
            {
                "tensorrt_version": trt.__version__,
                "tensorrt_in_profile_range": in_range,
                "engine": plan["engine"],
                "engine_built_now": built,
                "int8_mode": plan["int8_mode"],
                "dla_core": dla_core,
                "execution_api": runner.api,
                "trtexec": [" ".join(c) for c in trtexec_commands(plan)],
            }
        )
    else:
        if dla_core is not None:
            raise DeviceError("--dla needs the tensorrt backend")
        runner = OrtBackend(bundle, precision)
        report.update({"onnxruntime_version": runner.version, "model": runner.model_file})
    result = evaluate(runner.infer, probes)
    report.update(result)
    latency = {}
    for batch in batches:
        images = _tile(probes["images"], batch)
        timings = runner.time(images, warmup, runs)
        latency[f"batch_{batch}"] = {
            name: latency_summary(samples, batch) for name, samples in timings.items()
        }
    report["latency"] = latency
    first = latency[f"batch_{batches[0]}"]
    headline = first.get("gpu_ms", first["host_ms"])
    report["latency_ms"] = {k: headline[k] for k in ("p50", "p90", "p99")}
    report["latency_timer"] = "cuda-events (GPU compute)" if "gpu_ms" in first else "perf_counter (host)"
    report["within_budget"] = bool(batches[0] == 1 and headline["p50"] <= profile["latency_budget_ms"])
    name, reference = host_reference(bundle, precision, backend)
    report["vs_host"] = {"precision": name, **(compare(result, reference) or {})} if reference else None
    write_json_atomic(out or os.path.join(bundle, "device_report.json"), report)
    return report


def _tile(images, batch):
    """Gives back `batch` real images (repeating the set if it is smaller): time real data, not zeros."""
    reps = -(-batch // len(images))
    return np.ascontiguousarray(np.concatenate([images] * reps)[:batch])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Check an rkdtool bundle on the board: ACC/ASR per probe, latency -> device_report.json",
        epilog="example: python3 device/check.py . --precision int8 --runs 1000",
    )
    add_common_arguments(parser)
    parser.add_argument("--backend", choices=BACKENDS, default="auto")
    parser.add_argument("--warmup", type=int, default=100, help="untimed inferences first (default 100)")
    parser.add_argument(
        "--runs", type=int, default=1000, help="timed inferences per batch size (default 1000)"
    )
    parser.add_argument(
        "--batch", type=int, action="append", help="batch size to time (repeatable; default 1)"
    )
    parser.add_argument("--rebuild", action="store_true", help="rebuild the engine even if one exists")
    parser.add_argument("--out", help="report path (default BUNDLE/device_report.json)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.runs < 1 or args.warmup < 0 or any(b < 1 for b in args.batch or [1]):
        sys.stderr.write("error: --runs and --batch must be >= 1, --warmup >= 0\n")
        return 2
    try:
        report = run_check(
            args.bundle,
            args.precision,
            args.dla,
            args.backend,
            args.warmup,
            args.runs,
            tuple(args.batch or [1]),
            args.rebuild,
            args.out,
        )
    except DeviceError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    print(
        "{} on {} ({}, {})".format(
            report["target"],
            report["platform"]["model"] or report["platform"]["machine"],
            report["backend"],
            report["precision"],
        )
    )
    print("ACC {:.2%}".format(report["acc"]))
    for name, value in report["asr"].items():
        print(f"ASR {name} {value:.2%}")
    lat = report["latency_ms"]
    print(
        "latency p50 {:.3f} ms  p90 {:.3f}  p99 {:.3f} ({})".format(
            lat["p50"], lat["p90"], lat["p99"], report["latency_timer"]
        )
    )
    print("power mode: {}".format(report["platform"]["power_mode"] or "unknown (nvpmodel not found)"))
    print("wrote {}".format(args.out or os.path.join(args.bundle, "device_report.json")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
