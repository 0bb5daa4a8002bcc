"""Distillation: the main job and the methods it trains students with.

- `config`: the job's settings (`DistillConfig`) and the variant labels reports show.
- `losses`: FKD's margin, connector and partial L2; KD's softened KL.
- `methods`: one small registered class per method (kd, fkd, robustkd, robustkd-ta): its parameters and
  its training step.
- `robustkd`: RobustKD's detox masks (Eqs. 7-10) and the detoxified teacher.
- `prepare`: a method made ready to train (masks, tau search by Algorithm 1, trigger stand-ins).
- `trainer`: the student training loop (resumable) and its evaluation.
- `diagnostics`: feature variance of the teacher, the control and the detoxified teacher.
- `job`: `rkdtool distill`, teacher to run folder.
"""
