"""The attack kit: poisoned teachers for evaluation, and the demo teachers the main job runs on.

- `context`: the settings (`AttackConfig`) and what every kind is given (`AttackContext`).
- `poison`: the standard probes and the batch transforms that poison training batches.
- one module per kind: `badnets`, `blend`, `ckd`, `lba`, `adaptive`, `quant` (with `int8sim`, the attacker's
  INT8 simulation and the ONNX Runtime re-check); each gives `plant(ctx)`.
- `kit`: `make_attack` and `write_attack` (`rkdtool attack`).
- `demo`: the embedded `demo:` teachers, trained once and cached.
"""
