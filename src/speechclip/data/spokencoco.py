"""SpokenCOCO (Hsu et al. 2021) with the MSCOCO 2014 images, as published:

    ROOT/SpokenCOCO_train.json, ROOT/SpokenCOCO_val.json
        {"data": [{"image": "val2014/COCO_val2014_000000325114.jpg",
                   "captions": [{"text": ..., "speaker": ..., "uttid": ..., "wav": "wavs/val/0/....wav"}]}]}
    ROOT/wavs/{train,val}/<n>/*.wav
    IMAGES/{train2014,val2014}/*.jpg          (IMAGES defaults to ROOT)
    (optional) KARPATHY = dataset_coco.json   Karpathy's split: 5,000 val / 5,000 test images, the rest
                                              (train + restval) for training; ROOT/dataset_coco.json when
                                              not given. Without it, train and val are SpokenCOCO's own
                                              files and test is refused: SpokenCOCO has no test split of
                                              its own, and reading val again as test would pick best/ on
                                              the test set.
"""

from __future__ import annotations

import json
from pathlib import Path

from .items import DataError, SpokenCaption
from .karpathy import karpathy_split

SPLITS = ("train", "val", "test")


def read_spokencoco(root: str | Path, split: str, images: str | Path | None = None,
                    karpathy: str | Path | None = None) -> list[SpokenCaption]:
    root = Path(root)
    image_root = Path(images) if images else root
    if split not in SPLITS:
        raise DataError(f"split: expected one of {SPLITS}, got {split!r}")
    split_file = _karpathy_file(root, karpathy)
    if split_file is not None:
        wanted = karpathy_split(split_file, split)
        entries = _entries(root / "SpokenCOCO_train.json", root / "SpokenCOCO_val.json")
        entries = [e for e in entries if Path(e["image"]).name in wanted]
    elif split == "test":
        raise DataError(f"{root}: SpokenCOCO's test split is Karpathy's 5,000 test images (it has none of its own); "
                        f"give Karpathy's dataset_coco.json as karpathy= (data.options.karpathy) or put it at "
                        f"{root / 'dataset_coco.json'}")
    else:
        entries = _entries(root / f"SpokenCOCO_{split}.json")
    items = [_caption(root, image_root, entry, caption) for entry in entries for caption in entry["captions"]]
    if not items:
        raise DataError(f"{root}: no spoken captions found for split {split!r}")
    return items


def _karpathy_file(root: Path, given: str | Path | None) -> Path | None:
    """The Karpathy split file: the one given, refused when it does not exist (a typo fell back to
    SpokenCOCO's own split without a word), else ROOT/dataset_coco.json when present."""
    if given:
        path = Path(given)
        if not path.is_file():
            raise DataError(f"{path}: no such file (karpathy= / data.options.karpathy, Karpathy's dataset_coco.json; "
                            "leave it out to read SpokenCOCO's own train / val split)")
        return path
    default = root / "dataset_coco.json"
    return default if default.is_file() else None


def _entries(*paths: Path) -> list[dict]:
    """The entries of the caption lists, in order. An image listed twice is refused naming both entries:
    its captions would count twice (twice the weight in training, two rows of one image in retrieval)."""
    entries: list[dict] = []
    first: dict[str, str] = {}
    for path in paths:
        for index, entry in enumerate(_data(path)):
            place = f"{path.name} data[{index}]" if len(paths) > 1 else f"data[{index}]"
            if entry["image"] in first:
                raise DataError(f"{path}: data[{index}] lists {entry['image']} again (first at {first[entry['image']]})")
            first[entry["image"]] = place
            entries.append(entry)
    return entries


def _data(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"{path}: missing (SpokenCOCO caption list)")
    try:
        data = json.loads(path.read_text())["data"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise DataError(f"{path}: expected {{'data': [...]}} ({error})") from error
    for index, entry in enumerate(data):
        if not isinstance(entry, dict) or "image" not in entry or "captions" not in entry:
            raise DataError(f"{path}: data[{index}] lacks 'image' or 'captions'")
    return data


def _caption(root: Path, image_root: Path, entry: dict, caption: dict) -> SpokenCaption:
    if "wav" not in caption:
        raise DataError(f"{entry['image']}: a caption lacks its 'wav' field")
    return SpokenCaption(audio=root / caption["wav"], image=image_root / entry["image"],
                         image_id=Path(entry["image"]).stem, text=caption.get("text"),
                         speaker=caption.get("speaker"))
