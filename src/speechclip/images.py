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
            width, height = image.size  # read from the header; nothing is decoded yet
            if width * height > limit:
                raise ImageError(f"{path}: {width} x {height} = {width * height / 1e6:.0f} megapixels, over the limit "
                                 f"of {limit / 1e6:.0f} (speechclip.images.MAX_PIXELS)")
            return image.convert("RGB")
    except Image.DecompressionBombError as error:
        raise ImageError(f"{path}: refused by Pillow as a decompression bomb ({error})") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        if isinstance(error, ImageError):
            raise
        raise ImageError(f"{path}: unreadable image ({error})") from error
