"""A generic manifest for anyone's own data: JSONL or CSV with `audio`, `image` and optional `text`,
`image_id`, `speaker`. Relative paths are read from the manifest's folder."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterable

from .items import DataError, SpokenCaption

REQUIRED = ("audio", "image")


def read_manifest(path: str | Path) -> list[SpokenCaption]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such manifest")
    rows = _csv_rows(path) if path.suffix.lower() == ".csv" else _jsonl_rows(path)
    return [_item(row, path, line) for line, row in rows]


def write_manifest(items: Iterable[SpokenCaption], path: str | Path) -> Path:
    """Write JSONL with paths relative to the manifest's folder when they lie under it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        for item in items:
            row = {"audio": _relative(item.audio, path.parent), "image": _relative(item.image, path.parent),
                   "image_id": item.image_id, "text": item.text, "speaker": item.speaker}
            out.write(json.dumps({k: v for k, v in row.items() if v is not None}) + "\n")
    return path


def _relative(file: Path, folder: Path) -> str:
    try:
        return str(Path(file).resolve().relative_to(folder.resolve()))
    except ValueError:
        return str(file)


def _jsonl_rows(path: Path):
    for line, text in enumerate(path.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{line}: not valid JSON ({error.msg})") from error
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line}: expected a JSON object")
        yield line, row


def _csv_rows(path: Path):
    with path.open(newline="") as handle:
        for line, row in enumerate(csv.DictReader(handle), start=2):
            yield line, {k: v for k, v in row.items() if v not in (None, "")}


def _item(row: dict, manifest: Path, line: int) -> SpokenCaption:
    missing = [key for key in REQUIRED if not row.get(key)]
    if missing:
        raise DataError(f"{manifest}:{line}: missing field(s) {missing}")
    image = manifest.parent / str(row["image"])
    return SpokenCaption(
        audio=manifest.parent / str(row["audio"]),
        image=image,
        image_id=str(row.get("image_id") or row["image"]),
        text=row.get("text"),
        speaker=row.get("speaker"),
    )
