"""report.html opened in a real headless browser (Debian's `chromium`): it renders, the title is there, the
page is not blank and every plot image decodes at its PNG's size. Skips where no chromium binary exists
(`.ci/run` installs it when missing: `apt-get install --no-install-recommends chromium`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from report_run import write_report_run

from rkdtool.report import render_report

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Run after the page has loaded: writes what the browser made of the images and the title into <body>.
PROBE = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  document.body.dataset.images = images.length;
  document.body.dataset.loaded = images.filter((i) => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.sizes = images.map((i) => i.naturalWidth + "x" + i.naturalHeight).join(",");
  document.body.dataset.title = document.title;
  document.body.dataset.heading = document.querySelector("h1").textContent;
});
</script>
"""


@pytest.fixture(scope="module")
def browser() -> str:
    found = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    if found is None:
        pytest.skip("no chromium binary on PATH (apt-get install chromium)")
    return found


def headless(browser: str, *args: str) -> subprocess.CompletedProcess:
    """Runs the browser headless (no sandbox as root: Chromium refuses to start sandboxed as root)."""
    flags = ["--headless", "--disable-gpu", "--hide-scrollbars", "--no-first-run"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        flags.append("--no-sandbox")
    return subprocess.run([browser, *flags, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run = write_report_run(tmp_path_factory.mktemp("browser") / "run")
    return render_report(run)


def test_the_report_renders_in_chromium_with_every_plot_loaded(browser, report, tmp_path):
    probe = tmp_path / "probe.html"  # the report plus a script that reads the result back
    probe.write_text(report.html.read_text() + PROBE)
    proc = headless(browser, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", proc.stdout)
    assert body, proc.stdout[:2000]
    seen = dict(re.findall(r'data-(\w+)="([^"]*)"', body.group(1)))
    assert seen["title"] == seen["heading"] == "rkdtool report: run"
    assert int(seen["images"]) == len(report.plots) == 4
    assert int(seen["loaded"]) == len(report.plots)
    sizes = []
    for p in report.plots:
        with Image.open(p) as image:
            sizes.append(f"{image.width}x{image.height}")
    assert seen["sizes"].split(",") == sizes  # each image decoded at its PNG's own size


def test_the_report_screenshot_is_not_blank_and_shows_the_plots(browser, report, tmp_path):
    shot = tmp_path / "report.png"
    proc = headless(browser, f"--screenshot={shot}", "--window-size=1000,5000", report.html.as_uri())
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    with Image.open(shot) as image:
        rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
    ink = int((rgb != 255).any(axis=2).sum())
    assert ink > 0.02 * rgb.shape[0] * rgb.shape[1], f"only {ink} pixels are not white"
    # matplotlib's first two colours (C0 blue, C1 orange) fill the bars: the plots were painted
    blue = int((np.abs(rgb - (31, 119, 180)) < 12).all(axis=2).sum())
    orange = int((np.abs(rgb - (255, 127, 14)) < 12).all(axis=2).sum())
    assert blue > 5000 and orange > 500, (blue, orange)


def test_the_page_is_a_file_the_browser_reads_without_the_run_folder(report, tmp_path):
    """The plots are data URLs: a copy of report.html alone (mailed, attached to an issue) still has them."""
    copy = Path(tmp_path / "alone.html")
    copy.write_text(report.html.read_text())
    page = copy.read_text()
    assert page.count('src="data:image/png;base64,') == len(report.plots) and "plots/" not in re.sub(
        r'alt="[^"]*"', "", page
    )
