"""Sharded, resumable embedding export; the index built from its shards; the Lightning runner on 2 processes."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from speechclip import embed as embed_module
from speechclip.data import read_dataset
from speechclip.embed import MANIFEST, embed_collection, embedding_source, load_embeddings, read_manifest, shard_path
from speechclip.index import EmbeddingIndex, build_index_from_embeddings
from speechclip.model import SpeechCLIP
from tests.conftest import tiny_model_config


@pytest.fixture(scope="module")
def model(encoders):
    torch.manual_seed(0)
    return SpeechCLIP(tiny_model_config(encoders, "parallel")).eval()


@pytest.fixture(scope="module")
def items(tiny_corpus):
    return read_dataset("manifest", tiny_corpus, "test") + read_dataset("manifest", tiny_corpus, "val")


def _shards(folder, kind):
    """Each shard file's embeddings and ids, by file name."""
    shards = {}
    for path in sorted(folder.glob(f"{kind}-*.safetensors")):
        with safe_open(str(path), framework="pt") as file:
            shards[path.name] = (file.get_tensor("embeddings"), json.loads(file.metadata()["ids"]))
    return shards


def test_shards_and_manifest(model, items, tmp_path, monkeypatch):
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    manifest = read_manifest(embed_collection(model, items, tmp_path, batch_size=4, shard_size=5).parent)
    assert embed_module.os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == embed_module.KERNEL_CACHE  # bounded kernel cache
    assert manifest["kinds"]["speech"]["count"] == len(items)
    assert [s["count"] for s in manifest["kinds"]["speech"]["shards"]] == [5] * (len(items) // 5) + ([len(items) % 5] if len(items) % 5 else [])
    vectors, ids = load_embeddings(tmp_path, "speech")
    assert ids == [str(i.audio) for i in items] and vectors.shape == (len(items), model.clip.embed_dim)
    assert torch.allclose(vectors.norm(dim=1), torch.ones(len(items)), atol=1e-5)
    # the shards hold what the model's own API gives, row for row (batches sorted by length, put back in order)
    assert torch.allclose(vectors[:5], model.encode_speech([i.audio for i in items[:5]]), atol=1e-5)
    images = {i.image_id for i in items}
    assert manifest["kinds"]["image"]["count"] == len(images) and manifest["kinds"]["text"]["count"] == len(items)
    assert not list(tmp_path.glob("*.tmp"))


def test_resume_after_an_interruption_equals_an_uninterrupted_run(model, items, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    embed_collection(model, items, whole, what=["speech"], batch_size=4, shard_size=5)
    resumed = tmp_path / "resumed"
    real_write, written = embed_module.write_shard, []

    def write_then_fail(path, *args, **kwargs):
        if len(written) == 2:
            (path.parent / f"{path.name}.999.tmp").write_bytes(b"half a shard")  # a write cut short
            raise KeyboardInterrupt("simulated interruption after shard 2")
        written.append(path.name)
        return real_write(path, *args, **kwargs)

    monkeypatch.setattr(embed_module, "write_shard", write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        embed_collection(model, items, resumed, what=["speech"], batch_size=4, shard_size=5)
    assert sorted(p.name for p in resumed.glob("*.safetensors")) == written == ["speech-00000.safetensors", "speech-00001.safetensors"]
    assert not (resumed / MANIFEST).exists()
    monkeypatch.setattr(embed_module, "write_shard", real_write)
    encoded = []
    real_encode = embed_module.encode_prepared
    monkeypatch.setattr(embed_module, "encode_prepared", lambda m, kind, batch: encoded.append(len(next(iter(batch.values())))) or real_encode(m, kind, batch))
    embed_collection(model, items, resumed, what=["speech"], batch_size=4, shard_size=5)
    assert sum(encoded) == len(items) - 10  # the two finished shards were skipped, the torn one ignored
    assert read_manifest(resumed)["kinds"] == read_manifest(whole)["kinds"]
    whole_shards, resumed_shards = _shards(whole, "speech"), _shards(resumed, "speech")
    assert whole_shards.keys() == resumed_shards.keys() and len(whole_shards) == (len(items) + 4) // 5
    for name, (vectors, ids) in whole_shards.items():
        assert resumed_shards[name][1] == ids and torch.equal(resumed_shards[name][0], vectors)


def test_a_shard_from_other_inputs_is_refused(model, items, tmp_path):
    embed_collection(model, items[:6], tmp_path, what=["speech"], batch_size=4, shard_size=5)
    with pytest.raises(ValueError, match="speech-00000.safetensors: holds other items"):
        embed_collection(model, items[1:7], tmp_path, what=["speech"], batch_size=4, shard_size=5)


@pytest.mark.parametrize("runner", ["embed_collection", "run_embed_job"])
def test_a_rerun_with_another_checkpoint_is_refused_not_mixed(model, encoders, items, tmp_path, runner):
    """Resuming an interrupted export with other heads (or encoders) would leave two models' embeddings
    in one folder: the finished shards and the manifest are refused, naming the file."""
    from speechclip.train.embed_job import run_embed_job

    run = (lambda m, out: embed_collection(m, items, out, what=["speech"], batch_size=4, shard_size=5)) if runner == "embed_collection" \
        else (lambda m, out: run_embed_job(m, items, out, what=["speech"], batch_size=4, shard_size=5, accelerator="cpu", devices=1))
    run(model, tmp_path)
    written = _mtimes(tmp_path)
    other = SpeechCLIP(tiny_model_config(encoders, "parallel")).eval()
    other.load_trainable(model.trainable_state_dict())
    run(other, tmp_path)  # the same weights: every shard is reused
    assert {k: v for k, v in _mtimes(tmp_path).items() if k != MANIFEST} == {k: v for k, v in written.items() if k != MANIFEST}
    with torch.no_grad():
        next(p for p in other.parameters() if p.requires_grad).add_(1e-3)  # a training step later
    with pytest.raises(ValueError, match=r"manifest.json: holds the embeddings of another model \(fingerprint [0-9a-f]{12}; this one is"):
        run(other, tmp_path)
    (tmp_path / MANIFEST).unlink()  # interrupted before the manifest: the shards themselves say whose they are
    with pytest.raises(ValueError, match=r"speech-00000.safetensors: holds the embeddings of another model"):
        run(other, tmp_path)
    assert read_manifest_or_none(tmp_path) is None and len(list(tmp_path.glob("speech-*.safetensors"))) == (len(items) + 4) // 5


def read_manifest_or_none(folder):
    return read_manifest(folder) if (folder / MANIFEST).is_file() else None


def _mtimes(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_a_shard_from_before_fingerprints_is_refused_as_such(model, items, tmp_path):
    """A folder written before shards recorded their model cannot be vouched for: refused with its own
    reason, not as "another model"."""
    embed_collection(model, items, tmp_path, what=["speech"], batch_size=4, shard_size=5)
    (tmp_path / MANIFEST).unlink()
    path = shard_path(tmp_path, "speech", 0)
    with safe_open(str(path), framework="pt") as file:
        tensor, metadata = file.get_tensor("embeddings"), file.metadata()
    save_file({"embeddings": tensor}, str(path), metadata={k: v for k, v in metadata.items() if k != "model"})
    with pytest.raises(ValueError, match=r"speech-00000.safetensors: written before embeddings recorded the model"):
        embed_collection(model, items, tmp_path, what=["speech"], batch_size=4, shard_size=5)


@pytest.mark.parametrize("runner", ["embed_collection", "run_embed_job"])
def test_every_shard_is_checked_before_any_work(model, items, tmp_path, monkeypatch, runner):
    """A bad shard anywhere is refused before anything is embedded (and, on several ranks, before the
    Trainer exists: every rank refuses alike instead of one failing and the others waiting)."""
    from speechclip.train import embed_job

    embed_collection(model, items, tmp_path, what=["speech"], batch_size=4, shard_size=5)
    (tmp_path / MANIFEST).unlink()
    shard_path(tmp_path, "speech", 0).unlink()  # to do again
    shard_path(tmp_path, "speech", 1).write_bytes(b"not a shard")  # refused: must stop the run before shard 0
    monkeypatch.setattr(embed_module, "encode_prepared", lambda *a: pytest.fail("embedded before the check"))
    monkeypatch.setattr(embed_job.L, "Trainer", lambda *a, **k: pytest.fail("Trainer built before the check"))
    run = embed_collection if runner == "embed_collection" else \
        (lambda *a, **k: embed_job.run_embed_job(*a, **k, accelerator="cpu", devices=1))
    with pytest.raises(ValueError, match=r"speech-00001.safetensors: unreadable shard"):
        run(model, items, tmp_path, what=["speech"], batch_size=4, shard_size=5)
    assert not shard_path(tmp_path, "speech", 0).exists()


def test_a_folder_from_before_fingerprints_is_refused_as_such(model, items, tmp_path):
    manifest = read_manifest(embed_collection(model, items, tmp_path, what=["speech"], batch_size=4, shard_size=5).parent)
    del manifest["model"]["model"]  # as written before manifests recorded the model's fingerprint
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"manifest.json: written before embeddings recorded the model"):
        embed_collection(model, items, tmp_path, what=["speech"], batch_size=4, shard_size=5)


def test_a_manifest_that_is_not_json_is_named(tmp_path):
    (tmp_path / MANIFEST).write_text('{"format": "speechclip-embeddings/1", "kinds": {')  # not ours: ours are renamed whole
    with pytest.raises(ValueError, match=r"manifest.json: not a manifest of `speechclip embed`"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text("[]")
    with pytest.raises(ValueError, match=r"manifest.json: holds a JSON list, not a manifest"):
        read_manifest(tmp_path)


def test_legacy_single_file_still_reads(tmp_path):
    vectors = torch.nn.functional.normalize(torch.randn(7, 8), dim=-1)
    save_file({"embeddings": vectors}, str(tmp_path / "image.safetensors"))
    (tmp_path / "image.ids.json").write_text(json.dumps([f"img{i}" for i in range(7)]))
    loaded, ids = load_embeddings(tmp_path / "image.safetensors")
    assert torch.equal(loaded, vectors) and ids[0] == "img0"
    source = embedding_source(tmp_path / "image.safetensors")
    assert source.count == 7 and source.dim == 8


def _write_shards(folder, vectors, ids, shard_size):
    """A manifest folder of `vectors` in shards, as `speechclip embed` writes it."""
    collection = embed_module.Collection("image", ids, ids)
    for number, (start, stop) in enumerate(collection.shards(shard_size)):
        embed_module.write_shard(shard_path(folder, "image", number), torch.from_numpy(vectors[start:stop]), ids[start:stop],
                                  {"kind": "image", "shard": number})
    embed_module.write_manifest(folder, [collection], shard_size, {})


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq"])
def test_index_from_shards_equals_index_from_one_file(kind, tmp_path):
    rng = np.random.default_rng(0)
    vectors = (rng.standard_normal((40, 32))[rng.integers(0, 40, 3000)] + 0.3 * rng.standard_normal((3000, 32))).astype(np.float32)
    ids = [f"v{i}" for i in range(len(vectors))]
    _write_shards(tmp_path / "shards", vectors, ids, shard_size=700)
    save_file({"embeddings": torch.from_numpy(vectors)}, str(tmp_path / "one.safetensors"))
    (tmp_path / "one.ids.json").write_text(json.dumps(ids))
    printed = []
    options = {"nlist": 16} if kind != "flat" else {}
    sharded = build_index_from_embeddings(tmp_path / "shards", tmp_path / "a", kind, report=printed.append, **options)
    single = build_index_from_embeddings(tmp_path / "one.safetensors", tmp_path / "b", kind, report=printed.append, **options)
    assert f"{kind} index of 3,000 x 32" in printed[0] and "MB in memory" in printed[0]
    queries = vectors[:50] + 0.1
    assert sharded.ids == single.ids == ids
    for a, b in zip(sharded.search_rows(queries, 10), single.search_rows(queries, 10)):
        assert np.array_equal(a, b)
    reloaded = EmbeddingIndex.load(tmp_path / "a")
    assert np.array_equal(reloaded.search_rows(queries, 10)[1], sharded.search_rows(queries, 10)[1])


@pytest.mark.slow
def test_lightning_two_processes_write_the_same_shards(model, items, tmp_path):
    pytest.importorskip("lightning")
    from speechclip.train.embed_job import run_embed_job

    embed_collection(model, items, tmp_path / "one", batch_size=4, shard_size=5)
    run_embed_job(model, items, tmp_path / "two", batch_size=4, shard_size=5, accelerator="cpu", devices=2, strategy="ddp_fork")
    assert read_manifest(tmp_path / "two")["kinds"] == read_manifest(tmp_path / "one")["kinds"]
    for kind in ("speech", "image", "text"):
        a, ids_a = load_embeddings(tmp_path / "one", kind)
        b, ids_b = load_embeddings(tmp_path / "two", kind)
        assert ids_a == ids_b and torch.allclose(a, b, atol=1e-6)


def test_ivfpq_reranks_its_candidates_with_the_shards_on_disk(tmp_path):
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((20, 32))
    vectors = (centres[rng.integers(0, 20, 4000)] + 0.5 * rng.standard_normal((4000, 32))).astype(np.float32)
    queries = (centres[rng.integers(0, 20, 50)] + 0.5 * rng.standard_normal((50, 32))).astype(np.float32)
    ids = [f"v{i}" for i in range(len(vectors))]
    _write_shards(tmp_path / "shards", vectors, ids, shard_size=900)
    exact = EmbeddingIndex.build(vectors, ids, "flat").search_rows(queries, 10)[1]
    recall = lambda found: np.mean([len(set(a) & set(e)) / 10 for a, e in zip(found, exact)])  # noqa: E731
    plain = build_index_from_embeddings(tmp_path / "shards", tmp_path / "plain", "ivfpq", report=lambda _: None, nlist=16, refine=0)
    refined = build_index_from_embeddings(tmp_path / "shards", tmp_path / "refined", "ivfpq", report=lambda _: None, nlist=16, refine=300)
    assert recall(plain.search_rows(queries, 10)[1]) < 0.7 < 0.95 <= recall(refined.search_rows(queries, 10)[1])
    scores, rows = refined.search_rows(queries[:3], 5)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    query = queries[:3] / np.linalg.norm(queries[:3], axis=1, keepdims=True)
    assert np.allclose(scores, np.einsum("qkd,qd->qk", unit[rows], query), atol=1e-5)  # exact cosines, not PQ estimates
    reloaded = EmbeddingIndex.load(tmp_path / "refined")  # re-ranks from the same shards, found through meta.json
    assert np.array_equal(reloaded.search_rows(queries, 10)[1], refined.search_rows(queries, 10)[1])
    (tmp_path / "shards").rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match="shards: the embeddings .* re-ranks with are missing"):
        EmbeddingIndex.load(tmp_path / "refined")


def test_a_bad_clip_is_named(model, items, tmp_path):
    import soundfile

    short = tmp_path / "short.wav"
    soundfile.write(str(short), np.zeros(100, np.float32) + 0.1, 16000)
    bad = [items[0].__class__(audio=short, image=items[0].image, image_id="x")]
    with pytest.raises(ValueError, match="short.wav: too short"):
        embed_collection(model, items[:3] + bad, tmp_path / "out", what=["speech"], batch_size=4)
    with pytest.raises(ValueError, match="nope.wav: no such audio file"):
        embed_collection(model, [items[0].__class__(audio=tmp_path / "nope.wav", image=items[0].image, image_id="y")],
                         tmp_path / "out2", what=["speech"])


def test_arguments_that_would_fail_part_way_are_refused_first(model, items, tmp_path):
    for sizes, flag in (({"shard_size": -3}, "--shard-size=-3"), ({"batch_size": 0}, "--batch-size=0")):
        with pytest.raises(ValueError, match=flag):  # -3 used to write an empty manifest and exit 0
            embed_collection(model, items, tmp_path / "a", **sizes)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="a file, not a folder"):
        embed_collection(model, items, tmp_path / "file")
    with pytest.raises(ValueError, match="no items to embed as speech, image, text"):
        embed_collection(model, [], tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    from dataclasses import replace

    untranscribed = [replace(item, text="") for item in items[:3]]  # a manifest's text is optional
    kinds = read_manifest(embed_collection(model, untranscribed, tmp_path / "c").parent)["kinds"]
    assert kinds["speech"]["count"] == 3 and kinds["text"]["count"] == 0
    with pytest.raises(ValueError, match=r"manifest.json: no text embeddings in this folder"):
        build_index_from_embeddings(tmp_path / "c", tmp_path / "i", "flat", what="text", report=lambda line: None)


def test_index_refuses_shards_that_disagree_with_the_manifest(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((30, 8)).astype(np.float32)
    ids = [f"v{i}" for i in range(30)]
    folder = tmp_path / "shards"
    _write_shards(folder, vectors, ids, shard_size=10)
    second = shard_path(folder, "image", 1).read_bytes()
    shard_path(folder, "image", 2).write_bytes(second)  # a shard copied under another's name: same row count
    with pytest.raises(ValueError, match=r"image-00002.safetensors: holds \(10, 8\) image embeddings of shard 1, where the manifest lists 10 x 8 image of shard 2"):
        build_index_from_embeddings(folder, tmp_path / "i1", "flat", report=lambda line: None)
    shard_path(folder, "image", 2).write_bytes(second[:100])  # cut short
    with pytest.raises(ValueError, match=r"image-00002.safetensors: unreadable shard"):
        build_index_from_embeddings(folder, tmp_path / "i2", "flat", report=lambda line: None)
    (folder / MANIFEST).write_text(json.dumps({"format": embed_module.FORMAT}))
    with pytest.raises(ValueError, match=r"manifest.json: no 'kinds'"):
        build_index_from_embeddings(folder, tmp_path / "i3", "flat", report=lambda line: None)
    (folder / MANIFEST).write_text(json.dumps({"format": embed_module.FORMAT, "kinds": {"image": {"count": 30, "dim": 8}}}))
    with pytest.raises(ValueError, match=r"manifest.json: kinds.image lacks or misstates 'shards'"):
        build_index_from_embeddings(folder, tmp_path / "i4", "flat", report=lambda line: None)
    assert not any((tmp_path / f"i{n}").exists() for n in range(1, 5))


def test_search_refuses_a_model_whose_embeddings_the_index_cannot_be_compared_with(model, encoders, items, tmp_path):
    embed_collection(model, items, tmp_path / "emb", what=["speech", "image"], batch_size=4)
    speech = build_index_from_embeddings(tmp_path / "emb", tmp_path / "speech", "flat", what="speech", report=lambda line: None)
    image = build_index_from_embeddings(tmp_path / "emb", tmp_path / "image", "flat", what="image", report=lambda line: None)
    torch.manual_seed(1)
    other_heads = SpeechCLIP(tiny_model_config(encoders, "parallel")).eval()  # the same CLIP, other heads
    for index in (EmbeddingIndex.load(tmp_path / "speech"), EmbeddingIndex.load(tmp_path / "image")):
        index.check_query_model(model)  # the model that embedded them
    EmbeddingIndex.load(tmp_path / "image").check_query_model(other_heads)  # image vectors are the CLIP's alone
    with pytest.raises(ValueError, match="speech embeddings of another model"):
        EmbeddingIndex.load(tmp_path / "speech").check_query_model(other_heads)
    image.origin["encoders"]["clip"] = "0" * 16  # as if embedded with another CLIP
    image.save(tmp_path / "image")
    with pytest.raises(ValueError, match="embedded with another CLIP"):
        EmbeddingIndex.load(tmp_path / "image").check_query_model(model)
    assert speech.origin["what"] == "speech"


def test_written_files_follow_the_umask(model, items, tmp_path):
    """safetensors writes through a private temporary file (0600): a checkpoint or an embeddings folder on a
    shared machine would be unreadable to everyone else whatever their umask."""
    import os

    for umask, mode in ((0o022, 0o644), (0o027, 0o640)):
        old = os.umask(umask)
        try:
            embed_collection(model, items[:3], tmp_path / f"emb{umask}", what=["speech"], batch_size=4)
            model.save_pretrained(tmp_path / f"ckpt{umask}")
        finally:
            os.umask(old)
        written = [*(tmp_path / f"emb{umask}").glob("*.safetensors"), tmp_path / f"ckpt{umask}" / "model.safetensors"]
        assert written and {path.stat().st_mode & 0o777 for path in written} == {mode}
