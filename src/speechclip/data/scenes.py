"""Rendered compositional scenes: shapes with colour, size, position and count, each described by
several differently-worded captions. Deterministic for a seed."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "hexagon", "ring")
COLORS = {
    "red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 70, 220), "yellow": (235, 200, 20),
    "purple": (140, 50, 180), "orange": (245, 130, 20), "black": (20, 20, 20), "pink": (245, 120, 190),
}
SIZES = {"small": 0.11, "big": 0.2}  # radius as a fraction of the canvas
PLACES = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73), "middle": (0.5, 0.5)}
PLACE_WORDS = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
               "middle": "in the middle"}
PAIRS = (("left", "right"), ("top", "bottom"))
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}


@dataclass(frozen=True)
class Thing:
    shape: str
    color: str
    size: str
    place: str
    count: int = 1

    def phrase(self, with_size: bool = True) -> str:
        noun = self.shape + ("s" if self.count > 1 else "")
        size = f"{self.size} " if with_size else ""
        return f"{COUNT_WORDS[self.count]} {size}{self.color} {noun}"


def random_scene(rng: random.Random) -> tuple[Thing, ...]:
    """One to three of the same thing in the middle, or two different things side by side."""
    pick = lambda: (rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(SIZES)))  # noqa: E731
    if rng.random() < 0.35:
        shape, color, size = pick()
        return (Thing(shape, color, size, "middle", rng.choice((1, 2, 3))),)
    first, second = rng.choice(PAIRS) if rng.random() < 0.5 else rng.choice(PAIRS)[::-1]
    a, b = pick(), pick()
    while b[:2] == a[:2]:
        b = pick()
    return Thing(*a, first), Thing(*b, second)


def captions(scene: tuple[Thing, ...], rng: random.Random, count: int) -> list[str]:
    """`count` distinct wordings of the same scene (templates shuffled per scene)."""
    if len(scene) == 1:
        t = scene[0]
        options = [f"{t.phrase()}", f"there is {t.phrase()}", f"a picture of {t.phrase(False)}",
                   f"{t.phrase()} {PLACE_WORDS['middle']}", f"i see {t.phrase()}"]
    else:
        a, b = scene
        options = [f"{a.phrase()} {PLACE_WORDS[a.place]} and {b.phrase()} {PLACE_WORDS[b.place]}",
                   f"{a.phrase(False)} next to {b.phrase(False)}",
                   f"{b.phrase()} {PLACE_WORDS[b.place]} and {a.phrase()}",
                   f"there is {a.phrase()} and {b.phrase()}",
                   f"{a.phrase(False)} {PLACE_WORDS[a.place]} with {b.phrase(False)}"]
    rng.shuffle(options)
    return options[:count]


def render(scene: tuple[Thing, ...], size: int = 64, background: tuple[int, int, int] = (245, 245, 240)) -> Image.Image:
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for thing in scene:
        cx, cy = PLACES[thing.place]
        radius = SIZES[thing.size] * size * (1.0, 0.75, 0.6)[thing.count - 1]
        offsets = _count_offsets(thing.count, radius * 1.25)
        for dx, dy in offsets:
            _draw_shape(draw, thing.shape, COLORS[thing.color], cx * size + dx, cy * size + dy, radius)
    return image


def _count_offsets(count: int, step: float) -> list[tuple[float, float]]:
    if count == 1:
        return [(0.0, 0.0)]
    if count == 2:
        return [(-step, 0.0), (step, 0.0)]
    return [(-step * 1.75, 0.0), (0.0, 0.0), (step * 1.75, 0.0)]


def _polygon(cx: float, cy: float, radius: float, corners: int, start: float = -math.pi / 2) -> list[tuple[float, float]]:
    return [(cx + radius * math.cos(start + 2 * math.pi * i / corners), cy + radius * math.sin(start + 2 * math.pi * i / corners))
            for i in range(corners)]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, color, cx: float, cy: float, r: float) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "ring":
        draw.ellipse(box, outline=color, width=max(2, int(r / 3)))
    elif shape == "square":
        draw.rectangle((cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85), fill=color)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy + r * 0.15, r * 1.1, 3), fill=color)
    elif shape == "diamond":
        draw.polygon(_polygon(cx, cy, r, 4), fill=color)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, 0.0), fill=color)
    elif shape == "star":
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + math.pi * i / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=color)
    elif shape == "cross":
        w = r * 0.35
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=color)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=color)
    else:
        raise ValueError(f"unknown shape {shape!r}")
