"""The CLI's embed / keywords / index / search / eval commands, and the HTTP API, on a tiny checkpoint."""

import io
import json

import numpy as np
import pytest
import soundfile
import torch

from speechclip.cli import main
from speechclip.model import SpeechCLIP
from tests.conftest import tiny_model_config


@pytest.fixture(scope="module")
def checkpoint(encoders, tmp_path_factory):
    torch.manual_seed(0)
    return SpeechCLIP(tiny_model_config(encoders, "hybrid")).save_pretrained(tmp_path_factory.mktemp("ckpt") / "model")


def test_embed_index_search_keywords(checkpoint, tiny_corpus, tmp_path, capsys):
    manifest = f"{tiny_corpus}/test.jsonl"
    main(["embed", "--checkpoint", str(checkpoint), "--manifest", manifest, "--out", str(tmp_path / "emb")])
    written = json.loads(capsys.readouterr().out)
    assert set(written) == {"speech", "image", "text"}
    main(["index", "--embeddings", str(tmp_path / "emb" / "image.safetensors"), "--out", str(tmp_path / "idx")])
    first = json.loads((tmp_path / "emb" / "speech.ids.json").read_text())[0]
    capsys.readouterr()
    main(["search", "--index", str(tmp_path / "idx"), "--checkpoint", str(checkpoint), "--audio", first, "-k", "3"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[0].lstrip().startswith("1.")
    main(["keywords", "--checkpoint", str(checkpoint), "--top-k", "2", first])
    out = capsys.readouterr().out
    assert out.count("keyword ") == 4  # 4 keyword slots in the tiny config


def test_cli_reports_bad_input_plainly(checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["keywords", "--checkpoint", str(checkpoint), str(tmp_path / "nope.wav")])
    assert stop.value.code == 2
    assert "nope.wav: no such audio file" in capsys.readouterr().err


def _wav_bytes(seconds: float = 0.5, rate: int = 22050) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.random.default_rng(0).standard_normal(int(rate * seconds)).astype(np.float32) * 0.1, rate, format="WAV")
    return buffer.getvalue()


def test_http_api(checkpoint):
    from fastapi.testclient import TestClient

    from speechclip.index import EmbeddingIndex
    from speechclip.serve import create_app

    model = SpeechCLIP.from_pretrained(checkpoint)
    vectors = model.encode_text(["a red circle", "two blue squares", "a green star"]).numpy()
    client = TestClient(create_app(model, EmbeddingIndex.build(vectors, ["red", "blue", "green"], "flat")))
    assert "speechclip" in client.get("/").text
    speech = client.post("/embed/speech", files={"audio": ("q.wav", _wav_bytes(), "audio/wav")}).json()
    assert len(speech["embedding"]) == model.clip.embed_dim
    assert len(client.post("/embed/text", json={"texts": ["a", "b"]}).json()["embeddings"]) == 2
    found = client.post("/search", data={"text": "two blue squares", "k": "2"}).json()
    assert found["results"][0]["id"] == "blue" and len(found["results"]) == 2
    spoken = client.post("/search", files={"audio": ("q.wav", _wav_bytes(), "audio/wav")}, data={"k": "3"}).json()
    assert len(spoken["results"]) == 3 and len(spoken["keywords"]) == 4
    bad = client.post("/keywords", files={"audio": ("bad.wav", b"not a wav", "audio/wav")})
    assert bad.status_code == 422 and "bad.wav: unreadable audio" in bad.json()["detail"]
    assert client.post("/search", data={"k": "3"}).status_code == 422
