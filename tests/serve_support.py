"""Shared by the serve tests: a tiny checkpoint, a folder of pictures, spoken clips, WAV bytes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import soundfile
import torch
from PIL import Image, ImageDraw

from speechclip.model import SpeechCLIP
from tests.conftest import tiny_model_config

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]
RGB = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60), "yellow": (240, 220, 40),
       "purple": (140, 40, 170), "orange": (250, 140, 20), "black": (10, 10, 10), "white": (250, 250, 250)}


def tiny_checkpoint(encoders: dict, folder: Path, variant: str = "hybrid", seed: int = 0, upstream: str = "hubert") -> Path:
    """An untrained SpeechCLIP on the tiny encoders, saved as a checkpoint folder."""
    torch.manual_seed(seed)
    overrides = {} if variant == "hybrid" else {"cascaded": {}}  # CIF/parallel variants: no fixed keyword count
    return SpeechCLIP(tiny_model_config(encoders, variant, upstream, **overrides)).save_pretrained(folder)


def make_images(folder: Path, count: int = 8) -> list[Path]:
    """Distinct pictures (a coloured disc or square on grey), in a folder with one sub-folder."""
    paths = []
    for i in range(count):
        image = Image.new("RGB", (64, 64), (128, 128, 128))
        draw = ImageDraw.Draw(image)
        box = (8 + 2 * i, 8 + i, 52 - i, 56 - 2 * i)
        (draw.ellipse if i % 2 else draw.rectangle)(box, fill=RGB[COLOURS[i % len(COLOURS)]])
        path = folder / ("shapes" if i >= count // 2 else "") / f"{i:02d}_{COLOURS[i % len(COLOURS)]}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        paths.append(path)
    return paths


def noise(seconds: float, rate: int = 16_000, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(rate * seconds)) * 0.1).astype(np.float32)


def wav_bytes(seconds: float = 0.5, rate: int = 16_000, seed: int = 0, subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, noise(seconds, rate, seed), rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


def make_clips(folder: Path, images: list[Path]) -> Path:
    """Clips spoken 'about' the images (noise of several lengths) and a manifest with their transcripts."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, image in enumerate(images[:4]):
        path = folder / f"clip{i}.wav"
        soundfile.write(path, noise(0.4 + 0.3 * i, seed=10 + i), 16_000)
        rows.append({"audio": path.name, "image": str(image), "text": f"a picture of {image.stem}"})
    manifest = folder / "clips.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifest
