"""Flickr8k Audio Captions (Harwath & Glass 2015) with the Flickr8k images and text, as published:

    ROOT/flickr_audio/wavs/<image>_<n>.wav        40,000 spoken captions (5 per image)
    ROOT/flickr_audio/wav2capt.txt                "<image>_<n>.wav <image>.jpg #<n>"
    ROOT/flickr_audio/wav2spk.txt                 "<image>_<n>.wav <speaker>"
    ROOT/Flickr8k_Dataset/Flicker8k_Dataset/*.jpg (or ROOT/Flicker8k_Dataset, ROOT/Images)
    ROOT/Flickr8k_text/Flickr8k.token.txt         "<image>.jpg#<n>\\t<caption>"
    ROOT/Flickr8k_text/Flickr_8k.{train,dev,test}Images.txt   the 6,000 / 1,000 / 1,000 image split
    (optional) ROOT/dataset_flickr8k.json         Karpathy's split; used instead when present
"""

from __future__ import annotations

import json
from pathlib import Path

from .items import DataError, SpokenCaption

SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt", "test": "Flickr_8k.testImages.txt"}
IMAGE_DIRS = ("Flickr8k_Dataset/Flicker8k_Dataset", "Flicker8k_Dataset", "Flickr8k_Dataset", "Images")
TEXT_DIRS = ("Flickr8k_text", ".")


def read_flickr8k(root: str | Path, split: str) -> list[SpokenCaption]:
    """All spoken captions of the images in `split` (train / val / test)."""
    root = Path(root)
    if split not in SPLIT_FILES:
        raise DataError(f"split: expected one of {sorted(SPLIT_FILES)}, got {split!r}")
    images = set(_split_images(root, split))
    transcripts = _transcripts(_find(root, TEXT_DIRS, "Flickr8k.token.txt"))
    speakers = _pairs(root / "flickr_audio" / "wav2spk.txt", required=False)
    image_dir = _find_dir(root, IMAGE_DIRS)
    items = []
    for wav, image, index in _wav_captions(root / "flickr_audio" / "wav2capt.txt"):
        if image not in images:
            continue
        items.append(SpokenCaption(
            audio=root / "flickr_audio" / "wavs" / wav, image=image_dir / image, image_id=Path(image).stem,
            text=transcripts.get(f"{image}#{index}"), speaker=speakers.get(wav)))
    if not items:
        raise DataError(f"{root}: no spoken captions found for split {split!r}")
    return items


def _split_images(root: Path, split: str) -> list[str]:
    karpathy = root / "dataset_flickr8k.json"
    if karpathy.is_file():
        names = {"val": "val", "test": "test", "train": "train"}
        data = json.loads(karpathy.read_text())
        return [im["filename"] for im in data["images"] if im["split"] == names[split]]
    return [line.strip() for line in _find(root, TEXT_DIRS, SPLIT_FILES[split]).read_text().splitlines() if line.strip()]


def _wav_captions(path: Path):
    if not path.is_file():
        raise DataError(f"{path}: missing (Flickr8k Audio's wav -> caption list)")
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2:
            raise DataError(f"{path}:{line_no}: expected '<wav> <image>.jpg #<n>', got {line!r}")
        image, _, index = parts[1].partition("#")
        yield parts[0], image, (parts[2].lstrip("#") if len(parts) > 2 else index)


def _transcripts(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        key, _, text = line.partition("\t")
        if text:
            out[key.strip()] = text.strip()
    return out


def _pairs(path: Path, required: bool = True) -> dict[str, str]:
    if not path.is_file():
        if required:
            raise DataError(f"{path}: missing")
        return {}
    return dict(line.split(maxsplit=1) for line in path.read_text().splitlines() if len(line.split()) == 2)


def _find(root: Path, folders: tuple[str, ...], name: str) -> Path:
    for folder in folders:
        if (root / folder / name).is_file():
            return root / folder / name
    raise DataError(f"{root}: cannot find {name} (looked in {', '.join(folders)})")


def _find_dir(root: Path, folders: tuple[str, ...]) -> Path:
    for folder in folders:
        if (root / folder).is_dir():
            return root / folder
    raise DataError(f"{root}: cannot find the Flickr8k images (looked for {', '.join(folders)})")
