"""Teacher references and safe loading, on a fake Hugging Face cache and files the tests make themselves.

No network: huggingface_hub reads the cache laid out as it lays it out (models--OWNER--REPO/...), with
HF_HUB_OFFLINE=1, and an unreachable Hub is simulated by making HfApi.model_info fail.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import time
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi
from torch import nn
from typer.testing import CliRunner

from rkdtool import load_model
from rkdtool.cli.app import app
from rkdtool.data import CIFAR_MEAN, CIFAR_STD
from rkdtool.errors import NotFoundError, UnsafeCheckpointError, UsageError
from rkdtool.hub import parse_ref, pick_weights_file, read_checkpoint
from rkdtool.models import build_model
from rkdtool.weights import save_weights

REPO = "lixiao985/WideResNet28-4"
FILENAME = "CIFAR100-wresnet28-4_78.37%.pt"
COMMIT = "30e411e" + "5c0ffee" * 4 + "c0de1"  # 40 hex digits, like a git commit
REPO_ROOT = Path(__file__).resolve().parents[1]


# --- A reference pre-activation WRN, written here from the xternalz/RobustKD `models/WideResNet.py` layout
# (independent of rkdtool.models.wrn).


class RefBlock(nn.Module):
    def __init__(self, in_planes, out_planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equalInOut = in_planes == out_planes
        self.convShortcut = (
            (not self.equalInOut) and nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False) or None
        )

    def forward(self, x):
        if not self.equalInOut:
            x = self.relu1(self.bn1(x))
            out = self.relu2(self.bn2(self.conv1(x)))
        else:
            out = self.relu1(self.bn1(x))
            out = self.relu2(self.bn2(self.conv1(out)))
        out = self.conv2(out)
        return torch.add(x if self.equalInOut else self.convShortcut(x), out)


class RefNetworkBlock(nn.Module):
    def __init__(self, nb_layers, in_planes, out_planes, stride):
        super().__init__()
        self.layer = nn.Sequential(
            *[
                RefBlock(i == 0 and in_planes or out_planes, out_planes, i == 0 and stride or 1)
                for i in range(nb_layers)
            ]
        )

    def forward(self, x):
        return self.layer(x)


class RefWideResNet(nn.Module):
    def __init__(self, depth, num_classes, widen_factor):
        super().__init__()
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
        self.block1 = RefNetworkBlock(n, ch[0], ch[1], 1)
        self.block2 = RefNetworkBlock(n, ch[1], ch[2], 2)
        self.block3 = RefNetworkBlock(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(ch[3], num_classes)
        self.nChannels = ch[3]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(
                    m.weight, 0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels))
                )
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        out = nn.functional.avg_pool2d(out, 8)
        return self.fc(out.view(-1, self.nChannels))


def reference_wrn28_4(seed: int = 0) -> RefWideResNet:
    """A freshly initialised WRN-28-4 for CIFAR-100, with non-trivial BN statistics (loading them counts)."""
    torch.manual_seed(seed)
    model = RefWideResNet(28, 100, 4)
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.05)
            m.num_batches_tracked.fill_(97)
    return model.eval()


def save_as_from_cuda0(obj, path: Path) -> None:
    """torch.save with every storage tagged `cuda:0`, as the original teacher was saved (algorithms.md §7).

    No GPU here: a temporary location tagger makes the archive record cuda:0, so loading it needs
    map_location='cpu' exactly as the real file does.
    """
    from torch.serialization import _package_registry, register_package

    def tag_cuda0(storage):
        return "cuda:0" if storage.device.type == "cpu" else None

    register_package(0, tag_cuda0, lambda obj, location: None)
    try:
        torch.save(obj, path)
    finally:
        _package_registry[:] = [entry for entry in _package_registry if entry[1] is not tag_cuda0]


def lay_out_hf_cache(hf_home: Path, repo: str, files: dict[str, bytes], commit: str = COMMIT) -> Path:
    """Writes huggingface_hub's cache layout: blobs/<hash>, snapshots/<commit>/<file> -> blob, refs/main."""
    folder = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = hashlib.sha256(data).hexdigest()  # LFS blobs are named by their sha256
        (folder / "blobs" / blob).write_bytes(data)
        os.symlink(os.path.relpath(folder / "blobs" / blob, snapshot), snapshot / name)
    return snapshot


@pytest.fixture(scope="module")
def original_checkpoint(tmp_path_factory) -> tuple[RefWideResNet, bytes]:
    """The reference WRN-28-4 and the bytes of its state dict saved as the lixiao985 file was."""
    model = reference_wrn28_4()
    path = tmp_path_factory.mktemp("ckpt") / FILENAME
    save_as_from_cuda0(model.state_dict(), path)
    return model, path.read_bytes()


@pytest.fixture
def hf_home(tmp_path, monkeypatch, original_checkpoint) -> Path:
    home = tmp_path / "hf"
    lay_out_hf_cache(home, REPO, {FILENAME: original_checkpoint[1]})
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def go_online(monkeypatch) -> None:
    """Clears HF_HUB_OFFLINE (huggingface_hub also keeps the value it read at import)."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_fixture_is_saved_like_the_original(original_checkpoint, tmp_path):
    model, data = original_checkpoint
    path = tmp_path / "w.pt"
    path.write_bytes(data)
    with zipfile.ZipFile(path) as archive:
        pickled = next(archive.read(n) for n in archive.namelist() if n.endswith("data.pkl"))
    assert b"cuda:0" in pickled
    with pytest.raises(RuntimeError, match="CUDA"):  # exactly why map_location='cpu' is needed
        torch.load(path, weights_only=True)
    state = torch.load(path, weights_only=True, map_location="cpu")
    assert type(state) is OrderedDict and len(state) == 155
    assert sum(v.numel() for k, v in state.items() if k in dict(model.named_parameters())) == 5_872_180


def test_hf_reference_loads_from_the_offline_cache(hf_home, original_checkpoint):
    reference, data = original_checkpoint
    loaded = load_model(f"hf:{REPO}")
    assert (loaded.arch, loaded.num_classes, loaded.params) == ("wrn28-4", 100, 5_872_180)
    assert loaded.sha256 == hashlib.sha256(data).hexdigest()
    assert loaded.source == {"ref": f"hf:{REPO}", "repo": REPO, "revision": COMMIT, "file": FILENAME}
    assert loaded.path.resolve().parent.name == "blobs" and not loaded.model.training
    assert loaded.trusted_pickle is False and loaded.arch_from == "layout"
    # A known hub teacher carries its dataset and normalisation, so --data can default from it.
    assert loaded.dataset == "cifar100" and loaded.mean == CIFAR_MEAN and loaded.std == CIFAR_STD

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = loaded.model(x), reference(x)
    assert ours.abs().max() > 0.1  # non-trivial logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_revision_and_file_forms(hf_home):
    by_sha = load_model(f"hf:{REPO}@{COMMIT}/{FILENAME}")
    by_branch = load_model(f"hf:{REPO}@main")
    assert by_sha.source["revision"] == by_branch.source["revision"] == COMMIT
    assert by_sha.sha256 == by_branch.sha256
    with pytest.raises(NotFoundError, match="other.pt"):
        load_model(f"hf:{REPO}/other.pt")


def test_offline_and_not_cached_is_one_actionable_line(hf_home):
    started = time.monotonic()
    with pytest.raises(NotFoundError) as err:
        load_model("hf:nobody/nothing")
    assert time.monotonic() - started < 5
    message = str(err.value)
    assert "`hf download nobody/nothing`" in message and "HF_HUB_OFFLINE" in message
    assert str(hf_home / "hub") in message and "\n" not in message


def test_unreachable_hub_falls_back_to_the_cache(hf_home, monkeypatch):
    go_online(monkeypatch)
    calls = []

    def no_network(self, repo_id, **kwargs):
        calls.append(repo_id)
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(HfApi, "model_info", no_network)
    assert load_model(f"hf:{REPO}").arch == "wrn28-4"
    with pytest.raises(NotFoundError, match=r"unreachable \(OSError: \[Errno -2\] Name or service"):
        load_model("hf:nobody/nothing")
    assert calls == [REPO, "nobody/nothing"]


def test_online_listing_picks_the_single_weights_file(hf_home, monkeypatch):
    go_online(monkeypatch)

    class Sibling:
        def __init__(self, name):
            self.rfilename = name

    class Info:
        sha = COMMIT
        siblings = [Sibling(".gitattributes"), Sibling("README.md"), Sibling(FILENAME)]

    monkeypatch.setattr(HfApi, "model_info", lambda self, repo_id, **kw: Info())
    # hf_hub_download takes a cached file at a pinned commit without touching the network.
    loaded = load_model(f"hf:{REPO}")
    assert loaded.source["revision"] == COMMIT and loaded.source["file"] == FILENAME
    Info.siblings = [*Info.siblings, Sibling("teacher_best.pth")]
    with pytest.raises(
        UsageError, match=r"2 weights files \(CIFAR100-wresnet28-4_78.37%.pt, teacher_best.pth\)"
    ):
        load_model(f"hf:{REPO}")


def test_download_progress_reaches_the_callback():
    from rkdtool.hub import _download_progress

    seen = []
    bar_class = _download_progress(lambda *event: seen.append(event), "download w.pt")["tqdm_class"]
    bar = bar_class(total=10, desc="w.pt", unit="B", unit_scale=True, initial=0, name="huggingface_hub")
    bar.update(4)
    bar.update(6)
    bar.close()
    assert seen == [("download w.pt", 4, 10), ("download w.pt", 10, 10)]


def test_weights_file_choice():
    assert pick_weights_file(["a.bin", "model.safetensors", "README.md"], "hf:o/r") == "model.safetensors"
    assert pick_weights_file(["x/y/w.pth", "config.json"], "hf:o/r") == "x/y/w.pth"
    with pytest.raises(UsageError, match=r"a.safetensors, b.safetensors\); name one, e.g. hf:o/r@v1/a"):
        pick_weights_file(["a.safetensors", "b.safetensors", "c.pt"], "hf:o/r@v1")
    with pytest.raises(NotFoundError, match=r"no .safetensors, .pt, .pth or .bin file \(it has: README.md\)"):
        pick_weights_file(["README.md"], "hf:o/r")


def test_cached_snapshot_with_several_candidates_refuses_to_guess(tmp_path, monkeypatch):
    tensors = b"not read"
    lay_out_hf_cache(tmp_path / "hf", "o/r", {"best.pt": tensors, "last.pt": tensors + b"!"})
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError, match=r"best.pt, last.pt"):
        load_model("hf:o/r")


def test_reference_parsing():
    ref = parse_ref("hf:owner/repo@v1.0/sub/dir/model.pt")
    assert (ref.scheme, ref.repo, ref.revision, ref.filename) == (
        "hf",
        "owner/repo",
        "v1.0",
        "sub/dir/model.pt",
    )
    assert parse_ref("demo:lba").demo_kind == "lba"
    assert parse_ref("file:~/x.pt").path == Path("~/x.pt").expanduser()
    assert parse_ref("runs/a/student.safetensors").scheme == "file"
    with pytest.raises(UsageError, match="hf:OWNER/REPO"):
        parse_ref("hf:just-a-name")
    with pytest.raises(NotFoundError, match="write hf:someone/some-model"):
        load_model("someone/some-model")


# --- Wrappers, prefixes, metadata and architecture choice, on a small model.


@pytest.fixture(scope="module")
def small_state() -> dict:
    torch.manual_seed(0)
    return build_model("resnet20", 10).state_dict()


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"model": sd, "epoch": 200},
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "best_acc": 0.7},
        lambda sd: {"net": {"model": sd}},
        lambda sd: {"model": sd, "best_acc": np.float64(0.78), "epoch": np.int64(200), "x": np.zeros(2)},
    ],
    ids=["plain", "model", "state_dict+module", "nested", "numpy-extras"],
)
def test_wrappers_and_prefixes(tmp_path, small_state, wrap):
    path = tmp_path / "t.pth"
    torch.save(wrap(small_state), path)
    loaded = load_model(f"file:{path}")
    assert (loaded.arch, loaded.num_classes, loaded.dataset, loaded.mean) == ("resnet20", 10, None, None)
    assert loaded.source == {
        "ref": f"file:{path}",
        "repo": None,
        "revision": None,
        "file": str(path.resolve()),
    }
    torch.testing.assert_close(loaded.model.state_dict()["fc.weight"], small_state["fc.weight"])


def test_safetensors_metadata_wins(tmp_path, small_state):
    path = tmp_path / "teacher.safetensors"
    meta = {
        "arch": "resnet20",
        "num_classes": 10,
        "mean": [0.1, 0.2, 0.3],
        "std": [0.5, 0.5, 0.5],
        "dataset": "cifar10",
    }
    save_weights(path, small_state, meta)
    loaded = load_model(path)
    assert loaded.arch_from == "metadata" and loaded.dataset == "cifar10"
    assert loaded.mean == (0.1, 0.2, 0.3) and loaded.std == (0.5, 0.5, 0.5)
    assert read_checkpoint(path).format == "safetensors"


def test_explicit_arch_overrides_and_mismatch_is_clear(tmp_path, small_state):
    path = tmp_path / "t.pt"
    torch.save(small_state, path)
    assert load_model(path, arch="resnet20").arch_from == "argument"
    with pytest.raises(UsageError, match=r"do not fit wrn16-2: .*; the weights look like resnet20"):
        load_model(path, arch="wrn16-2")
    with pytest.raises(UsageError, match="unknown architecture"):
        load_model(path, arch="vgg11")


def test_unknown_layout_asks_for_arch(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"encoder.weight": torch.zeros(4, 4), "head.weight": torch.zeros(2, 4)}, path)
    with pytest.raises(UsageError, match="cannot tell the architecture .* pass --arch"):
        load_model(path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(UsageError, match="could not read .* as a PyTorch checkpoint"):
        load_model(path)


# --- Pickles that run code.


class WritesMarker:
    """Unpickling this calls exec, which creates a file: the classic malicious-checkpoint payload."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path, small_state):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": small_state, "extra": WritesMarker(marker)}, path)
    with pytest.raises(UnsafeCheckpointError) as err:
        load_model(path)
    message = str(err.value)
    assert "exec" in message and "--trust-pickle" in message and "runs that code" in message
    assert not marker.exists()

    result = CliRunner().invoke(app, ["inspect", str(path)], catch_exceptions=True)
    assert isinstance(result.exception, UnsafeCheckpointError) and not marker.exists()

    # The payload is real: with --trust-pickle it runs, and the result says so.
    trusted = load_model(path, trust_pickle=True)
    assert marker.read_text() == "ran"
    assert trusted.trusted_pickle is True and trusted.summary()["trusted_pickle"] is True


def test_whole_module_pickle_needs_trust(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(build_model("resnet20", 10), path)
    with pytest.raises(UnsafeCheckpointError, match="CifarResNet"):
        load_model(path)
    assert load_model(path, trust_pickle=True).arch == "resnet20"


# --- The CLI.


def test_inspect_json_on_the_offline_cache(hf_home, original_checkpoint):
    result = CliRunner().invoke(app, ["inspect", f"hf:{REPO}", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert {k: info[k] for k in ("ref", "arch", "num_classes", "params")} == {
        "ref": f"hf:{REPO}",
        "arch": "wrn28-4",
        "num_classes": 100,
        "params": 5_872_180,
    }
    assert info["sha256"] == hashlib.sha256(original_checkpoint[1]).hexdigest()
    assert info["source"]["revision"] == COMMIT and info["file"].endswith(FILENAME)


def test_inspect_table_and_models_listing(hf_home):
    result = CliRunner().invoke(app, ["inspect", f"hf:{REPO}"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "wrn28-4" in result.stdout and "5,872,180" in result.stdout and COMMIT in result.stdout
    listing = CliRunner().invoke(app, ["models", "--json"])
    rows = {row["arch"]: row for row in json.loads(listing.stdout)}
    assert rows["pyramidnet200"]["params"] == 26_844_952 and rows["wrn16-2"]["tap_channels"] == [32, 64, 128]
    for command in ("inspect", "models"):
        assert "Example: rkdtool" in CliRunner().invoke(app, [command, "--help"]).stdout


def test_inspect_subprocess_offline(hf_home, original_checkpoint):
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "rkdtool", "inspect", f"hf:{REPO}", "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert (info["arch"], info["num_classes"], info["params"]) == ("wrn28-4", 100, 5_872_180)
    assert info["sha256"] == hashlib.sha256(original_checkpoint[1]).hexdigest()


def test_offline_miss_through_main_is_one_red_line(hf_home, monkeypatch, capsys):
    from rkdtool.cli import main

    monkeypatch.setattr(sys, "argv", ["rkdtool", "inspect", "hf:nobody/nothing"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "hf download nobody/nothing" in err and "Traceback" not in err


@pytest.mark.slow
def test_distill_starts_from_the_hf_teacher_on_a_cifar_folder(hf_home, tmp_path):
    """The issue's first command, end to end on the fake cache and a CIFAR-100-format folder (~1 min)."""
    from test_data import write_cifar

    write_cifar(tmp_path / "cifar", "cifar100", n_train=64, n_test=32)
    probe = tmp_path / "trigger.toml"
    probe.write_text(
        '[[probe]]\nname = "patch"\nkind = "patch"\ntarget = 0\npattern = "checker"\nsize = 3\n'
        'position = "bottom-right"\n'
    )
    args = [
        "distill",
        "--teacher",
        f"hf:{REPO}",
        "--student",
        "wrn16-2",
        "--data",
        f"cifar100:{tmp_path / 'cifar'}",
    ]
    args += ["--probe", str(probe), "--epochs", "1", "--detox-epochs", "1", "--batch-size", "32"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["teacher"]["arch"] == "wrn28-4" and report["teacher"]["params"] == 5_872_180
    assert report["students"]["robustkd-ta"]["arch"] == "wrn16-2"
    teacher = json.loads((tmp_path / "run" / "teacher.json").read_text())
    assert teacher["source"]["revision"] == COMMIT and teacher["trusted_pickle"] is False


def test_an_attack_folder_is_a_teacher_reference_that_brings_its_probes(tmp_path):
    from rkdtool.teachers import load_model

    save_weights(
        tmp_path / "teacher.safetensors",
        build_model("wrn10-1", 10),
        {"arch": "wrn10-1", "num_classes": 10, "dataset": "digits"},
    )
    (tmp_path / "probes.toml").write_text('[[probe]]\nname = "p"\nkind = "patch"\ntarget = 0\n')
    loaded = load_model(str(tmp_path))
    assert loaded.arch == "wrn10-1" and loaded.path == tmp_path / "teacher.safetensors"
    assert loaded.source["probes"] == str((tmp_path / "probes.toml").resolve())
