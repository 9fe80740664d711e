"""What identifies a frozen encoder in a cache key. Its name alone does not: a local folder can be written
again under the same path (the demo pre-trains its mini CLIP and HuBERT again in place for another seed),
and one folder can be reached by several spellings of its path. A key therefore takes the folder's files
(size, modification time) and a sample of the loaded weights."""

from __future__ import annotations

from pathlib import Path

from torch import nn

WEIGHT_SAMPLES, SAMPLE_BYTES = 8, 4096


def folder_files(name_or_path: str | Path) -> list[list]:
    """[relative path, size, mtime_ns] of every file in a local encoder folder; [] for a hub id."""
    source = Path(name_or_path)
    files = sorted(source.rglob("*")) if source.is_dir() else []
    return [[str(f.relative_to(source)), f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()]


def update_with_weights(digest, module: nn.Module) -> None:
    """Feed `digest` the first float32 bytes of every n-th parameter: cheap at any model size, and different
    for any two trainings or initialisations."""
    parameters = list(module.parameters())
    for parameter in parameters[:: max(1, len(parameters) // WEIGHT_SAMPLES)]:
        head = parameter.detach().reshape(-1)[: SAMPLE_BYTES // 4]
        digest.update(head.float().cpu().numpy().tobytes())
