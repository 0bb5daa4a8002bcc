"""Jobs: what one command does from its plain inputs to its results, over the stages.

- `probe`: `rkdtool probe` and `rkdtool inspect --features` (ACC, ASR per probe, Neural Cleanse, variance).
- `attack`: `rkdtool attack` (the kit's teacher, its clean start loaded from any reference).

The main job, `rkdtool distill`, is `rkdtool.distill.job`; the export job is `rkdtool.deploy.bundle`.
"""
