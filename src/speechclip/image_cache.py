"""Frozen CLIP image embeddings, computed once per image and kept on disk.

The image tower is frozen, so an image's embedding never changes for a given CLIP: every epoch,
validation and evaluation reads it from here. Keyed by CLIP model (its files and a sample of its weights,
not its name: a folder can be pre-trained again in place) and by image (path, size, mtime),
so an edited image is embedded again. The keys travel in the safetensors metadata and the file is
replaced atomically, so processes sharing a cache folder (the demo's two runs) never read a torn one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from .clip import FrozenCLIP
from .file_modes import follow_umask
from .fingerprint import folder_files, weights_fingerprint
from .images import load_image


def _image_key(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def clip_slug(clip: FrozenCLIP) -> str:
    """The cache's sub-folder for one CLIP: the same for every spelling of a folder's path, another as soon
    as the weights or the folder's files change (a folder pre-trained again in place, another hub model)."""
    identity = {"weights": weights_fingerprint(clip.model), "files": folder_files(clip.name_or_path),
                "hub_id": None if Path(clip.name_or_path).is_dir() else str(clip.name_or_path)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


class ImageEmbeddingCache:
    def __init__(self, folder: str | Path, clip: FrozenCLIP, batch_size: int = 64):
        self.folder = Path(folder) / clip_slug(clip)
        self.clip = clip
        self.batch_size = batch_size
        self.images_embedded = 0  # how many images went through the CLIP tower (tests and benchmarks read it)
        self._keys: list[str] = []
        self._rows: dict[str, int] = {}
        self._table = torch.zeros(0, clip.embed_dim)
        self._load()

    def _load(self) -> None:
        weights = self.folder / "embeddings.safetensors"
        if weights.is_file():
            try:
                with safe_open(str(weights), framework="pt") as file:
                    keys = json.loads((file.metadata() or {}).get("keys", "[]"))
                    table = file.get_tensor("embeddings")
            except (OSError, ValueError, SafetensorError):  # a damaged cache is only a cache: embed again
                return
            if len(keys) == len(table):  # an older cache without keys is simply rebuilt
                self._keys, self._table = keys, table
                self._rows = {k: i for i, k in enumerate(keys)}

    def _save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "clip.txt").write_text(str(self.clip.name_or_path) + "\n")
        tmp = self.folder / f"embeddings.{os.getpid()}.tmp"
        save_file({"embeddings": self._table.contiguous()}, str(tmp), metadata={"keys": json.dumps(self._keys)})
        follow_umask(tmp)
        tmp.replace(self.folder / "embeddings.safetensors")

    def embeddings(self, paths: Sequence[str | Path], progress: bool = False) -> torch.Tensor:
        """(len(paths), D_clip) unnormalised image embeddings, embedding only the images not yet cached."""
        keys = [_image_key(Path(p)) if Path(p).is_file() else str(p) for p in paths]
        missing = list(dict.fromkeys(k for k in keys if k not in self._rows))
        if missing:
            by_key = dict(zip(keys, paths))
            new = []
            for start in tqdm(range(0, len(missing), self.batch_size), desc="image embeddings", disable=not progress):
                chunk = missing[start : start + self.batch_size]
                images = [load_image(by_key[k]) for k in chunk]
                new.append(self.clip.image_features(self.clip.preprocess_images(images)).float().cpu())
                self.images_embedded += len(chunk)
            self._rows.update({k: len(self._keys) + i for i, k in enumerate(missing)})
            self._keys += missing
            self._table = torch.cat([self._table] + new)
            self._save()
        return self._table[[self._rows[k] for k in keys]]
