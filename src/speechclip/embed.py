"""Embedding export: one `<kind>.safetensors` ("embeddings": (N, D), L2-normalised) per kind, with its
ids in `<kind>.ids.json` beside it (the format `speechclip index` reads)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from .data.items import SpokenCaption
from .model import SpeechCLIP

KINDS = ("speech", "image", "text")


def save_embeddings(embeddings: torch.Tensor, ids: Sequence[str], path: Path, meta: dict | None = None) -> Path:
    if len(ids) != len(embeddings):
        raise ValueError(f"{path}: {len(ids)} ids for {len(embeddings)} embeddings")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"embeddings": embeddings.float().contiguous()}, str(path), metadata={k: str(v) for k, v in (meta or {}).items()})
    path.with_suffix(".ids.json").write_text(json.dumps(list(ids)))
    return path


def load_embeddings(path: Path) -> tuple[torch.Tensor, list[str]]:
    ids_path = path.with_suffix(".ids.json")
    if not path.is_file() or not ids_path.is_file():
        raise FileNotFoundError(f"{path}: expected an embeddings .safetensors with {ids_path.name} beside it")
    return load_file(str(path))["embeddings"], json.loads(ids_path.read_text())


def embed_items(model: SpeechCLIP, items: Sequence[SpokenCaption], out: Path, what: Sequence[str], batch_size: int = 32) -> dict[str, Path]:
    unknown = set(what) - set(KINDS)
    if unknown:
        raise ValueError(f"--what: unknown kind(s) {sorted(unknown)}; choose from {KINDS}")
    meta = {"upstream": model.config.upstream, "clip": model.config.clip}
    written = {}
    if "speech" in what:
        embeds = model.encode_speech([i.audio for i in items], batch_size=batch_size)
        written["speech"] = save_embeddings(embeds, [str(i.audio) for i in items], out / "speech.safetensors", meta)
    if "image" in what:
        images = {i.image_id: i.image for i in items}
        chunks = [model.encode_image(list(images.values())[s : s + batch_size]) for s in range(0, len(images), batch_size)]
        written["image"] = save_embeddings(torch.cat(chunks), list(images), out / "image.safetensors", meta)
    if "text" in what:
        texts = [i for i in items if i.text]
        if texts:
            embeds = torch.cat([model.encode_text([i.text for i in texts[s : s + batch_size]]) for s in range(0, len(texts), batch_size)])
            written["text"] = save_embeddings(embeds, [str(i.audio) for i in texts], out / "text.safetensors", meta)
    return written
