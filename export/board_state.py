"""The board's platform state for device_report.json: power mode, clocks, temperatures, JetPack/L4T and
the CUDA/cuDNN versions. Every reader takes `root` (a folder standing for "/", so tests point it at a fake
sysfs tree) and gives back None for what is absent or unreadable; nothing here needs root.

Sources: /etc/nvpmodel.conf ("< POWER_MODEL ID=n NAME=... >") and /var/lib/nvpmodel/status ("pmode:000n"),
or `nvpmodel -q` ("NV Power Mode: NAME" then the id); devfreq's cur_freq/min_freq/max_freq in Hz
(Linux Documentation/ABI/testing/sysfs-class-devfreq); thermal zones' type and temp in millidegrees Celsius
(Documentation/ABI/testing/sysfs-class-thermal); /etc/nv_tegra_release ("# R35 (release), REVISION: 4.1");
`dpkg-query -W nvidia-jetpack` (edge.md §7.2). Python 3.6 syntax, standard library only.
"""

import glob
import os
import re
import shutil
import subprocess

GPU_DEVFREQ = re.compile(r"gpu|gv11b|ga10b|gp10b|gm20b|gb10b", re.IGNORECASE)
HOT_CELSIUS = 85.0  # Orin and Xavier start throttling in the mid-80s (Jetson thermal design guides)


def run_text(command):
    """Gives back the stripped stdout of a command, or None when it is missing, fails or hangs."""
    if shutil.which(command[0]) is None:
        return None
    try:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.decode("utf-8", "replace").strip() if done.returncode == 0 else None


def no_commands(command):
    """A command runner that runs nothing: readers pointed at a fake root must not ask the real board."""
    return None


def _runner(root, run):
    if run is not None:
        return run
    return run_text if os.path.abspath(root) == os.path.sep else no_commands


def read_text(root, path):
    """Gives back a file's text under `root` (NULs dropped, stripped), or None."""
    try:
        with open(os.path.join(root, path.lstrip("/")), "rb") as f:
            return f.read().decode("utf-8", "replace").replace("\x00", "").strip()
    except OSError:
        return None


def _read_int(root, path):
    text = read_text(root, path)
    try:
        return int(text.split()[0]) if text else None
    except ValueError:
        return None


def parse_nvpmodel_conf(text):
    """Gives back ({mode id: name}, default id or None) from /etc/nvpmodel.conf's text."""
    modes = {}
    for match in re.finditer(r"<\s*POWER_MODEL\s+ID\s*=\s*(\d+)\s+NAME\s*=\s*([^\s>]+)", text or ""):
        modes[int(match.group(1))] = match.group(2)
    default = re.search(r"<\s*PM_CONFIG\s+DEFAULT\s*=\s*(\d+)", text or "")
    return modes, (int(default.group(1)) if default else None)


def power_mode(root="/", run=None):
    """Gives back {"id", "name", "source"} of the nvpmodel power mode, or None where there is no nvpmodel."""
    modes, default = parse_nvpmodel_conf(read_text(root, "/etc/nvpmodel.conf"))
    status = read_text(root, "/var/lib/nvpmodel/status")
    match = re.search(r"pmode:\s*(\d+)", status or "")
    if match:
        mode = int(match.group(1))
        return {"id": mode, "name": modes.get(mode), "source": "/var/lib/nvpmodel/status"}
    query = _runner(root, run)(["nvpmodel", "-q"])
    if query:
        name = re.search(r"NV Power Mode:\s*(\S+)", query)
        ids = [int(line) for line in query.splitlines() if line.strip().isdigit()]
        return {
            "id": ids[-1] if ids else None,
            "name": name.group(1) if name else None,
            "source": "nvpmodel -q",
        }
    if default is not None:
        return {
            "id": default,
            "name": modes.get(default),
            "source": "default of /etc/nvpmodel.conf (no status)",
        }
    return None


def devfreq_kind(name):
    """Gives back "gpu", "dla", "emc" or "other" for a devfreq device name such as 17000000.ga10b."""
    if GPU_DEVFREQ.search(name):
        return "gpu"
    if "dla" in name.lower():
        return "dla"
    if "emc" in name.lower():
        return "emc"
    return "other"


def devfreq_clocks(root="/"):
    """Gives back {device: {kind, cur_hz, min_hz, max_hz, locked, governor}} from /sys/class/devfreq.

    `locked` is min == max: what `jetson_clocks` does to each devfreq device (it raises min to max).
    """
    clocks = {}
    for folder in sorted(glob.glob(os.path.join(root, "sys/class/devfreq/*"))):
        name = os.path.basename(folder)
        rel = "/sys/class/devfreq/" + name
        cur, low, high = (_read_int(root, rel + "/" + f) for f in ("cur_freq", "min_freq", "max_freq"))
        if cur is None and low is None and high is None:
            continue
        clocks[name] = {
            "kind": devfreq_kind(name),
            "cur_hz": cur,
            "min_hz": low,
            "max_hz": high,
            "locked": (low == high) if low is not None and high is not None else None,
            "governor": read_text(root, rel + "/governor"),
        }
    return clocks or None


def emc_rate(root="/"):
    """Gives back the EMC (memory) clock in Hz where the kernel shows it without root, else None.

    Orin has no EMC devfreq node; its rate is in BPMP debugfs (root only). Older L4T kept it in clk debugfs.
    """
    for path in ("/sys/kernel/debug/bpmp/debug/clk/emc/rate", "/sys/kernel/debug/clk/emc/clk_rate"):
        value = _read_int(root, path)
        if value is not None:
            return value
    return None


def thermal_zones(root="/"):
    """Gives back {zone type: degrees Celsius} from /sys/class/thermal/thermal_zone*/{type,temp}."""
    zones = {}
    for folder in sorted(glob.glob(os.path.join(root, "sys/class/thermal/thermal_zone*"))):
        rel = "/sys/class/thermal/" + os.path.basename(folder)
        kind = read_text(root, rel + "/type") or os.path.basename(folder)
        milli = _read_int(root, rel + "/temp")
        if milli is not None and milli > -40000:  # off sensors read -256000; Jetsons run from -25 C
            zones[kind] = milli / 1000.0
    return zones or None


def l4t_release(root="/"):
    """Gives back {"release": "35.4.1", "text": first line} from /etc/nv_tegra_release, or None."""
    text = read_text(root, "/etc/nv_tegra_release")
    if not text:
        return None
    first = text.splitlines()[0]
    match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", first)
    return {"release": f"{match.group(1)}.{match.group(2)}" if match else None, "text": first}


def jetpack_version(root="/", run=None):
    """Gives back the nvidia-jetpack package version ("5.1.2-b104"), or None."""
    return _runner(root, run)(["dpkg-query", "-W", "-f=${Version}", "nvidia-jetpack"]) or None


def cuda_version(root="/"):
    """Gives back the CUDA toolkit version from /usr/local/cuda/version.json or version.txt, or None."""
    text = read_text(root, "/usr/local/cuda/version.json")
    match = re.search(r'"cuda"\s*:\s*\{[^}]*"version"\s*:\s*"([\d.]+)"', text or "")
    if match:
        return match.group(1)
    match = re.search(r"CUDA Version\s+([\d.]+)", read_text(root, "/usr/local/cuda/version.txt") or "")
    return match.group(1) if match else None


def cudnn_version(root="/"):
    """Gives back cuDNN's version from its header (cudnn_version.h, or cudnn.h before cuDNN 8), or None."""
    patterns = (
        "usr/include/cudnn_version*.h",
        "usr/include/*-linux-gnu/cudnn_version*.h",
        "usr/local/cuda/include/cudnn_version*.h",
        "usr/include/cudnn.h",
    )
    for pattern in patterns:
        for path in sorted(glob.glob(os.path.join(root, pattern))):
            text = read_text("/", path) or ""
            parts = [
                re.search(rf"#define\s+CUDNN_{k}\s+(\d+)", text) for k in ("MAJOR", "MINOR", "PATCHLEVEL")
            ]
            if all(parts):
                return ".".join(p.group(1) for p in parts)
    return None


def clock_warnings(clocks):
    """Gives back warnings for GPU/DLA clocks that are not locked (latency then depends on DVFS ramp-up)."""
    warnings = []
    for name, clock in sorted((clocks or {}).items()):
        if clock["kind"] in ("gpu", "dla") and clock["locked"] is False:
            warnings.append(
                "{} clock {} is not locked (min {} Hz < max {} Hz): run `sudo jetson_clocks` first".format(
                    clock["kind"].upper(), name, clock["min_hz"], clock["max_hz"]
                )
            )
    return warnings


def platform_state(root="/", run=None):
    """Gives back the board's state: model, power mode, clocks, temperatures, L4T, JetPack, CUDA, cuDNN."""
    clocks = devfreq_clocks(root)
    zones = thermal_zones(root)
    warnings = clock_warnings(clocks)
    if zones and max(zones.values()) >= HOT_CELSIUS:
        warnings.append(f"a thermal zone is at {max(zones.values()):.1f} C: the board may be throttling")
    mode = power_mode(root, run)
    if clocks and mode is None:
        warnings.append("the nvpmodel power mode could not be read")
    return {
        "model": read_text(root, "/proc/device-tree/model"),
        "power_mode": mode,
        "clocks": clocks,
        "emc_hz": emc_rate(root),
        "thermal_c": zones,
        "l4t": l4t_release(root),
        "jetpack": jetpack_version(root, run),
        "cuda": cuda_version(root),
        "cudnn": cudnn_version(root),
        "warnings": warnings,
    }
