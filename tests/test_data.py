import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from speechclip.data import DataError, check_items, read_dataset, read_flickr8k, read_manifest, read_spokencoco
from tests.conftest import write_wav

IMAGES = ["1000268201_693b08cb0e", "1001773457_577c3a7d70", "1002674143_1b742ab4b8"]


def _wav(path, seconds=0.3):
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_wav(path, np.random.default_rng(0).standard_normal(int(16000 * seconds)).astype(np.float32) * 0.1)


def _image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), "red").save(path)


@pytest.fixture
def flickr_root(tmp_path):
    """Flickr8k Audio + Flickr8k images/text in their published layout (3 images x 5 captions)."""
    root = tmp_path / "flickr8k"
    audio, text = root / "flickr_audio", root / "Flickr8k_text"
    text.mkdir(parents=True)
    capt, spk, tokens = [], [], []
    for name in IMAGES:
        _image(root / "Flickr8k_Dataset" / "Flicker8k_Dataset" / f"{name}.jpg")
        for n in range(5):
            _wav(audio / "wavs" / f"{name}_{n}.wav")
            capt.append(f"{name}_{n}.wav {name}.jpg #{n}")
            spk.append(f"{name}_{n}.wav {n + 1}")
            tokens.append(f"{name}.jpg#{n}\tA dog number {n} runs .")
    (audio / "wav2capt.txt").write_text("\n".join(capt) + "\n")
    (audio / "wav2spk.txt").write_text("\n".join(spk) + "\n")
    (text / "Flickr8k.token.txt").write_text("\n".join(tokens) + "\n")
    for split, names in {"train": IMAGES[:1], "dev": IMAGES[1:2], "test": IMAGES[2:]}.items():
        (text / f"Flickr_8k.{split}Images.txt").write_text("".join(f"{n}.jpg\n" for n in names))
    return root


def test_flickr8k_reads_published_layout(flickr_root):
    test = read_flickr8k(flickr_root, "test")
    assert len(test) == 5 and {i.image_id for i in test} == {IMAGES[2]}
    item = test[3]
    assert item.audio.name == f"{IMAGES[2]}_3.wav" and item.audio.is_file()
    assert item.image.is_file() and item.text == "A dog number 3 runs ." and item.speaker == "4"
    assert len(read_flickr8k(flickr_root, "val")) == 5
    assert len(check_items(read_flickr8k(flickr_root, "train")).good) == 5


def test_flickr8k_karpathy_json_overrides_split(flickr_root):
    images = [{"filename": f"{n}.jpg", "split": s} for n, s in zip(IMAGES, ["test", "train", "val"])]
    (flickr_root / "dataset_flickr8k.json").write_text(json.dumps({"images": images}))
    assert {i.image_id for i in read_flickr8k(flickr_root, "test")} == {IMAGES[0]}


def test_flickr8k_missing_file_is_named(flickr_root):
    (flickr_root / "flickr_audio" / "wav2capt.txt").unlink()
    with pytest.raises(DataError, match="wav2capt.txt: missing"):
        read_flickr8k(flickr_root, "test")


@pytest.fixture
def coco_root(tmp_path):
    root = tmp_path / "SpokenCOCO"
    data = {"train": [], "val": []}
    for split, coco_split, ids in (("train", "train2014", [9, 25]), ("val", "val2014", [42, 73, 74])):
        for cid in ids:
            image = f"{coco_split}/COCO_{coco_split}_{cid:012d}.jpg"
            _image(root / image)
            captions = []
            for n in range(2):
                wav = f"wavs/{split}/0/spk{n}-UTT{cid}_{cid}_{n}.wav"
                _wav(root / wav)
                captions.append({"text": f"caption {n} of {cid}", "speaker": f"spk{n}", "uttid": f"u{cid}{n}", "wav": wav})
            data[split].append({"image": image, "captions": captions})
    for split in data:
        (root / f"SpokenCOCO_{split}.json").write_text(json.dumps({"data": data[split]}))
    return root


def test_spokencoco_reads_published_layout(coco_root):
    train = read_spokencoco(coco_root, "train")
    assert len(train) == 4 and train[0].text == "caption 0 of 9" and train[0].audio.is_file()
    assert train[0].image_id == "COCO_train2014_000000000009" and train[0].image.is_file()
    assert len(read_spokencoco(coco_root, "val")) == 6  # test needs Karpathy's split: see test_spokencoco_test_split_needs_karpathy


def test_spokencoco_karpathy_split(coco_root):
    images = [{"filename": "COCO_val2014_000000000042.jpg", "split": "test"},
              {"filename": "COCO_val2014_000000000073.jpg", "split": "restval"},
              {"filename": "COCO_val2014_000000000074.jpg", "split": "val"},
              {"filename": "COCO_train2014_000000000009.jpg", "split": "train"}]
    (coco_root / "dataset_coco.json").write_text(json.dumps({"images": images}))
    assert {i.image_id[-2:] for i in read_spokencoco(coco_root, "train")} == {"09", "73"}
    assert {i.image_id[-2:] for i in read_spokencoco(coco_root, "test")} == {"42"}


def test_manifest_jsonl_csv_and_errors(tmp_path):
    _wav(tmp_path / "a.wav")
    _image(tmp_path / "a.png")
    (tmp_path / "m.jsonl").write_text(json.dumps({"audio": "a.wav", "image": "a.png", "text": "hi"}) + "\n")
    (tmp_path / "m.csv").write_text("audio,image,image_id\na.wav,a.png,img1\n")
    jsonl, csv = read_manifest(tmp_path / "m.jsonl"), read_manifest(tmp_path / "m.csv")
    assert jsonl[0].audio == tmp_path / "a.wav" and jsonl[0].image_id == "a.png" and jsonl[0].text == "hi"
    assert csv[0].image_id == "img1" and csv[0].text is None
    (tmp_path / "bad.jsonl").write_text(json.dumps({"audio": "a.wav"}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl:1: missing field"):
        read_manifest(tmp_path / "bad.jsonl")
    (tmp_path / "train.jsonl").write_text((tmp_path / "m.jsonl").read_text())
    assert len(read_dataset("manifest", str(tmp_path), "train")) == 1


def test_check_items_raise_or_skip(tmp_path):
    _wav(tmp_path / "good.wav")
    write_wav(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32))
    (tmp_path / "junk.wav").write_bytes(b"not audio")
    _image(tmp_path / "i.png")
    rows = [{"audio": f, "image": "i.png"} for f in ("good.wav", "empty.wav", "junk.wav", "gone.wav")]
    rows.append({"audio": "good.wav", "image": "nothere.png"})
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    items = read_manifest(tmp_path / "m.jsonl")
    with pytest.raises(DataError, match="empty.wav: empty audio"):
        check_items(items)
    report = check_items(items, on_error="skip")
    assert len(report.good) == 1 and len(report.bad) == 4
    reasons = dict((k.split("/")[-1], v) for k, v in report.bad)
    assert reasons["junk.wav"].startswith("unreadable") and reasons["gone.wav"] == "missing audio"
    assert reasons["nothere.png"] == "missing image"
    assert "4 skipped" in report.summary()


def test_image_table_lists_each_image_once_in_first_seen_order():
    from speechclip.data import SpokenCaption, image_table

    items = [SpokenCaption(Path(f"{n}.wav"), Path(f"{image}.png"), image) for n, image in enumerate("babca")]
    table = image_table(items)
    assert table.ids == ["b", "a", "c"]
    assert table.paths == [Path("b.png"), Path("a.png"), Path("c.png")]
    assert table.caption_rows == [0, 1, 0, 2, 1]


def test_an_image_id_naming_two_files_is_refused_not_resolved_by_row_order():
    """Retrieval ranked the first file, an export embedded the last: the same id must name one picture."""
    from speechclip.data import SpokenCaption, image_table
    from speechclip.embed import collections

    items = [SpokenCaption(Path("0.wav"), Path("cat.png"), "img1"), SpokenCaption(Path("1.wav"), Path("dog.png"), "img1")]
    for use in (image_table, lambda rows: collections(rows, ["image"])):
        with pytest.raises(DataError, match=r"image_id 'img1': names two files, cat.png and dog.png"):
            use(items)


def test_the_data_check_names_a_wav_cut_short(tmp_path):
    """A header-only pass (600k SpokenCOCO files) still sees an interrupted copy: its data chunk is shorter
    than the header says (libsndfile itself would read the fragment without a word)."""
    whole = write_wav(tmp_path / "whole.wav", np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1).read_bytes()
    (tmp_path / "cut.wav").write_bytes(whole[:20000])
    _image(tmp_path / "i.png")
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps({"audio": f, "image": "i.png"}) for f in ("whole.wav", "cut.wav")))
    report = check_items(read_manifest(tmp_path / "m.jsonl"), on_error="skip")
    assert [i.audio.name for i in report.good] == ["whole.wav"]
    assert report.bad == [(str(tmp_path / "cut.wav"), f"cut short: its header promises {2 * 16000:,} bytes of samples, "
                                                      f"the file holds {20000 - 44:,} (an interrupted copy?)")]


# --- the readers refuse what they would otherwise read wrongly (a new user's probe) -------------------

KARPATHY_COCO = [{"filename": f"COCO_val2014_{cid:012d}.jpg", "split": s} for cid, s in ((42, "test"), (73, "val"))]


@pytest.mark.parametrize("content, message", [
    (json.dumps({"imgs": []}), r"dataset_coco.json: no 'images' list"),
    (json.dumps({"images": [{"filename": "COCO_val2014_000000000042.jpg"}]}), r"dataset_coco.json: images\[0\] has no 'split'"),
    (json.dumps({"images": [{"split": "test"}]}), r"dataset_coco.json: images\[0\] has no 'filename'"),
    (json.dumps({"images": [{"filename": "a.jpg", "split": "Test"}]}), r"images\[0\]: split 'Test' is not one of"),
    ("", r"dataset_coco.json: not valid JSON \(Expecting value: line 1 column 1"),
])
def test_a_broken_karpathy_file_is_one_line_naming_file_and_field(coco_root, content, message):
    (coco_root / "dataset_coco.json").write_text(content)
    with pytest.raises(DataError, match=message):
        read_spokencoco(coco_root, "val")


def test_flickr8k_karpathy_entry_without_split_is_named(flickr_root):
    (flickr_root / "dataset_flickr8k.json").write_text(json.dumps({"images": [{"filename": f"{IMAGES[0]}.jpg"}]}))
    with pytest.raises(DataError, match=r"dataset_flickr8k.json: images\[0\] has no 'split'"):
        read_flickr8k(flickr_root, "test")


def test_a_karpathy_path_that_does_not_exist_is_refused_not_ignored(coco_root, tmp_path):
    """A typo in data.options.karpathy silently fell back to SpokenCOCO's own split."""
    with pytest.raises(DataError, match=r"nonexistent.json: no such file \(karpathy"):
        read_spokencoco(coco_root, "train", karpathy=tmp_path / "nonexistent.json")


def test_spokencoco_test_split_needs_karpathy(coco_root):
    """Without Karpathy's file, val and test were both SpokenCOCO_val.json: best/ was picked on the test set."""
    assert len(read_spokencoco(coco_root, "train")) == 4 and len(read_spokencoco(coco_root, "val")) == 6
    with pytest.raises(DataError, match=r"SpokenCOCO's test split is Karpathy's .* dataset_coco.json"):
        read_spokencoco(coco_root, "test")
    (coco_root / "k.json").write_text(json.dumps({"images": KARPATHY_COCO}))
    assert {i.image_id[-2:] for i in read_spokencoco(coco_root, "test", karpathy=coco_root / "k.json")} == {"42"}


def test_spokencoco_image_listed_twice_is_refused(coco_root):
    path = coco_root / "SpokenCOCO_val.json"
    data = json.loads(path.read_text())
    data["data"].append(data["data"][0])
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"SpokenCOCO_val.json: data\[3\] lists val2014/COCO_val2014_000000000042.jpg "
                                        r"again \(first at data\[0\]\)"):
        read_spokencoco(coco_root, "val")


def test_flickr8k_token_file_with_spaces_for_tabs_is_refused(flickr_root):
    path = flickr_root / "Flickr8k_text" / "Flickr8k.token.txt"
    path.write_text(path.read_text().replace("\t", " "))
    with pytest.raises(DataError, match=r"Flickr8k.token.txt:1: expected '<image>.jpg#<n><TAB><caption>'"):
        read_flickr8k(flickr_root, "test")


def test_flickr8k_malformed_caption_index_is_refused(flickr_root):
    path = flickr_root / "flickr_audio" / "wav2capt.txt"
    lines = path.read_text().splitlines()
    lines[2] = lines[2].replace("#2", "#x")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"wav2capt.txt:3: expected '<wav> <image>.jpg #<n>'"):
        read_flickr8k(flickr_root, "test")


def test_flickr8k_duplicate_wav2capt_line_is_refused_naming_both(flickr_root):
    path = flickr_root / "flickr_audio" / "wav2capt.txt"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines + [lines[11]]) + "\n")
    with pytest.raises(DataError, match=rf"wav2capt.txt:16: {IMAGES[2]}_1.wav is listed again \(first at line 12\)"):
        read_flickr8k(flickr_root, "test")


@pytest.mark.parametrize("line, message", [
    ("{wav}", r"wav2spk.txt:16: expected '<wav> <speaker>', got '.*_2.wav'"),
    ("{wav} 7 8", r"wav2spk.txt:16: expected '<wav> <speaker>'"),
    ("{wav} 9", r"wav2spk.txt:16: .*_2.wav is given speaker 9, and 3 on an earlier line"),
])
def test_flickr8k_malformed_speaker_line_is_refused(flickr_root, line, message):
    path = flickr_root / "flickr_audio" / "wav2spk.txt"
    path.write_text(path.read_text() + line.format(wav=f"{IMAGES[2]}_2.wav") + "\n")
    with pytest.raises(DataError, match=message):
        read_flickr8k(flickr_root, "train")


def test_flickr8k_image_in_two_splits_is_refused(flickr_root):
    """A train image in the test list is a leak: its recall would be measured on an image seen in training."""
    test = flickr_root / "Flickr8k_text" / "Flickr_8k.testImages.txt"
    test.write_text(test.read_text() + f"{IMAGES[0]}.jpg\n")
    with pytest.raises(DataError, match=rf"testImages.txt:2: {IMAGES[0]}.jpg is also listed in .*trainImages.txt:1"):
        read_flickr8k(flickr_root, "val")
    images = [{"filename": f"{IMAGES[0]}.jpg", "split": "train"}, {"filename": f"{IMAGES[0]}.jpg", "split": "test"}]
    (flickr_root / "dataset_flickr8k.json").write_text(json.dumps({"images": images}))
    with pytest.raises(DataError, match=rf"images\[0\] and images\[1\] both list {IMAGES[0]}.jpg \(splits 'train' and 'test'\)"):
        read_flickr8k(flickr_root, "train")


def test_an_empty_manifest_split_is_refused_like_flickr8k(tmp_path):
    (tmp_path / "test.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"test.jsonl: no spoken captions found for split 'test'"):
        read_dataset("manifest", str(tmp_path), "test")


def test_check_items_reads_the_image_header(tmp_path):
    """A .jpg that is no image passed the check (it exists) and stopped training later."""
    _wav(tmp_path / "a.wav")
    _image(tmp_path / "good.jpg")
    (tmp_path / "text.jpg").write_text("not an image")
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps({"audio": "a.wav", "image": f}) for f in ("good.jpg", "text.jpg")))
    items = read_manifest(tmp_path / "m.jsonl")
    with pytest.raises(DataError, match=r"text.jpg: unreadable image \(cannot identify image file"):
        check_items(items)
    report = check_items(items, on_error="skip")
    assert [i.image.name for i in report.good] == ["good.jpg"]
    assert report.bad[0][0] == str(tmp_path / "text.jpg") and report.bad[0][1].startswith("unreadable image (")
