"""How much of the demo's quality ratio is the test set's own sampling noise: for finished `speechclip demo`
builds, each caption's speech->image and text->image (the ceiling) R@1 hit, the ratio recomputed from them
(it must equal the build's table), and its spread when the 200 test images (with their captions) are drawn
again with replacement: the part of the spread between draws that a larger test set, not a better model,
would remove. With --against (the same draws of a variant, on the same test split and mini CLIP), the
variant's change in the ratio, draw by draw and averaged over the draws, with its spread over the same
resampled test sets (paired: both builds scored on each). A research tool, not part of the product.

    python benchmarks/demo_test_noise.py runs/demo-seed0 runs/demo-seed1 runs/demo-seed2 runs/demo-seed3
    python benchmarks/demo_test_noise.py runs/demo-seed{0,1,2,3} --against runs/v4-seed{0,1,2,3}
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import common  # noqa: F401  (the CLI's logging set-up)
from speechclip.data import image_table, read_dataset
from speechclip.evaluate import encode_speech_streamed
from speechclip.image_cache import ImageEmbeddingCache
from speechclip.model import SpeechCLIP

RESAMPLES = 2000


def top1_hits(queries: torch.Tensor, images: torch.Tensor, caption_image: torch.Tensor) -> np.ndarray:
    """Per query, whether its nearest image by cosine is its own (written here from the raw embeddings,
    apart from the library's `recall_at_k`)."""
    queries = torch.nn.functional.normalize(queries.float(), dim=-1)
    images = torch.nn.functional.normalize(images.float(), dim=-1)
    return (queries @ images.T).argmax(1).eq(caption_image).numpy()


def build_hits(run: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(speech hits, text hits, image row of each caption) on the build's test split."""
    test = read_dataset("manifest", str(run / "corpus"), "test")
    table = image_table(test)
    caption_image = torch.tensor(table.caption_rows)
    model = SpeechCLIP.from_pretrained(run / "runs" / "pretrained" / "final")
    images = ImageEmbeddingCache(run / "cache", model.clip).embeddings(table.paths)
    speech = encode_speech_streamed(model, test).branches["parallel"]
    texts = model.encode_text([i.text for i in test], normalize=False)  # the mini CLIP's own, as the demo's ceiling
    return top1_hits(speech, images, caption_image), top1_hits(texts, images, caption_image), caption_image.numpy()


def image_draws(caption_image: np.ndarray, seed: int = 0) -> np.ndarray:
    """RESAMPLES test sets of as many images as the split's, drawn with replacement: (RESAMPLES, images)."""
    images = int(caption_image.max()) + 1
    return np.random.default_rng(seed).integers(0, images, size=(RESAMPLES, images))


def per_image(hits: np.ndarray, caption_image: np.ndarray) -> np.ndarray:
    """Hits summed over each image's captions."""
    return np.bincount(caption_image, weights=hits.astype(np.float64), minlength=int(caption_image.max()) + 1)


def resampled_ratios(speech: np.ndarray, text: np.ndarray, caption_image: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """The ratio on each resampled test set (each image with all its captions)."""
    return per_image(speech, caption_image)[draws].sum(1) / per_image(text, caption_image)[draws].sum(1)


def _interval(values: np.ndarray) -> str:
    low, high = np.percentile(values, [2.5, 97.5])
    return f"sd {values.std():.3f}, 95 % {low:+.3f} to {high:+.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="finished `speechclip demo` output folders")
    parser.add_argument("--against", type=Path, nargs="+", help="a variant's builds of the same draws, in the same order")
    args = parser.parse_args()
    if args.against and len(args.against) != len(args.runs):
        parser.error(f"--against: {len(args.against)} builds for {len(args.runs)} runs")
    ratios, changes = [], []
    for index, run in enumerate(args.runs):
        speech, text, caption_image = build_hits(run)
        draws = image_draws(caption_image)  # the same resampled test sets for every build
        table = json.loads((run / "results.json").read_text())
        printed = table["pretrained"]["parallel"]["speech_to_image"]["recall"]["1"] / table["clip_text_to_image"]["recall"]["1"]
        ratio, spread = speech.mean() / text.mean(), resampled_ratios(speech, text, caption_image, draws)
        ratios.append(ratio)
        low, high = np.percentile(spread, [2.5, 97.5])
        print(f"{run}: {100 * speech.mean():.1f} / {100 * text.mean():.1f} = {ratio:.3f} (table {printed:.3f}); "
              f"{len(caption_image)} captions of {caption_image.max() + 1} images drawn again {RESAMPLES} times: "
              f"sd {spread.std():.3f}, 95 % {low:.3f}-{high:.3f}, P(ratio >= 0.8) {np.mean(spread >= 0.8):.2f}")
        if args.against:
            other_speech, other_text, other_images = build_hits(args.against[index])
            if not (np.array_equal(other_images, caption_image) and np.array_equal(other_text, text)):
                raise SystemExit(f"{args.against[index]}: not the same test split and mini CLIP as {run}")
            change = other_speech.mean() / text.mean() - ratio
            paired = resampled_ratios(other_speech, text, caption_image, draws) - spread
            changes.append((change, paired))
            print(f"  {args.against[index]}: {other_speech.mean() / text.mean():.3f}, change {change:+.3f} ({_interval(paired)})")
    if len(ratios) > 1:
        print(f"between the {len(ratios)} builds: mean {np.mean(ratios):.3f}, sd {np.std(ratios, ddof=1):.3f}")
    if len(changes) > 1:
        mean_change = np.mean([paired for _, paired in changes], axis=0)
        print(f"change averaged over the {len(changes)} draws: {np.mean([change for change, _ in changes]):+.3f} "
              f"({_interval(mean_change)}; share of resampled test sets where it is > 0: {np.mean(mean_change > 0):.2f})")


if __name__ == "__main__":
    main()
