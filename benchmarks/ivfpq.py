"""IVF-PQ at 10,000,000 x 512 through `speechclip index`'s own path: build time, memory, ms/query and
recall@10 against exact search, with and without the exact re-ranking from the shards on disk.

1. 10M unit vectors (as benchmarks/search.py: around 20,000 centres; 500 a centre here) are generated in
   chunks and written as `speechclip embed` shards (20 GB on disk; never all in memory); the exact top 10 of
   the sample queries is computed on the way, chunk by chunk.
2. `build_index_from_embeddings` builds the index from the shards (a pass for the training sample, a pass
   adding shard by shard), with the parameters `plan_index` picks for the size; its peak RSS is measured in
   its own process.
3. The saved index is loaded (as `speechclip search` / `serve` do) and queried one query at a time, in the
   table's order: the first re-ranked rows read the shards from disk (what is not in the page cache yet).
Usage: python benchmarks/ivfpq.py [--count 10000000] [--queries 200] [--keep]  (shards under .cache/bench)
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

from common import CACHE, table
from speechclip.embed import SHARD_SIZE, Collection, shard_path, write_manifest, write_shard
from speechclip.index import EmbeddingIndex, _normalized, build_index_from_embeddings

SHARD = SHARD_SIZE  # as `speechclip embed` writes them


def chunk_vectors(number: int, size: int, dim: int, centres: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng([seed, number])
    return _normalized(centres[rng.integers(0, len(centres), size)] + 0.6 * rng.standard_normal((size, dim), dtype=np.float32))


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_collection(folder, count: int, dim: int, queries: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """The shards and manifest, as `speechclip embed` writes them; returns the exact top-10 rows per query."""
    scores = np.full((len(queries), 10), -np.inf, np.float32)
    rows = np.zeros((len(queries), 10), np.int64)
    collection = Collection("speech", [str(i) for i in range(count)], [])
    for number, (start, stop) in enumerate(collection.shards(SHARD)):
        vectors = chunk_vectors(number, stop - start, dim, centres)
        _merge_top10(scores, rows, queries @ vectors.T, start)
        write_shard(shard_path(folder, "speech", number), torch.from_numpy(vectors), collection.ids[start:stop], {})
    write_manifest(folder, [collection], SHARD, {"data": "benchmarks/ivfpq.py"})
    return rows


def _merge_top10(scores: np.ndarray, rows: np.ndarray, chunk_scores: np.ndarray, offset: int) -> None:
    """Fold a (Q, n) block of exact scores into the running top 10 per query, in place."""
    top = np.argpartition(-chunk_scores, 9, axis=1)[:, :10]
    both_scores = np.concatenate([scores, np.take_along_axis(chunk_scores, top, 1)], 1)
    both_rows = np.concatenate([rows, top + offset], 1)
    best = np.argsort(-both_scores, axis=1, kind="stable")[:, :10]
    scores[:] = np.take_along_axis(both_scores, best, 1)
    rows[:] = np.take_along_axis(both_rows, best, 1)


def build_worker(shards: str, out: str) -> None:
    """Own process: its peak RSS is the build's."""
    started = time.perf_counter()
    index = build_index_from_embeddings(shards, out, "ivfpq")
    print(json.dumps({"seconds": time.perf_counter() - started, "peak_mb": rss_mb(), "params": index.params,
                      "codes_mb": index.size * (index.index.code_size + 8) / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=10_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--keep", action="store_true", help="keep the shards (20 GB at 10M) and the index")
    parser.add_argument("--build", nargs=2, metavar=("SHARDS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        return build_worker(*args.build)
    folder, out = CACHE / f"ivfpq-{args.count}" / "shards", CACHE / f"ivfpq-{args.count}" / "index"
    shutil.rmtree(folder.parent, ignore_errors=True)
    centres = np.random.default_rng(1234).standard_normal((20_000, args.dim), dtype=np.float32)
    queries = chunk_vectors(10**9, args.queries, args.dim, centres)
    started = time.perf_counter()
    exact = write_collection(folder, args.count, args.dim, queries, centres)
    written = time.perf_counter() - started
    done = subprocess.run([sys.executable, __file__, "--build", str(folder), str(out)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"build failed:\n{done.stderr[-2000:]}")
    plan_line, result = done.stdout.strip().splitlines()[-2], json.loads(done.stdout.strip().splitlines()[-1])
    index = EmbeddingIndex.load(out)
    rows, default = [], (index.index.nprobe, index.params["refine"])
    settings = [(16, 0), (32, 0), (64, 0), (32, 300), (64, 100), (64, 300), (64, 1000), default]
    for number, (nprobe, refine) in enumerate(settings):
        index.index.nprobe, index.params["refine"] = nprobe, refine
        begun = time.perf_counter()
        found = np.stack([index.search_rows(q[None], 10)[1][0] for q in queries])  # one at a time: a user's latency
        per_query = (time.perf_counter() - begun) / len(queries) * 1000
        recall = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact)])
        note = "default" + (", again: its rows now in the page cache" if number == len(settings) - 1 else "") \
            if (nprobe, refine) == default else ""
        rows.append((nprobe, refine or "-", f"{per_query:.1f}", f"{recall:.3f}", note))
    print(f"IVF-PQ, {args.count:,} x {args.dim} (unit vectors around 20,000 centres), {args.queries} single queries, "
          f"recall@10 against exact search")
    print(f"  shards written in {written:.0f} s; `speechclip index` path: {plan_line}")
    print(f"  built from the shards in {result['seconds']:.0f} s, build process peak RSS {result['peak_mb']:,.0f} MB; "
          f"codes + FAISS ids {result['codes_mb']:,.0f} MB (the vectors: {args.count * args.dim * 4 / 2**30:.1f} GB)")
    print(table(rows, ("nprobe", "re-ranked (from disk)", "ms/query", "recall@10", "")))
    if not args.keep:
        shutil.rmtree(folder.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
