"""Spoken clips made searchable (image -> speech): a folder of audio files or a manifest, embedded with
the SpeechCLIP model and indexed; cached beside the source and reused while the clips and the model
are unchanged. Clips that cannot be read or are shorter than the model's minimum are skipped by name.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..audio import AudioError, load_audio
from ..data.manifest import read_manifest
from ..fingerprint import model_fingerprint
from ..index import EmbeddingIndex
from .files import cache_folder, fingerprint, item_id, list_files, read_meta
from .gallery import UnknownItem

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
MANIFEST_SUFFIXES = (".jsonl", ".csv")
BATCH = 16


@dataclass
class ClipSet:
    source: Path
    ids: list[str]
    paths: dict[str, Path]
    index: EmbeddingIndex
    texts: dict[str, str] = field(default_factory=dict)  # transcripts, when a manifest has them
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    embedded: int = 0  # clips that went through the model when this set was opened (0: all cached)

    def __len__(self) -> int:
        return len(self.ids)

    def path(self, clip_id: str) -> Path:
        if clip_id not in self.paths:
            raise UnknownItem(f"no clip {clip_id!r}")  # the server's own paths are not the client's business
        return self.paths[clip_id]

    def search(self, query: np.ndarray, k: int) -> list[tuple[str, float]]:
        return self.index.search(query[None, :], k)[0]


def _listed(source: Path) -> tuple[list[Path], Path, dict[Path, str]]:
    """The clip files of a folder or manifest, the folder ids are relative to, and transcripts by file."""
    if source.is_dir():
        files = list_files(source, AUDIO_SUFFIXES)
        if not files:
            raise ValueError(f"{source}: no audio files ({', '.join(AUDIO_SUFFIXES)}) in this folder")
        return files, source, {}
    if source.suffix.lower() not in MANIFEST_SUFFIXES:
        raise ValueError(f"{source}: --clips takes a folder of audio files or a .jsonl/.csv manifest")
    items = read_manifest(source)  # raises DataError naming the line
    files = list(dict.fromkeys(item.audio for item in items))
    return files, source.parent, {item.audio: item.text for item in items if item.text}


def _embed(model, files: list[Path], progress: bool) -> tuple[list[Path], torch.Tensor, list[tuple[str, str]]]:
    """Encode the readable clips in batches; (file, reason) for each one skipped."""
    kept, vectors, skipped = [], [], []
    minimum = model.upstream.min_samples
    for start in tqdm(range(0, len(files), BATCH), desc="clip embeddings", disable=not progress):
        waves, batch = [], []
        for path in files[start : start + BATCH]:
            try:
                wave = load_audio(path)
            except AudioError as error:
                skipped.append((str(path), str(error).removeprefix(f"{path}: ")))
                continue
            if wave.size < minimum:
                skipped.append((str(path), f"{wave.size} samples, shorter than the model's minimum of {minimum}"))
                continue
            waves.append(wave)
            batch.append(path)
        if waves:
            vectors.append(model.encode_speech(waves).float().cpu())
            kept += batch
    return kept, torch.cat(vectors) if vectors else torch.zeros(0, model.clip.embed_dim), skipped


def index_clips(model, source: str | Path, cache: str | Path | None = None, progress: bool = True) -> ClipSet:
    """Embed and index the clips of a folder or manifest with `model`, or reuse the cache."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such folder or manifest of clips")
    files, root, texts = _listed(source)
    folder = cache_folder(source, Path(cache) if cache else None) / f"clips-{source.stem}"
    key = fingerprint(files, model_fingerprint(model))
    meta = read_meta(folder / "source.json")
    if meta.get("fingerprint") == key:
        kept = [Path(name) for name in meta["kept"]]
        skipped = [(name, reason) for name, reason in meta["skipped"]]
        index, embedded = EmbeddingIndex.load(folder / "index"), 0
    else:
        if progress:
            print(f"embedding {len(files)} clips from {source} (cached in {folder})", file=sys.stderr)
        kept, vectors, skipped = _embed(model, files, progress)
        if not kept:
            raise AudioError(f"{source}: none of the {len(files)} clips could be used (first: {skipped[0][1]})")
        ids = [item_id(p, root) for p in kept]
        index, embedded = EmbeddingIndex.build(vectors.numpy(), ids, "auto"), len(kept)
        index.save(folder / "index")
        (folder / "source.json").write_text(json.dumps({"fingerprint": key, "kept": [str(p) for p in kept],
                                                        "skipped": skipped}) + "\n")
    for name, reason in skipped:
        print(f"skipped clip {name}: {reason}", file=sys.stderr)
    ids = [item_id(p, root) for p in kept]
    return ClipSet(source, ids, dict(zip(ids, kept)), index,
                   {i: texts[p] for i, p in zip(ids, kept) if p in texts}, skipped, embedded)

