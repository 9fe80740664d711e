"""The FastAPI app: thin handlers over `SearchEngine`, blocking work in the bounded `InferencePool`, the
page served from static files. The OpenAPI page (/docs, /openapi.json) documents the API."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from fastapi import Depends, FastAPI, File, Form, HTTPException, UploadFile
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from .limits import Bounds, DeclaredSizeGuard, install_error_handlers
from .pool import InferencePool
from .search import SearchEngine

STATIC = Path(__file__).parent / "static"
# The page loads nothing from elsewhere and never evaluates strings as code: a CSP that says so.
PAGE_POLICY = ("default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; "
               "style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'")
THUMBNAIL_CACHE = "public, max-age=3600"


class Texts(BaseModel):
    texts: list[str]


class SpeechclipAPI(FastAPI):
    """FastAPI with `DeclaredSizeGuard` outside its middleware, so every 413 is the same JSON sentence."""

    def build_middleware_stack(self):
        return DeclaredSizeGuard(super().build_middleware_stack(), self.state.engine.limits)


class Page(StaticFiles):
    """The page's static files, with the content security policy on each response. Mounted at /, it also
    receives a GET of a POST-only API path: that is answered 405 naming the method, not 404."""

    def __init__(self, *args, post_only: frozenset[str] = frozenset(), **kwargs):
        super().__init__(*args, **kwargs)
        self.post_only = post_only

    async def get_response(self, path: str, scope):
        if "/" + path.strip("/") in self.post_only:
            return JSONResponse({"detail": "Method Not Allowed"}, status_code=405, headers={"Allow": "POST"})
        response = await super().get_response(path, scope)
        response.headers["Content-Security-Policy"] = PAGE_POLICY
        return response


def _given(upload: UploadFile | None) -> bool:
    return upload is not None and bool(upload.filename or upload.size)


def _with_urls(found: dict) -> dict:
    """Add the URLs the app serves each result from (ids are paths: quoted, slashes kept)."""
    for hit in found.get("results", []):
        hit["url"] = f"/images/{quote(hit['id'])}"
        hit["thumbnail"] = f"/thumbs/{quote(hit['id'])}"
    for hit in found.get("clips", []):
        hit["audio_url"] = f"/clips/{quote(hit['id'])}"
    return found


def create_app(engine: SearchEngine, pool: InferencePool | None = None) -> FastAPI:
    limits = engine.limits
    pool = pool or InferencePool(limits.workers, limits.queue)
    bounds = Bounds(limits)
    app = SpeechclipAPI(title="speechclip", version="0.1.0", max_body_size=limits.max_upload_bytes,
                  description="Search pictures by voice: SpeechCLIP over a folder of images. Each result has an "
                              "id, a cosine score and the URLs of its image and thumbnail.")
    app.state.engine, app.state.pool = engine, pool
    install_error_handlers(app, limits)

    @app.get("/healthz")
    async def healthz() -> dict:
        """Liveness, answered on the event loop: never waits behind inference."""
        return {"status": "ok", "queued": pool.pending}

    @app.get("/info")
    async def info() -> dict:
        """The model variant, whether keywords and spoken clips are available, the bounds."""
        return engine.info()

    @app.post("/search")
    async def search(k: int = Depends(bounds.k), text: str | None = Depends(bounds.text),
                     image_id: str | None = Form(None, description="an indexed image's id (click a result)"),
                     audio: UploadFile | None = File(None, description="a spoken query (any soundfile format)"),
                     image: UploadFile | None = File(None, description="a picture")) -> dict:
        """Exactly one of `audio`, `image`, `text`, `image_id`. Audio queries also return keywords (cascaded
        and hybrid models); image queries also return spoken captions when clips are indexed."""
        chosen = [name for name, value in (("audio", _given(audio)), ("image", _given(image)),
                                           ("text", text is not None), ("image_id", image_id is not None)) if value]
        if len(chosen) != 1:
            raise HTTPException(422, "send exactly one of: an audio file, an image file, a text field or an image_id"
                                     + (f" (got {', '.join(chosen)})" if chosen else ""))
        if chosen == ["audio"]:
            found = await pool.run(engine.search_audio, audio.file, audio.filename or "audio", k)
        elif chosen == ["image"]:
            found = await pool.run(engine.search_image, image.file, image.filename or "image", k)
        elif chosen == ["text"]:
            found = await pool.run(engine.search_text, text, k)
        else:
            found = await pool.run(engine.search_image_id, image_id, k)
        return _with_urls(found)

    @app.post("/keywords")
    async def keywords(audio: UploadFile = File(...), top_k: int = Depends(bounds.top_k)) -> dict:
        """Cascaded/hybrid models: per keyword slot, the nearest CLIP subwords with cosine scores (the
        number of slots may differ between clips)."""
        return {"keywords": await pool.run(engine.keywords, audio.file, audio.filename or "audio", top_k)}

    @app.post("/embed/speech")
    async def embed_speech(audio: UploadFile = File(...)) -> dict:
        return {"embedding": await pool.run(engine.embed_speech, audio.file, audio.filename or "audio")}

    @app.post("/embed/image")
    async def embed_image(image: UploadFile = File(...)) -> dict:
        return {"embedding": await pool.run(engine.embed_image, image.file, image.filename or "image")}

    @app.post("/embed/text")
    async def embed_text(body: Texts) -> dict:
        if not 1 <= len(body.texts) <= limits.max_texts:
            raise HTTPException(422, f"texts: send 1 to {limits.max_texts} texts, got {len(body.texts)}")
        texts = [bounds.check_text(t, f"texts[{i}]") for i, t in enumerate(body.texts)]
        blank = next((i for i, t in enumerate(texts) if not t.strip()), None)
        if blank is not None:  # CLIP would embed its start and end tokens alone: a vector for no text
            raise HTTPException(422, f"texts[{blank}]: empty")
        return {"embeddings": await pool.run(engine.embed_text, texts)}

    @app.get("/images/{image_id:path}")
    def image_file(image_id: str) -> FileResponse:
        return FileResponse(engine.gallery.path(image_id))

    @app.get("/thumbs/{image_id:path}")
    def thumbnail(image_id: str) -> FileResponse:
        return FileResponse(engine.gallery.thumbnail(image_id), headers={"Cache-Control": THUMBNAIL_CACHE})

    @app.get("/clips/{clip_id:path}")
    def clip_file(clip_id: str) -> FileResponse:
        if engine.clips is None:
            raise HTTPException(404, "no spoken clips are indexed (start the server with --clips)")
        return FileResponse(engine.clips.path(clip_id))

    post_only = frozenset(r.path for r in app.routes if getattr(r, "methods", None) == {"POST"})
    app.mount("/", Page(directory=STATIC, html=True, post_only=post_only), name="page")  # last: the API's routes come first
    return app
