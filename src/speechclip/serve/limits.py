"""The bounds on a request, as FastAPI dependencies and error handlers, so every refusal is one readable
sentence in `{"detail": ...}` (the page shows it as text; a list of dicts showed "[object Object]").

The body size is enforced by FastAPI's own `max_body_size` (set in app.py): it counts bytes as they are
streamed, before the form is parsed, which a dependency cannot do (FastAPI reads the form before it
solves dependencies). A body whose declared Content-Length is already over the limit is answered by
`DeclaredSizeGuard` before anything is read: Starlette would answer it in plain text, not in our JSON.
"""

from __future__ import annotations

from fastapi import FastAPI, Form, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from ..audio import AudioError
from ..data.items import DataError
from ..images import ImageError
from .gallery import UnknownItem
from .pool import PoolFull
from .search import Limits, QueryError, TooLarge

MAX_KEYWORDS_SHOWN = 50


class Bounds:
    """Dependencies that check the form fields against the server's `Limits`."""

    def __init__(self, limits: Limits):
        self.limits = limits

    def k(self, k: int = Form(12, description="how many results: 1..max_k (1000 unless the server sets another bound)")) -> int:
        if not 1 <= k <= self.limits.max_k:
            raise HTTPException(422, f"k: must be between 1 and {self.limits.max_k}, got {k}")
        return k

    def top_k(self, top_k: int = Form(5, description="subwords shown per keyword slot, 1..50")) -> int:
        if not 1 <= top_k <= MAX_KEYWORDS_SHOWN:
            raise HTTPException(422, f"top_k: must be between 1 and {MAX_KEYWORDS_SHOWN}, got {top_k}")
        return top_k

    def text(self, text: str | None = Form(None, description="a text query")) -> str | None:
        return self.check_text(text, "text") if text is not None else None

    def check_text(self, text: str, field: str) -> str:
        if len(text) > self.limits.max_text_chars:
            raise HTTPException(422, f"{field}: {len(text)} characters, over the limit of {self.limits.max_text_chars}")
        return text


def too_large_message(limits: Limits) -> str:
    return f"request body over the {limits.max_upload_mb:g} MB upload limit"


class DeclaredSizeGuard:
    """Outermost ASGI layer: a request that declares more bytes than the limit gets 413 at once, unread."""

    def __init__(self, app: ASGIApp, limits: Limits):
        self.app, self.limits = app, limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            declared = Headers(scope=scope).get("content-length", "")
            if declared.isdigit() and int(declared) > self.limits.max_upload_bytes:
                response = JSONResponse({"detail": too_large_message(self.limits)}, status_code=413,
                                        headers={"Connection": "close"})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def _readable(error: dict) -> str:
    """One pydantic error -> 'field: message' (the location without 'body'/'query')."""
    where = ".".join(str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path"))
    return f"{where}: {error.get('msg', 'invalid')}" if where else str(error.get("msg", "invalid"))


def install_error_handlers(app: FastAPI, limits: Limits) -> None:
    """Our exceptions -> status codes: bad input 422, too large 413, unknown id 404, busy 503."""

    def plain(status: int, headers: dict | None = None):
        async def handler(_request: Request, error: Exception) -> JSONResponse:
            return JSONResponse({"detail": str(error)}, status_code=status, headers=headers)
        return handler

    for kind in (AudioError, ImageError, QueryError, DataError):
        app.add_exception_handler(kind, plain(422))
    app.add_exception_handler(TooLarge, plain(413))
    app.add_exception_handler(UnknownItem, plain(404))
    app.add_exception_handler(PoolFull, plain(503, {"Retry-After": "1"}))

    @app.exception_handler(RequestValidationError)
    async def validation(_request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": "; ".join(_readable(e) for e in error.errors())}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        if error.status_code == 413:  # FastAPI's body limit says only "Content Too Large"
            error = StarletteHTTPException(413, too_large_message(limits))
        return await http_exception_handler(request, error)
