"""Flickr8k Audio Captions (Harwath & Glass 2015) with the Flickr8k images and text, as published:

    ROOT/flickr_audio/wavs/<image>_<n>.wav        40,000 spoken captions (5 per image)
    ROOT/flickr_audio/wav2capt.txt                "<image>_<n>.wav <image>.jpg #<n>"
    ROOT/flickr_audio/wav2spk.txt                 "<image>_<n>.wav <speaker>"
    ROOT/Flickr8k_Dataset/Flicker8k_Dataset/*.jpg (or ROOT/Flicker8k_Dataset, ROOT/Images)
    ROOT/Flickr8k_text/Flickr8k.token.txt         "<image>.jpg#<n>\\t<caption>"
    ROOT/Flickr8k_text/Flickr_8k.{train,dev,test}Images.txt   the 6,000 / 1,000 / 1,000 image split
    (optional) ROOT/dataset_flickr8k.json         Karpathy's split; used instead when present

A malformed line, a clip listed twice or an image in two splits is refused naming file:line: each would
otherwise change the numbers silently (clips without text, a clip counted twice, a test image trained on).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from .items import DataError, SpokenCaption
from .karpathy import KARPATHY_SPLITS, read_karpathy

SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt", "test": "Flickr_8k.testImages.txt"}
IMAGE_DIRS = ("Flickr8k_Dataset/Flicker8k_Dataset", "Flicker8k_Dataset", "Flickr8k_Dataset", "Images")
TEXT_DIRS = ("Flickr8k_text", ".")
WAV2CAPT_LINE = re.compile(r"(\S+)\s+(\S+?)\s*#(\d+)")  # "<wav> <image>.jpg #<n>" (or "<image>.jpg#<n>")


def read_flickr8k(root: str | Path, split: str) -> list[SpokenCaption]:
    """All spoken captions of the images in `split` (train / val / test)."""
    root = Path(root)
    if split not in SPLIT_FILES:
        raise DataError(f"split: expected one of {sorted(SPLIT_FILES)}, got {split!r}")
    images = _split_images(root, split)
    transcripts = _transcripts(_find(root, TEXT_DIRS, "Flickr8k.token.txt"))
    speakers = _speakers(root / "flickr_audio" / "wav2spk.txt")
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


def _split_images(root: Path, split: str) -> set[str]:
    karpathy = root / "dataset_flickr8k.json"
    if karpathy.is_file():
        return {name for name, part in read_karpathy(karpathy).items() if part in KARPATHY_SPLITS[split]}
    lists = _split_lists(root)
    if split not in lists:
        _find(root, TEXT_DIRS, SPLIT_FILES[split])  # raises, naming the file and where it was looked for
    return lists[split]


def _split_lists(root: Path) -> dict[str, set[str]]:
    """The images of every split list present. All of them are read (8,000 lines), so an image listed in
    two (a leak: a test image seen in training) or twice in one is refused naming both lines."""
    lists: dict[str, set[str]] = {}
    where: dict[str, str] = {}
    for split, name in SPLIT_FILES.items():
        path = next((root / f / name for f in TEXT_DIRS if (root / f / name).is_file()), None)
        if path is None:
            continue
        lists[split] = set()
        for line_no, line in enumerate(path.read_text().splitlines(), start=1):
            image = line.strip()
            if not image:
                continue
            if image in where:
                raise DataError(f"{path}:{line_no}: {image} is also listed in {where[image]}")
            where[image] = f"{path}:{line_no}"
            lists[split].add(image)
    return lists


def _wav_captions(path: Path) -> Iterator[tuple[str, str, str]]:
    """(wav, image, caption index) per line. A clip listed twice is refused naming both lines rather than
    de-duplicated: the published file lists each of its 40,000 wavs once, so a repeat means an edited or
    concatenated file, and when the two lines differ no reader can tell which one is right."""
    if not path.is_file():
        raise DataError(f"{path}: missing (Flickr8k Audio's wav -> caption list)")
    first: dict[str, int] = {}
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        match = WAV2CAPT_LINE.fullmatch(line.strip())
        if match is None:
            raise DataError(f"{path}:{line_no}: expected '<wav> <image>.jpg #<n>', got {line!r}")
        wav, image, index = match.groups()
        if wav in first:
            raise DataError(f"{path}:{line_no}: {wav} is listed again (first at line {first[wav]})")
        first[wav] = line_no
        yield wav, image, index


def _transcripts(path: Path) -> dict[str, str]:
    """'<image>.jpg#<n>' -> caption. A line without a tab is refused naming it: split on spaces, the key
    would swallow the caption and every clip would silently lose its transcript."""
    out = {}
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        key, tab, text = line.partition("\t")
        if not tab or not key.strip():
            raise DataError(f"{path}:{line_no}: expected '<image>.jpg#<n><TAB><caption>', got {line[:80]!r}")
        if text.strip():
            out[key.strip()] = text.strip()
    return out


def _speakers(path: Path) -> dict[str, str]:
    """wav -> speaker id from the optional `wav2spk.txt`. A line that is not '<wav> <speaker>', or a clip given
    two speakers, is refused naming it: dropped, it would silently leave the clip without a speaker (the
    field that keeps test speakers out of training in speaker-disjoint splits)."""
    if not path.is_file():
        return {}
    out: dict[str, str] = {}
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise DataError(f"{path}:{line_no}: expected '<wav> <speaker>', got {line[:80]!r}")
        wav, speaker = fields
        if out.setdefault(wav, speaker) != speaker:
            raise DataError(f"{path}:{line_no}: {wav} is given speaker {speaker}, and {out[wav]} on an earlier line")
    return out


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
