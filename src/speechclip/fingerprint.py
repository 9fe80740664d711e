"""What identifies a model in a cache key or a checkpoint. A name alone does not: a local folder can be
written again under the same path (the demo pre-trains its mini CLIP and HuBERT again in place for another
seed), one folder can be reached by several spellings of its path, and a run keeps training heads under
one name. So keys take the weights themselves (and, for a folder, its files)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # model.py imports this module
    from .model import SpeechCLIP


def weights_fingerprint(module: nn.Module) -> str:
    """A short digest of a frozen encoder's weights: each tensor's name, shape and 64 evenly spaced values
    (exact bytes, so it is the same on every machine; any two trained or random models differ in them)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        count = min(64, flat.numel())
        picks = torch.arange(count, dtype=torch.long) * max(flat.numel() - 1, 0) // max(count - 1, 1)  # exact integers
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(flat[picks].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def model_fingerprint(model: "SpeechCLIP") -> str:
    """A SpeechCLIP's identity for cached embeddings: its config, every trained weight, and the frozen
    encoders' fingerprints (the same heads over another upstream embed otherwise), but not where the
    encoders were read from (one checkpoint reached by two spellings of its path is one model)."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("upstream", "clip")}
    digest = hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(json.dumps(model.encoder_fingerprints(), sort_keys=True).encode())
    for name, tensor in sorted(model.trainable_state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def folder_files(name_or_path: str | Path) -> list[list[str | int]]:
    """[relative path, size, mtime_ns] of every file in a local encoder folder; [] for a hub id."""
    source = Path(name_or_path)
    files = sorted(source.rglob("*")) if source.is_dir() else []
    return [[str(f.relative_to(source)), f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()]
