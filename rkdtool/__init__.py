"""rkdtool: distill a robust student from an untrusted teacher and ship it to an edge GPU."""

__version__ = "0.1.0"

_API = {
    # DESIGN §3's names
    "load_model": "rkdtool.teachers",
    "LoadedModel": "rkdtool.hub",
    "build_model": "rkdtool.models",
    "load_probes": "rkdtool.probes.spec",
    "Probe": "rkdtool.probes.spec",
    "attack_success_rate": "rkdtool.probes.metrics",
    "accuracy": "rkdtool.probes.metrics",
    "RkdError": "rkdtool.errors",
    # what notebooks reach for next: data, probes, the stages and the jobs
    "load_dataset": "rkdtool.data",
    "probe_bank": "rkdtool.probes.bank",
    "probe_results": "rkdtool.probes.metrics",
    "feature_variance": "rkdtool.probes.features",
    "reverse_engineer": "rkdtool.probes.reverse",
    "synthesise_uap": "rkdtool.probes.uap",
    "AttackConfig": "rkdtool.attacks.context",
    "run_attack": "rkdtool.jobs.attack",
    "DistillConfig": "rkdtool.distill.config",
    "run_distill": "rkdtool.distill.job",
    "open_run": "rkdtool.runs",
    "load_profile": "rkdtool.resources",
    "export_bundle": "rkdtool.deploy.bundle",
    "bench_path": "rkdtool.deploy.bench",
    "machine_info": "rkdtool.machine",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    # Lazy so that `import rkdtool` (and `rkdtool --help`) does not pay for importing torch.
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'rkdtool' has no attribute {name!r}")
