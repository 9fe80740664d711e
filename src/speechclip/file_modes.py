"""Written files readable as the user's umask says. safetensors (0.8) writes through a private temporary
file, so every `.safetensors` it makes is 0600 whatever the umask: on a shared machine a checkpoint,
an embeddings folder or a converted model would be unreadable to the rest of the lab."""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc), else set and put back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | Path) -> None:
    """Give a file, or every .safetensors file under a folder, the mode a new file gets here (0644 under umask
    022)."""
    path = Path(path)
    mode = 0o666 & ~current_umask()
    for file in (path.rglob("*.safetensors") if path.is_dir() else [path]):
        if file.is_file() and not file.is_symlink():
            os.chmod(file, mode)
