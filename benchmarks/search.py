"""Search latency and recall@10 of the FAISS indexes at 1,000,000 x 512, and each index's memory
(IVF-PQ at 10,000,000: benchmarks/ivfpq.py).

Data: 1M unit vectors drawn around 20,000 centres (embeddings of real collections are clustered; pure
Gaussian noise, which no approximate index handles well, is reported too with --uniform). Queries are
fresh draws from the same distribution. Recall@10 is measured against exact inner-product search.
Usage: python benchmarks/search.py [--count 1000000] [--queries 200]
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from common import table
from speechclip.index import EmbeddingIndex


def data(count: int, dim: int, centres: int, seed: int, uniform: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if uniform:
        return rng.standard_normal((count, dim), dtype=np.float32)
    middle = np.random.default_rng(1234).standard_normal((centres, dim), dtype=np.float32)
    return middle[rng.integers(0, centres, count)] + 0.6 * rng.standard_normal((count, dim), dtype=np.float32)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--uniform", action="store_true")
    parser.add_argument("--kinds", default="flat,ivf,hnsw,ivfpq")
    args = parser.parse_args()
    vectors = data(args.count, args.dim, 20000, 0, args.uniform)
    queries = data(args.queries, args.dim, 20000, 1, args.uniform)
    ids = [str(i) for i in range(args.count)]
    rows, exact = [], None
    for kind in args.kinds.split(","):
        before = rss_mb()
        started = time.perf_counter()
        index = EmbeddingIndex.build(vectors, ids, kind)
        build = time.perf_counter() - started
        memory = index.index.ntotal * args.dim * 4 / 2**20
        if kind == "ivfpq":  # codes + FAISS's int64 ids instead of float32 vectors
            memory = index.index.ntotal * (index.index.code_size + 8) / 2**20
        if kind == "hnsw":
            memory += index.index.ntotal * index.params["M"] * 2 * 4 / 2**20  # graph links (level 0)
        index.search_rows(queries[:5], 10)
        started = time.perf_counter()
        for query in queries:  # one query at a time: the latency a user sees
            index.search_rows(query[None], 10)
        single = (time.perf_counter() - started) / len(queries) * 1000
        _, found = index.search_rows(queries, 10)
        if kind == "flat":
            exact = found
        recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(found, exact)]) if exact is not None else float("nan")
        rows.append((kind, str(index.params), f"{build:.1f}", f"{single:.2f}", f"{recall:.3f}", f"{memory:.0f}",
                     f"{rss_mb() - before:+.0f}"))
        del index
    print(f"search, {args.count:,} x {args.dim} ({'gaussian' if args.uniform else 'clustered'}), top-10, "
          f"{args.queries} single queries")
    print(table(rows, ("index", "params", "build s", "ms/query", "recall@10 vs exact", "index MB", "peak RSS delta MB")))


if __name__ == "__main__":
    main()
