"""Queries -> results, with no HTTP in sight: what the app's handlers call (and tests and benchmarks can).

A spoken query runs the model once: the same forward gives the embedding and, for cascaded and hybrid
models, the keywords (their count may differ per utterance with the CIF variants).
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import BinaryIO

import numpy as np
import soundfile
import torch
from PIL import Image, UnidentifiedImageError

from ..audio import MAX_QUERY_SECONDS, SAMPLE_RATE, AudioError, decode_audio, reason
from ..images import ImageError
from .clips import ClipSet
from .gallery import Gallery


class QueryError(ValueError):
    """A query the model cannot take (too short, empty text); the message names the file or field."""


class TooLarge(ValueError):
    """Over a size bound (audio length, image pixels); answered with 413."""


@dataclass(frozen=True)
class Limits:
    max_upload_mb: float = 20.0  # whole request body; refused while streaming, never read whole
    max_audio_seconds: float = MAX_QUERY_SECONDS  # after decoding (a small compressed file can hold hours)
    max_image_pixels: int = 40_000_000  # a small PNG can decode to gigabytes
    max_text_chars: int = 1000  # CLIP reads 77 tokens anyway; longer is a mistake or abuse
    max_k: int = 1000
    max_texts: int = 256  # per /embed/text call
    workers: int = 1  # request threads; model forwards take turns (torch uses every core in one), more overlap decoding
    queue: int = 32  # requests waiting for a worker beyond these are answered 503

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


def read_audio(file: BinaryIO, name: str, max_seconds: float, min_samples: int) -> np.ndarray:
    """An uploaded clip -> 16 kHz mono float32; its length is checked from the header before decoding."""
    try:
        info = soundfile.info(file)
    except (RuntimeError, soundfile.LibsndfileError) as error:
        raise AudioError(f"{name}: unreadable audio ({reason(error)})") from error
    file.seek(0)
    if info.samplerate and info.frames / info.samplerate > max_seconds:
        raise TooLarge(f"{name}: {info.frames / info.samplerate:.1f} s of audio, over the {max_seconds:g} s limit")
    wave = decode_audio(file, name)
    if wave.size > max_seconds * SAMPLE_RATE:  # formats whose header does not give the length
        raise TooLarge(f"{name}: {wave.size / SAMPLE_RATE:.1f} s of audio, over the {max_seconds:g} s limit")
    if wave.size < min_samples:
        raise QueryError(f"{name}: {wave.size / SAMPLE_RATE * 1000:.0f} ms of audio ({wave.size} samples at 16 kHz) "
                         f"is shorter than the model's minimum of {min_samples} samples "
                         f"({min_samples / SAMPLE_RATE * 1000:.0f} ms)")
    return wave


def read_image(file: BinaryIO, name: str, max_pixels: int) -> Image.Image:
    """An uploaded picture -> RGB, its size checked from the header before decoding."""
    try:
        with Image.open(file) as image:
            if image.width * image.height > max_pixels:
                raise TooLarge(f"{name}: {image.width}x{image.height} pixels, over the {max_pixels:,} pixel limit")
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise ImageError(f"{name}: unreadable image ({error})") from error


def _hits(pairs: list[tuple[str, float]]) -> list[dict]:
    return [{"id": item, "score": round(score, 4)} for item, score in pairs]


class SearchEngine:
    """A model, the indexed images and (optionally) indexed spoken clips, and the bounds on queries."""

    def __init__(self, model, gallery: Gallery, clips: ClipSet | None = None, limits: Limits = Limits()):
        self.model, self.gallery, self.clips, self.limits = model, gallery, clips, limits
        # One forward at a time: the model is not safe to call from two threads at once (the upstream keeps
        # per-call state on the module: with two workers, 3 of 32 concurrent queries failed; HF fast
        # tokenizers raise "Already borrowed"). Extra workers still decode uploads beside a forward.
        self._model_lock = threading.Lock()

    def info(self) -> dict:
        """What the page needs to know: can it show keywords, are clips indexed, the bounds."""
        return {"variant": self.model.config.variant, "keywords": bool(self.model.config.uses_cascaded),
                "images": len(self.gallery), "clips": len(self.clips) if self.clips else 0,
                "min_audio_ms": round(self.model.upstream.min_samples / SAMPLE_RATE * 1000, 1),
                "limits": asdict(self.limits)}

    # ---- queries ---------------------------------------------------------------------------------
    def audio(self, file: BinaryIO, name: str) -> np.ndarray:
        return read_audio(file, name, self.limits.max_audio_seconds, self.model.upstream.min_samples)

    def speech(self, wave: np.ndarray, top_k: int | None = None) -> tuple[np.ndarray, list | None]:
        """One forward: the normalised (D,) embedding and, for cascaded/hybrid models, the keywords."""
        with self._model_lock:
            output = self.model.speech_outputs([wave])[0]
            vector = torch.nn.functional.normalize(output.embeds.float(), dim=-1)[0].cpu().numpy()
            if not self.model.config.uses_cascaded:
                return vector, None
            ids, scores = self.model.nearest_subwords(output, top_k)
            keywords = [[{"subword": self.model.subword(t), "score": round(s, 4)} for t, s in zip(slot_ids, slot_scores)]
                        for slot_ids, slot_scores in zip(ids[0], scores[0])]
        return vector, keywords

    def search_audio(self, file: BinaryIO, name: str, k: int) -> dict:
        wave = self.audio(file, name)
        vector, keywords = self.speech(wave)
        query = {"kind": "audio", "name": name, "seconds": round(wave.size / SAMPLE_RATE, 2)}
        return {"query": query, "results": _hits(self.gallery.search(vector, k)), "keywords": keywords}

    def search_text(self, text: str, k: int) -> dict:
        if not text.strip():
            raise QueryError("text: empty query")
        with self._model_lock:
            vector = self.model.encode_text([text])[0].float().cpu().numpy()
        return {"query": {"kind": "text", "text": text}, "results": _hits(self.gallery.search(vector, k))}

    def search_image(self, file: BinaryIO, name: str, k: int) -> dict:
        image = read_image(file, name, self.limits.max_image_pixels)
        with self._model_lock:
            vector = self.model.encode_image([image])[0].float().cpu().numpy()
        return self._by_image(vector, {"kind": "image", "name": name}, k)

    def search_image_id(self, image_id: str, k: int) -> dict:
        return self._by_image(self.gallery.vector(image_id), {"kind": "image_id", "id": image_id}, k)

    def _by_image(self, vector: np.ndarray, query: dict, k: int) -> dict:
        """Image -> images, and image -> spoken captions when clips are indexed."""
        found = {"query": query, "results": _hits(self.gallery.search(vector, k))}
        if self.clips is not None:
            found["clips"] = [{**hit, "text": self.clips.texts.get(hit["id"])} for hit in _hits(self.clips.search(vector, k))]
        return found

    def keywords(self, file: BinaryIO, name: str, top_k: int) -> list:
        if not self.model.config.uses_cascaded:
            raise QueryError(f"keywords: this checkpoint is {self.model.config.variant}; keywords need a cascaded "
                             "or hybrid model")
        return self.speech(self.audio(file, name), top_k)[1]

    # ---- embeddings ------------------------------------------------------------------------------
    def embed_speech(self, file: BinaryIO, name: str) -> list[float]:
        return self.speech(self.audio(file, name))[0].tolist()

    def embed_image(self, file: BinaryIO, name: str) -> list[float]:
        image = read_image(file, name, self.limits.max_image_pixels)
        with self._model_lock:
            return self.model.encode_image([image])[0].tolist()

    def embed_text(self, texts: list[str]) -> list[list[float]]:
        with self._model_lock:
            return self.model.encode_text(texts).tolist()
