"""`speechclip serve`: search pictures by voice, as an HTTP API and a page.

The layers, each usable alone:
  gallery.py  a folder of images -> embeddings + FAISS index, cached beside the folder; thumbnails
  clips.py    a folder or manifest of spoken clips -> embeddings + index (image -> speech)
  search.py   queries (audio, image, text, an indexed image) -> results; no HTTP
  limits.py   the bounds (upload size, audio length, k, text length) and their FastAPI dependencies
  pool.py     a bounded worker pool: inference off the event loop, 503 when the queue is full
  app.py      the FastAPI app, thin over the above; the page is static/ (HTML, JS, CSS; no build step)
  run.py      what the CLI calls: load, index, listen

Importing this package needs no web framework; `app` and `run` need the [serve] extra.
"""
