"""Search exported embeddings with FAISS: exact inner product for small collections, IVF or HNSW for large
ones, IVF-PQ (compressed codes, 32x smaller than float32) for collections too large for memory; the ids
kept beside the index. Embeddings are L2-normalised, so inner product = cosine.

IVF-PQ's codes rank coarsely (in a dense neighbourhood its top 10 is mostly wrong), so by default its top
`refine` candidates are re-scored exactly with their vectors, read on demand from the memory-mapped shards
the index was built from: the collection stays on disk, the index in memory.

Built from chunks (the shards `speechclip embed` writes): a first pass draws the training sample, a second
adds the vectors shard by shard, so the raw vectors are never all in memory.
A saved index is a folder: `index.faiss` (FAISS's own format, no pickle), `ids.json`, `meta.json`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from .folders import remove_leftovers, swap_in

EXACT_LIMIT = 100_000  # "auto" keeps exact search up to this many vectors
IVF_LIMIT = 1_000_000  # ... IVF on raw float32 vectors up to this many (2 GB at 512-d), IVF-PQ above
KINDS = ("auto", "flat", "ivf", "hnsw", "ivfpq")
USES = {"flat": (), "hnsw": (), "ivf": ("nlist", "nprobe"), "ivfpq": ("nlist", "nprobe", "m", "refine")}  # options per kind
# IVF-PQ candidates re-scored exactly: at 10M clustered vectors recall@10 went 0.21 (codes alone) -> 0.74 (100)
# -> 0.975 (300) -> 0.999 (1,000), each candidate a random read from the shards (benchmarks/ivfpq.py)
REFINE = 300
ID_BYTES = 8  # FAISS keeps an int64 id beside each vector in an inverted list
PY_STR_OVERHEAD = 49 + 8  # bytes of a Python str object (ASCII) and its slot in the ids list

Chunks = Callable[[], Iterable[tuple[np.ndarray, Sequence[str]]]]  # a fresh iterator over (vectors, ids) per call


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


def _pq_subquantizers(dim: int) -> int:
    """The most sub-quantizers that divide `dim` with at least 8 dimensions each (512-d: 64, 64 bytes a code)."""
    return next(m for m in range(max(1, dim // 8), 0, -1) if dim % m == 0)


@dataclass
class IndexPlan:
    """What will be built, chosen from the collection's size before any vector is read."""

    kind: str
    count: int
    dim: int
    params: dict = field(default_factory=dict)
    sample: int = 0  # training vectors (IVF kinds)
    memory: dict[str, int] = field(default_factory=dict)  # bytes, by part

    def describe(self) -> str:
        parts = ", ".join(f"{name} {_megabytes(size)}" for name, size in self.memory.items())
        params = f" {self.params}" if self.params else ""  # flat and hnsw-by-default have none: no bare "{}"
        return (f"{self.kind} index of {self.count:,} x {self.dim}{params}: about "
                f"{_megabytes(sum(self.memory.values()))} in memory ({parts})")


def _megabytes(size: int) -> str:
    """Whole MB, with two decimals below 10 (a small collection read "about 0 MB")."""
    return f"{size / 2**20:,.0f} MB" if size >= 10 * 2**20 else f"{size / 2**20:.2f} MB"


def plan_index(count: int, dim: int, kind: str = "auto", nlist: int | None = None, nprobe: int | None = None,
               m: int | None = None, nbits: int = 8, hnsw_m: int = 32, ef_search: int = 128, id_chars: int = 16,
               refine: int | None = None) -> IndexPlan:
    """Pick the index kind and its parameters for `count` vectors, with a memory estimate (vectors x bytes per
    code + FAISS ids + centroids + our Python ids of about `id_chars` characters). `refine`: IVF-PQ candidates
    re-scored with their exact vectors from disk (0: none)."""
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    for name, value, least in (("nlist", nlist, 1), ("nprobe", nprobe, 1), ("m", m, 1), ("refine", refine, 0)):
        if value is not None and value < least:
            raise ValueError(f"--{name}={value}: must be at least {least}")
    picked = kind == "auto"
    if picked:
        kind = "flat" if count <= EXACT_LIMIT else "ivf" if count <= IVF_LIMIT else "ivfpq"
    given = {"nlist": nlist, "nprobe": nprobe, "m": m, "refine": refine}
    unused = [f"--{name}" for name, value in given.items() if value is not None and name not in USES[kind]]
    if unused:  # silently built without them, the index would not be the one asked for
        chosen = f"auto picks {kind} for {count:,} vectors" if picked else f"--kind {kind}"
        article = "an" if kind.startswith("i") else "a"
        raise ValueError(f"{', '.join(unused)}: not used by {article} {kind} index ({chosen}); "
                         + ("use --kind ivf or ivfpq" if "--m" not in unused and "--refine" not in unused else "use --kind ivfpq"))
    memory = {"ids": count * (id_chars + PY_STR_OVERHEAD)}
    plan = IndexPlan(kind, count, dim, memory=memory)
    if kind == "flat":
        memory["vectors"] = count * dim * 4
    elif kind == "hnsw":
        plan.params = {"M": hnsw_m, "efSearch": ef_search}
        memory["vectors"] = count * dim * 4
        memory["graph"] = count * hnsw_m * 2 * 4  # level-0 links (upper levels add a few percent)
    elif kind == "ivf":
        nlist = nlist or max(1, min(count // 39, int(4 * math.sqrt(count))))
        plan.params = {"nlist": nlist, "nprobe": min(nprobe or 32, nlist)}
        memory["vectors"] = count * (dim * 4 + ID_BYTES)
        memory["centroids"] = nlist * dim * 4
    else:  # ivfpq: ~sqrt(N) lists (a power of two), 8 dimensions per sub-quantizer, 256 centroids each
        nlist = nlist or max(1, min(count // 39, 2 ** int(math.log2(max(1.0, math.sqrt(count))))))
        m = m or _pq_subquantizers(dim)
        if dim % m:
            raise ValueError(f"m: {m} sub-quantizers must divide the dimension {dim}")
        # more lists visited than for IVF alone: once re-ranked, recall is set by the lists (1M: 0.96 at 32, 0.99 at 64)
        plan.params = {"nlist": nlist, "nprobe": min(nprobe or max(32, nlist // 32), nlist), "m": m, "nbits": nbits,
                       "refine": REFINE if refine is None else refine}
        memory["codes"] = count * (m * nbits // 8 + ID_BYTES)
        memory["centroids"] = nlist * dim * 4 + (2**nbits) * dim * 4
    if kind in ("ivf", "ivfpq"):
        centroids = max(plan.params["nlist"], 2 ** nbits if kind == "ivfpq" else 0)
        if count < centroids:  # FAISS's k-means needs a training vector per centroid
            if centroids == plan.params["nlist"]:
                raise ValueError(f"--kind {kind}: {count:,} vectors are too few to train {centroids:,} lists; "
                                 "use --kind flat (exact), or fewer --nlist")
            raise ValueError(f"--kind ivfpq: {count:,} vectors are too few to train the {centroids:,} codes of each "
                             "sub-quantizer; use --kind flat (exact) or ivf")
        wanted = 64 * plan.params["nlist"]  # k-means wants 39..256 points a centroid; PQ's 256 codes too
        plan.sample = min(count, max(wanted, 39 * 2 ** plan.params.get("nbits", 0)), 256 * 1024)
        memory["training sample, while building"] = plan.sample * dim * 4
    return plan


class EmbeddingIndex:
    def __init__(self, index, ids: Sequence[str], kind: str, params: dict | None = None, vectors=None,
                 source: dict | None = None, origin: dict | None = None):
        """vectors: row-indexable (N, D) exact vectors for re-ranking (`embed.ShardRows` on disk, or an
        array); source: where they are ({"embeddings": folder, "what": kind}); origin: what the vectors are and
        which model made them ({"what", "model", "encoders"} from the embeddings' manifest), checked against a
        query's model by `check_query_model`. Both saved in meta.json."""
        self.index, self.ids, self.kind = index, list(ids), kind
        self.params, self.vectors, self.source, self.origin = params or {}, vectors, source, origin
        if len(self.ids) != index.ntotal:
            raise ValueError(f"{len(self.ids)} ids for an index of {index.ntotal} vectors")
        if vectors is not None and len(vectors) != index.ntotal:
            raise ValueError(f"{len(vectors)} vectors to re-rank with for an index of {index.ntotal}")

    @property
    def size(self) -> int:
        return self.index.ntotal

    @classmethod
    def build(cls, vectors: np.ndarray, ids: Sequence[str], kind: str = "auto", nlist: int | None = None,
              nprobe: int | None = None, hnsw_m: int = 32, ef_search: int = 128, seed: int = 0, **pq) -> "EmbeddingIndex":
        """kind: flat (exact) | ivf (k-means cells, `nprobe` visited) | hnsw (graph) | ivfpq (compressed) | auto."""
        if len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
        plan = plan_index(len(vectors), vectors.shape[1], kind, nlist, nprobe, hnsw_m=hnsw_m, ef_search=ef_search, **pq)
        if plan.kind == "ivfpq" and pq.get("refine") is None:
            plan.params["refine"] = 0  # in memory: re-ranking would keep the raw vectors (ask with refine=N)
        rows = _normalized(vectors) if plan.params.get("refine") else None
        return cls.build_from_chunks(plan, lambda: [(vectors, ids)], seed=seed, vectors=rows)

    @classmethod
    def build_from_chunks(cls, plan: IndexPlan, chunks: Chunks, seed: int = 0, vectors=None, source: dict | None = None) -> "EmbeddingIndex":
        """Build `plan` from chunks of (vectors, ids): IVF kinds train on a sample drawn in a first pass
        (the same rows whatever the chunking), then every kind adds the chunks one at a time."""
        faiss = _faiss()
        index = _new_index(faiss, plan)
        if plan.kind in ("ivf", "ivfpq"):
            index.cp.seed = seed
            index.train(_sample(chunks, plan, seed))
            index.nprobe = plan.params["nprobe"]
        all_ids: list[str] = []
        for chunk, ids in chunks():
            if len(ids) != len(chunk) or (len(chunk) and chunk.shape[1] != plan.dim):
                raise ValueError(f"a chunk of {len(ids)} ids and {tuple(chunk.shape)} vectors; expected dimension {plan.dim}")
            index.add(_normalized(chunk))
            all_ids += ids
        if len(all_ids) != plan.count:
            raise ValueError(f"the chunks held {len(all_ids)} vectors, the plan expected {plan.count}")
        return cls(index, all_ids, plan.kind, plan.params, vectors, source)

    def check_query_model(self, model) -> None:
        """Refuse queries from a model whose embeddings cannot be compared with the index's: another CLIP (its
        space), or, for an index of speech embeddings, another SpeechCLIP (one folder of embeddings never mixes
        two models either). Indexes that do not record their model are not checked."""
        origin = self.origin or {}
        clip = (origin.get("encoders") or {}).get("clip")
        if clip and clip != model.encoder_fingerprints()["clip"]:
            raise ValueError(f"the index's {origin.get('what', '')} vectors were embedded with another CLIP (fingerprint "
                             f"{clip[:12]}) than this checkpoint's; search with the checkpoint that `speechclip embed` used")
        if origin.get("what") == "speech" and origin.get("model"):
            from .fingerprint import model_fingerprint

            if origin["model"] != model_fingerprint(model):
                raise ValueError(f"the index holds the speech embeddings of another model (fingerprint {origin['model'][:12]}); "
                                 "search with the checkpoint that `speechclip embed` used")

    def search(self, queries: np.ndarray, k: int = 10) -> list[list[tuple[str, float]]]:
        """(Q, D) queries -> for each, the k best (id, cosine) pairs, best first."""
        scores, rows = self.search_rows(queries, k)
        return [[(self.ids[r], float(s)) for r, s in zip(row, score) if r >= 0] for row, score in zip(rows, scores)]

    def search_rows(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k < 1:
            raise ValueError(f"k={k}: must be at least 1")
        queries = _normalized(np.atleast_2d(queries))
        if queries.shape[1] != self.index.d:
            raise ValueError(f"query dimension {queries.shape[1]} != index dimension {self.index.d}")
        k = min(k, self.size)
        if self.params.get("refine") and self.vectors is not None:
            _, rows = self.index.search(queries, min(max(k, self.params["refine"]), self.size))
            return _rerank(queries, rows, self.vectors, k)
        scores, rows = self.index.search(queries, k)
        if self.index.metric_type == _faiss().METRIC_L2:  # unit vectors: cosine = 1 - squared distance / 2
            scores = 1 - scores / 2
        return scores, rows

    def save(self, folder: str | Path) -> Path:
        """Written beside `folder`, then renamed into place: an interrupted save leaves the old index whole,
        never a new index.faiss beside an old meta.json."""
        faiss = _faiss()
        folder = Path(folder)
        remove_leftovers(folder, "tmp")  # of killed saves (other pids)
        staging = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        faiss.write_index(self.index, str(staging / "index.faiss"))
        (staging / "ids.json").write_text(json.dumps(self.ids))
        meta = {"kind": self.kind, "params": self.params, "size": self.size, "source": self.source, "origin": self.origin}
        (staging / "meta.json").write_text(json.dumps(meta) + "\n")
        swap_in(staging, folder)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "EmbeddingIndex":
        faiss = _faiss()
        folder = Path(folder)
        for name in ("index.faiss", "ids.json", "meta.json"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name}: missing; build the index with `speechclip index`")
        meta, ids = _read_json(folder / "meta.json"), _read_json(folder / "ids.json")
        if not isinstance(meta, dict) or not isinstance(ids, list):
            raise ValueError(f"{folder}: meta.json must hold an object and ids.json a list; build the index again")
        try:
            index = faiss.read_index(str(folder / "index.faiss"))
        except RuntimeError as error:  # FAISS's own message is a C++ stack; its last line says what
            raise ValueError(f"{folder / 'index.faiss'}: unreadable ({str(error).strip().splitlines()[-1]}); "
                             "build the index again") from None
        try:
            if meta["kind"] in ("ivf", "ivfpq"):
                index.nprobe = meta["params"]["nprobe"]
            elif meta["kind"] == "hnsw":
                index.hnsw.efSearch = meta["params"]["efSearch"]
            kind, params = meta["kind"], meta["params"]
        except (KeyError, TypeError) as error:
            raise ValueError(f"{folder / 'meta.json'}: lacks {error}; build the index again") from None
        if len(ids) != index.ntotal:
            raise ValueError(f"{folder}: {len(ids)} ids in ids.json for {index.ntotal} vectors in index.faiss; build the index again")
        return cls(index, ids, kind, params, _source_rows(meta.get("source"), folder), meta.get("source"), meta.get("origin"))


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path}: not valid JSON ({error}); build the index again") from None


def _new_index(faiss, plan: IndexPlan):
    d, p = plan.dim, plan.params
    if plan.kind == "flat":
        return faiss.IndexFlatIP(d)
    if plan.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, p["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 64
        index.hnsw.efSearch = p["efSearch"]
        return index
    if plan.kind == "ivf":
        return faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, p["nlist"], faiss.METRIC_INNER_PRODUCT)
    # IVF-PQ in L2 on unit vectors (the same ranking as cosine): its residual codes estimate L2 distances
    # better than inner products (recall@10 0.44 against 0.30 with 8-byte codes on clustered 64-d vectors);
    # search_rows turns the distances back into cosines
    return faiss.IndexIVFPQ(faiss.IndexFlatL2(d), d, p["nlist"], p["m"], p["nbits"], faiss.METRIC_L2)


def _rerank(queries: np.ndarray, candidates: np.ndarray, vectors, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosines of each query's candidate rows, best k first (-1 rows, -inf scores where fewer)."""
    scores = np.full((len(queries), k), -np.inf, np.float32)
    rows = np.full((len(queries), k), -1, np.int64)
    for i, (query, found) in enumerate(zip(queries, candidates)):
        found = found[found >= 0]
        exact = _normalized(vectors[found]) @ query  # shards hold unit vectors; other inputs may not
        best = np.argsort(-exact, kind="stable")[:k]
        scores[i, : len(best)], rows[i, : len(best)] = exact[best], found[best]
    return scores, rows


def _source_rows(source: dict | None, folder: Path):
    """The exact vectors a saved index re-ranks with, memory-mapped from where it was built."""
    if not source:
        return None
    from .embed import embedding_source

    path = Path(source["embeddings"])
    if not path.exists():
        raise FileNotFoundError(f"{path}: the embeddings {folder / 'meta.json'} re-ranks with are missing; "
                                "put them back or rebuild the index (with --refine 0 for none)")
    return embedding_source(path, source.get("what")).rows()


def _sample(chunks: Chunks, plan: IndexPlan, seed: int) -> np.ndarray:
    """plan.sample rows drawn at random (by global row number, so any chunking gives the same sample)."""
    rows = np.sort(np.random.default_rng(seed).choice(plan.count, plan.sample, replace=False))
    picked, offset = [], 0
    for vectors, _ in chunks():
        lo, hi = np.searchsorted(rows, [offset, offset + len(vectors)])
        if hi > lo:
            picked.append(_normalized(vectors[rows[lo:hi] - offset]))
        offset += len(vectors)
    return np.concatenate(picked) if picked else np.zeros((0, plan.dim), np.float32)


def build_index_from_embeddings(embeddings: Path, out: Path, kind: str = "auto", what: str | None = None,
                                report: Callable[[str], None] = print, **options) -> EmbeddingIndex:
    """From `speechclip embed` output (a folder of shards with manifest.json and `what` = speech | image |
    text, or an older single <kind>.safetensors) to a saved index folder, reading one shard at a time.
    The plan and its memory estimate go to `report` before anything is built."""
    from .embed import embedding_source

    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out {out}: a file, not a folder")
    source = embedding_source(Path(embeddings), what)
    origin = {"what": source.kind, "model": source.made_by.get("model"), "encoders": source.made_by.get("encoders")} if source.kind else None
    plan = plan_index(source.count, source.dim, kind, id_chars=source.id_chars(), **options)
    report(plan.describe() + (f"; re-ranks its top {plan.params['refine']} with the vectors in {embeddings}"
                              if plan.params.get("refine") else ""))
    refine = {"vectors": source.rows(), "source": {"embeddings": str(Path(embeddings).resolve()), "what": source.kind or what}} \
        if plan.params.get("refine") else {}
    index = EmbeddingIndex.build_from_chunks(plan, lambda: ((v.numpy(), ids) for v, ids in source.chunks()), **refine)
    index.origin = origin
    index.save(out)
    return index
