import json
import os
import random
import shutil

import soundfile
from PIL import Image

from speechclip.data import read_dataset
from speechclip.data.clipart import find_drawings
from speechclip.data.scenes import captions, random_scene, render
from speechclip.data.synthetic import CorpusSpec, build_corpus

SPEC = CorpusSpec(num_scenes=14, num_clipart=4, captions_per_image=2, val_images=3, test_images=4, seed=3)


def test_scenes_are_deterministic_and_described():
    a, b = random_scene(random.Random(5)), random_scene(random.Random(5))
    assert a == b
    texts = captions(a, random.Random(1), 3)
    assert len(set(texts)) == 3 and all(a[0].color in t and a[0].shape in t for t in texts)
    assert render(a, 48).size == (48, 48)


def test_clipart_titles_are_clean_words():
    drawings = find_drawings()
    assert len(drawings) > 500
    assert all(d.title.replace(" ", "").isalpha() and d.title == d.title.lower() for d in drawings)
    assert len({d.title for d in drawings}) == len(drawings)


def test_build_corpus_splits_by_image_and_speaker(tmp_path):
    summary = build_corpus(tmp_path, SPEC, progress=False)
    splits = {s: read_dataset("manifest", str(tmp_path), s) for s in ("train", "val", "test")}
    images = {s: {i.image_id for i in items} for s, items in splits.items()}
    assert not images["train"] & images["test"] and not images["train"] & images["val"]
    speakers = {s: {i.speaker for i in items} for s, items in splits.items()}
    assert not speakers["train"] & speakers["test"] and summary["test_speakers_in_train"] == 0
    assert sum(len(v) for v in splits.values()) == sum(s["captions"] for s in summary["splits"].values())
    assert any(i.image_id.startswith("clipart") for v in splits.values() for i in v)
    # training captions are spoken by `train_voices` different training speakers; val and test by one
    voices = {}
    for i in splits["train"]:
        voices.setdefault((i.image_id, i.text), []).append(i.speaker)
    assert {len(v) for v in voices.values()} == {SPEC.train_voices} and all(len(set(v)) == len(v) for v in voices.values())
    assert len(splits["test"]) == len({(i.image_id, i.text) for i in splits["test"]})
    item = splits["test"][0]
    info = soundfile.info(str(item.audio))
    assert info.samplerate == 16000 and info.channels == 1 and info.duration > 0.3
    assert item.text and item.image.is_file()


def test_extra_test_folds_leave_the_other_splits_as_they_were(tmp_path):
    """Folds come from a stream of their own: adding them keeps train/val/test byte for byte, and each fold
    has the test split's size, unseen images (scenes and unused clip-art) and the held-out speakers."""
    from dataclasses import replace

    build_corpus(tmp_path / "one", SPEC, progress=False)
    summary = build_corpus(tmp_path / "three", replace(SPEC, test_folds=3), progress=False)
    for split in ("train", "val", "test"):
        assert (tmp_path / "one" / f"{split}.jsonl").read_text() == (tmp_path / "three" / f"{split}.jsonl").read_text()
    splits = {s: read_dataset("manifest", str(tmp_path / "three"), s) for s in ("train", "val", "test", "test_fold1", "test_fold2")}
    images = {s: {i.image_id for i in items} for s, items in splits.items()}
    sources = {s: {i.image.name.rsplit("_", 1)[1] for i in items} for s, items in splits.items()}  # content hashes
    for fold in ("test_fold1", "test_fold2"):
        assert len(images[fold]) == SPEC.test_images and len(splits[fold]) == SPEC.test_images * SPEC.captions_per_image
        assert all(not images[fold] & images[s] and not sources[fold] & sources[s] for s in splits if s != fold)
        assert not {i.speaker for i in splits[fold]} & {i.speaker for i in splits["train"]}
    assert summary["splits"]["test_fold2"] == {"images": SPEC.test_images, "captions": SPEC.test_images * SPEC.captions_per_image}
    # a copy made with hard links keeps its own summary when the original is rebuilt with more folds, and a
    # summary whose manifests are missing is not trusted
    linked = tmp_path / "linked"
    shutil.copytree(tmp_path / "one", linked, copy_function=os.link)
    build_corpus(tmp_path / "one", replace(SPEC, test_folds=2), progress=False)
    assert json.loads((linked / "corpus.json").read_text())["spec"]["test_folds"] == 1
    (tmp_path / "three" / "test_fold2.jsonl").unlink()
    build_corpus(tmp_path / "three", replace(SPEC, test_folds=3), progress=False)
    assert len(read_dataset("manifest", str(tmp_path / "three"), "test_fold2")) == SPEC.test_images * SPEC.captions_per_image


def test_build_is_deterministic_and_reuses_files(tmp_path):
    first = build_corpus(tmp_path / "a", SPEC, progress=False)
    second = build_corpus(tmp_path / "b", SPEC, progress=False)
    assert (tmp_path / "a" / "test.jsonl").read_text() == (tmp_path / "b" / "test.jsonl").read_text()
    # an interrupted build: a wav lost and the summary missing -> only the missing file is made again
    wav = tmp_path / "a" / json.loads((tmp_path / "a" / "train.jsonl").read_text().splitlines()[0])["audio"]
    untouched = sorted((tmp_path / "a" / "audio").iterdir())[-1]
    stamp = untouched.stat().st_mtime_ns
    wav.unlink()
    (tmp_path / "a" / "corpus.json").unlink()
    build_corpus(tmp_path / "a", SPEC, progress=False)
    assert wav.is_file() and untouched.stat().st_mtime_ns == stamp
    assert first["splits"] == second["splits"]


def test_a_changed_spec_never_reuses_a_stale_file(tmp_path):
    from dataclasses import replace

    build_corpus(tmp_path, SPEC, progress=False)
    changed = replace(SPEC, train_voices=3, image_size=40)
    summary = build_corpus(tmp_path, changed, progress=False)
    items = [i for s in ("train", "val", "test") for i in read_dataset("manifest", str(tmp_path), s)]
    # every clip and picture on disk is one the new manifests name (the old ones were made for another spec)
    assert sorted((tmp_path / "audio").iterdir()) == sorted({i.audio for i in items})
    assert sorted((tmp_path / "images").iterdir()) == sorted({i.image for i in items})
    assert {Image.open(i.image).size for i in items} == {(40, 40)}
    train = read_dataset("manifest", str(tmp_path), "train")
    assert summary["splits"]["train"]["captions"] == len(train) == 3 * len({(i.image_id, i.text) for i in train})


def test_cli_data_build_takes_unset_sizes_from_the_spec(tmp_path, capsys):
    from speechclip.cli import main

    main(["data", "build", "--out", str(tmp_path), "--scenes", "8", "--clipart", "0", "--captions", "1",
          "--val-images", "1", "--test-images", "2", "--workers", "2"])
    spec = json.loads(capsys.readouterr().out)["spec"]
    assert spec["num_scenes"] == 8 and spec["num_clipart"] == 0
    assert spec["train_voices"] == CorpusSpec().train_voices and spec["image_size"] == CorpusSpec().image_size


def test_the_corpus_is_the_same_spoken_in_worker_processes_or_by_the_program(tmp_path):
    """Speech through libespeak-ng in forked workers (the default where it loads) and through the espeak-ng
    program in threads: every wav byte for byte the same, and the same manifests."""
    small = CorpusSpec(num_scenes=8, num_clipart=2, captions_per_image=2, val_images=2, test_images=2, seed=5)
    build_corpus(tmp_path / "library", small, progress=False, in_process=True, workers=2)
    build_corpus(tmp_path / "program", small, progress=False, in_process=False)
    wavs = sorted(p.name for p in (tmp_path / "library" / "audio").glob("*.wav"))
    assert len(wavs) == len(list((tmp_path / "program" / "audio").glob("*.wav"))) > 10
    for name in wavs:
        assert (tmp_path / "library" / "audio" / name).read_bytes() == (tmp_path / "program" / "audio" / name).read_bytes(), name
    for split in ("train", "val", "test"):
        assert (tmp_path / "library" / f"{split}.jsonl").read_text() == (tmp_path / "program" / f"{split}.jsonl").read_text()


_spoken_in_this_worker: list = []


def _dies_on_the_fourth_clip(clip) -> None:
    """A speech job that kills its worker on the fourth clip, as a segfault in libespeak-ng would."""
    from speechclip.data import synthetic

    _spoken_in_this_worker.append(clip)
    if len(_spoken_in_this_worker) == 4:
        os._exit(1)
    synthetic.synthesize(*clip)


def test_a_speech_worker_that_dies_is_one_line_and_keeps_what_was_written(tmp_path, monkeypatch):
    """A crash inside libespeak-ng kills its worker process: the build says so in one line, the clips written
    so far stay (whole), and a second build finishes the corpus."""
    import pytest

    from speechclip.data import DataError, synthetic

    small = CorpusSpec(num_scenes=6, num_clipart=0, captions_per_image=1, val_images=1, test_images=1, seed=2)
    monkeypatch.setattr(synthetic, "_make_speech", _dies_on_the_fourth_clip)  # the forked worker inherits it
    with pytest.raises(DataError, match="speech worker process died"):
        build_corpus(tmp_path, small, progress=False, in_process=True, workers=1)
    assert not (tmp_path / "corpus.json").exists()
    written = list((tmp_path / "audio").glob("*.wav"))
    assert len(written) == 3 and all(soundfile.info(str(w)).frames > 0 for w in written)
    monkeypatch.undo()
    summary = build_corpus(tmp_path, small, progress=False, in_process=True)
    assert sum(s["captions"] for s in summary["splits"].values()) == len(list((tmp_path / "audio").glob("*.wav"))) > 3
