"""IVF-PQ at 10,000,000 x 512: build time, memory, ms/query and recall@10 against exact search.

The vectors are never all in memory (10M x 512 float32 is 20 GB): they are generated in chunks, the same
way on each pass (a seed per chunk), and the index is built the way `speechclip index` builds it from
shards (`EmbeddingIndex.build_from_chunks`: a pass for the training sample, a pass adding chunk by chunk),
with the parameters `plan_index` picks for the size. Exact top-10 of the sample queries is computed on the
adding pass, chunk by chunk. Data as benchmarks/search.py: unit vectors around 20,000 centres, queries
fresh draws from the same distribution.
Usage: python benchmarks/ivfpq.py [--count 10000000] [--chunk 200000] [--queries 200] [--nprobe 16,32,64,128]
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from common import table
from speechclip.index import EmbeddingIndex, _normalized, plan_index


def chunk_vectors(number: int, size: int, dim: int, centres: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng([seed, number])
    return _normalized(centres[rng.integers(0, len(centres), size)] + 0.6 * rng.standard_normal((size, dim), dtype=np.float32))


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=10_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--nprobe", default="16,32,64,128")
    args = parser.parse_args()
    centres = np.random.default_rng(1234).standard_normal((20_000, args.dim), dtype=np.float32)
    queries = chunk_vectors(10**9, args.queries, args.dim, centres)
    sizes = [min(args.chunk, args.count - start) for start in range(0, args.count, args.chunk)]
    exact_scores = np.full((args.queries, 10), -np.inf, np.float32)
    exact_rows = np.zeros((args.queries, 10), np.int64)
    passes = []

    def chunks():
        """One pass over the collection; the adding pass (the second) also keeps the exact top 10."""
        passes.append(time.perf_counter())
        offset = 0
        for number, size in enumerate(sizes):
            vectors = chunk_vectors(number, size, args.dim, centres)
            if len(passes) == 2:
                _merge_top10(exact_scores, exact_rows, queries @ vectors.T, offset)
            yield vectors, [str(offset + i) for i in range(size)]
            offset += size

    plan = plan_index(args.count, args.dim, "ivfpq", id_chars=len(str(args.count)) - 1)
    print(plan.describe(), flush=True)
    started = time.perf_counter()
    index = EmbeddingIndex.build_from_chunks(plan, chunks)
    build = time.perf_counter() - started
    train = passes[1] - started  # sample pass + training, before the adding pass began
    rows = []
    for nprobe in [int(n) for n in args.nprobe.split(",")]:
        index.index.nprobe = nprobe
        index.search_rows(queries[:5], 10)
        begun = time.perf_counter()
        found = np.stack([index.search_rows(q[None], 10)[1][0] for q in queries])  # one at a time: a user's latency
        per_query = (time.perf_counter() - begun) / len(queries) * 1000
        recall = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact_rows)])
        rows.append((nprobe, f"{per_query:.2f}", f"{recall:.3f}"))
    print(f"IVF-PQ, {args.count:,} x {args.dim} (clustered, unit vectors), {plan.params}; built in {build:.0f} s "
          f"(sample + training {train:.0f} s, adding {build - train:.0f} s, vector generation and the exact top 10 "
          f"included); index {index.index.invlists.compute_ntotal() * (index.index.code_size + 8) / 2**20:,.0f} MB of "
          f"codes + ids; process peak RSS {rss_mb():,.0f} MB; {args.queries} single queries against exact top 10")
    print(table(rows, ("nprobe", "ms/query", "recall@10 vs exact")))


def _merge_top10(scores: np.ndarray, rows: np.ndarray, chunk_scores: np.ndarray, offset: int) -> None:
    """Fold a (Q, n) block of exact scores into the running top 10 per query, in place."""
    top = np.argpartition(-chunk_scores, 9, axis=1)[:, :10] if chunk_scores.shape[1] > 10 else np.arange(chunk_scores.shape[1])[None].repeat(len(scores), 0)
    both_scores = np.concatenate([scores, np.take_along_axis(chunk_scores, top, 1)], 1)
    both_rows = np.concatenate([rows, top + offset], 1)
    best = np.argsort(-both_scores, axis=1, kind="stable")[:, :10]
    scores[:] = np.take_along_axis(both_scores, best, 1)
    rows[:] = np.take_along_axis(both_rows, best, 1)


if __name__ == "__main__":
    main()
