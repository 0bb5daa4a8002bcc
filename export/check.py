"""On the board: build the engine if there is no current one, re-check ACC and ASR on probes.npz, time it,
and write device_report.json next to host_report.json.

    python3 device/check.py .                        # from inside the bundle folder
    python3 device/check.py BUNDLE --precision fp16 --dla 0 --runs 2000 --sweep --compare

ASR (DESIGN §5): the share of test images whose true label is not the probe's target that the model sends to
the target once triggered; `asr_all_images` counts every image (the RobustKD code's variant); a probe with no
target (stored as -1) reports the flip rate to the most frequent predicted class.

Backends: TensorRT + pycuda (the board), or ONNX Runtime (`--backend onnxruntime`, the `cpu` target, or the
host twin of any bundle, FP16 ones included: ort_twin.py). Latency after a time-based warm-up (2 s, like
trtexec --warmUp=2000), per batch, repeated; GPU time from CUDA events around a CUDA graph replay where
capture works. The report records the board's state (board_state.py). Needs numpy plus the backend;
Python 3.6+.
"""

import argparse
import datetime
import importlib.util
import json
import os
import platform
import sys

import numpy as np

import board_state  # siblings in device/: none imports tensorrt or pycuda until used
import ort_twin
import trt_compare
import trt_run
import trt_sidecar
from trt_build import (
    DeviceError,
    add_common_arguments,
    check_tensorrt_range,
    ensure_engine,
    import_pycuda,
    import_tensorrt,
    plan_build,
    read_bundle,
    trtexec_commands,
    version_in_range,
)

BACKENDS = ("auto", "tensorrt", "onnxruntime")
SWEEP = (1, 8, 32, 64, 128, 256)  # edge.md §7.6: throughput over batch sizes
IMPLICIT_NOTE = (
    "not like-for-like: the engine was calibrated implicitly (TensorRT's entropy calibrator on calib.npz) "
    "while onnx-int8 is ONNX Runtime's Q/DQ model, two different INT8 quantisations"
)


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


def read_trtexec_times(path, batch=1):
    """Gives back GPU compute and host latency summaries from a `trtexec --exportTimes` JSON file.

    The file is a list of per-inference records with "computeMs" and "latencyMs" (sampleReporting.cpp
    exportJSONTrace), so the Python figures can be checked against trtexec's.
    """
    with open(path) as f:
        records = [r for r in json.load(f) if isinstance(r, dict) and "computeMs" in r]
    if not records:
        raise DeviceError(f"{path} holds no trtexec timing records (computeMs)")
    return {
        "file": os.path.basename(path),
        "gpu_compute_ms": latency_summary([r["computeMs"] for r in records], batch),
        "host_latency_ms": latency_summary([r["latencyMs"] for r in records], batch),
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


def _module_version(name, attribute="__version__"):
    if importlib.util.find_spec(name) is None:
        return None
    try:
        module = importlib.import_module(name)
    except ImportError:
        return None
    return getattr(module, attribute, None)


def software_versions(trt=None, cuda=None):
    """Gives back the versions of Python, numpy, TensorRT, pycuda (and its CUDA) and ONNX Runtime."""
    toolkit, driver = trt_sidecar.pycuda_versions(cuda)
    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "tensorrt": trt.__version__ if trt is not None else _module_version("tensorrt"),
        "pycuda": _module_version("pycuda", "VERSION_TEXT"),
        "pycuda_cuda": toolkit,
        "cuda_driver": driver,
        "onnxruntime": _module_version("onnxruntime"),
    }


def platform_info(root="/", run=None, trt=None, cuda=None):
    """Gives back what the board is and its state: model, power mode, clocks, temperatures, versions."""
    info = {"machine": platform.machine(), "system": platform.platform()}
    info.update(board_state.platform_state(root, run))
    info["software"] = software_versions(trt, cuda)
    return info


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


def host_reference(bundle, precision_run, int8_mode=None, backend="onnxruntime"):
    """Gives back (host_report row name, its numbers, like-for-like, note) this run should agree with."""
    with open(os.path.join(bundle, "host_report.json")) as f:
        precisions = json.load(f)["precisions"]
    name = {"int8": "onnx-int8", "fp16": "onnx-fp16"}.get(precision_run, "onnx-fp32")
    note = None
    if int8_mode == "implicit":
        note = IMPLICIT_NOTE
    elif precision_run == "fp16" and name not in precisions:
        name = "onnx-fp32"
        note = "not like-for-like: the host report has no onnx-fp16 row; compared with onnx-fp32"
    elif precision_run == "fp16" and backend == "tensorrt":
        # Same precision, not the same arithmetic: TensorRT may keep some layers in FP32 (its tactic choice).
        return name, precisions.get(name), True, "TensorRT FP16 kernels vs ONNX Runtime's FP16 copy"
    return name, precisions.get(name), note is None, note


def compare(result, reference):
    """Gives back ACC and per-probe ASR differences (device minus host)."""
    if reference is None:
        return None
    return {
        "acc_delta": result["acc"] - reference["acc"],
        "asr_delta": {k: v - reference["asr"].get(k, float("nan")) for k, v in result["asr"].items()},
    }


def write_json_atomic(path, obj):
    trt_sidecar.write_json_atomic(path, obj)


def _tensorrt_runner(bundle, settings, precision, options, log):
    """Gives back (EngineRunner, plan, report fields) with an engine built or reused per its sidecar."""
    trt = import_tensorrt()
    if not options["any_tensorrt"]:
        check_tensorrt_range(settings, trt.__version__)
    plan = plan_build(settings, trt.__version__, precision, options["dla_core"], options["dla_batch"])
    cuda = import_pycuda()
    engine_path, built, reasons = ensure_engine(
        trt, plan, bundle, cuda, options["rebuild"], log, settings["profile"].get("dla_cores")
    )
    runner = trt_run.EngineRunner(engine_path, trt=trt, cuda=cuda, dla_core=plan["dla_core"])
    spec = settings["profile"].get("tensorrt")
    sidecar = trt_sidecar.read_json(trt_sidecar.sidecar_path(engine_path)) or {}
    fields = {
        "tensorrt_version": trt.__version__,
        "tensorrt_in_profile_range": spec is None or version_in_range(trt.__version__, spec),
        "engine": plan["engine"],
        "engine_built_now": built,
        "engine_build_reasons": reasons,
        "engine_sidecar": {k: sidecar.get(k) for k in trt_sidecar.ENGINE_KEYS if k in sidecar},
        "layers": sidecar.get("layers"),
        "int8_mode": plan["int8_mode"],
        "dla_core": plan["dla_core"],
        "execution_api": runner.api,
        "profiles": [list(p) for p in runner.profiles],
        "trtexec": [" ".join(c) for c in trtexec_commands(plan, bundle)],
    }
    return runner, plan, fields, (trt, cuda)


def batches_to_time(runner, batches, sweep):
    """Gives back (batches to time, {batch: why skipped}) within the engine's profiles."""
    wanted = sorted(set(batches) | (set(SWEEP) if sweep else set()))
    ranges = getattr(runner, "profiles", None)
    if not ranges:
        return wanted, {}
    timed, skipped = [], {}
    for batch in wanted:
        if any(lo <= batch <= hi for lo, _, hi in ranges):
            timed.append(batch)
        else:
            skipped[batch] = "outside the engine's profiles {}".format([f"{lo}-{hi}" for lo, _, hi in ranges])
    if not timed:  # a static DLA engine at another batch: time the batch it takes
        timed = [ranges[0][0]]
    return timed, skipped


def _tile(images, batch):
    """Gives back `batch` real images (repeating the set if it is smaller): time real data, not zeros."""
    reps = -(-batch // len(images))
    return np.ascontiguousarray(np.concatenate([images] * reps)[:batch])


def measure_latency(runner, images, batches, options):
    """Gives back {"batch_N": {"host_ms": summary, "gpu_ms": summary, "gpu_timer", ...}} per batch."""
    timed, skipped = batches_to_time(runner, batches, options["sweep"])
    latency = {}
    for batch in timed:
        kwargs = {"warmup_ms": options["warmup_ms"], "repeats": options["repeats"]}
        if isinstance(runner, trt_run.EngineRunner):
            kwargs["use_graph"] = options["cuda_graph"]
        timings = runner.time(_tile(images, batch), options["warmup"], options["runs"], **kwargs)
        entry = {k: latency_summary(timings[k], batch) for k in ("host_ms", "gpu_ms") if timings.get(k)}
        entry.update({k: v for k, v in timings.items() if k not in ("host_ms", "gpu_ms")})
        latency[f"batch_{batch}"] = entry
    for batch, why in skipped.items():
        latency[f"batch_{batch}"] = {"skipped": why}
    return latency


def headline(latency, budget_ms):
    """Gives back the report's headline latency fields: batch 1 (else the first timed batch), its timer."""
    timed = [k for k, v in latency.items() if "host_ms" in v]
    if not timed:
        raise DeviceError(f"no batch size could be timed on this engine: {latency}")
    key = "batch_1" if "batch_1" in timed else timed[0]
    first = latency[key]
    if "gpu_ms" in first and first.get("gpu_timer") == "cuda-graph":
        timer = "cuda-graph (GPU compute: CUDA events around a CUDA graph replay)"
    elif "gpu_ms" in first:
        timer = "enqueue+GPU (CUDA events around one enqueue, no CUDA graph: {})".format(
            first.get("cuda_graph")
        )
    else:
        timer = "perf_counter (host)"
    chosen = first.get("gpu_ms", first["host_ms"])
    return {
        "latency_ms": {k: chosen[k] for k in ("p50", "p90", "p99")},
        "latency_batch": chosen["batch"],
        "latency_timer": timer,
        "within_budget": bool(chosen["batch"] == 1 and chosen["p50"] <= budget_ms),
    }


CHECK_DEFAULTS = {
    "precision": None,
    "dla_core": None,
    "dla_batch": 1,
    "backend": "auto",
    "warmup": 10,
    "warmup_ms": 2000.0,
    "runs": 1000,
    "repeats": 1,
    "batches": (1,),
    "sweep": False,
    "cuda_graph": True,
    "rebuild": False,
    "any_tensorrt": False,
    "compare": False,
    "trtexec_times": None,
    "out": None,
    "sysfs_root": "/",
    "run_command": None,
    "log": print,
}


def _open_backend(bundle, settings, precision, opts, report):
    """Gives back (runner, plan or None, (trt, cuda)) and fills the report's backend fields."""
    if report["backend"] == "tensorrt":
        runner, plan, fields, modules = _tensorrt_runner(bundle, settings, precision, opts, opts["log"])
        report.update(fields)
        report["precision_run"] = precision
        return runner, plan, modules
    if opts["dla_core"] is not None:
        raise DeviceError("--dla needs the tensorrt backend")
    runner = ort_twin.OrtBackend(bundle, precision)
    report.update(
        {
            "onnxruntime_version": runner.version,
            "model": runner.model_file,
            "precision_run": runner.precision_run,
            "note": runner.note,
        }
    )
    return runner, None, (None, None)


def _parity(bundle, runner, probes, precision, report):
    if report["backend"] != "tensorrt":
        return {"skipped": "--compare runs ONNX Runtime against TensorRT: it needs the tensorrt backend"}
    onnx_file = "model.int8.onnx" if precision == "int8" else "model.onnx"
    return trt_compare.polygraphy_parity(
        os.path.join(bundle, onnx_file),
        runner.engine,
        runner.input_name,
        runner.output_name,
        probes,
        precision,
        runner.profiles[0],
    )


def run_check(bundle, **options):
    """Runs the whole device check and gives back the device report (also written to `out`).

    Options and their defaults: CHECK_DEFAULTS.
    """
    unknown = set(options) - set(CHECK_DEFAULTS)
    if unknown:
        raise TypeError(f"run_check got unknown options {sorted(unknown)}")
    opts = dict(CHECK_DEFAULTS, **options)
    settings = read_bundle(bundle)
    profile = settings["profile"]
    precision = opts["precision"] or profile["precision"]
    probes = load_probes(bundle)
    report = {
        "target": settings["target"],
        "backend": choose_backend(opts["backend"]),
        "precision": precision,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "probe_images": int(len(probes["labels"])),
        "latency_budget_ms": profile["latency_budget_ms"],
    }
    runner, _, (trt, cuda) = _open_backend(bundle, settings, precision, opts, report)
    report["platform"] = platform_info(opts["sysfs_root"], opts["run_command"], trt, cuda)
    result = evaluate(runner.infer, probes)
    report.update(result)
    report["latency"] = measure_latency(runner, probes["images"], opts["batches"], opts)
    report["warmup"] = {
        "min_iterations": opts["warmup"],
        "min_ms": opts["warmup_ms"],
        "repeats": opts["repeats"],
    }
    report.update(headline(report["latency"], profile["latency_budget_ms"]))
    if opts["trtexec_times"]:
        report["trtexec_times"] = read_trtexec_times(opts["trtexec_times"])
    if opts["compare"]:
        report["compare"] = _parity(bundle, runner, probes, precision, report)
    name, reference, like, note = host_reference(
        bundle, report["precision_run"], report.get("int8_mode"), report["backend"]
    )
    report["vs_host"] = None
    if reference:
        report["vs_host"] = dict(
            {"precision": name, "like_for_like": like, "note": note}, **compare(result, reference)
        )
    write_json_atomic(opts["out"] or os.path.join(bundle, "device_report.json"), report)
    return report


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Check an rkdtool bundle on the board: ACC/ASR per probe, latency -> device_report.json",
        epilog="example: python3 device/check.py . --precision int8 --runs 1000",
    )
    add_common_arguments(parser)
    parser.add_argument("--backend", choices=BACKENDS, default="auto")
    parser.add_argument("--warmup", type=int, default=10, help="at least this many untimed runs (default 10)")
    parser.add_argument(
        "--warmup-ms", type=float, default=2000.0, help="and at least this long (default 2000)"
    )
    parser.add_argument("--runs", type=int, default=1000, help="timed inferences per batch and repeat (1000)")
    parser.add_argument("--repeats", type=int, default=1, help="repeat the timed runs; p50 per repeat (1)")
    parser.add_argument(
        "--batch", type=int, action="append", help="batch size to time (repeatable; default 1)"
    )
    parser.add_argument("--sweep", action="store_true", help="also time batches 1, 8, 32, 64, 128, 256")
    parser.add_argument("--no-cuda-graph", action="store_true", help="time plain enqueues (enqueue+GPU)")
    parser.add_argument(
        "--rebuild", action="store_true", help="rebuild the engine even if its sidecar matches"
    )
    parser.add_argument("--compare", action="store_true", help="ONNX Runtime vs TensorRT through Polygraphy")
    parser.add_argument("--trtexec-times", help="a `trtexec --exportTimes` JSON to cross-check the latency")
    parser.add_argument("--out", help="report path (default BUNDLE/device_report.json)")
    return parser.parse_args(argv)


def print_summary(report, out):
    platform_state = report["platform"]
    print(
        "{} on {} ({}, {}{})".format(
            report["target"],
            platform_state["model"] or platform_state["machine"],
            report["backend"],
            report["precision"],
            "" if report["precision_run"] == report["precision"] else " run as " + report["precision_run"],
        )
    )
    if report.get("note"):
        print("note: {}".format(report["note"]))
    print("ACC {:.2%}".format(report["acc"]))
    for name, value in report["asr"].items():
        print(f"ASR {name} {value:.2%}")
    lat = report["latency_ms"]
    print(
        "latency p50 {:.3f} ms  p90 {:.3f}  p99 {:.3f} ({})".format(
            lat["p50"], lat["p90"], lat["p99"], report["latency_timer"]
        )
    )
    mode = platform_state.get("power_mode")
    print(
        "power mode: {}".format(
            "{} ({})".format(mode["name"], mode["id"]) if mode else "unknown (no nvpmodel)"
        )
    )
    for warning in platform_state.get("warnings", []):
        print(f"warning: {warning}")
    print(f"wrote {out}")


def main(argv=None):
    args = parse_args(argv)
    if args.runs < 1 or args.warmup < 0 or args.repeats < 1 or any(b < 1 for b in args.batch or [1]):
        sys.stderr.write("error: --runs, --repeats and --batch must be >= 1, --warmup >= 0\n")
        return 2
    out = args.out or os.path.join(args.bundle, "device_report.json")
    try:
        report = run_check(
            args.bundle,
            precision=args.precision,
            dla_core=args.dla,
            dla_batch=args.dla_batch,
            backend=args.backend,
            warmup=args.warmup,
            warmup_ms=args.warmup_ms,
            runs=args.runs,
            repeats=args.repeats,
            batches=tuple(args.batch or [1]),
            sweep=args.sweep,
            cuda_graph=not args.no_cuda_graph,
            rebuild=args.rebuild,
            any_tensorrt=args.any_tensorrt,
            compare=args.compare,
            trtexec_times=args.trtexec_times,
            out=out,
        )
    except DeviceError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    print_summary(report, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
