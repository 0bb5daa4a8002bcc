"""Trigger probes and what is measured with them: the stage every other stage checks its work with.

- `spec`: the probe spec (TOML, DESIGN §5) and batched trigger application (`Probe.apply`).
- `bank`: the built-in bank of common, untargeted triggers.
- `metrics`: ACC and ASR (the §5 definition, and the RobustKD code's all-images variant).
- `features`: feature variance per stage, clean vs triggered (the RobustKD paper's Fig. 2).
- `reverse`: Neural Cleanse trigger reverse-engineering for unknown attacks.
- `uap`: untargeted universal perturbations synthesised from a model (the defender's trigger stand-ins).

Import from the modules themselves; this package file imports nothing, so loading one piece does not load
the others.
"""
