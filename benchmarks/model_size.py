"""Trainable vs frozen parameters of the base configurations, and the forward time of one batch; then the
trainable parameters of all five variants at Base size beside the released checkpoints' own layout.

HuBERT Base + CLIP ViT-B/32 (DESIGN's base) and + ViT-B/16 (the issue's wording), random weights. Our models
use the head settings of configs/flickr8k_<variant>_base.yaml; the reference count sums the trainable tensors
of the same heads built in the official module layout (tests/official_checkpoints.py: the names and shapes
atosystem/SpeechCLIP and ShampooWang/SpeechCLIP_plus save), so a mismatch would show a head built otherwise.
Usage: python benchmarks/model_size.py [--batch 8] [--seconds 4]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import CLIPConfig

import sys
from pathlib import Path

from common import CACHE, base_encoders, corpus_dir, table
from speechclip import SpeechCLIP, SpeechCLIPConfig
from speechclip.train.config import load_run_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.official_checkpoints import Case, Sizes, official_heads  # noqa: E402

VARIANTS = ("parallel", "cascaded", "hybrid", "cascaded_plus", "hybrid_plus")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# released Base heads: SpeechCLIP parallel/cascaded (fixed temperature), SpeechCLIP+ Base (trainable temperature)
OFFICIAL_BASE = {"parallel": Case("p", "parallel"), "cascaded": Case("c", "cascaded"), "hybrid": Case("h", "hybrid"),
                 "cascaded_plus": Case("c+", "cascaded_plus"), "hybrid_plus": Case("h+", "hybrid_plus", heads=8)}
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
        for variant in VARIANTS:
            model = SpeechCLIP(base_config(variant, hubert, clip)).eval()
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
    print()
    print(variant_table(hubert, b32))


def base_config(variant: str, hubert: str, clip: str) -> SpeechCLIPConfig:
    """The model section of configs/flickr8k_<variant>_base.yaml on the given encoder folders."""
    model = load_run_config(CONFIGS / f"flickr8k_{variant}_base.yaml").model
    model.upstream, model.clip = hubert, clip
    return model


def official_trainable(variant: str) -> int:
    """Trainable numbers of the released layout: every head tensor but BatchNorm statistics and the fixed VQ
    temperature, + the weighted sum, + SpeechCLIP+'s trainable contrastive temperature."""
    heads = official_heads(OFFICIAL_BASE[variant], Sizes(width=768, clip_width=512, keywords=8, ffn=3072, layers=12))
    fixed = ("running_mean", "running_var", "num_batches_tracked", "curr_temp")
    count = sum(t.numel() for k, t in heads.items() if not k.endswith(fixed))
    return count + (1 if variant not in ("parallel", "cascaded") else 0)  # Base SpeechCLIP+: temperature_trainable


def variant_table(hubert: str, clip: str) -> str:
    rows = []
    for variant in VARIANTS:
        ours = SpeechCLIP(base_config(variant, hubert, clip)).parameter_counts()["trainable"]
        reference = official_trainable(variant)
        rows.append((variant, f"{ours:,}", f"{reference:,}", "same" if ours == reference else f"{ours - reference:+,}"))
    return ("trainable parameters at Base size (HuBERT Base + ViT-B/32, K = 8), configs/flickr8k_<variant>_base.yaml\n"
            + table(rows, ("variant", "speechclip", "released layout", "difference")))


if __name__ == "__main__":
    main()
