"""Training step time against its floor (the frozen upstream's forward alone) and against the naive step.

Base parallel configuration: HuBERT Base + CLIP ViT-B/32 architectures (random weights), batches of
offline-corpus clips. Four timings on the same machine in one run, each the median over the batches:
  floor   upstream forward alone, length-grouped batch
  cached  full step (upstream, head, loss, backward, Adam) with image embeddings from the cache
  nocache the same step running the CLIP image tower every step (length-grouped)
  naive   no cache and random batches padded to their longest clip
Usage: python benchmarks/train_step.py [--batch 8] [--batches 4]
"""

from __future__ import annotations

import argparse
import random
import time

import soundfile
import torch

from common import CACHE, base_encoders, corpus_dir, table
from speechclip import SpeechCLIP, SpeechCLIPConfig
from speechclip.audio import load_audio, pad_batch
from speechclip.data import read_dataset
from speechclip.image_cache import ImageEmbeddingCache
from speechclip.images import load_image
from speechclip.loss import contrastive_loss


def _batches(items, lengths, size: int, count: int, grouped: bool, seed: int = 0):
    rng = random.Random(seed)
    order = sorted(range(len(items)), key=lambda i: lengths[i])
    out = []
    for _ in range(count):
        if grouped:
            start = rng.randrange(0, len(order) - size)
            out.append(order[start : start + size])
        else:
            out.append(rng.sample(range(len(items)), size))
    return out


def _median_time(function, batches) -> float:
    function(batches[0])  # warm-up
    times = []
    for batch in batches:
        started = time.perf_counter()
        function(batch)
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    upstream, clip = base_encoders()
    items = read_dataset("manifest", corpus_dir(), "train")
    lengths = [soundfile.info(str(i.audio)).frames for i in items]
    model = SpeechCLIP(SpeechCLIPConfig(upstream=upstream, clip=clip, variant="parallel")).train()
    cache = ImageEmbeddingCache(CACHE / "image-cache", model.clip)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    waves = {i: torch.from_numpy(load_audio(items[i].audio)) for i in range(len(items))}
    image_ids = {i: hash(items[i].image_id) % 10**9 for i in range(len(items))}

    def floor(rows):
        batch, lens = pad_batch([waves[r] for r in rows])
        model.upstream(batch, lens)

    def step(rows, use_cache: bool):
        batch, lens = pad_batch([waves[r] for r in rows])
        if use_cache:
            images = cache.embeddings([items[r].image for r in rows])
        else:
            pixels = model.clip.preprocess_images([load_image(items[r].image) for r in rows])
            images = model.clip.image_features(pixels)
        output = model(batch, lens)
        loss = contrastive_loss(output.parallel, images, model.scale(), torch.tensor([image_ids[r] for r in rows]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    grouped = _batches(items, lengths, args.batch, args.batches, grouped=True)
    shuffled = _batches(items, lengths, args.batch, args.batches, grouped=False)
    cache.embeddings([i.image for i in items])  # fill the cache once, as training's set-up does
    t_floor = _median_time(floor, grouped)
    t_cached = _median_time(lambda r: step(r, True), grouped)
    t_nocache = _median_time(lambda r: step(r, False), grouped)
    t_naive = _median_time(lambda r: step(r, False), shuffled)
    padded = lambda bs: sum(max(lengths[i] for i in b) * len(b) for b in bs) / sum(lengths[i] for b in bs for i in b)  # noqa: E731
    rows = [
        ("upstream forward alone (floor)", f"{t_floor:.3f}", f"{1 / t_floor:.2f}", "1.00"),
        ("step, image cache, length-grouped", f"{t_cached:.3f}", f"{1 / t_cached:.2f}", f"{t_cached / t_floor:.2f}"),
        ("step, CLIP image tower, length-grouped", f"{t_nocache:.3f}", f"{1 / t_nocache:.2f}", f"{t_nocache / t_floor:.2f}"),
        ("step, CLIP image tower, random batches", f"{t_naive:.3f}", f"{1 / t_naive:.2f}", f"{t_naive / t_floor:.2f}"),
    ]
    print(f"train step, base parallel (HuBERT Base + CLIP ViT-B/32 architectures), batch {args.batch}, "
          f"median of {args.batches} batches, {torch.get_num_threads()} threads")
    print(table(rows, ("what", "s/step", "steps/s", "x floor")))
    print(f"cached step / floor = {t_cached / t_floor:.2f} (goal <= 1.15); naive / cached = {t_naive / t_cached:.2f}x "
          f"(goal >= 1.5); cache alone saves {t_nocache / t_cached:.2f}x")
    print(f"padded samples / real samples: grouped {padded(grouped):.2f}, random {padded(shuffled):.2f}")


if __name__ == "__main__":
    main()
