import os

import numpy as np
import pytest

from speechclip.index import EmbeddingIndex
from tests.conftest import dead_pid


def _clustered(count: int, dim: int = 32, centers: int = 50, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    middle = rng.standard_normal((centers, dim))
    return (middle[rng.integers(0, centers, count)] + 0.3 * rng.standard_normal((count, dim))).astype(np.float32)


def test_exact_search_finds_itself(tmp_path):
    vectors = _clustered(500)
    index = EmbeddingIndex.build(vectors, [f"id{i}" for i in range(500)], kind="auto")
    assert index.kind == "flat"
    hits = index.search(vectors[:3], k=4)
    assert [h[0][0] for h in hits] == ["id0", "id1", "id2"]
    assert hits[0][0][1] == pytest.approx(1.0, abs=1e-5) and hits[0][0][1] >= hits[0][1][1]
    loaded = EmbeddingIndex.load(index.save(tmp_path / "idx"))
    assert loaded.search(vectors[:3], k=4) == hits


def test_a_save_removes_what_killed_saves_left(tmp_path):
    index = EmbeddingIndex.build(_clustered(50), [str(i) for i in range(50)], "flat")
    index.save(tmp_path / "idx")
    killed = [tmp_path / f".idx.tmp-{dead_pid()}", tmp_path / f".idx.replaced-{dead_pid()}"]
    running = tmp_path / f".idx.tmp-{os.getppid()}"  # a live process: perhaps saving right now
    other = tmp_path / f".other.tmp-{dead_pid()}"  # another index's
    for folder in (*killed, running, other):
        folder.mkdir()
    index.save(tmp_path / "idx")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["idx", running.name, other.name])
    old = tmp_path / f".idx.replaced-{dead_pid()}"
    (tmp_path / "idx").rename(old)  # a save killed between its two renames: the old index is the only copy,
    index.save(tmp_path / "idx")  # so a save with no `idx` to keep leaves it,
    assert old.exists()
    index.save(tmp_path / "idx")  # and the next one, with `idx` whole again, removes it
    assert not old.exists()


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_index_recall_against_exact(kind, tmp_path):
    vectors = _clustered(5000, seed=1)
    queries = _clustered(50, seed=2)
    ids = [str(i) for i in range(len(vectors))]
    exact = EmbeddingIndex.build(vectors, ids, "flat").search_rows(queries, 10)[1]
    approx = EmbeddingIndex.build(vectors, ids, kind)
    found = approx.search_rows(queries, 10)[1]
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(found, exact)])
    assert recall >= 0.9
    reloaded = EmbeddingIndex.load(approx.save(tmp_path / kind))
    assert reloaded.params == approx.params
    assert (reloaded.search_rows(queries, 10)[1] == found).all()


def test_errors_name_the_problem(tmp_path):
    index = EmbeddingIndex.build(_clustered(20), [str(i) for i in range(20)], "flat")
    with pytest.raises(ValueError, match="query dimension 5 != index dimension 32"):
        index.search(np.ones((1, 5)))
    with pytest.raises(FileNotFoundError, match="index.faiss"):
        EmbeddingIndex.load(tmp_path)
    with pytest.raises(ValueError, match="kind"):
        EmbeddingIndex.build(_clustered(20), [str(i) for i in range(20)], "lsh")


def test_plan_picks_the_kind_by_size_and_estimates_memory():
    from speechclip.index import plan_index

    assert [plan_index(n, 512).kind for n in (1000, 500_000, 10_000_000)] == ["flat", "ivf", "ivfpq"]
    plan = plan_index(10_000_000, 512, id_chars=10)
    # ~sqrt(N) lists, 8 dims per sub-quantizer, the top 300 re-scored exactly from the shards on disk
    assert plan.params == {"nlist": 2048, "nprobe": 64, "m": 64, "nbits": 8, "refine": 300}
    assert plan.memory["codes"] == 10_000_000 * (64 + 8)  # 64-byte codes + FAISS's int64 ids
    assert plan.memory["centroids"] == (2048 + 256) * 512 * 4 and plan.memory["ids"] == 10_000_000 * (10 + 57)
    assert "ivfpq index of 10,000,000 x 512" in plan.describe() and "codes 687 MB" in plan.describe()
    assert plan_index(1000, 512).describe().startswith("flat index of 1,000 x 512: about ")  # no bare "{}"
    assert plan_index(10_000_000, 512).memory["codes"] < plan_index(10_000_000, 512, "flat").memory["vectors"] / 25
    with pytest.raises(ValueError, match="m: 7 sub-quantizers must divide the dimension 32"):
        plan_index(1000, 32, "ivfpq", m=7)


def test_ivfpq_recall_on_clustered_vectors(tmp_path):
    vectors = _clustered(5000, seed=1)
    queries = _clustered(100, seed=2)
    ids = [str(i) for i in range(len(vectors))]
    exact = EmbeddingIndex.build(vectors, ids, "flat").search_rows(queries, 10)[1]
    compressed = EmbeddingIndex.build(vectors, ids, "ivfpq")
    assert compressed.params["m"] == 4 and compressed.index.code_size == 4  # 4 bytes a vector instead of 128
    found = compressed.search_rows(queries, 10)[1]
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(found, exact)])
    assert recall >= 0.35  # 4-byte codes; a random ranking would give 0.002
    assert np.mean([e[0] in a for a, e in zip(found, exact)]) >= 0.6  # the true nearest is mostly in the top 10
    scores = compressed.search(vectors[:5], k=1)
    assert all(abs(hits[0][1] - 1.0) < 0.1 for hits in scores)  # scores are cosines, not PQ distances
    reloaded = EmbeddingIndex.load(compressed.save(tmp_path / "pq"))
    assert reloaded.params == compressed.params and (reloaded.search_rows(queries, 10)[1] == found).all()


def test_bad_parameters_and_damaged_folders_are_named(tmp_path):
    vectors, ids = _clustered(200), [str(i) for i in range(200)]
    # FAISS's own k-means error would be a C++ stack: the plan says what is too few first
    with pytest.raises(ValueError, match=r"--kind ivfpq: 200 vectors are too few to train the 256 codes of each sub-quantizer; use --kind flat \(exact\) or ivf"):
        EmbeddingIndex.build(vectors, ids, "ivfpq")
    with pytest.raises(ValueError, match=r"--kind ivf: 200 vectors are too few to train 500 lists"):
        EmbeddingIndex.build(vectors, ids, "ivf", nlist=500)
    for option in ({"nlist": 0}, {"nprobe": 0}, {"m": 0}, {"refine": -5}):  # 0 used to read as "not given"
        with pytest.raises(ValueError, match=f"--{next(iter(option))}="):
            EmbeddingIndex.build(_clustered(3000), [str(i) for i in range(3000)], "ivfpq", **option)
    # options the kind does not use were ignored: the index built was not the one asked for
    with pytest.raises(ValueError, match=r"--m, --refine: not used by a flat index \(--kind flat\); use --kind ivfpq"):
        EmbeddingIndex.build(vectors, ids, "flat", m=8, refine=10)
    with pytest.raises(ValueError, match=r"--nprobe: not used by a flat index \(auto picks flat for 200 vectors\); use --kind ivf or ivfpq"):
        EmbeddingIndex.build(vectors, ids, "auto", nprobe=4)
    with pytest.raises(ValueError, match=r"--m: not used by an ivf index"):
        EmbeddingIndex.build(vectors, ids, "ivf", nlist=4, m=8)
    assert EmbeddingIndex.build(vectors, ids, "ivf", nlist=4, nprobe=2).params == {"nlist": 4, "nprobe": 2}
    index = EmbeddingIndex.build(vectors, ids, "flat")
    with pytest.raises(ValueError, match="k=0: must be at least 1"):
        index.search(vectors[:1], k=0)
    folder = index.save(tmp_path / "idx")
    EmbeddingIndex.build(vectors[:50], ids[:50], "flat").save(folder)  # over an older index: replaced whole
    assert EmbeddingIndex.load(folder).size == 50 and [p.name for p in tmp_path.iterdir()] == ["idx"]
    index.save(folder)
    data = (folder / "index.faiss").read_bytes()
    (folder / "index.faiss").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"index.faiss: unreadable \(.*\); build the index again"):
        EmbeddingIndex.load(folder)
    (folder / "index.faiss").write_bytes(data)
    (folder / "meta.json").write_text("{")
    with pytest.raises(ValueError, match=r"meta.json: not valid JSON"):
        EmbeddingIndex.load(folder)
    (folder / "meta.json").write_text("[1]")
    with pytest.raises(ValueError, match=r"meta.json must hold an object"):
        EmbeddingIndex.load(folder)
    (folder / "meta.json").write_text('{"kind": "flat"}')
    with pytest.raises(ValueError, match=r"meta.json: lacks 'params'"):
        EmbeddingIndex.load(folder)
