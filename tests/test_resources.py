"""Target profiles and the device runtime: found in a checkout and in a wheel's layout, validated on load."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

from rkdtool import resources
from rkdtool.errors import NotFoundError, UsageError
from rkdtool.resources import load_profile, version_in_range

REPO = Path(__file__).resolve().parents[1]
TARGETS = {
    "jetson-nano",
    "jetson-tx2",
    "jetson-xavier-nx",
    "jetson-agx-xavier",
    "jetson-orin-nano",
    "jetson-orin-nx",
    "jetson-agx-orin",
    "x86-cuda",
    "cpu",
}


def test_every_target_of_the_design_has_a_valid_profile():
    profiles = {p.name: p for p in resources.list_profiles()}
    assert set(profiles) == TARGETS
    for name, profile in profiles.items():
        assert profile.path == resources.profiles_dir() / f"{name}.toml"
        assert profile.batch.min <= profile.batch.opt <= profile.batch.max
        # edge.md §6.1: the dynamo exporter cannot write opset <= 17, so those profiles use TorchScript.
        assert profile.exporter == ("torchscript" if profile.opset <= 17 else "dynamo")


def test_profiles_carry_the_jetson_facts_of_edge_md():
    nano, tx2 = load_profile("jetson-nano"), load_profile("jetson-tx2")
    for old in (nano, tx2):
        assert old.opset == 13 and old.precision == "fp16" and old.dla_cores == 0
        assert old.tensorrt_allows("8.2.1.8") and not old.tensorrt_allows("8.5.2")
    assert (nano.sm, tx2.sm) == ("5.3", "6.2")
    for xavier in (load_profile("jetson-xavier-nx"), load_profile("jetson-agx-xavier")):
        assert (xavier.sm, xavier.opset, xavier.dla_cores) == ("7.2", 17, 2)
        assert xavier.tensorrt_allows("8.5.2.2") and not xavier.tensorrt_allows("10.3.0")
    orin_nano = load_profile("jetson-orin-nano")
    assert (orin_nano.sm, orin_nano.dla_cores, orin_nano.precision) == ("8.7", 0, "int8")
    assert orin_nano.tensorrt_allows("10.3.0.30") and not orin_nano.tensorrt_allows("11.4.1")
    assert load_profile("jetson-agx-orin").tensorrt_allows("11.4.1")
    cpu = load_profile("cpu")
    assert cpu.tensorrt is None and cpu.sm is None and not cpu.tensorrt_allows("10.3")


def test_jetson_is_an_alias_of_orin_nano():
    assert load_profile("jetson") == load_profile("jetson-orin-nano")
    assert load_profile("JETSON").name == "jetson-orin-nano"


def test_unknown_target_names_the_known_ones():
    with pytest.raises(UsageError) as err:
        load_profile("jetson-thor")
    message = str(err.value)
    assert "unknown target 'jetson-thor'" in message
    assert all(name in message for name in TARGETS) and "jetson = jetson-orin-nano" in message


def test_a_profile_file_path_loads_and_a_missing_one_is_not_found(tmp_path):
    path = tmp_path / "board.toml"
    path.write_text(
        (resources.profiles_dir() / "cpu.toml").read_text().replace('name = "cpu"', 'name = "board"')
    )
    assert load_profile(str(path)).name == "board"
    assert load_profile(path).path == path
    with pytest.raises(NotFoundError, match="does not exist"):
        load_profile(tmp_path / "absent.toml")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("opset = 18", "opset = 13"), "dynamo exporter cannot write opset 13"),
        (('exporter = "dynamo"', 'exporter = "onnx"'), "exporter must be one of"),
        (('precision = "int8"', 'precision = "int4"'), "precision must be one of"),
        (('calibration = "percentile"', 'calibration = "minmax"'), "calibration must be one of"),
        (("min = 1", "min = 32"), "1 <= min <= opt <= max"),
        (('tensorrt = "none"', 'tensorrt = "10.3"'), "version range"),
        (("dla_cores = 0", "dla_cores = 0\ncolour = 1"), "unknown field(s) colour"),
        (("calib_samples = 512\n", ""), "missing field(s) calib_samples"),
        (("opset = 18", "opset = 11"), "opset must be an integer >= 13"),
    ],
)
def test_a_bad_profile_field_is_a_usage_error_naming_it(tmp_path, edit, message):
    text = (resources.profiles_dir() / "cpu.toml").read_text()
    assert edit[0] in text
    path = tmp_path / "bad.toml"
    path.write_text(text.replace(edit[0], edit[1], 1))
    with pytest.raises(UsageError, match="profile .*bad.toml") as err:
        load_profile(path)
    assert message in str(err.value)


def test_version_ranges_compare_by_release_prefix():
    assert version_in_range("10.3.0.30", ">=10.3,<11")
    assert not version_in_range("10.2.9", ">=10.3,<11")
    assert not version_in_range("11.0", ">=10.3,<11")
    assert version_in_range("8.5.2.2", "==8.5")
    assert not version_in_range("8.6.1", "==8.5")


def test_resources_are_found_in_a_checkout():
    assert resources.profiles_dir() == REPO / "profiles"
    assert resources.export_dir() == REPO / "export"


def test_resources_are_found_where_the_wheel_puts_them(tmp_path, monkeypatch):
    package = tmp_path / "site-packages" / "rkdtool"
    for name in ("profiles", "export"):
        (package / "_data" / name).mkdir(parents=True)
    (package / "_data" / "profiles" / "cpu.toml").write_text((REPO / "profiles" / "cpu.toml").read_text())
    monkeypatch.setattr(resources, "PACKAGE_DIR", package)
    assert resources.profiles_dir() == package / "_data" / "profiles"
    assert resources.export_dir() == package / "_data" / "export"
    assert resources.profile_names() == ["cpu"]


def test_missing_resources_say_so(tmp_path, monkeypatch):
    monkeypatch.setattr(resources, "PACKAGE_DIR", tmp_path / "rkdtool")
    with pytest.raises(NotFoundError, match="profiles/ folder is missing"):
        resources.profiles_dir()


def test_the_wheel_force_includes_both_folders_where_resources_looks():
    build = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]
    assert build["force-include"] == {"profiles": "rkdtool/_data/profiles", "export": "rkdtool/_data/export"}


def test_device_modules_load_by_path_without_tensorrt(monkeypatch):
    for name in ("tensorrt", "pycuda", "pycuda.driver", "pycuda.autoinit"):
        monkeypatch.setitem(sys.modules, name, None)  # any import of them now raises ImportError
    for name in ("trt_build", "trt_run", "check"):
        module = resources.load_device_module(name)
        assert Path(module.__file__) == REPO / "export" / f"{name}.py"
    assert str(REPO / "export") not in sys.path
    with pytest.raises(NotFoundError):
        resources.load_device_module("absent")


def test_profiles_write_back_to_toml_that_reads_equal():
    for profile in resources.list_profiles():
        again = resources.parse_profile(tomllib.loads(profile.to_toml()), "round trip")
        assert again == profile and again.path is None
