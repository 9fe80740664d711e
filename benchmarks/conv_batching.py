"""The GroupNorm conv stack on several clips a call, with per-clip statistics, against one call per clip length.

HuBERT / wav2vec 2.0 / WavLM Base normalise their first conv layer over time, so zero padding would shift a
clip's statistics. Until stop 35 `SpeechUpstream` ran the conv stack once per distinct clip length (in a
length-sorted batch of real speech nearly every clip has its own); it now runs it on chunks of a batch's rows
(`upstream.CONV_CHUNK_BYTES` of first-layer output a call) and takes the first layer's statistics over each
clip's valid frames (`upstream._masked_group_norm_conv`). This times an
upstream-state cache build both ways, each in its own process (its peak RSS), interleaved over rounds.

Usage: python benchmarks/conv_batching.py [--rounds 3] [--clips N]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

import soundfile
import torch

from common import base_encoders, corpus_dir, table
from speechclip.data import read_dataset
from speechclip.demo.released import RELEASED
from speechclip.pretrain.precision import cpu_has_fast_bf16
from speechclip.train.state_cache import build_state_cache
from speechclip.upstream import SpeechUpstream, _rows_by_length

# (name, folder, clips): the demo's mini HuBERT, and HuBERT Base's architecture (random weights) on fewer clips
MODELS = {"mini HuBERT (demo)": (lambda: str(RELEASED / "hubert"), 2000),
          "HuBERT Base arch": (lambda: base_encoders()[0], 96)}
WAYS = ("per length (before)", "chunks, masked norm (now)")


def per_length_conv(upstream: SpeechUpstream) -> None:
    """The previous behaviour: the conv stack once per distinct clip length, results zero-padded."""
    encoder = upstream.model.feature_extractor

    def forward(input_values: torch.Tensor) -> torch.Tensor:
        hidden = None
        lengths = upstream._call()["lengths"]
        for length, rows in _rows_by_length(lengths):
            part = torch.nn.Sequential(*encoder.conv_layers)(input_values[rows, :length][:, None])
            if hidden is None:
                frames = int(upstream.frame_lengths(lengths.max()))
                hidden = part.new_zeros(len(lengths), part.shape[1], frames)
            hidden[rows, :, : part.shape[2]] = part
        return hidden

    encoder.forward = forward


def worker(model: str, way: str, bf16: bool, clips: int | None) -> dict:
    """Build an upstream-state cache (what a training run with `cache_upstream_states` does first) of the bench
    corpus's train clips in batches of 32 by length, in a fresh folder; on fewer clips than it has (Base), groups of
    32 neighbours in length, as the batches of a large collection are."""
    torch.set_num_threads(2)
    folder, count = MODELS[model]
    items = read_dataset("manifest", corpus_dir(), "train")
    lengths = [soundfile.info(str(item.audio)).frames for item in items]
    order = sorted(range(len(items)), key=lengths.__getitem__)
    groups = min(len(order), clips or count) // 32  # groups of 32 neighbours in length, spread over the lengths,
    starts = [round(g * (len(order) - 32) / max(1, groups - 1)) for g in range(groups)]  # as a large collection's batches are
    rows = [row for start in starts for row in order[start : start + 32]]
    items, lengths = [items[row] for row in rows], [lengths[row] for row in rows]
    upstream = SpeechUpstream(folder())
    if way == WAYS[0]:
        per_length_conv(upstream)
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        build_state_cache(upstream, items, lengths, cache, 32, autocast=autocast, progress=False)
        elapsed = time.perf_counter() - started
    return {"seconds": elapsed, "clips": len(items), "audio_s": sum(lengths) / 16000,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clips", type=int, default=0, help="per model (default: 2,000 mini, 96 Base)")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        model, way, bf16 = args.worker
        print(json.dumps(worker(model, way, bf16 == "1", args.clips)))
        return
    bf16s = [False, True] if cpu_has_fast_bf16() else [False]
    results: dict[tuple, list[dict]] = {}
    for _ in range(args.rounds):
        for model in MODELS:
            for bf16 in bf16s:
                for way in WAYS:
                    command = [sys.executable, __file__, "--clips", str(args.clips), "--worker", model, way, str(int(bf16))]
                    line = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
                    results.setdefault((model, bf16, way), []).append(json.loads(line))
    rows = []
    for (model, bf16, way), runs in results.items():
        seconds = sorted(r["seconds"] for r in runs)
        before = sorted(r["seconds"] for r in results[(model, bf16, WAYS[0])])
        median, base = seconds[len(seconds) // 2], before[len(before) // 2]
        clips = runs[0]["clips"]
        rows.append((model, "bf16" if bf16 else "fp32", way, clips, f"{1000 * median / clips:.1f}",
                     f"{1000 * seconds[0] / clips:.1f}-{1000 * seconds[-1] / clips:.1f}", f"{runs[0]['audio_s'] / median:.0f}",
                     f"{base / median:.2f}x", f"{max(r['peak_mb'] for r in runs):,.0f}"))
    print(f"upstream-state cache build (every hidden state of each clip, batches of 32 by length) over the bench corpus's "
          f"speech, 2 threads; median of {args.rounds} processes per row")
    print(table(rows, ("model", "precision", "conv stack", "clips", "ms/clip", "range", "audio s per s", "speed-up",
                       "peak RSS MB")))


if __name__ == "__main__":
    main()
