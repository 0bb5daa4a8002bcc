"""The board-state readers of export/board_state.py on a fake sysfs tree: power mode, devfreq clocks,
thermal zones, L4T/JetPack and CUDA/cuDNN versions, each tolerant of absence.

The tree copies the layout and formats of a Jetson AGX Orin on JetPack 6 (Linux sysfs ABI for devfreq and
thermal, /etc/nvpmodel.conf's POWER_MODEL lines, /etc/nv_tegra_release's first line).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rkdtool.resources import load_device_module

board_state = load_device_module("check").board_state

NVPMODEL_CONF = """
< PARAM TYPE=FILE NAME=CPU_ONLINE >
< POWER_MODEL ID=0 NAME=MAXN >
CPU_ONLINE CORE_0 1
< POWER_MODEL ID=1 NAME=MODE_15W >
CPU_ONLINE CORE_0 1
< POWER_MODEL ID=2 NAME=MODE_30W >
< PM_CONFIG DEFAULT=2 >
"""


def write(root: Path, path: str, text: str) -> None:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)


@pytest.fixture
def orin_root(tmp_path) -> Path:
    root = tmp_path / "orin"
    write(root, "/proc/device-tree/model", "NVIDIA Jetson AGX Orin Developer Kit\x00")
    write(root, "/etc/nvpmodel.conf", NVPMODEL_CONF)
    write(root, "/var/lib/nvpmodel/status", "pmode:0001 fmode:quiet\n")
    gpu = "/sys/class/devfreq/17000000.ga10b/"
    for name, value in (("cur_freq", 1300500000), ("min_freq", 306000000), ("max_freq", 1300500000)):
        write(root, gpu + name, f"{value}\n")
    write(root, gpu + "governor", "nvhost_podgov\n")
    dla = "/sys/class/devfreq/15880000.nvdla0/"
    for name in ("cur_freq", "min_freq", "max_freq"):
        write(root, dla + name, "1369600000\n")
    write(root, "/sys/class/thermal/thermal_zone0/type", "cpu-thermal\n")
    write(root, "/sys/class/thermal/thermal_zone0/temp", "47500\n")
    write(root, "/sys/class/thermal/thermal_zone1/type", "gpu-thermal\n")
    write(root, "/sys/class/thermal/thermal_zone1/temp", "46125\n")
    write(root, "/sys/class/thermal/thermal_zone2/type", "tj-thermal\n")
    write(root, "/sys/class/thermal/thermal_zone2/temp", "-256000\n")  # sensor off
    write(root, "/etc/nv_tegra_release", "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic\n")
    write(root, "/usr/local/cuda/version.json", '{"cuda": {"name": "CUDA SDK", "version": "12.6.68"}}')
    write(
        root,
        "/usr/include/aarch64-linux-gnu/cudnn_version_v9.h",
        "#define CUDNN_MAJOR 9\n#define CUDNN_MINOR 3\n#define CUDNN_PATCHLEVEL 0\n",
    )
    return root


def test_power_mode_comes_from_the_status_file_and_the_conf(orin_root):
    assert board_state.power_mode(str(orin_root)) == {
        "id": 1,
        "name": "MODE_15W",
        "source": "/var/lib/nvpmodel/status",
    }
    (orin_root / "var/lib/nvpmodel/status").unlink()
    asked = board_state.power_mode(str(orin_root), run=lambda cmd: "NV Power Mode: MAXN\n0")
    assert asked == {"id": 0, "name": "MAXN", "source": "nvpmodel -q"}
    fallback = board_state.power_mode(str(orin_root), run=board_state.no_commands)
    assert fallback["id"] == 2 and fallback["name"] == "MODE_30W" and "default" in fallback["source"]


def test_devfreq_clocks_say_which_are_locked_and_warn(orin_root):
    clocks = board_state.devfreq_clocks(str(orin_root))
    assert clocks["17000000.ga10b"] == {
        "kind": "gpu",
        "cur_hz": 1300500000,
        "min_hz": 306000000,
        "max_hz": 1300500000,
        "locked": False,
        "governor": "nvhost_podgov",
    }
    assert clocks["15880000.nvdla0"]["kind"] == "dla" and clocks["15880000.nvdla0"]["locked"] is True
    warnings = board_state.clock_warnings(clocks)
    assert len(warnings) == 1 and warnings[0].startswith("GPU clock 17000000.ga10b is not locked")
    assert "jetson_clocks" in warnings[0]


def test_thermal_l4t_cuda_and_cudnn(orin_root):
    root = str(orin_root)
    assert board_state.thermal_zones(root) == {"cpu-thermal": 47.5, "gpu-thermal": 46.125}
    assert board_state.l4t_release(root)["release"] == "36.4.3"
    assert board_state.cuda_version(root) == "12.6.68" and board_state.cudnn_version(root) == "9.3.0"
    assert board_state.jetpack_version(
        root, run=lambda cmd: "6.2+b77" if "nvidia-jetpack" in cmd else None
    ) == ("6.2+b77")
    write(orin_root, "/usr/local/cuda/version.json", "")
    write(orin_root, "/usr/local/cuda/version.txt", "CUDA Version 10.2.300\n")  # JetPack 4.6
    assert board_state.cuda_version(root) == "10.2.300"


def test_platform_state_of_the_whole_board(orin_root):
    state = board_state.platform_state(str(orin_root), run=board_state.no_commands)
    assert (
        state["model"] == "NVIDIA Jetson AGX Orin Developer Kit" and state["power_mode"]["name"] == "MODE_15W"
    )
    assert state["l4t"]["release"] == "36.4.3" and state["jetpack"] is None and state["emc_hz"] is None
    assert len(state["warnings"]) == 1 and "not locked" in state["warnings"][0]
    write(orin_root, "/sys/class/thermal/thermal_zone1/temp", "91000\n")
    assert any("throttling" in w for w in board_state.platform_state(str(orin_root))["warnings"])


def test_every_reader_gives_none_on_a_machine_that_is_not_a_jetson(tmp_path):
    root = str(tmp_path)
    state = board_state.platform_state(root)  # a fake root never runs the real nvpmodel or dpkg-query
    assert state == {
        "model": None,
        "power_mode": None,
        "clocks": None,
        "emc_hz": None,
        "thermal_c": None,
        "l4t": None,
        "jetpack": None,
        "cuda": None,
        "cudnn": None,
        "warnings": [],
    }
    write(tmp_path, "/sys/class/devfreq/x.gpu/cur_freq", "not a number\n")
    assert board_state.devfreq_clocks(root) is None
