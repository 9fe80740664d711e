"""Shared set-up for the benchmarks: base-architecture encoders (random weights: no hub here) and a corpus."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from transformers import CLIPConfig, HubertConfig

from speechclip.data import read_dataset
from speechclip.data.synthetic import CorpusSpec, build_corpus
from speechclip.demo.spec import DemoSpec
from speechclip.mini_encoders import save_mini_clip, save_mini_speech, train_clip_tokenizer
from speechclip.quiet import quiet_libraries

quiet_libraries()  # the CLI's own set-up: no HF bars, no Lightning tips, tokenizers without a thread pool
CACHE = Path(os.environ.get("SPEECHCLIP_BENCH_CACHE", ".cache/bench"))


def base_encoders() -> tuple[str, str]:
    """HuBERT Base and CLIP ViT-B/32 architectures (the paper's base model), random weights, HF folders."""
    hubert, clip = CACHE / "hubert-base-arch", CACHE / "clip-vit-b32-arch"
    if not (hubert / "config.json").is_file():
        torch.manual_seed(0)
        save_mini_speech(hubert, HubertConfig())  # defaults = facebook/hubert-base-ls960's architecture
    if not (clip / "config.json").is_file():
        torch.manual_seed(0)
        corpus = read_dataset("manifest", corpus_dir(), "train")
        tokenizer = train_clip_tokenizer([i.text for i in corpus], vocab_size=2000)
        save_mini_clip(clip, tokenizer, CLIPConfig())  # defaults = openai/clip-vit-base-patch32's architecture
    return str(hubert), str(clip)


def demo_build_spec(run: Path) -> DemoSpec:
    """The DemoSpec a finished `speechclip demo` build was made with, its `--seed` draw and its arithmetic
    (`--fp32`) read back from the mini HuBERT's marker (pretrain.json), so a variant trains the same draw."""
    built = json.loads((run / "encoders" / "hubert" / "pretrain.json").read_text())["spec"]
    spec = DemoSpec().seeded(built["seed"] - DemoSpec().hubert.seed)
    return spec if built.get("bf16", True) else spec.in_fp32()


def corpus_dir() -> str:
    """A small offline corpus (the demo's generator), built once."""
    folder = CACHE / "corpus"
    build_corpus(folder, CorpusSpec(num_scenes=240, num_clipart=40, val_images=20, test_images=40), progress=False)
    return str(folder)


def timed(function, repeats: int, warmup: int = 1) -> float:
    """Median seconds of `function()` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def table(rows: list[tuple], header: tuple) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    line = lambda r: "| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])
