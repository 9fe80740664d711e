"""Bad input, one table per input class, through the Python API and the CLI: each gets one line that names
the item (file, field or tensor), never a traceback, never a silent wrong answer. (Config and run-folder
tables: tests/test_train_config.py and tests/test_run_folder.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from speechclip import SpeechCLIP
from speechclip.cli import main
from speechclip.index import EmbeddingIndex
from tests.conftest import cli_error_line, tiny_model_config, write_wav


@pytest.fixture(scope="module")
def saved(encoders, tmp_path_factory) -> dict:
    """A tiny cascaded checkpoint, a flat index for it, and a good clip and picture."""
    root = tmp_path_factory.mktemp("bad")
    torch.manual_seed(0)
    model = SpeechCLIP(tiny_model_config(encoders, "cascaded")).eval()
    model.save_pretrained(root / "ckpt")
    EmbeddingIndex.build(np.random.default_rng(0).standard_normal((5, model.clip.embed_dim)), list("abcde"), "flat").save(root / "index")
    Image.new("RGB", (40, 30), "red").save(root / "good.png")
    return {"root": root, "ckpt": root / "ckpt", "index": root / "index", "model": model,
            "wav": write_wav(root / "good.wav", np.random.default_rng(1).standard_normal(8000).astype(np.float32) * 0.1)}


# ---- audio ---------------------------------------------------------------------------------------------------
def _audio_cases(root: Path) -> list[tuple[str, object, str]]:
    (root / "notes.wav").write_text("not audio")
    write_wav(root / "empty.wav", np.zeros(0, dtype=np.float32))
    write_wav(root / "blip.wav", np.random.default_rng(2).standard_normal(100).astype(np.float32))
    whole = write_wav(root / "whole.wav", np.random.default_rng(4).standard_normal(8000).astype(np.float32) * 0.1).read_bytes()
    (root / "cut.wav").write_bytes(whole[: len(whole) // 2])  # an interrupted copy: libsndfile reads what is there
    data = whole.index(b"data") + 8  # the RIFF data chunk: its size field, then the samples
    declared, present = int.from_bytes(whole[data - 4 : data], "little"), len(whole) // 2 - data
    (root / "clips").mkdir(exist_ok=True)
    return [("missing file", root / "nowhere.wav", r"nowhere.wav: no such audio file"),
            ("a folder", root / "clips", r"clips: a folder, not an audio file"),
            ("not audio", root / "notes.wav", r"notes.wav: unreadable audio"),
            ("empty", root / "empty.wav", r"empty.wav: empty audio"),
            ("shorter than one frame", root / "blip.wav", r"blip.wav: too short \(100 samples\); the upstream needs at least 400"),
            ("cut short", root / "cut.wav", rf"cut.wav: cut short: its header promises {declared:,} bytes of samples, the file holds {present:,}"),
            ("NaN samples", np.full(4000, np.nan, dtype=np.float32), r"audio\[0\]: audio contains NaN"),
            ("booleans", np.ones(4000, dtype=bool), r"audio\[0\]: expected float or integer PCM samples, got dtype bool")]


@pytest.mark.parametrize("row", range(8))
def test_bad_audio_through_the_api(saved, row):
    name, clip, message = _audio_cases(saved["root"])[row]
    with pytest.raises(ValueError, match=message):
        saved["model"].encode_speech(clip)


@pytest.mark.parametrize("row", range(6))
def test_bad_audio_through_the_cli(saved, capsys, row):
    name, clip, message = _audio_cases(saved["root"])[row]
    assert __import__("re").search(message, cli_error_line(capsys, "keywords", "--checkpoint", str(saved["ckpt"]), str(clip)))
    assert __import__("re").search(message, cli_error_line(capsys, "search", "--index", str(saved["index"]), "--checkpoint",
                                                 str(saved["ckpt"]), "--audio", str(clip)))


def test_integer_pcm_is_scaled_like_a_file(saved):
    samples = (np.random.default_rng(3).standard_normal(8000) * 3000).astype(np.int16)
    model = saved["model"]
    torch.testing.assert_close(model.encode_speech(samples), model.encode_speech(samples.astype(np.float32) / 32768))


# ---- images --------------------------------------------------------------------------------------------------
def _image_cases(root: Path) -> list[tuple[str, Path, str]]:
    (root / "notes.png").write_text("not a picture")
    Image.new("L", (9000, 5000)).save(root / "huge.png")
    return [("missing", root / "nowhere.png", r"nowhere.png: no such image file"),
            ("not an image", root / "notes.png", r"notes.png: unreadable image"),
            ("over the pixel limit", root / "huge.png", r"huge.png: 9000 x 5000 = 45 megapixels, over the limit of 40")]


@pytest.mark.parametrize("row", range(3))
def test_bad_images_through_the_api_and_the_cli(saved, capsys, row):
    name, image, message = _image_cases(saved["root"])[row]
    with pytest.raises(ValueError, match=message):
        saved["model"].encode_image(image)
    err = cli_error_line(capsys, "search", "--index", str(saved["index"]), "--checkpoint", str(saved["ckpt"]), "--image", str(image))
    assert __import__("re").search(message, err), err


# ---- checkpoints -----------------------------------------------------------------------------------------------
def _damage(folder: Path, how: str, encoders: dict) -> str:
    """Copy of the good checkpoint with one thing wrong; returns the message it must give."""
    weights, config = folder / "model.safetensors", folder / "config.json"
    tensors = load_file(str(weights))
    if how == "no config":
        config.unlink()
        return r"config.json: missing"
    if how == "config not JSON":
        config.write_text("{ not json")
        return r"config.json: cannot read model config"
    if how == "unknown field":
        values = json.loads(config.read_text())
        values["layers"] = 3
        config.write_text(json.dumps(values))
        return r"config.json: model: unknown field\(s\) \['layers'\]"
    if how == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:1000])
        return r"model.safetensors: unreadable weights"
    if how == "wrong shape":
        tensors["head.cls"] = torch.zeros(3, tensors["head.cls"].shape[1])
        save_file(tensors, str(weights))
        return r"model.safetensors: tensor head.cls has shape \(3, 64\), the config builds \(4, 64\)"
    if how == "NaN weights":
        tensors["head.keywords.projection.weight"][0, 0] = float("nan")
        save_file(tensors, str(weights))
        return r"model.safetensors: tensor head.keywords.projection.weight holds NaN or infinite values"
    if how == "another upstream":
        values = json.loads(config.read_text())
        values["upstream"] = encoders["hubert-other"]
        config.write_text(json.dumps(values))
        return r"config.json: the upstream loaded is not the one these heads were trained on"
    if how == "encoder folder gone":
        values = json.loads(config.read_text())
        values["clip"] = "encoders/clip-that-moved"
        (folder / "encoders").mkdir()
        config.write_text(json.dumps(values))
        return r"config.json: clip 'encoders/clip-that-moved' is not a folder"
    raise AssertionError(how)


CHECKPOINT_CASES = ["no config", "config not JSON", "unknown field", "truncated weights", "wrong shape", "NaN weights",
                    "another upstream", "encoder folder gone"]


@pytest.fixture(scope="module")
def other_upstream(encoders, tmp_path_factory) -> str:
    """A HuBERT of exactly the same shape with other weights: the case a path-only config cannot tell apart."""
    from speechclip.mini_encoders import mini_speech_config, save_mini_speech

    torch.manual_seed(99)
    return str(save_mini_speech(tmp_path_factory.mktemp("other") / "hubert", mini_speech_config("hubert")))


@pytest.mark.parametrize("how", CHECKPOINT_CASES)
def test_bad_checkpoints_through_the_api_and_the_cli(saved, encoders, other_upstream, tmp_path, capsys, how):
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(saved["ckpt"], folder)
    config = json.loads((folder / "config.json").read_text())  # encoders are stored relative to the folder
    config["upstream"], config["clip"] = encoders["hubert"], encoders["clip"]
    (folder / "config.json").write_text(json.dumps(config))
    message = _damage(folder, how, {**encoders, "hubert-other": other_upstream})
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        SpeechCLIP.from_pretrained(folder)
    assert __import__("re").search(message, cli_error_line(capsys, "keywords", "--checkpoint", str(folder), str(saved["wav"])))
    if how == "another upstream":  # the explicit override
        assert SpeechCLIP.from_pretrained(folder, check_encoders=False).config.variant == "cascaded"


# ---- API edges ---------------------------------------------------------------------------------------------------
def test_api_edges(saved):
    model = saved["model"]
    assert model.encode_text("a cat").shape == (1, model.clip.embed_dim)  # one text, not three characters
    torch.testing.assert_close(model.encode_text("a cat"), model.encode_text(["a cat"]))
    assert model.encode_speech([]).shape == (0, model.clip.embed_dim)
    assert model.encode_text([]).shape == (0, model.clip.embed_dim) and model.encode_image([]).shape[0] == 0
    assert model.encode_speech(str(saved["wav"])).shape == (1, model.clip.embed_dim)
    with pytest.raises(ValueError, match="branch: expected 'parallel' or 'cascaded', got 'paralel'"):
        model.encode_speech([saved["wav"]], branch="paralel")
    with pytest.raises(ValueError, match="branch='parallel' needs a parallel or hybrid model"):
        model.encode_speech([saved["wav"]], branch="parallel")
    with pytest.raises(ValueError, match="top_k=0: must be an integer >= 1"):
        model.keywords([saved["wav"]], top_k=0)
    with pytest.raises(ValueError, match=r"texts\[1\]: expected a string"):
        model.encode_text(["a cat", 3])


def test_keywords_names_a_bad_clip_before_loading_the_model(saved, capsys, monkeypatch):
    from speechclip import model as model_module

    monkeypatch.setattr(model_module.SpeechCLIP, "from_pretrained", lambda *a, **k: pytest.fail("loaded first"))
    assert cli_error_line(capsys, "keywords", "--checkpoint", str(saved["ckpt"]), str(saved["wav"]), str(saved["root"] / "gone.wav")) \
        == f"speechclip: error: {saved['root'] / 'gone.wav'}: no such audio file"


def test_keywords_and_search_refuse_an_overlong_clip_before_loading_the_model(saved, capsys, monkeypatch):
    """A clip is encoded whole: a 10-minute one took 4 GB through the tiny model's keywords."""
    from speechclip import cli
    from speechclip import model as model_module
    from speechclip.audio import MAX_QUERY_SECONDS

    monkeypatch.setattr(model_module.SpeechCLIP, "from_pretrained", lambda *a, **k: pytest.fail("loaded first"))
    long = write_wav(saved["root"] / "long.wav", np.full(16000 * 3 // 2, 0.1, dtype=np.float32))
    over = f"speechclip: error: {long}: 1.5 s of audio, over the 1 s limit (--max-audio-seconds; a clip is encoded whole)"
    assert cli_error_line(capsys, "keywords", "--checkpoint", str(saved["ckpt"]), "--max-audio-seconds", "1", str(long)) == over
    assert cli_error_line(capsys, "search", "--index", str(saved["index"]), "--checkpoint", str(saved["ckpt"]),
                          "--max-audio-seconds", "1", "--audio", str(long)) == over
    assert cli_error_line(capsys, "keywords", "--checkpoint", str(saved["ckpt"]), "--max-audio-seconds", "0", str(long)) \
        == "speechclip: error: --max-audio-seconds 0: must be more than 0"
    assert f"default: {MAX_QUERY_SECONDS:g}," in cli.QUERY_SECONDS_HELP
    monkeypatch.setattr("speechclip.audio.MAX_QUERY_SECONDS", 1.0)  # the default is the shared limit
    assert cli_error_line(capsys, "keywords", "--checkpoint", str(saved["ckpt"]), str(long)) == over


def test_search_arguments_are_checked_before_any_work(saved, capsys):
    search = ("search", "--index", str(saved["index"]), "--checkpoint", str(saved["ckpt"]))
    assert cli_error_line(capsys, *search, "--text", "") == "speechclip: error: --text: empty"  # once an image search of None
    assert cli_error_line(capsys, *search, "--audio", " ") == "speechclip: error: --audio: empty"
    assert cli_error_line(capsys, *search, "--text", "a red square", "-k", "0") == "speechclip: error: -k 0: must be at least 1"


def test_embed_refuses_a_split_it_would_ignore(saved, tmp_path, capsys):
    """A manifest lists every clip to embed: --split test beside it used to be dropped without a word."""
    manifest = tmp_path / "clips.jsonl"
    manifest.write_text(json.dumps({"audio": str(saved["wav"]), "image": str(saved["root"] / "good.png"), "text": "red"}) + "\n")
    embed = ("embed", "--checkpoint", str(saved["ckpt"]), "--manifest", str(manifest), "--out", str(tmp_path / "emb"))
    assert cli_error_line(capsys, *embed, "--split", "val", "--set", "data.root=x") == \
        "speechclip: error: --split, --set: not used with --manifest (it lists every clip to embed); give one or the other"
    assert not (tmp_path / "emb").exists()


def test_an_interrupt_is_one_line_not_a_traceback(saved, capsys, monkeypatch):
    import speechclip.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "cmd_keywords", interrupted)
    with pytest.raises(SystemExit) as stop:
        main(["keywords", "--checkpoint", str(saved["ckpt"]), str(saved["wav"])])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 130 and err == "speechclip keywords: interrupted"
    from speechclip.train.run import TrainingInterrupted

    def stopped_training(args):
        raise TrainingInterrupted("interrupted at step 4; run the same command with --resume to go on")
    monkeypatch.setattr(cli, "cmd_train", stopped_training)
    with pytest.raises(SystemExit) as stop:
        main(["train", "--config", "run.yaml", "--run-dir", "runs/x"])
    assert stop.value.code == 130
    assert capsys.readouterr().err.strip() == "speechclip train: interrupted at step 4; run the same command with --resume to go on"
    monkeypatch.setattr(cli, "cmd_serve", interrupted)  # Ctrl-C is how a server is stopped: not an error
    with pytest.raises(SystemExit) as stop:
        main(["serve"])
    assert stop.value.code == 0 and capsys.readouterr().err.strip() == "speechclip serve: stopped"
