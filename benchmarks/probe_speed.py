"""Batched trigger application and ASR against the image-by-image Python loop, measured in one run.

    .venv/bin/python benchmarks/probe_speed.py [--images 2000] [--asr-images 360] [--threads 1,2]

Two measurements, each the median of `--repeats` alternating runs of both variants:
1. applying every probe of the bank to a set of pixel-space images: `Probe.apply` on the whole tensor
   against a Python loop calling it once per image;
2. the ASR of a real model (WRN-16-1, untrained weights: the cost does not depend on them) on the digits
   test split for two probes: `probe_results` (batches of 512) against a loop that triggers, normalises and
   classifies one image at a time.
Writes benchmarks/results/probe_speed.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from rkdtool.data import load_dataset, normalize
from rkdtool.models import build_model
from rkdtool.probes.bank import probe_bank
from rkdtool.probes.metrics import asr_from_predictions, probe_results

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_pair(batched, looped, repeats: int) -> tuple[float, float]:
    times_b, times_l = [], []
    for _ in range(repeats):  # alternate, so a load change on a shared machine hits both alike
        times_b.append(timed(batched))
        times_l.append(timed(looped))
    return statistics.median(times_b), statistics.median(times_l)


def measure(args, threads: int) -> dict:
    torch.set_num_threads(threads)
    bank = probe_bank()
    images = torch.rand(args.images, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def apply_batched():
        for probe in bank:
            probe.apply(images)

    def apply_looped():
        for probe in bank:
            torch.stack([probe.apply(img[None])[0] for img in images])

    for probe in bank:  # the two variants agree before they are timed
        assert torch.allclose(
            probe.apply(images[:64]), torch.stack([probe.apply(i[None])[0] for i in images[:64]])
        )
    apply_b, apply_l = median_pair(apply_batched, apply_looped, args.repeats)

    data = load_dataset("digits").subset(test=args.asr_images, seed=0)
    model = build_model("wrn16-1", data.num_classes).eval()
    probes = [bank[0].with_target(0), bank[9]]

    def asr_batched():
        return probe_results(model, data.test_images, data.test_labels, probes, mean=data.mean, std=data.std)

    @torch.inference_mode()
    def asr_looped():
        out = {}
        for probe in probes:
            preds = torch.stack(
                [
                    model(normalize(probe.apply(img[None]), data.mean, data.std))[0].argmax()
                    for img in data.test_images
                ]
            )
            out[probe.name] = asr_from_predictions(preds, data.test_labels, probe.target)
        return out

    batched, looped = asr_batched(), asr_looped()
    assert all(abs(batched[p.name].asr - looped[p.name].asr) < 1e-9 for p in probes)
    asr_b, asr_l = median_pair(asr_batched, asr_looped, max(1, args.repeats // 2))

    return {
        "threads": threads,
        "trigger_application": {
            "probes": len(bank),
            "images": args.images,
            "batched_s": apply_b,
            "per_image_loop_s": apply_l,
            "speedup": apply_l / apply_b,
        },
        "asr_end_to_end": {
            "model": "wrn16-1",
            "dataset": "digits test split",
            "images": len(data.test_labels),
            "probes": len(probes),
            "batched_s": asr_b,
            "per_image_loop_s": asr_l,
            "speedup": asr_l / asr_b,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="images for the trigger-application test")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", default="1,2", help="torch thread counts to measure, comma-separated")
    parser.add_argument("--asr-images", type=int, default=360, help="digits test images for the ASR test")
    args = parser.parse_args()
    runs = [measure(args, int(t)) for t in args.threads.split(",")]
    result = {
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        "runs": runs,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "probe_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"machine: {result['machine']}\n")
    print(
        "| torch threads | measurement | batched (s) | per-image loop (s) | speed-up |\n|---|---|---|---|---|"
    )
    for run in runs:
        for key, label in (
            ("trigger_application", "apply 11 bank probes"),
            ("asr_end_to_end", "ASR, 2 probes"),
        ):
            row = run[key]
            print(
                f"| {run['threads']} | {label} ({row['images']} images) | {row['batched_s']:.4f} | "
                f"{row['per_image_loop_s']:.3f} | {row['speedup']:.1f}x |"
            )


if __name__ == "__main__":
    main()
