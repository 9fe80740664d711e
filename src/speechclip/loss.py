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


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every process's gradient for the local rows (all_reduce) and
    returns this process's slice, as Lightning's `all_gather(sync_grads=True)` does."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
        ctx.rank, ctx.rows = rank, tensor.shape[0]
        gathered = [torch.zeros_like(tensor) for _ in range(world_size)]
        dist.all_gather(gathered, tensor.contiguous())
        return torch.cat(gathered)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None, None


def gather_batch(tensor: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """All-gather (B, ...) from every process into (world_size * B, ...), rank order. Equal B assumed.

    Every process computes the same loss over the global batch; a row's gradient is then the sum of
    what every process's loss sends it (all_reduce in backward), so after DDP averages the parameter
    gradients over processes they equal the single-process gradient of the loss over the whole batch.
    (Keeping only the local slice's graph, without that sum, gives 1/world_size of it.)"""
    if world_size == 1:
        return tensor
    if tensor.requires_grad:
        return _GatherWithGrad.apply(tensor, rank, world_size)
    gathered = [torch.zeros_like(tensor) for _ in range(world_size)]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered)
