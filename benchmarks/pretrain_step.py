"""The demo's pre-training steps on CPU: the previous and the current designs, fp32 vs bf16 autocast,
SDPA vs eager attention.

One forward + backward of the mini HuBERT's masked-prediction step (16 random 2 s windows) and of the mini
CLIP (a batch of 128 pairs of the demo's captions), at the demo's sizes and random weights:
  mini HuBERT, previous: HuBERT's 320x conv stack (10-sample first kernel at stride 5) with a LayerNorm in
    every conv layer (stop 11's demo);
  mini HuBERT, now: 640x (25 Hz frames), a 20-sample first kernel at stride 10, GroupNorm in the first conv
    layer only (HuBERT Base's design);
  mini CLIP, previous: captions padded to 32 tokens; now: each batch cut to its longest caption (exact).
Settings are timed in interleaved rounds (median), so their ratios come from the same minutes of the same
machine. bf16 rows only where the CPU has bf16 units (elsewhere autocast emulates bf16, slower than fp32).
Usage: python benchmarks/pretrain_step.py [--rounds 3] [--steps 4] [--threads N]
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModel

from common import table, timed
from speechclip.mini_encoders import train_clip_tokenizer
from speechclip.pretrain.mini_clip import MiniCLIPSpec, _trimmed, clip_config
from speechclip.pretrain.mini_hubert import MiniHubertSpec, _step, hubert_config, without_waveform_gradient
from speechclip.pretrain.precision import cpu_autocast, cpu_has_fast_bf16

PREVIOUS_HUBERT = dict(conv_dims=(32, 32, 64, 64, 128, 128, 128), conv_kernels=(10, 3, 3, 3, 3, 2, 2),
                       conv_strides=(5, 2, 2, 2, 2, 2, 2), conv_norm="layer")
CAPTIONS = ["a big red circle on the left", "three small blue squares in the middle of the picture",
            "there is a purple star next to a green triangle", "a drawing of a cat", "two yellow rings at the top"]


def hubert_step(attention: str, bf16: bool, previous: bool = False, waveform_gradient: bool = False):
    spec = MiniHubertSpec(**PREVIOUS_HUBERT) if previous else MiniHubertSpec()
    torch.manual_seed(0)
    model = AutoModel.from_config(hubert_config(spec), attn_implementation=attention).train()
    if not (previous or waveform_gradient):
        without_waveform_gradient(model)
    head = torch.nn.Linear(spec.width, spec.clusters)
    waves = torch.randn(spec.batch_size, spec.crop_samples) * 0.1
    targets = torch.randint(0, spec.clusters, (spec.batch_size, spec.frames(spec.crop_samples)))

    def step():
        with cpu_autocast(bf16):
            loss, _ = _step(model, head, waves, targets, spec)
        loss.backward()

    return step


def clip_step(attention: str, bf16: bool, previous: bool = False):
    spec = MiniCLIPSpec()
    torch.manual_seed(0)
    tokenizer = train_clip_tokenizer(CAPTIONS * 20, vocab_size=300)
    model = AutoModel.from_config(clip_config(spec, len(tokenizer)), attn_implementation=attention).train()
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(spec.batch_size)]
    tokens = tokenizer(captions, padding="max_length", max_length=spec.max_tokens, return_tensors="pt")
    ids, mask = (tokens["input_ids"], tokens["attention_mask"]) if previous else _trimmed(tokens["input_ids"], tokens["attention_mask"])
    pixels = torch.randn(spec.batch_size, 3, spec.image_size, spec.image_size)

    def step():
        with cpu_autocast(bf16):
            loss = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, return_loss=True).loss
        loss.backward()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per setting per round")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = [("fp32", "sdpa"), ("fp32", "eager")] + ([("bf16", "eager")] if cpu_has_fast_bf16() else [])
    models = [("mini HuBERT", "previous (320x, LayerNorm conv)", hubert_step, True),
              ("mini HuBERT", "640x, GroupNorm, waveform gradient", lambda a, b, _: hubert_step(a, b, waveform_gradient=True), False),
              ("mini HuBERT", "now (640x, GroupNorm)", hubert_step, False),
              ("mini CLIP", "previous (padded to 32)", clip_step, True), ("mini CLIP", "now (trimmed)", clip_step, False)]
    steps = {(model, design, precision, attention): build(attention, precision == "bf16", previous)
             for model, design, build, previous in models for precision, attention in settings}
    times = {key: [] for key in steps}
    for _ in range(args.rounds):
        for key, step in steps.items():
            times[key].append(timed(step, args.steps))
    median = {key: sorted(values)[args.rounds // 2] for key, values in times.items()}
    rows = []
    for model, design, _, _ in models:
        base = median[next(k for k in steps if k[0] == model and k[1].startswith("previous") and k[2:] == ("fp32", "sdpa"))]
        for precision, attention in settings:
            seconds = median[(model, design, precision, attention)]
            rows.append((model, design, precision, attention, f"{1000 * seconds:.0f}", f"{base / seconds:.2f}x"))
    print(f"pre-training step (forward + backward) at the demo's sizes, {args.threads} threads, CPU bf16 units: {cpu_has_fast_bf16()}")
    print(table(rows, ("model", "design", "precision", "attention", "ms/step", "speed-up vs previous fp32 sdpa")))


if __name__ == "__main__":
    main()
