"""A finished folder moved into place whole: what converted checkpoints and saved indexes are written with, so a
kill at any moment leaves the old folder or the new one, never a mix of their files."""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path


def swap_in(staging: Path, target: Path) -> None:
    """Move the finished `staging` folder to `target`; an old `target` is moved aside first and deleted only after."""
    old = target.parent / f".{target.name}.replaced-{os.getpid()}"
    if target.exists() or target.is_symlink():
        target.rename(old)
    staging.rename(target)
    remove(old)


def remove(path: Path) -> None:
    """Delete a folder, file or link if there is one (rmtree alone leaves a file or a link in place)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale(target: Path, tag: str) -> list[Path]:
    """Delete the `.NAME.TAG-PID` folders beside `target` whose process is gone: a killed run (SIGTERM, power)
    skips its own clean-up, and the next run has another pid, so nothing else would ever remove them."""
    removed = []
    for path in target.parent.glob(f".{glob.escape(target.name)}.{tag}-*"):
        pid = path.name.rsplit("-", 1)[1]
        if pid.isdigit() and int(pid) > 0 and not _alive(int(pid)):
            remove(path)
            removed.append(path)
    return removed


def remove_leftovers(target: Path, tag: str) -> None:
    """Before staging `target` anew: remove what killed runs left beside it, their `.NAME.TAG-PID` staging folders
    and, while `target` exists, the old folders a killed `swap_in` had moved aside (without `target`, such a
    folder is the only copy left, so it stays)."""
    remove_stale(target, tag)
    if target.exists():
        remove_stale(target, "replaced")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
