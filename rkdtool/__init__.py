"""rkdtool: distill a robust student from an untrusted teacher and ship it to an edge GPU."""

__version__ = "0.1.0"

_API = {
    "load_model": "rkdtool.hub",
    "LoadedModel": "rkdtool.hub",
    "build_model": "rkdtool.models",
    "load_probes": "rkdtool.probes",
    "Probe": "rkdtool.probes",
    "attack_success_rate": "rkdtool.metrics",
    "accuracy": "rkdtool.metrics",
    "RkdError": "rkdtool.errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    # Lazy so that `import rkdtool` (and `rkdtool --help`) does not pay for importing torch.
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'rkdtool' has no attribute {name!r}")
