"""Real clip-art drawings from Debian's `openclipart-svg` package, with captions from their titles.

Each SVG carries `<dc:title>` (its first one names the drawing; later ones name agents) and sometimes
`<dc:description>`; its folder names a category. Junk titles are filtered out: file-like names,
numbers, "untitled", and any title with a word outside the English word list (Debian `wamerican`),
which drops authors' names and non-English titles; only the first drawing of each title is kept. Rendering uses `rsvg-convert` (Debian `librsvg2-bin`) onto a white background.
"""

from __future__ import annotations

import random
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .items import DataError

CLIPART_ROOT = Path("/usr/share/openclipart/svg")
WORD_LIST = Path("/usr/share/dict/american-english")
TITLE = re.compile(r"<dc:title>([^<]*)</dc:title>")
DESCRIPTION = re.compile(r"<dc:description>([^<]*)</dc:description>")
WORD = re.compile(r"^[a-z]+$")
JUNK = {"untitled", "drawing", "image", "clipart", "clip", "art", "svg", "new", "document", "layer", "test", "icon",
        "open", "library", "simple"}


@dataclass(frozen=True)
class Drawing:
    svg: Path
    title: str  # cleaned, lower case, 1-4 words
    category: str
    description: str | None = None


def find_drawings(root: Path = CLIPART_ROOT) -> list[Drawing]:
    """All usable drawings, one per file name (the package lists some files under two folders)."""
    if not root.is_dir():
        raise DataError(f"{root}: not found; install Debian's openclipart-svg (scripts/setup.sh does)")
    english = _english_words()
    files: set[str] = set()
    titles: dict[str, Drawing] = {}
    for svg in sorted(root.rglob("*.svg")):
        if svg.name in files:
            continue
        files.add(svg.name)
        drawing = _read(svg, root)
        if drawing is not None and drawing.title not in titles and all(w in english for w in drawing.title.split()):
            titles[drawing.title] = drawing
    return list(titles.values())


def _english_words() -> set[str]:
    if not WORD_LIST.is_file():
        raise DataError(f"{WORD_LIST}: not found; install Debian's wamerican (scripts/setup.sh does)")
    return {w.strip().lower() for w in WORD_LIST.read_text(errors="ignore").splitlines() if "'" not in w}


def _read(svg: Path, root: Path) -> Drawing | None:
    try:
        head = svg.read_text(errors="ignore")[:20000]
    except OSError:
        return None
    titles = TITLE.findall(head)
    title = _clean(titles[0]) if titles else None
    if title is None:
        return None
    description = DESCRIPTION.search(head)
    category = svg.relative_to(root).parts[0].replace("_", " ")
    text = _clean(description.group(1), max_words=8) if description else None
    return Drawing(svg, title, category, text if text and text != title else None)


def _clean(text: str, max_words: int = 4) -> str | None:
    words = re.sub(r"[_\-]+", " ", text).lower().split()
    if not 1 <= len(words) <= max_words or not all(WORD.match(w) for w in words):
        return None
    if any(w in JUNK for w in words) or all(len(w) < 3 for w in words):
        return None
    return " ".join(words)


def clipart_captions(drawing: Drawing, rng: random.Random, count: int) -> list[str]:
    options = [f"a drawing of {_article(drawing.title)}", f"{drawing.title}", f"clip art of {_article(drawing.title)}",
               f"a picture of {_article(drawing.title)} from {drawing.category}"]
    if drawing.description:
        options.append(drawing.description)
    rng.shuffle(options)
    return options[:count]


def _article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def render_svg(svg: Path, out: Path, size: int) -> None:
    """SVG -> size x size PNG, aspect kept, on white; raises DataError naming the file on failure."""
    if shutil.which("rsvg-convert") is None:
        raise DataError("rsvg-convert not found; install Debian's librsvg2-bin (scripts/setup.sh does)")
    tmp = out.with_suffix(".tmp.png")
    result = subprocess.run(["rsvg-convert", "-w", str(size), "-h", str(size), "-a", "-b", "white", "-o", str(tmp), str(svg)],
                            capture_output=True, timeout=60)
    if result.returncode != 0 or not tmp.is_file():
        raise DataError(f"{svg}: rsvg-convert failed ({result.stderr.decode(errors='ignore').strip()[:200]})")
    from PIL import Image

    with Image.open(tmp) as drawn:
        canvas = Image.new("RGB", (size, size), "white")
        canvas.paste(drawn.convert("RGB"), ((size - drawn.width) // 2, (size - drawn.height) // 2))
    canvas.save(out)
    tmp.unlink()
