"""The demo's pre-training steps on CPU: fp32 vs bf16 autocast, default (SDPA) vs eager attention.

One forward + backward of the demo's mini HuBERT (its own masked-prediction step, 16 random 2 s windows)
and of the mini CLIP (a batch of 128 pairs), at the demo's sizes and random weights. The four settings
are timed in interleaved rounds (median), so their ratios come from the same minutes of the same machine.
Usage: python benchmarks/pretrain_step.py [--rounds 3] [--steps 4]
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModel

from common import table, timed
from speechclip.pretrain.mini_clip import MiniCLIPSpec, clip_config
from speechclip.pretrain.mini_hubert import MiniHubertSpec, _step, hubert_config
from speechclip.pretrain.precision import cpu_autocast, cpu_has_fast_bf16

SETTINGS = (("fp32", "sdpa"), ("fp32", "eager"), ("bf16", "sdpa"), ("bf16", "eager"))


def hubert_step(attention: str, bf16: bool):
    spec = MiniHubertSpec()
    config = hubert_config(spec)
    torch.manual_seed(0)
    model = AutoModel.from_config(config, attn_implementation=attention).train()
    head = torch.nn.Linear(spec.width, spec.clusters)
    waves = [torch.randn(48000) * 0.1 for _ in range(64)]
    labels = [torch.randint(0, spec.clusters, ((48000 - 400) // 320 + 1,)) for _ in range(64)]
    generator = torch.Generator().manual_seed(0)

    def step():
        with cpu_autocast(bf16):
            loss, _ = _step(model, head, waves, labels, spec, generator)
        loss.backward()

    return step


def clip_step(attention: str, bf16: bool):
    spec = MiniCLIPSpec()
    config = clip_config(spec, spec.vocab_size)
    torch.manual_seed(0)
    model = AutoModel.from_config(config, attn_implementation=attention).train()
    ids = torch.randint(2, spec.vocab_size, (spec.batch_size, spec.max_tokens))
    mask = torch.ones_like(ids)
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
    args = parser.parse_args()
    steps = {(model, precision, attention): build(attention, precision == "bf16")
             for model, build in (("mini HuBERT", hubert_step), ("mini CLIP", clip_step))
             for precision, attention in SETTINGS}
    times = {key: [] for key in steps}
    for _ in range(args.rounds):
        for key, step in steps.items():
            times[key].append(timed(step, args.steps))
    rows = []
    for model in ("mini HuBERT", "mini CLIP"):
        base = sorted(times[(model, "fp32", "sdpa")])[args.rounds // 2]
        for precision, attention in SETTINGS:
            median = sorted(times[(model, precision, attention)])[args.rounds // 2]
            rows.append((model, precision, attention, f"{1000 * median:.0f}", f"{base / median:.2f}x"))
    print(f"pre-training step (forward + backward) at the demo's sizes, {torch.get_num_threads()} threads, "
          f"CPU bf16 units: {cpu_has_fast_bf16()}")
    print(table(rows, ("model", "precision", "attention", "ms/step", "speed-up vs fp32 sdpa")))


if __name__ == "__main__":
    main()
