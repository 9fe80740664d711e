"""What `speechclip serve` calls: find the model and data (the finished demo by default), index them
(cached), and listen."""

from __future__ import annotations

import socket
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


def check_listening(host: str, port: int, limits: Limits) -> None:
    """Refuse, before the model loads and the images are indexed (a minute on a real gallery), a port that
    cannot be listened on and limits that would refuse every request."""
    if not 1 <= port <= 65535:
        raise ValueError(f"--port {port}: must be 1-65535")
    for flag, value in (("--max-upload-mb", limits.max_upload_mb), ("--max-audio-seconds", limits.max_audio_seconds)):
        if not value > 0:
            raise ValueError(f"{flag} {value:g}: must be above 0 (every request would be refused)")
    try:
        with socket.create_server((host, port)):
            pass  # free now; a server started in the next seconds could still take it (then uvicorn says so)
    except OSError as error:
        raise ValueError(f"--host {host} --port {port}: cannot listen there ({error.strerror or error})") from error


def serve(sources: Sources, host: str = "127.0.0.1", port: int = 8000, limits: Limits = Limits(),
          cache: Path | None = None) -> None:
    import uvicorn

    check_listening(host, port, limits)
    app = build_app(sources, limits, cache)
    print(f"open http://{host}:{port}/  (API: http://{host}:{port}/docs)", file=sys.stderr)
    # lifespan off: the app has no start-up or shut-down hooks, and uvicorn's lifespan task logged a CancelledError
    # traceback on every Ctrl-C. Ctrl-C and SIGTERM answer the requests in flight, then stop (the CLI says so).
    uvicorn.run(app, host=host, port=port, access_log=False, lifespan="off")
    print("speechclip serve: stopped", file=sys.stderr)  # (where uvicorn raises Ctrl-C again instead, the CLI says it)
