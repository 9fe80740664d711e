"""Score fusion of a finished demo build's two branches at retrieval: speech->image R@1 of
(1 - w) cos(parallel, image) + w cos(cascaded, image) for a few w, on the validation split and on each test
fold, and the check's pooled ratio for each w (w = 0 is the build's own parallel branch). No training. A
research tool, not part of the product.

    python benchmarks/demo_fusion.py runs/demo-seed0 runs/demo-seed1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.nn.functional import normalize

import common  # noqa: F401  (the CLI's logging set-up)
from speechclip.data import image_table, read_dataset
from speechclip.data.synthetic import test_fold_split
from speechclip.evaluate import encode_speech_streamed
from speechclip.image_cache import ImageEmbeddingCache
from speechclip.model import SpeechCLIP

WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 1.0)


def fused_r1(model: SpeechCLIP, items, cache: ImageEmbeddingCache) -> dict[float, float]:
    """R@1 for every weight in WEIGHTS (argmax of the fused cosine; captions of one image share its row)."""
    table = image_table(items)
    images = normalize(cache.embeddings(table.paths).float(), dim=-1)
    rows = torch.tensor(table.caption_rows)
    with torch.no_grad():
        branches = encode_speech_streamed(model, items).branches
    parallel = normalize(branches["parallel"], dim=-1) @ images.T
    cascaded = normalize(branches["cascaded"], dim=-1) @ images.T
    return {w: ((1 - w) * parallel + w * cascaded).argmax(1).eq(rows).float().mean().item() for w in WEIGHTS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished `speechclip demo` output folders (hybrid)")
    args = parser.parse_args()
    for run in args.runs:
        model = SpeechCLIP.from_pretrained(run / "runs" / "pretrained" / "final").eval()
        cache = ImageEmbeddingCache(run / "cache", model.clip)
        folds = json.loads((run / "results.json").read_text())["test_folds"]
        pooled, validation = dict.fromkeys(WEIGHTS, 0.0), {}
        for split in ["val", "test"] + [test_fold_split(f) for f in range(1, folds["folds"])]:
            recall = fused_r1(model, read_dataset("manifest", str(run / "corpus"), split), cache)
            print(f"{run.name} {split:<10} " + " ".join(f"w={w}: {r:.3f}" for w, r in recall.items()), flush=True)
            if split == "val":
                validation = recall
            else:
                for w, r in recall.items():
                    pooled[w] += r
        ceiling = sum(folds["ceiling_r1"])
        chosen = max(WEIGHTS, key=lambda w: (validation[w], -w))  # the best on validation; ties: less fusion
        print(f"{run.name} pooled ratio " + " ".join(f"w={w}: {r / ceiling:.3f}" for w, r in pooled.items())
              + f" (the build printed {folds['ratio']:.3f}); w chosen on validation {chosen}: "
              f"{pooled[chosen] / ceiling:.3f}", flush=True)


if __name__ == "__main__":
    main()
