"""`speechclip serve` as a user meets it: the CLI in its own process on 127.0.0.1, an upload that is too
big refused while it streams (the server's memory measured), and the page in a real browser (Debian's
Chromium, headless, driven by Playwright) with a WAV file as the microphone.

Known answers: the server's own API, called with the very bytes the page sent, and the library for
files on disk; a picture searched with itself comes first with score 1.

SPEECHCLIP_DEMO_RUN=runs/demo runs the same tests on the finished demo's model, images and test clips,
and saves the README's screenshot, docs/serve.png.
"""

from __future__ import annotations

import base64
import io
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np
import pytest
import soundfile

from speechclip.data.manifest import read_manifest
from tests.serve_support import tiny_checkpoint

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]
DEMO_RUN = os.environ.get("SPEECHCLIP_DEMO_RUN")
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "serve.png"
MB = 1024 * 1024


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


@pytest.fixture(scope="module")
def sources(request, tmp_path_factory) -> dict:
    """The model, images and clips to serve: the demo's when SPEECHCLIP_DEMO_RUN is set, else a tiny
    untrained model over the tiny corpus (the demo's layout: images/ and test.jsonl)."""
    if DEMO_RUN:
        run = Path(DEMO_RUN)
        checkpoint, corpus = run / "runs" / "pretrained" / "final", run / "corpus"
        if not (checkpoint / "model.safetensors").is_file():
            pytest.fail(f"SPEECHCLIP_DEMO_RUN={DEMO_RUN}: {checkpoint} holds no finished model")
    else:
        corpus = Path(request.getfixturevalue("tiny_corpus"))
        checkpoint = tiny_checkpoint(request.getfixturevalue("encoders"), tmp_path_factory.mktemp("live") / "model")
    return {"checkpoint": checkpoint, "images": corpus / "images", "clips": corpus / "test.jsonl",
            "cache": tmp_path_factory.mktemp("serve-cache")}


@pytest.fixture(scope="module")
def server(sources):
    """`python -m speechclip.cli serve ...` in its own process; yields (base URL, pid)."""
    port = _free_port()
    command = [sys.executable, "-m", "speechclip.cli", "serve", "--checkpoint", str(sources["checkpoint"]),
               "--images", str(sources["images"]), "--clips", str(sources["clips"]), "--cache", str(sources["cache"]),
               "--port", str(port)]
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + (600 if DEMO_RUN else 120)  # the demo's first start embeds its clips
    try:
        while True:
            if process.poll() is not None:
                log.seek(0)
                pytest.fail(f"speechclip serve exited with {process.returncode}:\n{log.read().decode()[-3000:]}")
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("speechclip serve did not answer /healthz in time")
            time.sleep(0.2)
        yield base, process.pid
    finally:
        process.terminate()
        process.wait(10)


# ---- over HTTP: a 50 MB upload is refused while it streams, and the server's memory stays flat -----------

def _send_until_answered(port: int, head: bytes, chunks, chunked: bool) -> tuple[bytes, int]:
    """Send `head` then the body chunk by chunk, stopping as soon as the server answers; returns the
    answer and how many body bytes had been sent by then."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(head)
        for chunk in chunks:
            if select.select([connection], [], [], 0)[0]:
                break
            frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" if chunked else chunk
            try:
                connection.sendall(frame)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        answer = b""
        connection.settimeout(10)
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            part = connection.recv(65536)
            if not part:
                break
            answer += part
    return answer, sent


def _multipart_upload(total: int) -> tuple[bytes, list[bytes], str]:
    """A well-formed multipart head and `total` bytes of file content in 256 kB chunks (one buffer reused,
    so the client holds no 50 MB)."""
    boundary = "speechclipboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"audio\"; filename=\"huge.wav\"\r\n"
            "Content-Type: audio/wav\r\n\r\n").encode()
    chunk = b"\0" * (256 * 1024)
    return head, [head] + [chunk] * (total // len(chunk)), boundary


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_50_mb_upload_is_413_before_it_is_read_and_memory_stays_flat(server, declared):
    base, pid = server
    port = int(base.rsplit(":", 1)[1])
    head, chunks, boundary = _multipart_upload(50 * MB)
    length = f"Content-Length: {sum(map(len, chunks))}\r\n" if declared else "Transfer-Encoding: chunked\r\n"
    request = (f"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\n{length}"
               f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n").encode()
    before, peak, stop = _rss_kb(pid), [0], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_kb(pid))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        answer, sent = _send_until_answered(port, request, chunks, chunked=not declared)
    finally:
        stop.set()
        watcher.join()
    status, _, body = answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 413"), answer[:300]
    assert json.loads(body[body.index(b"{"):])["detail"] == "request body over the 20 MB upload limit"
    assert sent < 30 * MB, f"the server answered only after {sent / MB:.0f} MB"  # refused while streaming
    growth = (peak[0] - before) / 1024
    assert growth < 16, f"server RSS grew by {growth:.1f} MB during a 50 MB upload"
    assert httpx.get(f"{base}/healthz").status_code == 200


# ---- in a real browser ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def microphone_clip(sources, server) -> Path:
    """The spoken query the fake microphone plays: a test clip of the served corpus (for the demo's
    screenshot, the first whose own picture the server ranks first when sent the file)."""
    items = read_manifest(sources["clips"])
    if DEMO_RUN:
        for item in items[:100]:
            found = _api(server, files={"audio": (item.audio.name, item.audio.read_bytes(), "audio/wav")}, data={"k": "1"})
            if found["results"][0]["id"] == item.image.name:
                return item.audio
    return items[0].audio


@pytest.fixture(scope="module")
def browser(microphone_clip, tmp_path_factory):
    """Debian's Chromium, headless, in a fresh profile, with `microphone_clip` as its microphone."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (scripts/setup.sh does) to run the page's tests")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_ARGS + [f"--use-file-for-fake-audio-capture={microphone_clip}"],
            viewport={"width": 1100, "height": 900})
        context.set_default_timeout(20_000)
        yield context
        context.close()


@pytest.fixture
def page(browser, server, request, tmp_path):
    """A fresh page on the app; on failure a screenshot is kept (its path printed); JavaScript errors fail."""
    page = browser.new_page()
    problems = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.goto(server[0] + "/")
    failed_before = request.session.testsfailed
    yield page
    if request.session.testsfailed > failed_before:  # the call phase's report is counted before teardown
        page.screenshot(path=str(tmp_path / "failure.png"))
        print(f"screenshot of the failed page: {tmp_path / 'failure.png'}")
    page.close()
    assert not problems, f"JavaScript errors on the page: {problems}"


def _api(server, **request) -> dict:
    answer = httpx.post(f"{server[0]}/search", timeout=30, **request)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _shown_ids(page) -> list[str]:
    return page.locator("#results .result .id").all_inner_texts()


def _perfect_matches(page) -> list[str]:
    """Ids shown with score 1.000 (a picture searched with itself; an identical copy may tie with it)."""
    ids, scores = _shown_ids(page), page.locator("#results .result .score").all_inner_texts()
    return [i for i, score in zip(ids, scores) if score == "1.000"]


def _recording(page) -> bytes:
    """The WAV the page recorded and sent (the page keeps the last one; its CSP forbids fetching blob: URLs)."""
    data = page.evaluate("""async () => {
        const bytes = new Uint8Array(await state.recording.arrayBuffer());
        let text = ''; for (const b of bytes) text += String.fromCharCode(b);
        return btoa(text); }""")
    return base64.b64decode(data)


def _best_alignment(recorded: np.ndarray, source: np.ndarray) -> float:
    """Peak normalised cross-correlation of the source clip against the recording (the fake microphone
    loops the file; where the recording starts in it is not known)."""
    n = 1 << int(np.ceil(np.log2(len(recorded) + len(source))))
    spectrum = np.fft.rfft(recorded, n) * np.conj(np.fft.rfft(source, n))
    correlation = np.fft.irfft(spectrum, n)
    lags = np.arange(-len(source) + 1, len(recorded))
    power = np.concatenate([[0.0], np.cumsum(recorded.astype(np.float64) ** 2)])
    ends = np.minimum(lags + len(source), len(recorded))  # the recording's window under the source at each lag
    energy = np.sqrt(power[ends] - power[np.maximum(lags, 0)])
    normalised = correlation[lags % n] / (np.linalg.norm(source) * energy + 1e-9)
    return float(normalised.max())


def test_spoken_query_from_the_microphone(page, server, microphone_clip):
    source, rate = soundfile.read(microphone_clip, dtype="float32")
    page.click("#record")
    from playwright.sync_api import expect

    expect(page.locator("#status")).to_contain_text("Recording")
    time.sleep(min(len(source) / rate, 4.0) + 0.3)
    page.click("#record")
    expect(page.locator("#results .result")).to_have_count(12)
    wav = _recording(page)
    recorded, recorded_rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    info = soundfile.info(io.BytesIO(wav))
    assert (recorded_rate, info.channels, info.subtype) == (16_000, 1, "PCM_16")
    assert 0.5 < len(recorded) / recorded_rate < 10
    assert _best_alignment(recorded, source) > 0.6  # the recording is the microphone's clip, at 16 kHz
    expected = _api(server, files={"audio": ("recording.wav", wav, "audio/wav")}, data={"k": "12"})
    assert _shown_ids(page) == [hit["id"] for hit in expected["results"]]
    slots = page.locator("#keywords .slot .subword")
    expect(slots).to_have_count(len(expected["keywords"]))
    assert slots.all_inner_texts() == [slot[0]["subword"] for slot in expected["keywords"]]
    expect(page.locator("#query audio")).to_have_count(1)  # the recording can be played back
    page.screenshot(path=str(SCREENSHOT if DEMO_RUN else Path(tempfile.gettempdir()) / "speechclip-serve-tiny.png"))


def test_uploading_a_clip_gives_the_librarys_answer(page, server, microphone_clip):
    from playwright.sync_api import expect

    page.set_input_files("#file", str(microphone_clip))
    expect(page.locator("#results .result")).to_have_count(12)
    expected = _api(server, files={"audio": (microphone_clip.name, microphone_clip.read_bytes(), "audio/wav")},
                    data={"k": "12"})
    assert _shown_ids(page) == [hit["id"] for hit in expected["results"]]


def test_text_search_and_a_linked_query(page, server):
    from playwright.sync_api import expect

    page.goto(f"{server[0]}/?q={quote('a big red circle')}")
    expect(page.locator("#results .result")).to_have_count(12)
    assert _shown_ids(page) == [h["id"] for h in _api(server, data={"text": "a big red circle", "k": "12"})["results"]]
    page.fill("#text", "two blue squares")
    page.press("#text", "Enter")
    expect(page).to_have_url(f"{server[0]}/?q=two%20blue%20squares")
    expected = [h["id"] for h in _api(server, data={"text": "two blue squares", "k": "12"})["results"]]
    page.wait_for_function("ids => [...document.querySelectorAll('#results .result .id')].map(e => e.textContent)"
                           ".join() === ids.join()", arg=expected)


def test_clicking_a_picture_searches_with_it(page, server):
    from playwright.sync_api import expect

    page.fill("#text", "a picture")
    page.press("#text", "Enter")
    expect(page.locator("#results .result")).to_have_count(12)
    chosen = _shown_ids(page)[4]
    page.locator("#results .result").nth(4).click()
    expect(page.locator("#query")).to_contain_text(chosen)
    expect(page.locator("#results .result .score").first).to_have_text("1.000")
    assert chosen in _perfect_matches(page)
    expect(page.locator("#clips audio")).to_have_count(12)  # image -> spoken captions, with players
    assert page.locator("#clips .text").first.inner_text().strip()


def test_dropping_a_picture_searches_with_it(page, sources):
    from playwright.sync_api import expect

    picture = sorted(Path(sources["images"]).glob("*.png"))[3]
    transfer = page.evaluate_handle(
        """([data, name]) => { const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
           const transfer = new DataTransfer(); transfer.items.add(new File([bytes], name, {type: 'image/png'}));
           return transfer; }""", [base64.b64encode(picture.read_bytes()).decode(), picture.name])
    page.dispatch_event("body", "drop", {"dataTransfer": transfer})
    expect(page.locator("#query")).to_contain_text(picture.name)
    expect(page.locator("#results .result .score").first).to_have_text("1.000")
    assert picture.name in _perfect_matches(page)


def test_a_bad_upload_shows_the_servers_words_as_text(page):
    from playwright.sync_api import expect

    name = "<img src=x>notes.wav"  # shown as text, or it would become an element
    page.set_input_files("#file", files=[{"name": name, "mimeType": "audio/wav", "buffer": b"this is not audio"}])
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_contain_text(f"{name}: unreadable audio")
    expect(page.locator("#error img, #query img")).to_have_count(0)
    expect(page.locator("#results .result")).to_have_count(0)
    page.fill("#text", "")
    page.press("#text", "Enter")
    expect(page.locator("#error")).to_have_text("Type something to search for.")


def test_keyword_slots_of_varying_number_are_all_shown(page, server):
    """CIF models hear a different number of keywords per utterance: the page shows what it is sent."""
    from playwright.sync_api import expect

    reply = {"query": {"kind": "audio", "name": "x.wav", "seconds": 1.0}, "results": [], "keywords": [
        [{"subword": "three", "score": 0.71}, {"subword": "two", "score": 0.5}],
        [{"subword": "<img src=x onerror=alert(1)>", "score": 0.4}],
        [{"subword": "rings", "score": 0.66}, {"subword": "ring", "score": 0.6}, {"subword": "round", "score": 0.2}]]}
    page.route("**/search", lambda route: route.fulfill(json=reply))
    page.set_input_files("#file", files=[{"name": "x.wav", "mimeType": "audio/wav", "buffer": b"RIFF"}])
    expect(page.locator("#keywords .slot")).to_have_count(3)
    assert page.locator("#keywords .slot .subword").all_inner_texts() == ["three", "<img src=x onerror=alert(1)>", "rings"]
    expect(page.locator("#keywords img")).to_have_count(0)
    expect(page.locator("#keywords .slot").nth(2)).to_contain_text("ring 0.60, round 0.20")
