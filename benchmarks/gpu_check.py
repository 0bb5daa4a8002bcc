"""The GPU check (issue 14 item 5): one command on a CUDA machine, no download, under 8 minutes on one GPU.

    python benchmarks/gpu_check.py                        # WRN-28-4 -> WRN-16-2, 100 classes, batch 128
    python benchmarks/gpu_check.py --device cpu --quick   # the same code on tiny sizes (the suite runs it)

It measures, on random CIFAR-shaped tensors (a step's cost does not depend on the pixels or the weights):
1. distillation images per second of the trainer's own step (`throughput.TrainerLoop`: the split kept on
   the device, batches augmented there, `trainer.train_step`) for FKD and robustkd-ta, with `--amp` and
   `--channels-last` each on and off: the measurement that decides their defaults on CUDA
   (`trainer.default_channels_last` keeps channels_last off there until this has run);
2. with two or more GPUs, the same FKD step under DDP on 2 ranks (`torchrun`, NCCL; gloo on the CPU), each
   rank at the one-GPU batch, as global images per second and the scaling over one GPU;
3. the student's CUDA latency at batch 1 and 64: FP32 and FP16, eager and replayed as a CUDA graph
   (`deploy.timing.time_cuda`, CUDA events), p50 and images per second.
The card, driver-side versions and the library versions are named on top of
`benchmarks/results/gpu_check.md` (and `.json`). A section that fails is reported with its error and the
others still run, so one run gives everything it can.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from throughput import TrainerLoop, distiller_for, steps_per_second

from rkdtool.data import CIFAR_MEAN, CIFAR_STD, ImageData
from rkdtool.deploy.timing import latency_stats, time_cuda, time_host
from rkdtool.machine import machine_info
from rkdtool.models import build_model
from rkdtool.models.pixel import PixelSpaceModel
from rkdtool.ranks import Ranks
from rkdtool.training import resolve_device

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
QUICK = {"teacher": "wrn16-1", "student": "wrn10-1", "classes": 10, "batch": 8, "steps": 2, "rounds": 1}
QUICK.update({"train_images": 32, "latency_batch": [1, 4], "latency_runs": 5})


def random_cifar(n: int, classes: int, seed: int = 0) -> ImageData:
    """Gives back a CIFAR-shaped set of n uniform-noise training images (8-bit levels, as decoded images
    are) and a few test images, with CIFAR's normalisation and augmentation."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n + 16, 3, 32, 32), generator=g).float() / 255
    labels = torch.randint(0, classes, (n + 16,), generator=g)
    return ImageData(
        "random-cifar",
        images[:n],
        labels[:n],
        images[n:],
        labels[n:],
        CIFAR_MEAN,
        CIFAR_STD,
        classes,
        "cifar",
    )


def throughput_rows(args, data: ImageData, device: torch.device, errors: dict) -> list[dict]:
    """Images per second of FKD and robustkd-ta with --amp and --channels-last on and off (median of
    `rounds` runs of `steps` steps after 3 warm-up steps; the loops alternate within each round). A variant
    that fails to build or to step is left out, with its error in `errors`, and the others still run."""
    loops = {}
    for method in ("fkd", "robustkd-ta"):
        for amp in (False, True):
            for layout in (False, True):
                key = (method, amp, layout)
                try:
                    noise = 0.1 if method == "robustkd-ta" else 0.0
                    distiller = distiller_for(method, args, data, device, noise=noise)
                    loops[key] = TrainerLoop(
                        distiller, data, device, args.batch, amp=amp, channels_last=layout
                    )
                    steps_per_second(loops[key], 3)
                except Exception as exc:  # e.g. a kernel this GPU lacks: say so, measure the rest
                    loops.pop(key, None)
                    errors[f"throughput {variant_name(key)}"] = f"{type(exc).__name__}: {exc}"
                    traceback.print_exc()
    samples: dict[tuple, list[float]] = {key: [] for key in loops}
    for r in range(args.rounds):
        for key, loop in loops.items():
            samples[key].append(steps_per_second(loop, args.steps) * args.batch)
        print(f"throughput round {r + 1}/{args.rounds} done", flush=True)
    rows = []
    for (method, amp, layout), values in samples.items():
        dtype = loops[(method, amp, layout)].dtype
        rows.append(
            {
                "method": method,
                "amp": amp,
                "amp_dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
                "channels_last": layout,
                "images_per_s": statistics.median(values),
                "min": min(values),
                "max": max(values),
            }
        )
    del loops
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def variant_name(key: tuple) -> str:
    method, amp, layout = key
    return f"{method}{' --amp' if amp else ''}{' --channels-last' if layout else ''}"


def ddp_worker(args) -> None:
    """One torchrun rank: the FKD step under DDP at `--batch` images per rank; rank 0 writes the result."""
    ranks = Ranks.from_env()
    device = ranks.join(resolve_device(args.device))
    data = random_cifar(args.train_images, args.classes)
    distiller = distiller_for("fkd", args, data, device)
    loop = TrainerLoop(distiller, data, device, args.batch, amp=args.ddp_amp, ranks=ranks)
    steps_per_second(loop, 3)
    rates = [steps_per_second(loop, args.steps) for _ in range(args.rounds)]
    difference = ranks.largest_difference(distiller.student)
    if ranks.main:
        result = {
            "world_size": ranks.world,
            "backend": ranks.describe()["backend"],
            "global_images_per_s": statistics.median(rates) * args.batch * ranks.world,
            "largest_weight_difference": difference,
        }
        Path(args.ddp_worker).write_text(json.dumps(result))
    del loop, distiller  # DDP's reducer goes before its process group does (the loop's batch generator
    gc.collect()  # holds the loop in a cycle, so only the collector frees it)
    ranks.leave()


def ddp_row(args, one_gpu: float | None) -> dict:
    """Runs the DDP worker on 2 ranks through torchrun and gives back its result beside the one-GPU rate."""
    with tempfile.TemporaryDirectory() as work:
        out = Path(work) / "ddp.json"
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            __file__, "--ddp-worker", str(out), "--device", args.device, "--teacher", args.teacher,
            "--student", args.student, "--classes", str(args.classes), "--batch", str(args.batch),
            "--steps", str(args.steps), "--rounds", str(args.rounds),
            "--train-images", str(args.train_images),
        ]  # fmt: skip
        if args.ddp_amp:
            command.append("--ddp-amp")
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        if args.device == "cpu":
            env["OMP_NUM_THREADS"] = "1"
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.ddp_timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"torchrun exited {proc.returncode}: {proc.stderr.strip()[-1500:]}")
        result = json.loads(out.read_text())
    result["amp"] = args.ddp_amp
    result["one_process_images_per_s"] = one_gpu
    result["scaling"] = result["global_images_per_s"] / one_gpu if one_gpu else None
    return result


def latency_rows(args, device: torch.device) -> list[dict]:
    """The student's latency (pixel-space model, eval) per batch: FP32 and FP16, eager and CUDA graph on
    CUDA; FP32 eager on the CPU."""
    torch.manual_seed(0)
    base = PixelSpaceModel(build_model(args.student, args.classes), CIFAR_MEAN, CIFAR_STD).eval()
    precisions = (
        [("fp32", torch.float32), ("fp16", torch.float16)]
        if device.type == "cuda"
        else [("fp32", torch.float32)]
    )
    rows = []
    for name, dtype in precisions:
        model = base.to(device=device, dtype=dtype)
        for batch in args.latency_batch:
            x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch)).to(device, dtype)
            for graph in (False, True) if device.type == "cuda" else (False,):
                note = ""
                if device.type == "cuda":
                    samples, graphed, note = time_cuda(
                        model, x, warmup=20, runs=args.latency_runs, use_graph=graph
                    )
                else:
                    with torch.inference_mode():
                        samples = time_host(lambda m=model, x=x: m(x), warmup=3, runs=args.latency_runs)
                    graphed = False
                stats = latency_stats(samples)
                rows.append(
                    {
                        "precision": name,
                        "batch": batch,
                        "cuda_graph": graphed,
                        "p50_ms": stats.p50,
                        "p90_ms": stats.p90,
                        "images_per_s": batch / stats.p50 * 1e3,
                        **({"note": note} if note else {}),
                    }
                )
    return rows


def markdown(report: dict) -> str:
    m, a = report["machine"], report["args"]
    gpu = m.get("cuda_device") or "no CUDA device"
    lines = [
        "# GPU check: distillation throughput, DDP and the student's CUDA latency",
        "",
        f"Machine: {gpu} ({report.get('gpu_count', 0)} visible; {report.get('gpu_memory_gib', '-')} GiB), "
        f"CPU {m['cpu']} ({m['cpu_cores']} cores), torch {m['torch']}, CUDA {m['torch_cuda']}, "
        f"cuDNN {m['cudnn']}, device {a['device']}. {report['when']}.",
        f"Command: `{report['command']}`. Teacher {a['teacher']}, student {a['student']}, {a['classes']} "
        f"classes, batch {a['batch']}, random CIFAR-shaped tensors; median of {a['rounds']} rounds of "
        f"{a['steps']} steps. Took {report['seconds']:.0f} s.",
        "",
    ]
    rows = report.get("throughput")
    if rows:
        lines += [
            "| method | amp | channels_last | img/s (median) | min | max |",
            "|---|---|---|---|---|---|",
            *(
                f"| {r['method']} | {r['amp_dtype'] or 'off'} | {'on' if r['channels_last'] else 'off'} | "
                f"{r['images_per_s']:,.0f} | {r['min']:,.0f} | {r['max']:,.0f} |"
                for r in rows
            ),
            "",
        ]
        rate = {(r["method"], r["amp"], r["channels_last"]): r["images_per_s"] for r in rows}
        ratios = {  # name: (numerator, denominator) as (method, amp, channels_last)
            "fkd: --amp / fp32 (NCHW)": (("fkd", True, False), ("fkd", False, False)),
            "fkd: --amp / fp32 (channels_last)": (("fkd", True, True), ("fkd", False, True)),
            "fkd: channels_last / NCHW (fp32)": (("fkd", False, True), ("fkd", False, False)),
            "fkd: channels_last / NCHW (--amp)": (("fkd", True, True), ("fkd", True, False)),
            "robustkd-ta: --amp and channels_last / neither": (
                ("robustkd-ta", True, True),
                ("robustkd-ta", False, False),
            ),
            "robustkd-ta step time / fkd (fp32, NCHW)": (
                ("fkd", False, False),
                ("robustkd-ta", False, False),
            ),
        }
        lines += ["| ratio | value |", "|---|---|"]
        for name, (top, bottom) in ratios.items():
            if top in rate and bottom in rate:
                lines.append(f"| {name} | {rate[top] / rate[bottom]:.2f}x |")
        lines.append("")
    ddp = report.get("ddp")
    if isinstance(ddp, dict):
        lines += [
            f"DDP, {ddp['world_size']} ranks ({ddp['backend']}), fkd, batch {a['batch']} per rank: "
            f"{ddp['global_images_per_s']:,.0f} img/s in all; "
            f"one process {ddp['one_process_images_per_s'] or 0:,.0f} img/s; "
            f"scaling {ddp['scaling'] or 0:.2f}x; largest weight difference between ranks "
            f"{ddp['largest_weight_difference']:.1e}.",
            "",
        ]
    elif ddp:
        lines += [f"DDP: {ddp}.", ""]
    if report.get("latency"):
        lines += [
            f"Student {a['student']} latency (pixel-space model, eval):",
            "",
            "| precision | batch | CUDA graph | p50 ms | p90 ms | img/s |",
            "|---|---|---|---|---|---|",
            *(
                f"| {r['precision']} | {r['batch']} | {'yes' if r['cuda_graph'] else 'no'} | "
                f"{r['p50_ms']:.3f} | {r['p90_ms']:.3f} | {r['images_per_s']:,.0f} |"
                for r in report["latency"]
            ),
            "",
        ]
    for section, error in report.get("errors", {}).items():
        lines += [f"{section} failed: {error}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--teacher", default="wrn28-4")
    parser.add_argument("--student", default="wrn16-2")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-images", type=int, default=4096)
    parser.add_argument("--latency-batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--latency-runs", type=int, default=300)
    parser.add_argument("--ddp", choices=("auto", "on", "off"), default="auto",
                        help="auto: 2 ranks when 2 GPUs are visible; on: also on the CPU (gloo)")  # fmt: skip
    parser.add_argument("--ddp-amp", action="store_true", help="the DDP step with --amp")
    parser.add_argument("--ddp-timeout", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="tiny models and counts: checks the script runs")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_check.md")
    parser.add_argument("--ddp-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.ddp_worker:
        ddp_worker(args)
        return
    began = time.perf_counter()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    np.random.seed(0)
    report: dict = {
        "machine": machine_info(),
        "when": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:]),
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "ddp_worker")},
        "errors": {},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        report["gpu_count"] = torch.cuda.device_count()
        report["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        report["gpu_capability"] = f"{props.major}.{props.minor}"
        report["bf16"] = torch.cuda.is_bf16_supported()
    data = random_cifar(args.train_images, args.classes)
    sections = [("throughput", lambda: throughput_rows(args, data, device, report["errors"]))]
    two_gpus = device.type == "cuda" and torch.cuda.device_count() >= 2
    if args.ddp == "on" or (args.ddp == "auto" and two_gpus):

        def run_ddp():
            one = [
                r for r in report.get("throughput", []) if r["method"] == "fkd" and r["amp"] == args.ddp_amp
            ]
            one = [r for r in one if r["channels_last"] == (device.type == "cpu")]
            return ddp_row(args, one[0]["images_per_s"] if one else None)

        sections.append(("ddp", run_ddp))
    else:
        report["ddp"] = (
            "not run (one GPU visible)"
            if device.type == "cuda"
            else "not run (--ddp on to run it on the CPU)"
        )
    sections.append(("latency", lambda: latency_rows(args, device)))
    for name, section in sections:
        start = time.perf_counter()
        try:
            report[name] = section()
        except Exception as exc:  # report what failed and go on: one run should give everything it can
            report["errors"][name] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    report["seconds"] = time.perf_counter() - began
    text = markdown(report)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for path, body in (
        (args.out, text),
        (args.out.with_suffix(".json"), json.dumps(report, indent=2) + "\n"),
    ):
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(body)
        os.replace(tmp, path)
    sys.exit(1 if report["errors"] else 0)


if __name__ == "__main__":
    main()
