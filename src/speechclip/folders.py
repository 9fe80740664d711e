"""A finished folder moved into place whole: what converted checkpoints and saved indexes are written with, so a
kill at any moment leaves the old folder or the new one, never a mix of their files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def swap_in(staging: Path, target: Path) -> None:
    """Move the finished `staging` folder to `target`; an old `target` is moved aside first and deleted only after."""
    old = target.parent / f".{target.name}.replaced-{os.getpid()}"
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)
