"""Weights with metadata in safetensors files: what travels with a student or a cached teacher.

Metadata (safetensors' string map; structured values are JSON): `arch`, `num_classes`, `input_size`,
`mean`, `std`, `dataset`, `provenance`, and anything else a caller adds.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from rkdtool.models import build_model


def atomic_path(path: Path) -> Path:
    """Gives back a temporary sibling of `path` to write to before `os.replace` (no half-written files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def write_text_atomic(path: Path, text: str) -> None:
    """Writes `text` to `path` through a temporary file and a rename."""
    tmp = atomic_path(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_weights(path: Path, tensors: dict[str, torch.Tensor] | nn.Module, metadata: dict) -> None:
    """Writes a state dict (or a module's) and its metadata to a safetensors file, atomically."""
    state = tensors.state_dict() if isinstance(tensors, nn.Module) else tensors
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    tmp = atomic_path(Path(path))
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)


def read_metadata(path: Path) -> dict:
    """Gives back the metadata of a safetensors file, JSON values decoded."""
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    out = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Gives back (state_dict, metadata) of a safetensors file."""
    return load_file(str(path), device="cpu"), read_metadata(path)


def build_from_weights(path: Path) -> tuple[nn.Module, dict]:
    """Gives back the eval-mode model a metadata-carrying safetensors file describes, and its metadata."""
    state, meta = load_weights(path)
    model = build_model(meta["arch"], int(meta["num_classes"]))
    model.load_state_dict(state)
    return model.eval(), meta
