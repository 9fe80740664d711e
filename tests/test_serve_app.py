"""The serve layers in process: folder indexing and its cache, search results against the library's own
answers, the bounds (422 / 413 with readable messages), the bounded pool (503) and a free event loop."""

from __future__ import annotations

import asyncio
import shutil
import threading

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from speechclip.model import SpeechCLIP
from speechclip.serve.app import create_app
from speechclip.serve.clips import index_clips
from speechclip.serve.gallery import index_images
from speechclip.serve.search import Limits, SearchEngine
from tests.serve_support import make_clips, make_images, noise, tiny_checkpoint, wav_bytes


@pytest.fixture(scope="module")
def model(encoders, tmp_path_factory) -> SpeechCLIP:
    return SpeechCLIP.from_pretrained(tiny_checkpoint(encoders, tmp_path_factory.mktemp("ckpt") / "hybrid"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("serve-data")
    images = make_images(root / "images")
    return {"images": root / "images", "paths": images, "clips": make_clips(root / "clips", images)}


@pytest.fixture(scope="module")
def engine(model, data) -> SearchEngine:
    gallery = index_images(model, data["images"], progress=False)
    return SearchEngine(model, gallery, index_clips(model, data["clips"], progress=False))


@pytest.fixture(scope="module")
def client(engine) -> TestClient:
    return TestClient(create_app(engine))


def _audio(seconds: float = 0.5, name: str = "q.wav", **kw) -> dict:
    return {"audio": (name, wav_bytes(seconds, **kw), "audio/wav")}


# ---- indexing a folder ---------------------------------------------------------------------------------

def test_image_index_is_cached_and_follows_the_folder(model, tmp_path):
    make_images(tmp_path / "pics", 5)
    first = index_images(model, tmp_path / "pics", progress=False)
    assert first.embedded == 5 and first.ids[0] == "00_red.png" and "shapes/04_purple.png" in first.ids
    assert (tmp_path / "pics" / ".speechclip").is_dir()  # cached beside the images
    again = index_images(model, tmp_path / "pics", progress=False)
    assert again.embedded == 0 and again.ids == first.ids
    np.testing.assert_allclose(again.vectors, first.vectors, atol=1e-6)
    shutil.copy(tmp_path / "pics" / "00_red.png", tmp_path / "pics" / "zz_copy.png")
    (tmp_path / "pics" / "broken.jpg").write_bytes(b"not a picture")
    changed = index_images(model, tmp_path / "pics", progress=False)
    assert changed.embedded == 1 and "zz_copy.png" in changed.ids  # only the new picture is embedded
    assert [name.endswith("broken.jpg") for name, _ in changed.skipped] == [True]
    assert changed.search(changed.vector("zz_copy.png"), 2)[0][1] == pytest.approx(1.0, abs=1e-4)


def test_the_same_clip_by_another_path_reuses_the_index(model, tmp_path, monkeypatch):
    make_images(tmp_path / "pics", 3)
    first = index_images(model, tmp_path / "pics", progress=False)
    saved = {p: p.stat().st_mtime_ns for p in (tmp_path / "pics" / ".speechclip").rglob("*") if p.is_file()}
    monkeypatch.setattr(model.clip, "name_or_path", f"{model.clip.name_or_path}/./")  # one folder, another spelling
    again = index_images(model, tmp_path / "pics", progress=False)
    assert again.embedded == 0 and again.ids == first.ids
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "pics" / ".speechclip").rglob("*") if p.is_file()} == saved


def test_image_folder_errors_name_the_folder(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: no such image folder"):
        index_images(model, tmp_path / "nowhere", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: no images"):
        index_images(model, tmp_path / "empty", progress=False)


def test_clip_index_skips_bad_clips_by_name_and_is_cached(model, data, tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    (folder / "good.wav").write_bytes(wav_bytes(0.5))
    (folder / "tiny.wav").write_bytes(wav_bytes(0.01))  # 160 samples: under HuBERT's 400
    (folder / "bad.wav").write_bytes(b"RIFF nonsense")
    clips = index_clips(model, folder, progress=False)
    assert clips.ids == ["good.wav"] and clips.embedded == 1
    reasons = dict(clips.skipped)
    assert "shorter than the model's minimum of 400" in reasons[str(folder / "tiny.wav")]
    assert "unreadable audio" in reasons[str(folder / "bad.wav")]
    assert index_clips(model, folder, progress=False).embedded == 0
    from_manifest = index_clips(model, data["clips"], progress=False)
    assert from_manifest.texts["clip0.wav"] == "a picture of 00_red"


# ---- search results are the library's answers -----------------------------------------------------------

def test_text_search_matches_the_library(client, model, engine):
    found = client.post("/search", data={"text": "a red circle", "k": "3"}).json()
    expected = engine.gallery.index.search(model.encode_text(["a red circle"]).numpy(), 3)[0]
    assert [(r["id"], round(r["score"], 3)) for r in found["results"]] == [(i, round(s, 3)) for i, s in expected]
    assert found["results"][0]["url"] == f"/images/{expected[0][0]}"


def test_audio_search_gives_results_and_keywords_from_one_forward(client, model, engine, data):
    clip = data["clips"].parent / "clip2.wav"
    found = client.post("/search", files={"audio": ("clip2.wav", clip.read_bytes(), "audio/wav")}, data={"k": "4"}).json()
    expected = engine.gallery.index.search(model.encode_speech([clip]).numpy(), 4)[0]
    assert [r["id"] for r in found["results"]] == [i for i, _ in expected]
    keywords = model.keywords([clip])[0]
    assert [[c["subword"] for c in slot] for slot in found["keywords"]] == [[s for s, _ in slot] for slot in keywords]
    assert found["query"] == {"kind": "audio", "name": "clip2.wav", "seconds": 1.0}


def test_picture_search_finds_itself_first_and_its_spoken_captions(client, data):
    by_id = client.post("/search", data={"image_id": "shapes/05_orange.png", "k": "3"}).json()
    assert by_id["results"][0]["id"] == "shapes/05_orange.png" and by_id["results"][0]["score"] == pytest.approx(1.0, abs=1e-3)
    assert len(by_id["clips"]) == 3 and by_id["clips"][0]["audio_url"].startswith("/clips/clip")
    assert by_id["clips"][0]["text"].startswith("a picture of")
    upload = data["paths"][2].read_bytes()
    by_file = client.post("/search", files={"image": ("mine.png", upload, "image/png")}, data={"k": "2"}).json()
    assert by_file["results"][0]["id"] == "02_green.png"
    assert client.get(by_id["clips"][0]["audio_url"]).content[:4] == b"RIFF"


def test_images_and_cached_thumbnails_are_served(client, engine, data):
    full = client.get("/images/shapes/05_orange.png")
    assert full.status_code == 200 and full.content == (data["images"] / "shapes" / "05_orange.png").read_bytes()
    thumb = client.get("/thumbs/shapes/05_orange.png")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    made = sorted((engine.gallery.cache / "thumbs").iterdir())
    client.get("/thumbs/shapes/05_orange.png")
    assert sorted((engine.gallery.cache / "thumbs").iterdir()) == made  # the second request reads the cache
    for missing in ("/images/nope.png", "/thumbs/../../etc/passwd", "/images/%2e%2e/%2e%2e/etc/passwd"):
        assert client.get(missing).status_code == 404, missing


def test_page_and_api_documentation_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "Record" in page.text and "script-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/app.js").status_code == 200 and client.get("/style.css").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/search", "/keywords", "/embed/speech", "/embed/text", "/embed/image", "/healthz"} <= set(paths)
    assert client.get("/info").json()["keywords"] is True
    for path in ("/search", "/embed/text", "/keywords/"):  # the page's mount at / must not answer "not found"
        wrong = client.get(path)
        assert (wrong.status_code, wrong.headers["allow"], wrong.json()) == (405, "POST", {"detail": "Method Not Allowed"}), path
    assert client.get("/no-such-page").status_code == 404


def test_embeddings_and_keywords_endpoints(client, model):
    speech = client.post("/embed/speech", files=_audio()).json()["embedding"]
    assert len(speech) == model.clip.embed_dim and np.linalg.norm(speech) == pytest.approx(1.0, abs=1e-4)
    assert len(client.post("/embed/text", json={"texts": ["a", "b"]}).json()["embeddings"]) == 2
    picture = client.post("/embed/image", files={"image": ("p.png", client.get("/images/00_red.png").content, "image/png")})
    assert len(picture.json()["embedding"]) == model.clip.embed_dim
    slots = client.post("/keywords", files=_audio(), data={"top_k": "2"}).json()["keywords"]
    assert len(slots) == 4 and all(len(slot) == 2 for slot in slots)


# ---- bounds -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k, message", [("0", "k: must be between 1 and 1000, got 0"),
                                        ("-1", "k: must be between 1 and 1000, got -1"),
                                        ("1001", "k: must be between 1 and 1000, got 1001"),
                                        ("many", "k: Input should be a valid integer")])
def test_k_outside_bounds_is_422_with_a_sentence(client, k, message):
    answer = client.post("/search", data={"text": "a red circle", "k": k})
    assert answer.status_code == 422 and isinstance(answer.json()["detail"], str)
    assert answer.json()["detail"].startswith(message)


def test_bad_queries_are_422_naming_the_field_or_file(client):
    cases = [
        ({"data": {"text": "x" * 1001}}, "text: 1001 characters, over the limit of 1000"),
        ({"data": {"k": "3"}}, "send exactly one of"),
        ({"data": {"text": "red", "image_id": "00_red.png"}}, "(got text, image_id)"),
        ({"data": {"text": "   "}}, "text: empty query"),
        ({"files": {"audio": ("notes.txt", b"hello, not audio", "text/plain")}}, "notes.txt: unreadable audio"),
        ({"files": _audio(0.01, "click.wav")}, "click.wav: 10 ms of audio (160 samples at 16 kHz) is shorter than the "
                                               "model's minimum of 400 samples (25 ms)"),
        ({"files": {"image": ("cat.jpg", b"\xff\xd8 broken", "image/jpeg")}}, "cat.jpg: unreadable image"),
    ]
    for request, message in cases:
        answer = client.post("/search", **request)
        assert answer.status_code == 422, (request, answer.text)
        assert message in answer.json()["detail"], (message, answer.json())
    garbage = client.post("/search", files={"audio": ("notes.txt", b"hello, not audio", "text/plain")}).json()["detail"]
    assert garbage == "notes.txt: unreadable audio (Format not recognised.)"  # not the temporary file object's repr
    assert client.post("/embed/text", json={"texts": []}).status_code == 422
    assert client.post("/embed/text", json={"texts": ["ok", " "]}).json()["detail"] == "texts[1]: empty"
    assert client.post("/search", data={"image_id": "nope.png"}).json()["detail"] == "no image 'nope.png'"  # no server path
    assert "texts[1]: 1001 characters" in client.post("/embed/text", json={"texts": ["ok", "y" * 1001]}).json()["detail"]
    assert "top_k: must be between 1 and 50" in client.post("/keywords", files=_audio(), data={"top_k": "0"}).json()["detail"]
    assert client.post("/search", data={"image_id": "nope.png"}).status_code == 404


def test_long_audio_and_big_uploads_are_413(engine):
    client = TestClient(create_app(SearchEngine(engine.model, engine.gallery, limits=Limits(max_upload_mb=1))))
    long = client.post("/search", files=_audio(61, rate=8000, name="talk.wav"))  # 61 s at 8 kHz: 0.98 MB
    assert long.status_code == 413 and long.json()["detail"] == "talk.wav: 61.0 s of audio, over the 60 s limit"
    big = client.post("/search", files={"audio": ("big.wav", b"\0" * (1024 * 1024 + 1), "audio/wav")})
    assert big.status_code == 413 and big.json()["detail"] == "request body over the 1 MB upload limit"
    assert client.post("/embed/text", json={"texts": ["z" * 600] * 2000}).status_code == 413


def test_parallel_model_has_no_keywords(encoders, data, tmp_path):
    model = SpeechCLIP.from_pretrained(tiny_checkpoint(encoders, tmp_path / "parallel", "parallel"))
    client = TestClient(create_app(SearchEngine(model, index_images(model, data["images"], tmp_path / "cache", False))))
    assert client.post("/search", files=_audio()).json()["keywords"] is None
    answer = client.post("/keywords", files=_audio())
    assert answer.status_code == 422 and "this checkpoint is parallel" in answer.json()["detail"]


def test_keyword_count_varies_per_utterance_with_cif(encoders, data, tmp_path):
    model = SpeechCLIP.from_pretrained(tiny_checkpoint(encoders, tmp_path / "plus", "hybrid_plus"))
    client = TestClient(create_app(SearchEngine(model, index_images(model, data["images"], tmp_path / "cache", False))))
    counts = []
    for seconds in (0.3, 3.0):
        found = client.post("/search", files=_audio(seconds, seed=3)).json()["keywords"]
        expected = model.keywords([noise(seconds, seed=3)])[0]
        assert [[c["subword"] for c in slot] for slot in found] == [[s for s, _ in slot] for slot in expected]
        counts.append(len(found))
    assert counts[0] != counts[1], counts


# ---- the pool: 503 when full, and the event loop stays free ------------------------------------------

class GatedEngine(SearchEngine):
    """Text searches wait for a gate: a stand-in for a long clip being encoded."""

    def __init__(self, engine: SearchEngine, limits: Limits):
        super().__init__(engine.model, engine.gallery, engine.clips, limits)
        self.gate, self.started = threading.Event(), threading.Semaphore(0)

    def search_text(self, text: str, k: int) -> dict:
        self.started.release()
        assert self.gate.wait(30), "the test never opened the gate"
        return super().search_text(text, k)


def test_full_queue_is_503_and_healthz_answers_during_a_slow_request(engine):
    gated = GatedEngine(engine, Limits(workers=1, queue=1))
    app = create_app(gated)

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            slow = [asyncio.create_task(http.post("/search", data={"text": f"slow {i}"})) for i in range(2)]
            await asyncio.to_thread(gated.started.acquire, True, 10)  # one runs, one waits in the queue
            for _ in range(100):
                if app.state.pool.pending == 2:
                    break
                await asyncio.sleep(0.02)
            assert app.state.pool.pending == 2
            health = await asyncio.wait_for(http.get("/healthz"), timeout=2)
            assert health.status_code == 200 and health.json() == {"status": "ok", "queued": 2}
            busy = await http.post("/search", data={"text": "one too many"})
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert "the server is busy" in busy.json()["detail"]
            gated.gate.set()
            assert [r.status_code for r in await asyncio.gather(*slow)] == [200, 200]
            assert (await http.post("/search", data={"text": "after"})).status_code == 200

    asyncio.run(scenario())


def test_concurrent_queries_on_several_workers_all_succeed(encoders, data, tmp_path):
    """A pre-norm upstream (the demo's mini HuBERT is one) keeps per-call state on the module: two forwards
    at once broke it (500s under load). The engine lets forwards take turns; every answer must be right."""
    model = SpeechCLIP.from_pretrained(tiny_checkpoint(encoders, tmp_path / "ln", upstream="hubert-layernorm"))
    engine = SearchEngine(model, index_images(model, data["images"], tmp_path / "cache", False), limits=Limits(workers=4))
    app = create_app(engine)
    clips = [wav_bytes(0.3 + 0.1 * i, seed=i) for i in range(6)]
    expected = [TestClient(app).post("/search", files={"audio": ("q.wav", c, "audio/wav")}).json()["results"] for c in clips]

    async def scenario() -> list:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            return await asyncio.gather(*[http.post("/search", files={"audio": ("q.wav", clips[i % 6], "audio/wav")})
                                          for i in range(36)])

    answers = asyncio.run(scenario())
    assert [a.status_code for a in answers] == [200] * 36
    assert all(a.json()["results"] == expected[i % 6] for i, a in enumerate(answers))
