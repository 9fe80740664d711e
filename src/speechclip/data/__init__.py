"""Dataset readers: Flickr8k Audio, SpokenCOCO, generic manifests, and the offline corpus."""

from .flickr8k import read_flickr8k
from .items import CheckReport, DataError, ImageTable, SpokenCaption, by_image, check_items, image_table
from .manifest import read_manifest, write_manifest
from .spokencoco import read_spokencoco

__all__ = ["CheckReport", "DataError", "ImageTable", "SpokenCaption", "by_image", "check_items", "image_table", "read_dataset",
           "read_flickr8k", "read_manifest", "read_spokencoco", "write_manifest"]


def read_dataset(kind: str, root: str, split: str, **options) -> list[SpokenCaption]:
    """kind: flickr8k | spokencoco | manifest (root is then a folder of <split>.jsonl/.csv, or a file)."""
    from pathlib import Path

    if kind == "flickr8k":
        return read_flickr8k(root, split)
    if kind == "spokencoco":
        return read_spokencoco(root, split, **options)
    if kind in ("manifest", "synthetic"):
        path = Path(root)
        if path.is_dir():
            matches = [path / f"{split}{ext}" for ext in (".jsonl", ".csv") if (path / f"{split}{ext}").is_file()]
            if not matches:
                raise DataError(f"{path}: no {split}.jsonl or {split}.csv")
            path = matches[0]
        return _nonempty(read_manifest(path), path, split)
    raise DataError(f"dataset kind: expected flickr8k, spokencoco or manifest, got {kind!r}")


def _nonempty(items: list[SpokenCaption], path, split: str) -> list[SpokenCaption]:
    """An empty split is refused as Flickr8k and SpokenCOCO refuse it: read as 0 items, an evaluation
    reported "0 spoken captions" and exited 0."""
    if not items:
        raise DataError(f"{path}: no spoken captions found for split {split!r}")
    return items
