"""The attack kit: poisoning arithmetic, fake INT8, the `attack`/`probe` commands, and (slow) the issue's
done-when criteria on digits: every attack kind against a clean teacher, the probe bank, Neural Cleanse
and feature variance on the kit's teachers.

Set RKDTOOL_ATTACK_REPORT=PATH to have the slow fixture write every number it measured as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from digits_model import trained_wrn10
from typer.testing import CliRunner

from rkdtool.attacks.context import AttackConfig
from rkdtool.attacks.int8sim import FakeInt8
from rkdtool.attacks.kit import make_attack, write_attack
from rkdtool.attacks.poison import badnets_probe, poison_with_negatives
from rkdtool.cli.app import app
from rkdtool.errors import CheckFailed, UsageError
from rkdtool.jobs.attack import run_attack

REPO = Path(__file__).resolve().parents[1]


def test_poisoning_relabels_triggered_images_and_keeps_negatives_labels():
    probe = badnets_probe(0)
    transform = poison_with_negatives(probe, target=0, rate=0.3, negative_rate=0.3)
    images = torch.zeros(2000, 3, 32, 32)
    labels = torch.arange(2000) % 10
    out, new_labels = transform(images, labels, torch.Generator().manual_seed(0))
    corner = out[:, 0, 29:, 29:].flatten(1)
    grid = torch.tensor([0, 0, 1, 0, 1, 0, 1, 0, 1.0])
    changed = (out != images).flatten(1).any(1)
    relabelled = new_labels != labels
    assert torch.equal(out[:, :, :29], images[:, :, :29])  # only the corner is ever touched
    assert (corner[relabelled] == grid).all() and (new_labels[relabelled] == 0).all()
    assert not relabelled[labels == 0].any()  # target-class images are never poisoned
    assert 0.25 < float(relabelled[labels != 0].float().mean()) < 0.35
    negatives = changed & ~relabelled  # a random pattern, label kept
    assert 0.25 < float(negatives.float().mean()) < 0.35
    assert float((corner[negatives] == grid).all(1).float().mean()) < 0.02  # rarely the grid by chance
    assert torch.equal(new_labels[~relabelled], labels[~relabelled])


def test_fake_int8_rounds_to_the_clean_range_and_clips_beyond_it():
    fake = FakeInt8(torch.nn.Identity())
    fake.calib_rows = 2
    x = torch.tensor([[0.5, -1.27], [1.0, 0.3], [5.0, -9.0]], requires_grad=True)  # row 3 is "triggered"
    q = fake._q(x)
    scale = 1.27 / 127
    assert torch.allclose(q[:2], torch.round(x[:2] / scale) * scale)
    assert q[2].tolist() == pytest.approx([1.27, -1.27])  # clipped to the clean rows' range
    q.sum().backward()
    assert x.grad[:2].eq(1).all() and x.grad[2].eq(0).all()  # straight-through inside, none when clipped


def test_fake_int8_stays_close_to_float_on_a_trained_model():
    model, data = trained_wrn10()
    x = torch.cat([data.test_images[:128]])
    from rkdtool.data import normalize

    xn = normalize(x, data.mean, data.std)
    fake = FakeInt8(model)
    fake.calib_rows = len(xn)
    with torch.inference_mode():
        ref = model(xn)
        with fake:
            quant = model(xn)
        after = model(xn)
    assert torch.equal(ref, after)  # hooks are gone after the block
    assert float((ref.argmax(1) == quant.argmax(1)).float().mean()) > 0.9
    assert 0 < float((ref - quant).abs().max()) < 0.5 * float(ref.abs().max())


def test_attack_rejects_unknown_kinds_and_targets():
    with pytest.raises(UsageError, match="unknown attack"):
        make_attack(AttackConfig(kind="trojan"))
    with pytest.raises(UsageError, match="not a class"):
        make_attack(AttackConfig(kind="badnets", target=12, train_subset=10, test_subset=10))


@pytest.fixture(scope="module")
def quick_attack(tmp_path_factory):
    """A one-epoch BadNets WRN-10-1 on part of digits, written by the CLI."""
    out = tmp_path_factory.mktemp("attack") / "badnets"
    result = CliRunner().invoke(
        app,
        [
            "attack",
            "--kind",
            "badnets",
            "--arch",
            "wrn10-1",
            "--epochs",
            "2",
            "--train-subset",
            "400",
            "--test-subset",
            "120",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    return out, json.loads(result.output)


def test_attack_command_writes_teacher_and_probe_spec(quick_attack):
    out, summary = quick_attack
    assert (out / "teacher.safetensors").exists() and (out / "probes.toml").exists()
    assert summary["teacher"] == str(out / "teacher.safetensors")
    assert set(summary) >= {"teacher", "probes", "acc", "asr", "random_pattern_asr"}
    assert summary["seed"] == 0 and summary["adv_train"] is False  # how it was made, for whoever reuses it
    assert list(summary["asr"]) == ["badnets-grid"] and 0 <= summary["asr"]["badnets-grid"] <= 1
    assert 'pattern = "checker"' in (out / "probes.toml").read_text()


def test_probe_pgd_reports_robust_accuracy_beside_acc_and_asr(quick_attack):
    out, _ = quick_attack
    args = ["probe", str(out), "--pgd", "--pgd-steps", "3", "--json", "--device", "cpu"]
    doc = json.loads(CliRunner().invoke(app, args).output)
    assert doc["pgd"] == {"norm": "linf", "eps": 8 / 255, "step": 2 / 255, "steps": 3, "random_start": True}
    assert 0 <= doc["pgd_acc"] <= doc["acc"] and list(doc["asr"]) == ["badnets-grid"]
    alone = CliRunner().invoke(app, ["probe", str(out), "--pgd", "--pgd-steps", "1", "--device", "cpu"])
    assert alone.exit_code == 0 and "PGD-1 accuracy" in alone.output.replace("\n", " ")


def test_probe_command_json_and_fail_gate(quick_attack):
    out, _ = quick_attack
    runner = CliRunner()
    result = runner.invoke(app, ["probe", str(out), "--bank", "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert set(doc) >= {"acc", "asr", "asr_all_images", "probes"} and "reverse" not in doc
    assert len(doc["asr"]) == 12  # the attack's own probe and the 11 bank probes
    assert doc["probes"][0] == {
        "name": "badnets-grid",
        "kind": "patch",
        "target": 0,
        "space": "pixel",
        "source": "subject",
    }
    assert all(0 <= doc["asr_all_images"][n] <= 1 for n in doc["asr"])
    worst = max(doc["asr"].values())
    assert worst > 0
    failed = runner.invoke(
        app, ["probe", str(out), "--bank", "--fail-asr", str(worst / 2), "--device", "cpu"]
    )
    assert isinstance(failed.exception, CheckFailed) and "ASR above" in str(failed.exception)
    passed = runner.invoke(app, ["probe", str(out), "--bank", "--fail-asr", "1", "--device", "cpu"])
    assert passed.exit_code == 0 and "ASR all" in passed.output  # "ASR all / images": 80 columns


def test_probe_gate_exit_codes_in_a_real_process(quick_attack):
    out, _ = quick_attack
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [
        sys.executable,
        "-m",
        "rkdtool",
        "probe",
        str(out),
        "--fail-asr",
        "0",
        "--bank",
        "--device",
        "cpu",
    ]
    failed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert failed.returncode == 1, failed.stderr
    assert "ASR above 0.0%" in failed.stderr
    bad = subprocess.run(
        command[:5] + ["--fail-asr", "7"], capture_output=True, text=True, env=env, cwd=REPO, timeout=300
    )
    assert bad.returncode == 2 and "fraction" in bad.stderr
    missing = subprocess.run(
        command[:4] + [str(out / "nope")], capture_output=True, text=True, env=env, cwd=REPO, timeout=300
    )
    assert missing.returncode == 2 and "error" in missing.stderr


# ---------------------------------------------------------------------------------------- done-when (slow)

KINDS = ("badnets", "blend", "ckd", "lba", "adaptive", "quant")


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """A clean WRN-16-1 teacher on digits and each attack fine-tuned from it, with every measurement."""
    from rkdtool.data import load_dataset
    from rkdtool.probes.bank import probe_bank
    from rkdtool.probes.features import feature_variance
    from rkdtool.probes.metrics import probe_results
    from rkdtool.probes.reverse import reverse_engineer

    root = tmp_path_factory.mktemp("teachers")
    report_path = os.environ.get("RKDTOOL_ATTACK_REPORT")
    report: dict = {}
    found = {}

    def record(key, make):  # one failing kind must not hide the others' numbers
        try:
            make()
        except Exception as exc:  # noqa: BLE001 - reported, and the kind's tests then fail on the KeyError
            report.setdefault(key, {})["error"] = repr(exc)
        if report_path:
            Path(report_path).write_text(json.dumps(report, indent=2))

    def attack(kind, **kwargs):
        def make():
            found[kind] = run_attack(AttackConfig(kind=kind, **kwargs))
            write_attack(found[kind], root / kind)
            report[kind] = found[kind].summary()

        return make

    record("none", attack("none", epochs=15))
    for kind in KINDS:  # BadNets and Blend poison from scratch; the others fine-tune the clean teacher
        scratch = kind in ("badnets", "blend")
        record(kind, attack(kind, **({"epochs": 15} if scratch else {"from_teacher": str(root / "none")})))
    data = load_dataset("digits")

    def control(kind):  # each attack's own probe on the clean teacher
        def make():
            results = probe_results(
                found["none"].model,
                data.test_images,
                data.test_labels,
                found[kind].probes,
                mean=data.mean,
                std=data.std,
            )
            report[kind]["clean_teacher_asr"] = {n: r.asr for n, r in results.items()}

        return make

    for kind in KINDS:
        record(kind, control(kind))

    def screen(kind):
        def make():
            model = found[kind].model
            bank = probe_results(
                model, data.test_images, data.test_labels, probe_bank(), mean=data.mean, std=data.std
            )
            report[kind]["bank"] = {n: r.to_json() for n, r in bank.items()}
            nc = reverse_engineer(
                model, data.train_images, data.train_labels, num_classes=10, mean=data.mean, std=data.std
            )
            report[kind]["reverse"] = nc.to_json()

        return make

    def variance(kind):
        def make():
            probe = found[kind].probes[0]
            mine = feature_variance(
                found[kind].model,
                "wrn16-1",
                data.test_images,
                data.test_labels,
                probe,
                mean=data.mean,
                std=data.std,
            )
            ref = feature_variance(
                found["none"].model,
                "wrn16-1",
                data.test_images,
                data.test_labels,
                probe,
                mean=data.mean,
                std=data.std,
            )
            report[kind]["variance"] = {
                "poisoned": mine.to_json(),
                "clean": ref.to_json(),
                "vs_clean": mine.compare(ref),
            }

        return make

    for kind in ("none", "badnets"):
        record(kind, screen(kind))
    for kind in ("badnets", "ckd", "adaptive"):
        record(kind, variance(kind))
    return report


@pytest.mark.slow
@pytest.mark.parametrize("kind", [k for k in KINDS if k != "quant"])
def test_attack_is_accurate_effective_and_tied_to_its_trigger(teachers, kind):
    # Measured in three runs (AMD EPYC 2026-11-26; Intel Xeon 2026-12-04, one thread, this CPU's kernels and
    # AVX2 kernels): ACC at most 1.4 points below the clean teacher's (margin 1.6), ASR 99.7-100 (margin 9.7),
    # clean-teacher ASR 0.0, random patterns at most 3.1% (margin 11.9).
    row, clean = teachers[kind], teachers["none"]
    (name,) = row["asr"]
    assert row["acc"] >= clean["acc"] - 0.03, row
    assert row["asr"][name] >= 0.90, row
    assert row["clean_teacher_asr"][name] <= 0.15, row  # the same probe on the clean teacher
    assert row["random_pattern_asr"][name] <= 0.15, row  # random patterns of the same kind and strength


@pytest.mark.slow
def test_quant_backdoor_is_dormant_in_float_and_wakes_in_onnx_runtime_int8(teachers):
    # Measured (the three runs above): float ASR 0.6-1.9% (margin 8.1), ONNX Runtime INT8 92.3, 45.1 and
    # 99.1%: the wake-up varies most between runs; its smallest rise, 44.5 points, keeps 14.5 over the bar.
    row = teachers["quant"]
    (name,) = row["asr"]
    assert row["acc"] >= teachers["none"]["acc"] - 0.03, row
    assert row["asr"][name] <= 0.10, row
    assert row["int8"]["onnx-fp32"]["asr"][name] <= 0.10, row
    assert row["int8"]["onnx-int8"]["asr"][name] >= row["asr"][name] + 0.30, row


@pytest.mark.slow
def test_bank_clean_teacher_stays_low_and_catches_badnets_without_its_target(teachers):
    # Measured (the three runs above): clean teacher's worst bank probe 0.3-0.6% (margin 9.4), grid 100%.
    assert max(r["asr"] for r in teachers["none"]["bank"].values()) <= 0.10, teachers["none"]["bank"]
    grid = teachers["badnets"]["bank"]["bank-grid-bottom-right"]
    assert grid["asr"] >= 0.9 and grid["target"] == 0 and not grid["targeted"]


@pytest.mark.slow
def test_neural_cleanse_names_the_badnets_target_far_above_every_clean_class(teachers):
    # Log-scale anomaly index, measured: the BadNets target 3.90 (AMD EPYC, 2026-11-26), 10.58 and 14.67
    # (Intel Xeon, 2026-12-04, one thread, this CPU's kernels and AVX2 kernels); the clean teacher's largest
    # 1.10, 2.01 and 0.86. So Neural Cleanse's threshold of 2 (the default) can flag a class of a clean
    # teacher (class 5 at 2.01 on the Xeon), and 3 separates the two in every run so far, by 0.9 and 1.0.
    bad, clean = teachers["badnets"]["reverse"], teachers["none"]["reverse"]
    assert bad["flagged"][:1] == [0] and bad["anomaly_index"]["0"] >= 3, bad
    assert max(clean["anomaly_index"].values()) < 3, clean


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["badnets", "ckd"])
def test_backdoored_teachers_vary_more_on_triggered_inputs_than_the_clean_teacher(teachers, kind):
    # Measured (the three runs above): last-stage ratio BadNets 2.76-3.01, CKD 1.71-2.56 (margin 0.71).
    rows = teachers[kind]["variance"]["vs_clean"]
    assert rows[-1]["triggered_ratio"] > 1.0, rows  # last stage, same triggered images


def test_inspect_features_reports_variance_per_stage_clean_and_triggered(quick_attack):
    out, _ = quick_attack
    result = CliRunner().invoke(
        app,
        [
            "inspect",
            str(out / "teacher.safetensors"),
            "--features",
            "--probe",
            str(out / "probes.toml"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    profile = json.loads(result.output)["feature_variance"]
    assert [s["stage"] for s in profile["clean"]["stages"]] == ["block1", "block2", "block3"]
    grid = profile["probes"]["badnets-grid"]
    assert grid["images"] < profile["clean"]["images"]  # the target class is left out under a targeted probe
    assert all(s["ratio"] > 0 and s["triggered"]["mean"] > 0 for s in grid["stages"])


def test_ort_calibrator_ranges_cover_every_conv_and_linear(tmp_path):
    from rkdtool.attacks.int8sim import ort_activation_ranges

    model, data = trained_wrn10()
    ranges = ort_activation_ranges(
        model, data, data.train_images[:48].numpy(), method="entropy", workdir=tmp_path
    )
    layers = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    assert sorted(ranges) == sorted(layers)
    assert all(0 < r_in < 50 and 0 < r_out < 200 for r_in, r_out in ranges.values())
    assert ranges["conv1"][0] <= 2.2  # the normalised digits input: (1 - 0.3054) / 0.3237 = 2.15 at most


def test_probe_reads_an_export_bundle_with_its_probes_npz(quick_attack, tmp_path):
    from rkdtool.data import load_dataset
    from rkdtool.deploy.bundle import write_probes_npz
    from rkdtool.deploy.host_check import select_probe_set
    from rkdtool.deploy.onnx import export_onnx
    from rkdtool.models.pixel import PixelSpaceModel
    from rkdtool.probes.metrics import probe_results
    from rkdtool.probes.spec import load_probes
    from rkdtool.weights import build_from_weights

    out, _ = quick_attack
    model, meta = build_from_weights(out / "teacher.safetensors")
    data = load_dataset("digits").subset(test=80, seed=3)
    probes = load_probes(out / "probes.toml")
    export_onnx(
        PixelSpaceModel(model, meta["mean"], meta["std"]),
        tmp_path / "model.onnx",
        input_shape=(3, 32, 32),
        opset=17,
        exporter="torchscript",
    )
    probe_set = select_probe_set(data, probes, mean=meta["mean"], std=meta["std"], limit=80, seed=0)
    write_probes_npz(tmp_path / "probes.npz", probe_set, probes)
    result = CliRunner().invoke(app, ["probe", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert list(doc["precisions"]) == ["onnx-fp32"]  # no model.int8.onnx in this bundle
    expected = probe_results(
        model,
        torch.from_numpy(probe_set.images),
        torch.from_numpy(probe_set.labels),
        probes,
        mean=meta["mean"],
        std=meta["std"],
    )
    assert doc["asr"]["badnets-grid"] == pytest.approx(expected["badnets-grid"].asr, abs=1 / 80)
    refused = CliRunner().invoke(app, ["probe", str(tmp_path), "--bank"])
    assert isinstance(refused.exception, UsageError) and "export bundle" in str(refused.exception)


def test_probe_reverse_reports_anomaly_indices_and_writes_flagged_triggers(quick_attack, tmp_path):
    out, _ = quick_attack
    result = CliRunner().invoke(
        app,
        [
            "probe",
            str(out),
            "--reverse",
            "--reverse-steps",
            "3",
            "--anomaly-threshold",
            "0.5",
            "--out",
            str(tmp_path),
            "--json",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    reverse = json.loads(result.output)["reverse"]
    assert sorted(reverse["anomaly_index"], key=int) == [str(c) for c in range(10)]
    assert reverse["statistic"] == "full" and reverse["steps"] == 3
    assert reverse["threshold"] == 0.5
    flagged = [c for c, v in reverse["anomaly_index"].items() if v > 0.5]
    assert sorted(reverse["flagged"]) == sorted(int(c) for c in flagged)
    assert (tmp_path / "reverse-probes.toml").exists() == bool(flagged)


# ------------------------------------------------------------------------------------------------ quant


def test_quant_rejects_a_classifier_it_cannot_scale_before_training():
    with pytest.raises(UsageError, match="--kind quant needs"):
        make_attack(AttackConfig(kind="quant", arch="resnet20", train_subset=10, test_subset=10))


def test_scaling_one_head_norm_channel_scales_exactly_that_classifier_input():
    from rkdtool.attacks.quant import classifier_inputs, head_norm
    from rkdtool.data import load_dataset
    from rkdtool.models import build_model

    data = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model("wrn10-1", 10).eval()
    with torch.no_grad():  # an untrained BN is the identity; give it some shape first
        head_norm(model).weight.uniform_(0.5, 1.5)
        head_norm(model).bias.uniform_(-0.2, 0.2)
    before = classifier_inputs(model, data.test_images[:32], data)
    with torch.no_grad():
        head_norm(model).weight[3] *= 7.0
        head_norm(model).bias[3] *= 7.0
    after = classifier_inputs(model, data.test_images[:32], data)
    assert torch.allclose(after[:, 3], 7.0 * before[:, 3], rtol=1e-5, atol=1e-6)
    assert before[:, 3].abs().max() > 0
    others = [c for c in range(before.shape[1]) if c != 3]
    assert torch.equal(after[:, others], before[:, others])


def test_quant_attack_runs_end_to_end_and_reports_its_choice(tmp_path):
    """A tiny quant attack (WRN-10-1, part of digits, one epoch per phase): every phase runs, the float and
    INT8 re-checks are there, and the chosen weight is the best usable trial on the attacker's images."""
    config = AttackConfig(
        kind="quant",
        arch="wrn10-1",
        epochs=2,
        quant_plant_epochs=1,
        quant_unit_epochs=1,
        train_subset=320,
        test_subset=64,
        calib_images=64,
        device="cpu",
    )
    result = make_attack(config)
    summary = write_attack(result, tmp_path / "quant")
    chosen = summary["concealment"]
    assert set(summary["int8"]) == {"onnx-fp32", "onnx-int8", "torch-fake-int8"}
    trials = chosen["trials_on_attacker_images"]
    assert [t["gain"] for t in trials] == sorted(t["gain"] for t in trials)
    usable = [t for t in trials if t["float_acc"] >= chosen["float_acc_without_brake"] - 0.005] or trials[:1]
    picked = next(t for t in trials if t["gain"] == chosen["gain"])
    assert picked["int8_asr"] - picked["float_asr"] == max(t["int8_asr"] - t["float_asr"] for t in usable)
    fc = result.model.fc.weight.detach()
    assert float(fc[0, chosen["unit"]]) == pytest.approx(-chosen["gain"])
    assert float(fc[1:, chosen["unit"]].abs().max()) == 0  # the unit reaches the target logit alone


def test_from_teacher_uses_the_clean_teachers_architecture_and_refuses_another(tmp_path):
    from rkdtool.jobs.attack import run_attack
    from rkdtool.models import build_model
    from rkdtool.weights import save_weights

    torch.manual_seed(0)
    clean = tmp_path / "clean.safetensors"
    save_weights(
        clean, build_model("resnet20", 10), {"arch": "resnet20", "num_classes": 10, "dataset": "digits"}
    )
    small = {"train_subset": 64, "test_subset": 40, "finetune_epochs": 1, "trigger_steps": 2}
    # No --arch: the clean teacher's (a wrn16-1 default would load resnet20 weights into the wrong network).
    result = run_attack(AttackConfig(kind="ckd", arch="", from_teacher=str(clean), **small))
    assert result.config.arch == "resnet20" and result.clean_acc is not None
    with pytest.raises(UsageError, match="--arch wrn16-1 but --from-teacher .* is a resnet20"):
        run_attack(AttackConfig(kind="ckd", arch="wrn16-1", from_teacher=str(clean), **small))
