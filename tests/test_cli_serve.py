"""The CLI's embed / keywords / index / search commands and `serve`'s arguments, on a tiny checkpoint
(the server itself: tests/test_serve_app.py over HTTP in process, tests/test_serve_live.py in a browser)."""

import json
from pathlib import Path

import pytest
import torch

from speechclip.cli import main
from speechclip.embed import load_embeddings
from speechclip.model import SpeechCLIP
from tests.conftest import tiny_model_config


@pytest.fixture(scope="module")
def checkpoint(encoders, tmp_path_factory):
    torch.manual_seed(0)
    return SpeechCLIP(tiny_model_config(encoders, "hybrid")).save_pretrained(tmp_path_factory.mktemp("ckpt") / "model")


def test_embed_index_search_keywords(checkpoint, tiny_corpus, tmp_path, capsys):
    manifest = f"{tiny_corpus}/test.jsonl"
    main(["embed", "--checkpoint", str(checkpoint), "--manifest", manifest, "--out", str(tmp_path / "emb"), "--no-progress"])
    written = json.loads(capsys.readouterr().out)
    assert set(written["kinds"]) == {"speech", "image", "text"} and written["kinds"]["speech"] == written["kinds"]["text"] > 0
    main(["index", "--embeddings", str(tmp_path / "emb"), "--what", "image", "--out", str(tmp_path / "idx")])
    assert "flat index of " in capsys.readouterr().out  # the plan and its memory estimate, printed first
    first = load_embeddings(tmp_path / "emb", "speech")[1][0]
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


def test_embed_into_a_folder_of_another_checkpoint_says_so_in_one_line(checkpoint, encoders, tiny_corpus, tmp_path, capsys,
                                                                       monkeypatch):
    manifest, out = f"{tiny_corpus}/test.jsonl", str(tmp_path / "emb")
    main(["embed", "--checkpoint", str(checkpoint), "--manifest", manifest, "--out", out, "--what", "speech", "--no-progress"])
    shards = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "emb").glob("speech-*.safetensors")}
    monkeypatch.chdir(checkpoint.parent)  # the same checkpoint by another path: one model, its shards reused
    main(["embed", "--checkpoint", f"./{checkpoint.name}/", "--manifest", manifest, "--out", out, "--what", "speech", "--no-progress"])
    assert shards and {p.name: p.stat().st_mtime_ns for p in (tmp_path / "emb").glob("speech-*.safetensors")} == shards
    torch.manual_seed(1)
    other = SpeechCLIP(tiny_model_config(encoders, "hybrid")).save_pretrained(tmp_path / "other")
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(["embed", "--checkpoint", str(other), "--manifest", manifest, "--out", out, "--what", "speech", "--no-progress"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "manifest.json: holds the embeddings of another model" in err


def test_serve_without_the_demo_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no runs/demo here
    with pytest.raises(SystemExit) as stop:
        main(["serve"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "run `speechclip demo` first" in err and "runs/demo" in err


def test_serve_needs_both_checkpoint_and_images(checkpoint):
    with pytest.raises(SystemExit, match="give both --checkpoint and --images"):
        main(["serve", "--checkpoint", str(checkpoint)])


def test_serve_uses_the_finished_demo_by_default(checkpoint, tmp_path, monkeypatch):
    """No arguments: the demo's model, its corpus's images and its test clips, whatever the folder layout."""
    import shutil

    from speechclip.serve import run

    demo = tmp_path / "runs" / "demo"
    shutil.copytree(checkpoint, demo / "runs" / "pretrained" / "final")
    (demo / "corpus" / "images").mkdir(parents=True)
    (demo / "corpus" / "test.jsonl").write_text("")
    served = {}
    monkeypatch.setattr(run, "serve", lambda sources, **kw: served.update(sources=sources, **kw))
    monkeypatch.chdir(tmp_path)
    main(["serve", "--port", "8123"])
    assert served["sources"] == run.Sources(Path("runs/demo/runs/pretrained/final"), Path("runs/demo/corpus/images"),
                                            Path("runs/demo/corpus/test.jsonl"))
    assert served["host"] == "127.0.0.1" and served["port"] == 8123


def test_serve_refuses_a_port_it_cannot_listen_on_before_loading_anything(checkpoint, tmp_path, monkeypatch, capsys):
    """--port 70000 was an OverflowError, and a port in use was found only after the model loaded and the
    gallery was indexed (a minute on a real gallery)."""
    import socket

    from speechclip.serve import run

    monkeypatch.setattr(run, "build_app", lambda *a, **k: pytest.fail("loaded before the arguments were checked"))
    serve = ["serve", "--checkpoint", str(checkpoint), "--images", str(tmp_path)]
    for extra, message in ((["--port", "70000"], "--port 70000: must be 1-65535"),
                           (["--max-upload-mb", "0"], "--max-upload-mb 0: must be above 0 (every request would be refused)")):
        with pytest.raises(SystemExit) as stop:
            main(serve + extra)
        assert stop.value.code == 2 and capsys.readouterr().err.strip() == f"speechclip: error: {message}"
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit):
            main(serve + ["--port", str(port)])
    assert f"--host 127.0.0.1 --port {port}: cannot listen there (" in capsys.readouterr().err
