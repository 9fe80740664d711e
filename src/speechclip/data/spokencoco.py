"""SpokenCOCO (Hsu et al. 2021) with the MSCOCO 2014 images, as published:

    ROOT/SpokenCOCO_train.json, ROOT/SpokenCOCO_val.json
        {"data": [{"image": "val2014/COCO_val2014_000000325114.jpg",
                   "captions": [{"text": ..., "speaker": ..., "uttid": ..., "wav": "wavs/val/0/....wav"}]}]}
    ROOT/wavs/{train,val}/<n>/*.wav
    IMAGES/{train2014,val2014}/*.jpg          (IMAGES defaults to ROOT)
    (optional) KARPATHY = dataset_coco.json   Karpathy's split: 5,000 val / 5,000 test images, the rest
                                              (train + restval) for training. Without it, val and test
                                              are both SpokenCOCO_val.json (say so in any report).
"""

from __future__ import annotations

import json
from pathlib import Path

from .items import DataError, SpokenCaption

SPLITS = ("train", "val", "test")


def read_spokencoco(root: str | Path, split: str, images: str | Path | None = None,
                    karpathy: str | Path | None = None) -> list[SpokenCaption]:
    root = Path(root)
    image_root = Path(images) if images else root
    if split not in SPLITS:
        raise DataError(f"split: expected one of {SPLITS}, got {split!r}")
    karpathy = Path(karpathy) if karpathy else (root / "dataset_coco.json")
    if karpathy.is_file():
        wanted = _karpathy_images(karpathy, split)
        entries = _entries(root / "SpokenCOCO_train.json") + _entries(root / "SpokenCOCO_val.json")
        entries = [e for e in entries if Path(e["image"]).name in wanted]
    else:
        entries = _entries(root / ("SpokenCOCO_train.json" if split == "train" else "SpokenCOCO_val.json"))
    items = [_caption(root, image_root, entry, caption) for entry in entries for caption in entry["captions"]]
    if not items:
        raise DataError(f"{root}: no spoken captions found for split {split!r}")
    return items


def _entries(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"{path}: missing (SpokenCOCO caption list)")
    try:
        data = json.loads(path.read_text())["data"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise DataError(f"{path}: expected {{'data': [...]}} ({error})") from error
    for index, entry in enumerate(data):
        if "image" not in entry or "captions" not in entry:
            raise DataError(f"{path}: data[{index}] lacks 'image' or 'captions'")
    return data


def _karpathy_images(path: Path, split: str) -> set[str]:
    accepted = {"train": {"train", "restval"}, "val": {"val"}, "test": {"test"}}[split]
    data = json.loads(path.read_text())
    return {im["filename"] for im in data["images"] if im["split"] in accepted}


def _caption(root: Path, image_root: Path, entry: dict, caption: dict) -> SpokenCaption:
    if "wav" not in caption:
        raise DataError(f"{entry['image']}: a caption lacks its 'wav' field")
    return SpokenCaption(audio=root / caption["wav"], image=image_root / entry["image"],
                         image_id=Path(entry["image"]).stem, text=caption.get("text"),
                         speaker=caption.get("speaker"))
