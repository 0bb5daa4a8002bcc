"""White-box universal targeted triggers, optimised on the student itself: how large a trigger must be before
a model sends most images to the target, whatever taught it (issue 13).

    python benchmarks/universal_trigger.py NAME=WEIGHTS [NAME=WEIGHTS ...] [--arch wrn10-1] [--target 0]
        [--blend 0.2 0.3 0.5] [--patch 4 8] [--steps 300] [--out benchmarks/results/universal_trigger.md]

For each model (a safetensors file, e.g. a run's `students/robustkd-ta.safetensors`) and each budget, Adam
optimises one pattern (and for blends the per-pixel mask, bounded by the budget) to send non-target training
images to `--target`, with the model frozen; the ASR is then measured on the test split like any probe.
Blends: (1 - m) x + m p with m in [0, b]. Patches: a k x k square of full strength in the bottom-right corner.
This is an upper bound for an attacker who only chooses a trigger (it sees the defended student), and the
same search on a student of the clean teacher says which budgets are a backdoor and which are an ordinary
universal adversarial perturbation of any digits model.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

from rkdtool.data import augment, load_dataset, normalize
from rkdtool.machine import cpu_summary
from rkdtool.models import build_model
from rkdtool.probes.metrics import probe_results
from rkdtool.probes.spec import Probe
from rkdtool.training import frozen
from rkdtool.weights import load_weights

RESULTS = Path(__file__).resolve().parent / "results"


def universal_trigger(model, data, target: int, kind: str, budget: float, steps: int, seed: int = 0) -> Probe:
    """Gives back the probe Adam found on `model` (frozen, eval) for a blend of bound `budget` or a patch of
    side `budget`."""
    g = torch.Generator().manual_seed(seed)
    h, w = data.train_images.shape[-2:]
    theta = (0.1 * torch.randn(3, h, w, generator=g)).requires_grad_(True)
    mask_logit = torch.zeros(1, h, w, requires_grad=True)
    patch = torch.zeros(1, h, w)
    if kind == "patch":
        k = int(budget)
        patch[:, h - k - 1 : h - 1, w - k - 1 : w - 1] = 1.0

    def trigger():
        mask = patch if kind == "patch" else budget * torch.sigmoid(mask_logit)
        return torch.sigmoid(theta), mask

    optimizer = torch.optim.Adam([theta, mask_logit], lr=0.05)
    images = data.train_images[data.train_labels != target]
    goal = torch.full((64,), target)
    with frozen(model):
        model.eval()
        for _ in range(steps):
            x = augment(images[torch.randint(0, len(images), (64,), generator=g)], data.augmentation, g)
            pattern, mask = trigger()
            logits = model(normalize((1 - mask) * x + mask * pattern, data.mean, data.std))
            loss = nn.functional.cross_entropy(logits, goal)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        pattern, mask = trigger()
    return Probe(f"{kind}-{budget:g}", "image-mask", target, pattern, mask)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", help="NAME=WEIGHTS.safetensors")
    parser.add_argument("--arch", default="wrn10-1")
    parser.add_argument("--data", default="digits")
    parser.add_argument("--target", type=int, default=0)
    parser.add_argument("--blend", type=float, nargs="*", default=[0.2, 0.3, 0.5])
    parser.add_argument("--patch", type=int, nargs="*", default=[4, 8])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=RESULTS / "universal_trigger.md")
    args = parser.parse_args()
    data = load_dataset(args.data)
    budgets = [("blend", b) for b in args.blend] + [("patch", float(k)) for k in args.patch]
    rows = {}
    for spec in args.models:
        name, _, path = spec.partition("=")
        model = build_model(args.arch, data.num_classes)
        model.load_state_dict(load_weights(Path(path))[0])
        for kind, budget in budgets:
            probe = universal_trigger(model, data, args.target, kind, budget, args.steps)
            result = probe_results(
                model, data.test_images, data.test_labels, [probe], mean=data.mean, std=data.std
            )
            rows.setdefault(name, {})[probe.name] = result[probe.name].asr
            print(f"{name} {probe.name}: ASR {result[probe.name].asr:.1%}", flush=True)
    machine = cpu_summary()
    names = [f"{k}-{b:g}" for k, b in budgets]
    lines = [
        "# White-box universal targeted triggers, optimised on each model",
        "",
        f"Machine: {machine['cpu']}, {machine['torch_threads']} torch threads, kernels "
        f"{machine['numerics_env'] or 'default'}. {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. "
        f"Models: {', '.join(args.models)}; {args.arch} on {args.data}, target {args.target}, "
        f"{args.steps} Adam steps each.",
        "",
        "| model | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
        *(f"| {m} | " + " | ".join(f"{r[n]:.1%}" for n in names) + " |" for m, r in rows.items()),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"machine": machine, "asr": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
