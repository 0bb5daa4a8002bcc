"""The built-in probe bank: common triggers without a target, to find a backdoor whose target is unknown.

Each probe reports the flip rate to the most frequent predicted class (DESIGN §5). Sources: BadNets grids and
squares as ABD's `badnet_grid`/`badnet_sq`, the Blend noise key (Chen et al. 2017), SIG (Barni et al. 2019).
"""

from __future__ import annotations

from pathlib import Path

from rkdtool.probes.spec import CORNERS, Probe, probe_from_table


def probe_bank(height: int = 32, width: int = 32) -> list[Probe]:
    """Gives back the built-in bank of common triggers, all untargeted (flip rate to the top class).

    BadNets 3x3 grids and 4x4 white squares (ABD's `badnet_grid`/`badnet_sq`) at the four corners,
    blended noise keys (`noise:0`, Chen et al. 2017) at alpha 0.1 and 0.2, and a SIG sinusoid.
    """
    tables: list[dict] = []
    for corner in CORNERS:
        tables.append(
            {
                "name": f"bank-grid-{corner}",
                "kind": "patch",
                "pattern": "checker",
                "size": 3,
                "position": corner,
                "margin": 0,
            }
        )
    for corner in CORNERS:
        tables.append(
            {
                "name": f"bank-square-{corner}",
                "kind": "patch",
                "pattern": "white",
                "size": 4,
                "position": corner,
                "margin": 1,
            }
        )
    for alpha in (0.1, 0.2):
        tables.append(
            {"name": f"bank-blend-noise0-a{alpha}", "kind": "blend", "pattern": "noise:0", "alpha": alpha}
        )
    tables.append({"name": "bank-sig", "kind": "sinusoid", "delta": 20 / 255, "frequency": 6})
    return [probe_from_table(t, Path("."), height, width) for t in tables]
