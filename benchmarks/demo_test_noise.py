"""How much of the demo's quality ratio is the test set's own sampling noise: for finished `speechclip demo`
builds, each caption's speech->image and text->image (the ceiling) R@1 hit, the ratio recomputed from them
(it must equal the build's table), and its spread when the 200 test images (with their captions) are drawn
again with replacement: the part of the spread between draws that a larger test set, not a better model,
would remove. A research tool, not part of the product.

    python benchmarks/demo_test_noise.py runs/demo-seed0 runs/demo-seed1 runs/demo-seed2 runs/demo-seed3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import common  # noqa: F401  (the CLI's logging set-up)
from speechclip.clip import FrozenCLIP
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
    clip = FrozenCLIP(str(run / "encoders" / "clip"))
    tokens = clip.tokenize([i.text for i in test])
    with torch.inference_mode():
        texts = clip.text_features(tokens["input_ids"], tokens["attention_mask"])
    return top1_hits(speech, images, caption_image), top1_hits(texts, images, caption_image), caption_image.numpy()


def resampled_ratios(speech: np.ndarray, text: np.ndarray, caption_image: np.ndarray, seed: int = 0) -> np.ndarray:
    """The ratio over RESAMPLES test sets of as many images, drawn with replacement, each with its captions."""
    rows = [np.flatnonzero(caption_image == image) for image in range(caption_image.max() + 1)]
    speech_per_image = np.array([speech[r].sum() for r in rows], dtype=np.float64)
    text_per_image = np.array([text[r].sum() for r in rows], dtype=np.float64)
    draws = np.random.default_rng(seed).integers(0, len(rows), size=(RESAMPLES, len(rows)))
    return speech_per_image[draws].sum(1) / text_per_image[draws].sum(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="finished `speechclip demo` output folders")
    args = parser.parse_args()
    ratios = []
    for run in args.runs:
        speech, text, caption_image = build_hits(run)
        table = json.loads((run / "results.json").read_text())
        printed = table["pretrained"]["parallel"]["speech_to_image"]["recall"]["1"] / table["clip_text_to_image"]["recall"]["1"]
        ratio = speech.mean() / text.mean()
        spread = resampled_ratios(speech, text, caption_image)
        low, high = np.percentile(spread, [2.5, 97.5])
        ratios.append(ratio)
        print(f"{run}: {100 * speech.mean():.1f} / {100 * text.mean():.1f} = {ratio:.3f} (table {printed:.3f}); "
              f"{len(caption_image)} captions of {caption_image.max() + 1} images drawn again {RESAMPLES} times: "
              f"sd {spread.std():.3f}, 95 % {low:.3f}-{high:.3f}, P(ratio >= 0.8) {np.mean(spread >= 0.8):.2f}")
    if len(ratios) > 1:
        print(f"between the {len(ratios)} builds: mean {np.mean(ratios):.3f}, sd {np.std(ratios, ddof=1):.3f}")


if __name__ == "__main__":
    main()
