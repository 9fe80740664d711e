"""Listing a folder, fingerprinting it, and where its cache lives: what decides that a cached index is
still valid (same files, same sizes, same modification times, same model)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Sequence


CACHE_NAME = ".speechclip"  # beside the data: inside the folder, hidden, skipped when listing it


def list_files(folder: Path, suffixes: Iterable[str]) -> list[Path]:
    """Files under `folder` (recursively) with one of `suffixes`, sorted; hidden folders are skipped,
    so the cache kept inside the folder is never listed as data."""
    wanted = {s.lower() for s in suffixes}
    found = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts[:-1]) or relative.name.startswith("."):
            continue
        if path.suffix.lower() in wanted and path.is_file():
            found.append(path)
    return sorted(found)


def item_id(path: Path, root: Path) -> str:
    """A file's id: its path relative to the folder (or manifest folder), with forward slashes."""
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()


def fingerprint(files: Sequence[Path], *extra: str) -> str:
    """One hash over (path, size, mtime) of every file, plus `extra` strings (the model's identity):
    equal fingerprints mean the cached embeddings are still right."""
    digest = hashlib.sha1()
    for part in extra:
        digest.update(part.encode() + b"\0")
    for path in files:
        stat = path.stat()
        digest.update(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cache_folder(source: Path, cache: Path | None) -> Path:
    """`cache` when given, else `.speechclip/` inside the folder (or beside the manifest file)."""
    if cache is not None:
        return Path(cache)
    return (source if source.is_dir() else source.parent) / CACHE_NAME


def read_meta(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # absent or torn: the caller rebuilds
