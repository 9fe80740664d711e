"""HTTP API and a one-page web UI over a SpeechCLIP checkpoint (and optionally an index).

POST /embed/speech (wav upload), /embed/text (JSON {"texts": [...]}), /keywords (wav upload),
/search (wav upload or form field `text`, `k`); GET / serves the page.
"""

import io
from pathlib import Path
from typing import Optional

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, UploadFile  # the [serve] extra
from fastapi.responses import HTMLResponse
from pydantic import BaseModel

from .audio import AudioError, decode_audio
from .index import EmbeddingIndex
from .model import SpeechCLIP

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>speechclip</title>
<style>body{font-family:sans-serif;max-width:720px;margin:2em auto}li{margin:.2em 0}</style></head><body>
<h1>speechclip</h1><p>Search with a spoken query (a wav file) or with text.</p>
<form id="f"><input type="file" name="audio" accept="audio/*"> or <input name="text" placeholder="text query">
<input name="k" value="10" size="3"><button>search</button></form><ol id="r"></ol><pre id="kw"></pre>
<script>
document.getElementById('f').onsubmit = async (e) => {
  e.preventDefault(); const data = new FormData(e.target);
  if (!data.get('audio').size) data.delete('audio');
  const res = await fetch('/search', {method: 'POST', body: data}); const body = await res.json();
  document.getElementById('r').innerHTML = (body.results || []).map(r => `<li>${r.id} (${r.score.toFixed(3)})</li>`).join('')
    || `<li>${body.detail || 'no results'}</li>`;
  document.getElementById('kw').textContent = body.keywords ? 'keywords: ' + body.keywords.map(s => s[0][0]).join(' ') : '';
};
</script></body></html>"""


def read_upload(data: bytes, name: str) -> np.ndarray:
    """Uploaded audio bytes -> float32 16 kHz mono, with the same errors as files on disk."""
    return decode_audio(io.BytesIO(data), name)


class Texts(BaseModel):
    texts: list[str]


def create_app(model: SpeechCLIP, index: Optional[EmbeddingIndex] = None) -> FastAPI:
    app = FastAPI(title="speechclip")

    async def waveform(upload: UploadFile) -> np.ndarray:
        try:
            return read_upload(await upload.read(), upload.filename or "upload")
        except AudioError as error:
            raise HTTPException(status_code=422, detail=str(error)) from error

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE

    @app.post("/embed/speech")
    async def embed_speech(audio: UploadFile = File(...)) -> dict:
        return {"embedding": model.encode_speech([await waveform(audio)])[0].tolist()}

    @app.post("/embed/text")
    def embed_text(body: Texts) -> dict:
        return {"embeddings": model.encode_text(body.texts).tolist()}

    @app.post("/keywords")
    async def keywords(audio: UploadFile = File(...), top_k: int = Form(5)) -> dict:
        if not model.config.uses_cascaded:
            raise HTTPException(status_code=400, detail="this checkpoint is parallel: no keywords")
        return {"keywords": model.keywords([await waveform(audio)], top_k=top_k)[0]}

    @app.post("/search")
    async def search(audio: Optional[UploadFile] = File(None), text: Optional[str] = Form(None), k: int = Form(10)) -> dict:
        if index is None:
            raise HTTPException(status_code=400, detail="the server was started without --index")
        if audio is not None and audio.filename:
            wave = await waveform(audio)
            query = model.encode_speech([wave])
            extra = {"keywords": model.keywords([wave])[0]} if model.config.uses_cascaded else {}
        elif text:
            query, extra = model.encode_text([text]), {}
        else:
            raise HTTPException(status_code=422, detail="send an audio file or a text field")
        results = index.search(query.numpy(), k)[0]
        return {"results": [{"id": i, "score": s} for i, s in results], **extra}

    return app


def serve(checkpoint: Path, index: Optional[Path], host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    app = create_app(SpeechCLIP.from_pretrained(checkpoint), EmbeddingIndex.load(index) if index else None)
    uvicorn.run(app, host=host, port=port)
