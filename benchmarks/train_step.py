"""Training step time against its floor (the frozen upstream's forward alone) and against the naive step.

Base parallel configuration: HuBERT Base + CLIP ViT-B/32 architectures (random weights), batches of
offline-corpus clips. Five timings in one run, interleaved batch by batch, each a median:
  floor   upstream forward alone, length-grouped batch
  head    the trainable part alone on precomputed upstream states
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


def _interleaved(kinds: dict, rounds: int) -> dict[str, float]:
    """Median seconds per kind, the kinds timed in turn on each batch (machine noise hits all alike)."""
    for function, batches in kinds.values():
        function(batches[0])  # warm-up
    times: dict[str, list[float]] = {name: [] for name in kinds}
    for _ in range(rounds):
        for position in range(len(next(iter(kinds.values()))[1])):
            for name, (function, batches) in kinds.items():
                started = time.perf_counter()
                function(batches[position])
                times[name].append(time.perf_counter() - started)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
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

    def head_only(rows):
        """The trainable part alone (layer sum, head, loss, backward, Adam) on precomputed upstream states:
        what a step costs beyond the frozen forward, whatever the implementation around it."""
        states, mask = states_for[tuple(rows)]
        output = model.forward_states(states, mask)
        images = cache.embeddings([items[r].image for r in rows])
        loss = contrastive_loss(output.parallel, images, model.scale(), torch.tensor([image_ids[r] for r in rows]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    grouped = _batches(items, lengths, args.batch, args.batches, grouped=True)
    states_for = {tuple(rows): model.upstream(*pad_batch([waves[r] for r in rows])) for rows in grouped}
    shuffled = _batches(items, lengths, args.batch, args.batches, grouped=False)
    cache.embeddings([i.image for i in items])  # fill the cache once, as training's set-up does
    kinds = {
        "floor": (floor, grouped), "head": (head_only, grouped), "cached": (lambda r: step(r, True), grouped),
        "nocache": (lambda r: step(r, False), grouped), "naive": (lambda r: step(r, False), shuffled),
    }
    timings = _interleaved(kinds, args.rounds)
    t_floor, t_head, t_cached, t_nocache, t_naive = (timings[k] for k in ("floor", "head", "cached", "nocache", "naive"))
    padded = lambda bs: sum(max(lengths[i] for i in b) * len(b) for b in bs) / sum(lengths[i] for b in bs for i in b)  # noqa: E731
    rows = [
        ("upstream forward alone (floor)", f"{t_floor:.3f}", f"{1 / t_floor:.2f}", "1.00"),
        ("trainable part alone (head fwd+bwd+Adam)", f"{t_head:.3f}", f"{1 / t_head:.2f}", f"{t_head / t_floor:.2f}"),
        ("step, image cache, length-grouped", f"{t_cached:.3f}", f"{1 / t_cached:.2f}", f"{t_cached / t_floor:.2f}"),
        ("step, CLIP image tower, length-grouped", f"{t_nocache:.3f}", f"{1 / t_nocache:.2f}", f"{t_nocache / t_floor:.2f}"),
        ("step, CLIP image tower, random batches", f"{t_naive:.3f}", f"{1 / t_naive:.2f}", f"{t_naive / t_floor:.2f}"),
    ]
    print(f"train step, base parallel (HuBERT Base + CLIP ViT-B/32 architectures), batch {args.batch}, "
          f"median of {args.batches} batches x {args.rounds} interleaved rounds, {torch.get_num_threads()} threads")
    print(table(rows, ("what", "s/step", "steps/s", "x floor")))
    print(f"cached step / floor = {t_cached / t_floor:.2f} (goal <= 1.15); naive / cached = {t_naive / t_cached:.2f}x "
          f"(goal >= 1.5); cache alone saves {t_nocache / t_cached:.2f}x")
    print(f"step - floor - trainable part = {t_cached - t_floor - t_head:+.3f} s (overhead outside the model's own compute)")
    print(f"padded samples / real samples: grouped {padded(grouped):.2f}, random {padded(shuffled):.2f}")


if __name__ == "__main__":
    main()
