"""Image loading with errors that name the file, and a pixel limit checked before decoding."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

# Larger images are refused before they are decoded: 40 megapixels decode to ~120 MB of RGB, and CLIP sees
# them at 224 x 224 anyway. Raise it per call (max_pixels=) or here for a whole program.
MAX_PIXELS = 40_000_000


class ImageError(ValueError):
    """Missing, unreadable or oversized image; the message starts with the file."""


def load_image(path: str | Path, max_pixels: int | None = None) -> Image.Image:
    """Open an image fully (not lazily) as RGB, so a truncated file fails here and not mid-batch."""
    path = Path(path)
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    if not path.is_file():
        raise ImageError(f"{path}: no such image file")
    try:
        with Image.open(path) as image:
            problem = _oversized(image.size, limit)  # read from the header; nothing is decoded yet
            if problem is None:
                return image.convert("RGB")
    except _OPEN_ERRORS as error:
        raise ImageError(f"{path}: {_unreadable(error)}") from error
    raise ImageError(f"{path}: {problem}")


def header_problem(path: str | Path, max_pixels: int | None = None) -> str | None:
    """Why `path` would not load, from its header alone (Pillow opens lazily): what a pass over a whole dataset
    can afford. A body cut short behind a good header is found only when `load_image` decodes it; Image.verify()
    would not help: for JPEG it checks nothing, for PNG it reads the whole file."""
    try:
        with Image.open(path) as image:
            return _oversized(image.size, MAX_PIXELS if max_pixels is None else max_pixels)
    except _OPEN_ERRORS as error:
        return _unreadable(error)


_OPEN_ERRORS = (Image.DecompressionBombError, UnidentifiedImageError, OSError, SyntaxError, ValueError)


def _oversized(size: tuple[int, int], limit: int) -> str | None:
    width, height = size
    if width * height <= limit:
        return None
    return f"{width} x {height} = {width * height / 1e6:.0f} megapixels, over the limit of {limit / 1e6:.0f} (speechclip.images.MAX_PIXELS)"


def _unreadable(error: Exception) -> str:
    if isinstance(error, Image.DecompressionBombError):
        return f"refused by Pillow as a decompression bomb ({error})"
    return f"unreadable image ({error})"
