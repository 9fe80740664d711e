"""Pre-train a mini CLIP (HF `CLIPModel` + a CLIP-format BPE tokenizer) on image-caption pairs.

Used by the offline demo in place of `openai/clip-vit-base-patch32`: the same classes, the same
folder format, trained contrastively (CLIP's own loss) on the corpus's training pairs only.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm
from transformers import AutoModel, CLIPConfig

from ..images import load_image
from ..mini_encoders import mini_clip_config, mini_image_processor, save_mini_clip, train_clip_tokenizer
from .precision import attention_kernel, cpu_autocast, cpu_has_fast_bf16


@dataclass
class MiniCLIPSpec:
    vocab_size: int = 1000
    width: int = 128
    layers: int = 3
    heads: int = 4
    image_size: int = 64
    patch_size: int = 8
    projection_dim: int = 128
    max_tokens: int = 32
    steps: int = 350
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    bf16: bool = True  # bf16 autocast where the CPU computes bf16 natively (precision.py)
    seed: int = 0


def clip_config(spec: MiniCLIPSpec, vocab_size: int) -> CLIPConfig:
    """The mini CLIP's architecture for a tokenizer of `vocab_size` entries."""
    return mini_clip_config(vocab_size, spec.width, spec.layers, spec.heads, spec.image_size, spec.patch_size,
                            spec.projection_dim, spec.max_tokens)


def _pixels(paths: Sequence[Path], image_size: int, batch: int = 256) -> torch.Tensor:
    """All images once, preprocessed exactly as the saved folder's image processor will at inference."""
    processor = mini_image_processor(image_size)
    chunks = [processor(images=[load_image(p) for p in paths[s : s + batch]], return_tensors="pt")["pixel_values"]
              for s in range(0, len(paths), batch)]
    return torch.cat(chunks)


def pretrain_mini_clip(pairs: Sequence[tuple[Path, str]], out: str | Path, spec: MiniCLIPSpec = MiniCLIPSpec(),
                       progress: bool = True) -> dict:
    """pairs: (image path, caption) training pairs. Writes a CLIP folder to `out`; returns a log."""
    torch.manual_seed(spec.seed)
    started = time.perf_counter()
    captions = [c for _, c in pairs]
    tokenizer = train_clip_tokenizer(captions, spec.vocab_size)
    config = clip_config(spec, len(tokenizer))
    bf16 = spec.bf16 and cpu_has_fast_bf16()
    model = AutoModel.from_config(config, attn_implementation=attention_kernel(bf16)).train()
    images = sorted({p for p, _ in pairs})
    row = {p: i for i, p in enumerate(images)}
    pixels = _pixels(images, spec.image_size)
    tokens = tokenizer(captions, padding="max_length", truncation=True, max_length=spec.max_tokens, return_tensors="pt")
    image_of = torch.tensor([row[p] for p, _ in pairs])
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    warmup = max(1, spec.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / spec.steps))))
    generator = torch.Generator().manual_seed(spec.seed)
    losses = []
    for step in tqdm(range(spec.steps), desc="mini CLIP", disable=not progress, unit="step"):
        batch = _distinct_image_batch(image_of, spec.batch_size, generator)
        ids, mask = _trimmed(tokens["input_ids"][batch], tokens["attention_mask"][batch])
        with cpu_autocast(bf16):
            output = model(input_ids=ids, attention_mask=mask, pixel_values=pixels[image_of[batch]], return_loss=True)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(float(output.loss.detach()))
    save_mini_clip(out, tokenizer, config, model.eval())
    return {"steps": spec.steps, "loss_first": losses[0], "loss_last": sum(losses[-20:]) / min(20, len(losses)),
            "bf16": bf16, "losses": losses, "seconds": round(time.perf_counter() - started, 1), "pairs": len(pairs), "images": len(images)}


def _trimmed(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the padding columns no caption of the batch reaches. Exact: the text tower is causal and reads
    its feature at the first EOS, so no kept position ever attends to a dropped one; the demo's captions
    fill a third of the 32 positions, and the text tower's step shrinks with them."""
    width = int(mask.sum(1).max())
    return ids[:, :width], mask[:, :width]


def _distinct_image_batch(image_of: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Random pairs with no image twice (CLIP's loss treats every other pair as a negative)."""
    order = torch.randperm(len(image_of), generator=generator)
    _, first = torch.unique(image_of[order], return_inverse=True)
    seen, picked = set(), []
    for index, image in zip(order.tolist(), first.tolist()):
        if image not in seen:
            seen.add(image)
            picked.append(index)
            if len(picked) == size:
                break
    return torch.tensor(picked)
