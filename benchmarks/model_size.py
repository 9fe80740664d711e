"""Trainable vs frozen parameters of the base configurations, and the forward time of one batch.

HuBERT Base + CLIP ViT-B/32 (DESIGN's base) and + ViT-B/16 (the issue's wording), random weights.
Usage: python benchmarks/model_size.py [--batch 8] [--seconds 4]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import CLIPConfig

from common import CACHE, base_encoders, corpus_dir, table
from speechclip import SpeechCLIP, SpeechCLIPConfig
from speechclip.data import read_dataset
from speechclip.mini_encoders import save_mini_clip, train_clip_tokenizer


def vit_b16() -> str:
    folder = CACHE / "clip-vit-b16-arch"
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        texts = [i.text for i in read_dataset("manifest", corpus_dir(), "train")]
        config = CLIPConfig(vision_config={"patch_size": 16})  # openai/clip-vit-base-patch16's architecture
        save_mini_clip(folder, train_clip_tokenizer(texts, 2000), config)
    return str(folder)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    hubert, b32 = base_encoders()
    b16 = vit_b16()
    waves = torch.randn(args.batch, int(16000 * args.seconds)) * 0.1
    lengths = torch.full((args.batch,), waves.shape[1])
    rows = []
    for clip_name, clip in (("ViT-B/32", b32), ("ViT-B/16", b16)):
        for variant in ("parallel", "cascaded", "hybrid"):
            model = SpeechCLIP(SpeechCLIPConfig(upstream=hubert, clip=clip, variant=variant)).eval()
            counts = model.parameter_counts()
            with torch.no_grad():
                model(waves, lengths)  # warm-up
                started = time.perf_counter()
                model(waves, lengths)
                seconds = time.perf_counter() - started
            rows.append((f"HuBERT Base + {clip_name}", variant, f"{counts['trainable']:,}", f"{counts['frozen']:,}",
                         f"{seconds:.2f}"))
    print(f"parameters and one forward pass (batch {args.batch} x {args.seconds:.0f} s, no grad, "
          f"{torch.get_num_threads()} threads)")
    print(table(rows, ("encoders", "variant", "trainable", "frozen", "forward s")))


if __name__ == "__main__":
    main()
