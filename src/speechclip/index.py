"""Search exported embeddings with FAISS: exact inner product for small collections, IVF or HNSW for
large ones, the ids kept beside the index. Embeddings are L2-normalised, so inner product = cosine.

A saved index is a folder: `index.faiss` (FAISS's own format, no pickle), `ids.json`, `meta.json`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

EXACT_LIMIT = 100_000  # "auto" keeps exact search up to this many vectors


def _faiss():
    try:
        import faiss
    except ImportError as error:  # the [index] extra
        raise ImportError("speechclip.index needs faiss: pip install 'speechclip[index]'") from error
    return faiss


def _normalized(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


class EmbeddingIndex:
    def __init__(self, index, ids: Sequence[str], kind: str, params: dict | None = None):
        self.index, self.ids, self.kind = index, list(ids), kind
        self.params = params or {}
        if len(self.ids) != index.ntotal:
            raise ValueError(f"{len(self.ids)} ids for an index of {index.ntotal} vectors")

    @property
    def size(self) -> int:
        return self.index.ntotal

    @classmethod
    def build(cls, vectors: np.ndarray, ids: Sequence[str], kind: str = "auto", nlist: int | None = None,
              nprobe: int = 32, hnsw_m: int = 32, ef_search: int = 128, seed: int = 0) -> "EmbeddingIndex":
        """kind: flat (exact) | ivf (k-means cells, `nprobe` visited) | hnsw (graph) | auto."""
        faiss = _faiss()
        vectors = _normalized(vectors)
        count, dim = vectors.shape
        if kind == "auto":
            kind = "flat" if count <= EXACT_LIMIT else "ivf"
        if kind == "flat":
            index, params = faiss.IndexFlatIP(dim), {}
        elif kind == "ivf":
            nlist = nlist or max(1, min(count // 39, int(4 * math.sqrt(count))))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(seed)
            sample = vectors[rng.choice(count, min(count, 64 * nlist), replace=False)]
            index.cp.seed = seed
            index.train(sample)
            index.nprobe = min(nprobe, nlist)
            params = {"nlist": nlist, "nprobe": index.nprobe}
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = 64
            index.hnsw.efSearch = ef_search
            params = {"M": hnsw_m, "efSearch": ef_search}
        else:
            raise ValueError(f"kind: expected auto, flat, ivf or hnsw, got {kind!r}")
        index.add(vectors)
        return cls(index, ids, kind, params)

    def search(self, queries: np.ndarray, k: int = 10) -> list[list[tuple[str, float]]]:
        """(Q, D) queries -> for each, the k best (id, cosine) pairs, best first."""
        scores, rows = self.search_rows(queries, k)
        return [[(self.ids[r], float(s)) for r, s in zip(row, score) if r >= 0] for row, score in zip(rows, scores)]

    def search_rows(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = _normalized(np.atleast_2d(queries))
        if queries.shape[1] != self.index.d:
            raise ValueError(f"query dimension {queries.shape[1]} != index dimension {self.index.d}")
        return self.index.search(queries, min(k, self.size))

    def save(self, folder: str | Path) -> Path:
        faiss = _faiss()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(folder / "index.faiss"))
        (folder / "ids.json").write_text(json.dumps(self.ids))
        (folder / "meta.json").write_text(json.dumps({"kind": self.kind, "params": self.params, "size": self.size}) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "EmbeddingIndex":
        faiss = _faiss()
        folder = Path(folder)
        for name in ("index.faiss", "ids.json", "meta.json"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name}: missing; build the index with `speechclip index`")
        meta = json.loads((folder / "meta.json").read_text())
        index = faiss.read_index(str(folder / "index.faiss"))
        if meta["kind"] == "ivf":
            index.nprobe = meta["params"]["nprobe"]
        elif meta["kind"] == "hnsw":
            index.hnsw.efSearch = meta["params"]["efSearch"]
        return cls(index, json.loads((folder / "ids.json").read_text()), meta["kind"], meta["params"])


def build_index_from_embeddings(embeddings: Path, out: Path, kind: str = "auto") -> EmbeddingIndex:
    """From a `speechclip embed` file (<kind>.safetensors + <kind>.ids.json) to a saved index folder."""
    from .embed import load_embeddings

    vectors, ids = load_embeddings(embeddings)
    index = EmbeddingIndex.build(vectors.numpy(), ids, kind)
    index.save(out)
    return index
