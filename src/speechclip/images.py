"""Image loading with errors that name the file."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError


class ImageError(ValueError):
    """Missing or unreadable image; the message starts with the file."""


def load_image(path: str | Path) -> Image.Image:
    """Open an image fully (not lazily) as RGB, so a truncated file fails here and not mid-batch."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such image file")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise ImageError(f"{path}: unreadable image ({error})") from error
