"""Karpathy's split files (dataset_flickr8k.json, dataset_coco.json), which the Flickr8k and SpokenCOCO readers
share: image file name -> split, every entry checked."""

from __future__ import annotations

import json
from pathlib import Path

from .items import DataError

# Karpathy's split names -> ours: restval (the 30k COCO val images outside his 5k val / 5k test) trains.
KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


def karpathy_split(path: Path, split: str) -> set[str]:
    """The image file names of our `split` (train / val / test) in Karpathy's dataset_*.json."""
    accepted = KARPATHY_SPLITS[split]
    return {name for name, part in read_karpathy(path).items() if part in accepted}


def read_karpathy(path: Path) -> dict[str, str]:
    """Karpathy's split file as image file name -> split name. Every entry is checked, not only the split
    asked for: an image listed twice is refused naming both entries (in two splits it is a train/test
    leak; in one its captions would count twice)."""
    splits: dict[str, str] = {}
    first: dict[str, int] = {}
    for index, entry in enumerate(_karpathy_images(path)):
        name, split = _karpathy_entry(path, index, entry)
        if name in first:
            raise DataError(f"{path}: images[{first[name]}] and images[{index}] both list {name} "
                            f"(splits {splits[name]!r} and {split!r})")
        first[name], splits[name] = index, split
    return splits


def _karpathy_images(path: Path) -> list:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error}); expected Karpathy's split file") from error
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: unreadable ({error})") from error
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise DataError(f"{path}: no 'images' list (Karpathy's split file is "
                        '{"images": [{"filename": ..., "split": ...}, ...]})')
    return images


def _karpathy_entry(path: Path, index: int, entry: object) -> tuple[str, str]:
    if not isinstance(entry, dict):
        raise DataError(f"{path}: images[{index}] is not an object")
    for key in ("filename", "split"):
        if not isinstance(entry.get(key), str):
            raise DataError(f"{path}: images[{index}] has no '{key}'")
    known = sorted({name for names in KARPATHY_SPLITS.values() for name in names})
    if entry["split"] not in known:
        raise DataError(f"{path}: images[{index}]: split {entry['split']!r} is not one of {', '.join(known)}")
    return entry["filename"], entry["split"]
