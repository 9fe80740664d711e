"""A folder of images made searchable: CLIP embeddings and a FAISS index cached beside the folder and
reused while the folder is unchanged (a progress bar the first time), and thumbnails cached on demand.

Layout of the cache (`DIR/.speechclip/` unless told otherwise):
  images/<clip-slug>/embeddings.safetensors   per-image embeddings (`ImageEmbeddingCache`: an added image
                                              costs one forward, not the whole folder again)
  images/<clip-slug>/index/                   the FAISS index + meta.json holding the folder's fingerprint
  thumbs/                                     JPEG thumbnails, keyed by image and its mtime
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..image_cache import ImageEmbeddingCache
from ..images import ImageError
from ..index import EmbeddingIndex
from .files import cache_folder, fingerprint, item_id, list_files, read_meta

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
THUMBNAIL_SIZE = 256  # longest side in pixels: sharp in a grid cell, a few kB each


class UnknownItem(KeyError):
    """An id that is not in the collection (a stale link, a typo); the app answers 404."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class Gallery:
    folder: Path
    ids: list[str]
    paths: dict[str, Path]
    vectors: np.ndarray  # (N, D) L2-normalised image embeddings, row i = ids[i]
    index: EmbeddingIndex
    cache: Path
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    embedded: int = 0  # images that went through CLIP when this gallery was opened (0: all cached)

    def __post_init__(self) -> None:
        self._rows = {image_id: row for row, image_id in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def path(self, image_id: str) -> Path:
        if image_id not in self.paths:
            raise UnknownItem(f"no image {image_id!r}")  # the server's own folder is not the client's business
        return self.paths[image_id]

    def vector(self, image_id: str) -> np.ndarray:
        self.path(image_id)
        return self.vectors[self._rows[image_id]]

    def search(self, query: np.ndarray, k: int) -> list[tuple[str, float]]:
        """(D,) normalised query -> the k nearest images as (id, cosine), best first."""
        return self.index.search(query[None, :], k)[0]

    def thumbnail(self, image_id: str, size: int = THUMBNAIL_SIZE) -> Path:
        """A JPEG no larger than `size` on its longest side (small images are kept as they are), made once."""
        source = self.path(image_id)
        stat = source.stat()
        key = hashlib.sha1(f"{image_id}|{stat.st_size}|{stat.st_mtime_ns}|{size}".encode()).hexdigest()
        target = self.cache / "thumbs" / f"{key}.jpg"
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(source) as image:
                image = _on_white(image)
                image.thumbnail((size, size))
            tmp = target.with_name(f"{target.stem}.{os.getpid()}.{id(image)}.tmp")
            image.save(tmp, "JPEG", quality=88)
            tmp.replace(target)  # atomic: two requests for one thumbnail never read a half-written file
        return target


def _on_white(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited over white (JPEG has no alpha; black would hide line art)."""
    if image.mode in ("RGBA", "LA", "P", "PA"):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return image.convert("RGB")


def _readable(paths: list[Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Split into images Pillow can open and (file, reason) for the rest; only run on a cache miss."""
    good, bad = [], []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
            good.append(path)
        except Exception as error:  # Pillow raises many types for broken files; each is reported by name
            bad.append((str(path), f"unreadable image ({error})"))
    return good, bad


def index_images(model, folder: str | Path, cache: str | Path | None = None, progress: bool = True) -> Gallery:
    """Embed every image under `folder` with the model's CLIP and index them, or reuse the cache."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such image folder")
    files = list_files(folder, IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    root = cache_folder(folder, Path(cache) if cache else None)
    embeddings = ImageEmbeddingCache(root / "images", model.clip)
    index_dir = embeddings.folder / "index"
    key = fingerprint(files)  # the CLIP is the cache's own sub-folder (its weights), not a path spelling
    source = read_meta(index_dir / "source.json")  # the fingerprint the saved index was built from
    cached = source.get("fingerprint") == key
    if cached:
        skipped = [(name, reason) for name, reason in source.get("skipped", [])]
        unreadable = {name for name, _ in skipped}
        good = [p for p in files if str(p) not in unreadable]
    else:
        good, skipped = _readable(files)
        if not good:
            raise ImageError(f"{folder}: none of the {len(files)} images could be read (first: {skipped[0][1]})")
        if progress:
            print(f"indexing {len(good)} images in {folder} (cached in {root}; reused while the folder is unchanged)",
                  file=sys.stderr)
    for name, reason in skipped:
        print(f"skipped {name}: {reason}", file=sys.stderr)
    vectors = torch.nn.functional.normalize(embeddings.embeddings(good, progress=progress).float(), dim=-1).numpy()
    ids = [item_id(p, folder) for p in good]
    index = EmbeddingIndex.load(index_dir) if cached else None
    if index is None or index.ids != ids:
        index = EmbeddingIndex.build(vectors, ids, "auto")
        index.save(index_dir)
        (index_dir / "source.json").write_text(json.dumps({"fingerprint": key, "skipped": skipped}) + "\n")
    return Gallery(folder, ids, dict(zip(ids, good)), vectors, index, root, skipped, embeddings.images_embedded)
