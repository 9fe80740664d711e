"""Padding waste: padded samples / real samples for length-grouped batches against random batches.

Uses the training sampler itself (LengthGroupedBatchSampler) on the offline corpus's clip lengths, and
on Flickr8k-like lengths (log-normal, mean ~4.3 s, cropped at 6.4 s as in training).
Usage: python benchmarks/padding.py [--batch 64]
"""

from __future__ import annotations

import argparse
import random

import numpy as np
import soundfile

from common import corpus_dir, table
from speechclip.data import read_dataset
from speechclip.train.datamodule import LengthGroupedBatchSampler


def waste(lengths, batches) -> float:
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return padded / sum(lengths[i] for b in batches for i in b) - 1


def random_batches(count: int, size: int, seed: int = 0):
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return [order[s : s + size] for s in range(0, count - size + 1, size)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    corpus = [soundfile.info(str(i.audio)).frames for i in read_dataset("manifest", corpus_dir(), "train")]
    rng = np.random.default_rng(0)
    flickr_like = np.minimum(rng.lognormal(np.log(4.0 * 16000), 0.4, 30000), 102400).astype(int).tolist()
    rows = []
    for name, lengths in (("offline corpus (train)", corpus), ("Flickr8k-like, 6.4 s crop", flickr_like)):
        grouped = [[i for i, _ in b] for b in LengthGroupedBatchSampler(lengths, args.batch, bucket=50, seed=0)]  # (clip, crop seed)
        shuffled = random_batches(len(lengths), args.batch)
        w_grouped, w_random = waste(lengths, grouped), waste(lengths, shuffled)
        rows.append((name, len(lengths), f"{100 * w_random:.1f}%", f"{100 * w_grouped:.1f}%",
                     f"{(1 + w_random) / (1 + w_grouped):.2f}x"))
    print(f"padding waste (padded / real samples - 1), batch {args.batch}")
    print(table(rows, ("lengths", "clips", "random batches", "length-grouped", "samples computed, random / grouped")))


if __name__ == "__main__":
    main()
