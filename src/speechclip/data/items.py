"""The one record every dataset reader produces, and the checks that keep a long pass from dying late."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import soundfile
from ..audio import cut_short
from ..images import header_problem


class DataError(ValueError):
    """A dataset file or field is missing or malformed; the message names it."""


@dataclass(frozen=True)
class SpokenCaption:
    audio: Path  # wav (any soundfile format), any rate / channel count: loading makes it 16 kHz mono
    image: Path
    image_id: str  # groups the captions of one image (the 5-captions-per-image protocol)
    text: str | None = None  # transcript: evaluation only (zero-shot speech<->text), never training
    speaker: str | None = None


@dataclass
class CheckReport:
    """What a pass over a dataset found: the good items, and each bad one with its reason."""

    good: list[SpokenCaption] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)

    def summary(self) -> str:
        lines = [f"{len(self.good)} usable items, {len(self.bad)} skipped"]
        lines += [f"  skipped {name}: {reason}" for name, reason in self.bad[:20]]
        if len(self.bad) > 20:
            lines.append(f"  ... and {len(self.bad) - 20} more")
        return "\n".join(lines)


def check_items(items: Iterable[SpokenCaption], on_error: str = "raise") -> CheckReport:
    """Check that every audio file opens with samples in it and every image opens, before training.

    on_error: "raise" stops at the first bad item with its file in the message; "skip" drops and counts.
    Reads headers only, so 600k SpokenCOCO files take a minute, not an hour.
    """
    if on_error not in ("raise", "skip"):
        raise DataError(f"on_error: expected 'raise' or 'skip', got {on_error!r}")
    report = CheckReport()
    for item in items:
        problem = _problem(item)
        if problem is None:
            report.good.append(item)
        elif on_error == "raise":
            raise DataError(f"{problem[0]}: {problem[1]}")
        else:
            report.bad.append(problem)
    return report


def _problem(item: SpokenCaption) -> tuple[str, str] | None:
    if not item.image.is_file():
        return str(item.image), "missing image"
    image_problem = header_problem(item.image)
    if image_problem:
        return str(item.image), image_problem
    if not item.audio.is_file():
        return str(item.audio), "missing audio"
    try:
        info = soundfile.info(str(item.audio))
    except (RuntimeError, soundfile.LibsndfileError) as error:
        return str(item.audio), f"unreadable audio ({error})"
    if info.frames == 0:
        return str(item.audio), "empty audio"
    cut = cut_short(info.extra_info)
    return (str(item.audio), cut) if cut else None


@dataclass
class ImageTable:
    """The distinct images of a caption list, in first-seen order: what retrieval ranks against."""

    ids: list[str]
    paths: list[Path]
    caption_rows: list[int]  # per caption, the row of its image in `ids` / `paths`


def distinct_images(items: Iterable[SpokenCaption]) -> dict[str, Path]:
    """Each image id's file, in first-seen order. An id naming two files is refused: which one retrieval
    ranks (or an export embeds) would otherwise depend on the order of the rows."""
    files: dict[str, Path] = {}
    for item in items:
        known = files.setdefault(item.image_id, item.image)
        if known != item.image:
            raise DataError(f"image_id {item.image_id!r}: names two files, {known} and {item.image}")
    return files


def image_table(items: Sequence[SpokenCaption]) -> ImageTable:
    files = distinct_images(items)
    rows = {image_id: row for row, image_id in enumerate(files)}
    return ImageTable(list(files), list(files.values()), [rows[item.image_id] for item in items])


def by_image(items: Iterable[SpokenCaption]) -> dict[str, list[SpokenCaption]]:
    groups: dict[str, list[SpokenCaption]] = {}
    for item in items:
        groups.setdefault(item.image_id, []).append(item)
    return groups
