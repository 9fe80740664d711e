"""What `--out` may be: checked before anything is read or written, because `overwrite` deletes the old folder.

A folder is replaced only when it holds a converted model (its `conversion.json`, which only `convert` writes)
and not the checkpoint being converted; an empty folder is simply used. A file, the current folder (or one
holding it) and a path through a file are refused by name."""

from __future__ import annotations

from pathlib import Path

from .errors import ConversionError

REPORT = "conversion.json"  # written last into every converted folder: where it came from, what was dropped


def check_target(out: Path, checkpoint: Path, overwrite: bool) -> None:
    """Raise ConversionError, naming `out`, if converting into it could lose anything but a converted model."""
    where = out.resolve()
    if where == Path.cwd() or where in Path.cwd().parents:
        raise ConversionError(f"{out}: the current folder (or one holding it); convert into a new folder")
    if where in checkpoint.resolve().parents:
        raise ConversionError(f"{out}: holds the checkpoint being converted ({checkpoint}); choose another folder")
    _check_parents(out)
    if out.exists() and not out.is_dir():
        raise ConversionError(f"{out}: a file, not a folder; choose a folder name")
    if not out.exists() or not any(out.iterdir()):
        return  # nothing there to lose
    if not (out / REPORT).is_file():
        raise ConversionError(f"{out}: not empty and holds no converted model (no {REPORT}); choose another folder")
    if not overwrite:
        raise ConversionError(f"{out}: holds a converted model; choose another folder or pass overwrite=True (--overwrite)")


def _check_parents(out: Path) -> None:
    """The nearest existing folder above `out` must be a folder: the staging folder is written beside `out`."""
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConversionError(f"{_shown(parent, out)}: a file, not a folder (on the way to --out {out})")
            return


def _shown(parent: Path, out: Path) -> Path:
    """`parent` as the user wrote it when it is a prefix of `out`, else absolute."""
    for candidate in out.parents:
        if candidate.absolute() == parent:
            return candidate
    return parent
