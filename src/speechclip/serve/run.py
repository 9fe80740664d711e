"""What `speechclip serve` calls: find the model and data (the finished demo by default), index them
(cached), and listen."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from .search import Limits

DEMO_RUN = Path("runs/demo")


@dataclass(frozen=True)
class Sources:
    checkpoint: Path
    images: Path
    clips: Path | None = None


def demo_sources(run: Path = DEMO_RUN) -> Sources:
    """The finished demo's model, its corpus's images, and its test-split clips (image -> speech)."""
    sources = Sources(run / "runs" / "pretrained" / "final", run / "corpus" / "images", run / "corpus" / "test.jsonl")
    for needed in (sources.checkpoint / "model.safetensors", sources.images):
        if not needed.exists():
            raise FileNotFoundError(f"no finished demo in {run} ({needed} is missing): run `speechclip demo` first, "
                                    "or give --checkpoint CKPT --images DIR")
    return sources if sources.clips.is_file() else Sources(sources.checkpoint, sources.images)


def build_app(sources: Sources, limits: Limits = Limits(), cache: Path | None = None, progress: bool = True):
    """Load the model, index the images (and clips), and return the FastAPI app."""
    from ..model import SpeechCLIP
    from .app import create_app
    from .clips import index_clips
    from .gallery import index_images
    from .search import SearchEngine

    model = SpeechCLIP.from_pretrained(sources.checkpoint)
    gallery = index_images(model, sources.images, cache, progress)
    clips = index_clips(model, sources.clips, cache, progress) if sources.clips else None
    print(f"speechclip serve: {len(gallery)} images from {sources.images}"
          + (f", {len(clips)} spoken clips from {sources.clips}" if clips else "")
          + f"; model {sources.checkpoint} ({model.config.variant})", file=sys.stderr)
    return create_app(SearchEngine(model, gallery, clips, limits))


def serve(sources: Sources, host: str = "127.0.0.1", port: int = 8000, limits: Limits = Limits(),
          cache: Path | None = None) -> None:
    import uvicorn

    app = build_app(sources, limits, cache)
    print(f"open http://{host}:{port}/  (API: http://{host}:{port}/docs)", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, access_log=False)
