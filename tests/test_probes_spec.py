"""Trigger probe specs, batched application, the probe bank and probe files."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rkdtool.data import CIFAR_MEAN, CIFAR_STD, denormalize
from rkdtool.errors import NotFoundError, UsageError
from rkdtool.probes.bank import probe_bank
from rkdtool.probes.spec import Probe, load_probes, named_pattern, read_tensor_file, save_probes

REPO = Path(__file__).resolve().parents[1]
OFFICIAL = REPO.parent / "shared" / "fixtures" / "robustkd-official"
needs_official = pytest.mark.skipif(
    not OFFICIAL.is_dir(), reason="../shared/fixtures/robustkd-official is absent (it is never copied in)"
)


def images(n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(seed)).float() / 255


def write_spec(folder: Path, body: str) -> Path:
    path = folder / "probes.toml"
    path.write_text(body)
    return path


# ------------------------------------------------------------------------------- the RobustKD trigger pair


def official_spec(folder: Path, pair: str) -> Path:
    return write_spec(
        folder,
        f"""[[probe]]
name = "robustkd-{pair}"
kind = "image-mask"
target = 0
space = "normalized"
image = "{OFFICIAL / f"cifar100-{pair}-pattern.png"}"
mask = "{OFFICIAL / f"cifar100-{pair}-mask.pth"}"
""",
    )


def repository_blend(x: torch.Tensor, pair: str) -> torch.Tensor:
    """The RobustKD repository's own code path (mydataloader.py, poison_type=0): ToTensor + Normalize,
    then (1 - M) x_n + M T with T read by ToTensor and M by torch.load."""
    from torchvision import transforms

    pattern = transforms.ToTensor()(Image.open(OFFICIAL / f"cifar100-{pair}-pattern.png").convert("RGB"))
    mask = torch.load(OFFICIAL / f"cifar100-{pair}-mask.pth", map_location="cpu", weights_only=True)
    x_n = transforms.Normalize(CIFAR_MEAN, CIFAR_STD)(x)
    return (1 - mask) * x_n + mask * pattern


@needs_official
@pytest.mark.parametrize("pair", ["wrn28-4", "lba"])
def test_official_pair_reproduces_the_repository_blend_exactly(tmp_path, pair):
    probe = load_probes(official_spec(tmp_path, pair))[0].bind(CIFAR_MEAN, CIFAR_STD)
    x = images()
    expected = repository_blend(x, pair)
    assert probe.kind == "image-mask" and probe.space == "normalized" and probe.target == 0
    assert torch.equal(probe.model_input(x, mean=CIFAR_MEAN, std=CIFAR_STD), expected)
    # pixel space: (1 - M) x + M (mean + std T) (algorithms.md §3.6)
    pixel = denormalize(expected, CIFAR_MEAN, CIFAR_STD)
    assert (probe.apply(x) - pixel).abs().max() < 1e-6
    equivalent = probe.in_pixel_space()
    assert equivalent.space == "pixel"
    assert (equivalent.apply(x) - pixel).abs().max() < 1e-6
    assert equivalent.apply(x).min() >= 0 and equivalent.apply(x).max() <= 1  # stays an image
    # and through a written spec that other stages load
    reloaded = load_probes(save_probes([equivalent], tmp_path / "written"))[0]
    assert (reloaded.apply(x) - pixel).abs().max() < 1e-6


@needs_official
def test_cuda_saved_mask_loads_on_cpu_weights_only():
    path = OFFICIAL / "cifar100-wrn28-4-mask.pth"
    if not torch.cuda.is_available():  # the file really holds a CUDA tensor: plain torch.load fails here
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)
    mask = read_tensor_file(path)
    assert mask.shape == (32, 32) and mask.device.type == "cpu"
    assert float(mask.max()) == pytest.approx(0.2) and float(mask.min()) == 0.0
    assert float((mask == mask.max()).float().mean()) == pytest.approx(0.78, abs=0.01)


def test_normalized_probe_needs_a_normalisation(tmp_path):
    np.save(tmp_path / "m.npy", np.full((32, 32), 0.1, np.float32))
    spec = write_spec(
        tmp_path, '[[probe]]\nname="n"\nkind="image-mask"\nspace="normalized"\nimage="white"\nmask="m.npy"\n'
    )
    probe = load_probes(spec)[0]
    with pytest.raises(UsageError, match="bind it"):
        probe.apply(images(2))
    assert probe.bind((0.5,) * 3, (0.25,) * 3).apply(images(2)).shape == (2, 3, 32, 32)


# ------------------------------------------------------------------------------------------ kinds and files


def test_badnets_grid_sits_on_rows_and_columns_29_to_31(tmp_path):
    spec = write_spec(tmp_path, '[[probe]]\nname="g"\nkind="patch"\ntarget=0\npattern="checker"\nsize=3\n')
    x = torch.full((2, 3, 32, 32), 0.5)
    out = load_probes(spec)[0].apply(x)
    # ABD badnet_grid: rows 29, 30, 31 read [0,0,1], [0,1,0], [1,0,1] over columns 29..31
    assert out[0, 0, 29:, 29:].tolist() == [[0, 0, 1], [0, 1, 0], [1, 0, 1]]
    untouched = torch.ones(32, 32, dtype=torch.bool)
    untouched[29:, 29:] = False
    assert torch.equal(out[:, :, untouched], x[:, :, untouched])


def test_square_margin_and_explicit_position(tmp_path):
    spec = write_spec(
        tmp_path,
        '[[probe]]\nname="sq"\nkind="patch"\npattern="white"\nsize=4\nmargin=1\n'
        '[[probe]]\nname="xy"\nkind="patch"\npattern="white"\nsize=2\nposition=[3, 5]\n',
    )
    square, explicit = load_probes(spec)
    x = torch.zeros(1, 3, 32, 32)
    assert square.apply(x)[0, 0].nonzero().unique(dim=0).tolist()[0] == [27, 27]  # ABD badnet_sq: 27-30
    assert square.apply(x).sum() == 3 * 16
    assert explicit.apply(x)[0, 0, 5:7, 3:5].sum() == 4 and explicit.apply(x).sum() == 12


def test_pattern_sources_agree_name_png_npy_torch(tmp_path):
    checker = named_pattern("checker", 3, 4, 4)
    Image.fromarray((checker.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(tmp_path / "p.png")
    np.save(tmp_path / "p.npy", checker.numpy())
    torch.save(checker, tmp_path / "p.pt")
    body = "".join(
        f'[[probe]]\nname="{n}"\nkind="patch"\ntarget=1\nsize=4\npattern="{src}"\n'
        for n, src in [("name", "checker"), ("png", "p.png"), ("npy", "p.npy"), ("pt", "p.pt")]
    )
    probes = load_probes(write_spec(tmp_path, body))
    x = images(4)
    reference = probes[0].apply(x)
    for probe in probes[1:]:
        assert torch.equal(probe.apply(x), reference), probe.name


def test_blend_and_sinusoid_formulas(tmp_path):
    spec = write_spec(
        tmp_path,
        '[[probe]]\nname="b"\nkind="blend"\nalpha=0.1\npattern="noise:3"\n'
        '[[probe]]\nname="s"\nkind="sinusoid"\ndelta=0.1\nfrequency=4\n',
    )
    blend, sig = load_probes(spec)
    x = torch.full((2, 3, 32, 32), 0.5)
    key = named_pattern("noise:3", 3, 32, 32)
    assert torch.allclose(blend.apply(x), 0.9 * x + 0.1 * key)
    out = sig.apply(x)
    assert torch.allclose(
        out[0, 0, 0], 0.5 + 0.1 * torch.sin(2 * torch.pi * torch.arange(32) * 4 / 32), atol=1e-6
    )
    assert torch.equal(out[:, :, 0], out[:, :, 17])  # constant down each column
    assert sig.target is None


@pytest.mark.parametrize(
    ("body", "error", "match"),
    [
        ('[[probe]]\nname="a"\nkind="stamp"\n', UsageError, "kind must be one of"),
        ('[[probe]]\nname="a"\nkind="blend"\nalpha=1.5\n', UsageError, "alpha"),
        ('[[probe]]\nname="a"\nkind="patch"\nsize=40\n', UsageError, "does not fit"),
        ('[[probe]]\nname="a"\nkind="patch"\ntarget=-1\n', UsageError, "class index"),
        ('[[probe]]\nname="a"\nkind="patch"\nspace="lab"\n', UsageError, "pixel or normalized"),
        ('[[probe]]\nname="a"\nkind="patch"\npattern="stripes"\n', UsageError, "unknown pattern"),
        ('[[probe]]\nname="a"\nkind="image-mask"\nimage="white"\n', UsageError, "needs `image` and `mask`"),
        ('[[probe]]\nname="a"\nkind="blend"\npattern="gone.png"\n', NotFoundError, "does not exist"),
        ('[[probe]]\nname="a"\nkind="patch"\n[[probe]]\nname="a"\nkind="blend"\n', UsageError, "repeats"),
        ("[probe]\nname = 1\n", UsageError, "no \\[\\[probe\\]\\] table"),
        ("[[probe]\n", UsageError, "not valid TOML"),
    ],
)
def test_spec_errors_say_what_is_wrong(tmp_path, body, error, match):
    with pytest.raises(error, match=match):
        load_probes(write_spec(tmp_path, body))


def test_mask_out_of_range_and_code_pickles_are_refused(tmp_path):
    np.save(tmp_path / "big.npy", np.full((32, 32), 2.0, np.float32))
    spec = write_spec(tmp_path, '[[probe]]\nname="m"\nkind="image-mask"\nimage="white"\nmask="big.npy"\n')
    with pytest.raises(UsageError, match=r"mask values must lie in \[0, 1\]"):
        load_probes(spec)
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump(Path("x"), f)  # needs code (a class) to unpickle: weights_only refuses it
    with pytest.raises(UsageError, match="cannot read"):
        read_tensor_file(tmp_path / "evil.pt")
    with pytest.raises(NotFoundError):
        load_probes(tmp_path / "missing.toml")


# ------------------------------------------------------------------------------ writing specs back, the bank


def test_save_probes_round_trips_every_kind(tmp_path):
    built = load_probes(
        write_spec(
            tmp_path,
            '[[probe]]\nname="grid"\nkind="patch"\ntarget=0\n'
            '[[probe]]\nname="blend"\nkind="blend"\ntarget=2\nalpha=0.2\npattern="noise:7"\n'
            '[[probe]]\nname="sig"\nkind="sinusoid"\ndelta=0.05\nfrequency=3\nphase=0.5\n',
        )
    )
    derived = [
        Probe("reversed class 4", "image-mask", 4, torch.rand(3, 32, 32), torch.rand(1, 32, 32) * 0.3),
        Probe(
            "spec-less blend",
            "blend",
            1,
            torch.rand(3, 32, 32),
            torch.full((1, 32, 32), 0.2),
            spec={"name": "spec-less blend", "kind": "blend", "alpha": 0.2},
        ),  # its table omits the pattern
        built[0].random_like(5),
    ]
    probes = built + derived
    path = save_probes(probes, tmp_path / "out")
    text = path.read_text()
    assert 'pattern = "checker"' not in text or 'name = "grid"' in text
    assert 'image = "reversed_class_4.pattern.npy"' in text  # tensors become files beside the spec
    reloaded = load_probes(path)
    x = images(8)
    assert [p.name for p in reloaded] == [p.name for p in probes]
    for a, b in zip(probes, reloaded, strict=True):
        assert a.target == b.target, a.name
        assert torch.allclose(a.apply(x), b.apply(x), atol=1e-7), a.name


def test_random_like_keeps_kind_and_strength_but_not_pattern():
    grid = probe_bank()[0].with_target(0)
    rand = grid.random_like(3)
    assert rand.kind == "patch" and rand.target == 0 and torch.equal(rand.mask, grid.mask)
    assert not torch.equal(rand.pattern, grid.pattern)
    assert set(rand.pattern.unique().tolist()) <= {0.0, 1.0}
    blend = probe_bank()[9]
    assert torch.equal(blend.random_like(1).mask, blend.mask)
    assert not torch.equal(blend.random_like(1).pattern, blend.pattern)


def test_apply_random_patterns_draws_a_pattern_per_image():
    grid = probe_bank()[0]
    x = torch.zeros(64, 3, 32, 32)
    out = grid.apply_random_patterns(x, torch.Generator().manual_seed(0))
    assert torch.equal(out[:, :, :29], x[:, :, :29])  # only the patch changes
    corners = out[:, 0, 29:, 29:].flatten(1)
    assert len(corners.unique(dim=0)) > 30  # 64 draws from 512 patterns
    blend = probe_bank()[9]
    out = blend.apply_random_patterns(x, torch.Generator().manual_seed(0))
    assert out.max() <= 0.2 + 1e-6 and out.std() > 0.03


def test_bank_covers_the_common_triggers_without_targets():
    bank = probe_bank()
    names = [p.name for p in bank]
    assert len(names) == len(set(names)) == 11
    assert all(p.target is None for p in bank)
    assert sum(p.kind == "patch" for p in bank) == 8 and sum(p.kind == "blend" for p in bank) == 2
    assert {p.spec.get("alpha") for p in bank if p.kind == "blend"} == {0.1, 0.2}
    x = torch.full((1, 3, 32, 32), 0.5)
    touched = [(p.apply(x) != x).any(1)[0] for p in bank if p.kind == "patch"]
    corners = {(int(t.nonzero()[:, 0].min() > 15), int(t.nonzero()[:, 1].min() > 15)) for t in touched}
    assert corners == {(0, 0), (0, 1), (1, 0), (1, 1)}  # all four corners
