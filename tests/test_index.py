import numpy as np
import pytest

from speechclip.index import EmbeddingIndex


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
