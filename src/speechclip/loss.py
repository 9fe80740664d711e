"""Symmetric InfoNCE between speech and image embeddings, with negatives gathered across processes."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def contrastive_loss(
    speech: torch.Tensor,
    image: torch.Tensor,
    logit_scale: torch.Tensor,
    image_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of speech->image and image->speech cross-entropy over a (B, B) similarity matrix.

    speech, image: (B, D) paired rows (need not be normalised). logit_scale: scalar, already exp()'d.
    image_ids: (B,) ids; two captions of the same image are not treated as negatives of each other
    (their off-diagonal logits are masked out), which matters with 5 captions per image.
    """
    speech = F.normalize(speech.float(), dim=-1)
    image = F.normalize(image.float(), dim=-1)
    logits = logit_scale * speech @ image.T
    if image_ids is not None:
        same = image_ids[:, None] == image_ids[None, :]
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    targets = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def gather_batch(tensor: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """All-gather (B, ...) from every process into (world_size * B, ...), keeping the local slice's graph
    so each process back-propagates through its own rows (open_clip's local-loss trick). Equal B assumed."""
    if world_size == 1:
        return tensor
    gathered = [torch.zeros_like(tensor) for _ in range(world_size)]
    dist.all_gather(gathered, tensor.contiguous())
    gathered[rank] = tensor
    return torch.cat(gathered)
