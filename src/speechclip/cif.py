"""Continuous integrate-and-fire (CIF), SpeechCLIP+'s keyword segmenter: a weight in [0, 1] per frame,
accumulated along time; each time the sum crosses a multiple of the threshold a keyword "fires", and that
keyword is the weighted sum of the frames that filled it. So the number of keywords follows the speech.

Facts from SpeechCLIP+ (`avssl/module/cif.py`, `kw_branches.py`, configs), rebuilt here:
- weights: Conv1d(D, D, w, same padding) -> Dropout -> ReLU (x layers) -> Dropout -> Linear(D, 1) -> sigmoid;
- keywords = floor(sum of weights / threshold), at least 1, at most 75;
- training: the target length is round(frames / 20); for the first `scaling_steps` steps the weights are
  scaled to sum to it; the leftover tail is dropped; the quantity loss is |sum of weights - target| (L1);
- inference: a leftover tail of at least 0.5 fires one more keyword, scaled up to a full one.
Padded frames are zeroed before the convolution, so a clip gives the same keywords alone or in a batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import CIFConfig
from .dropout import Dropout

SCALING_EPS = 1e-5  # reference: the scaled weights sum to threshold * target + 1e-5


@dataclass
class Fired:
    keywords: torch.Tensor  # (B, N, D) fired keyword vectors; rows past `lengths` are padding
    lengths: torch.Tensor  # (B,) keywords per utterance
    weight_sum: torch.Tensor  # (B,) sum of the unscaled frame weights (the quantity the loss compares)


def integrate_and_fire(frames: torch.Tensor, weights: torch.Tensor, threshold: float, max_keywords: int,
                       tail_threshold: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, D) frames and (B, S) weights -> (B, N, D) keywords and (B,) lengths.

    Keyword j collects, from each frame, the part of the frame's weight that falls in [j, j+1) * threshold
    of the running sum; the slot after the last full keyword collects everything beyond it (the tail).
    `tail_threshold` None (training) drops the tail; otherwise a tail >= it fires one more keyword, scaled
    to a full threshold's weight, and positions past each utterance's length are zeroed.
    """
    lengths = (weights.sum(1) / threshold).floor().clamp(1, max_keywords).long()
    slots = int(lengths.max())
    end = weights.cumsum(1)
    start = torch.cat([end.new_zeros(end.shape[0], 1), end[:, :-1]], dim=1)
    low = torch.arange(slots + 1, device=frames.device, dtype=end.dtype) * threshold
    high = torch.cat([low[1:], low.new_full((1,), float("inf"))])
    share = (torch.minimum(end[..., None], high) - torch.maximum(start[..., None], low)).clamp(min=0)  # (B, S, N+1)
    keywords = torch.einsum("bsn,bsd->bnd", share.to(frames.dtype), frames)
    if tail_threshold is None:
        return keywords[:, :slots], lengths
    rows = torch.arange(len(lengths), device=frames.device)
    tail = share.sum(1)[rows, lengths]  # (B,) weight left after each utterance's last full keyword
    extend = tail >= tail_threshold
    scale = torch.where(extend, threshold / tail.clamp(min=1e-12), torch.ones_like(tail)).to(keywords.dtype)
    keywords[rows, lengths] = keywords[rows, lengths] * scale[:, None]
    lengths = (lengths + extend.long()).clamp(max=max_keywords)
    keywords = keywords[:, : int(lengths.max())]
    past = torch.arange(keywords.shape[1], device=frames.device)[None, :] >= lengths[:, None]
    return keywords.masked_fill(past[..., None], 0.0), lengths


class ContinuousIntegrateAndFire(nn.Module):
    def __init__(self, width: int, config: CIFConfig):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        for _ in range(config.conv_layers):
            layers += [nn.Conv1d(width, width, config.conv_width, padding=config.conv_width // 2),
                       Dropout(config.dropout), nn.ReLU()]
        self.conv = nn.Sequential(*layers)
        self.weight_proj = nn.Sequential(Dropout(config.dropout), nn.Linear(width, 1), nn.Sigmoid())

    def frame_weights(self, frames: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """(B, S, D) frames, (B, S) valid mask -> (B, S) float32 weights in [0, 1], zero on padding."""
        frames = frames.masked_fill(~frame_mask[..., None], 0.0)
        hidden = self.conv(frames.transpose(1, 2)).transpose(1, 2)
        weights = self.weight_proj(hidden).squeeze(-1).float().clamp(0.0, 1.0)
        return weights.masked_fill(~frame_mask, 0.0)

    def target_lengths(self, frame_mask: torch.Tensor) -> torch.Tensor:
        """Training target: round(frames / frames_per_keyword) keywords (2.5 per second at 50 frames/s)."""
        return (frame_mask.sum(1) / self.config.frames_per_keyword).round().long()

    def forward(self, frames: torch.Tensor, frame_mask: torch.Tensor, step: int = 0) -> Fired:
        """Training (module in train mode): keywords towards the target length, tail dropped.
        Inference: the weights as they are, tail fired when large enough."""
        weights = self.frame_weights(frames, frame_mask)
        weight_sum = weights.sum(1)
        config = self.config
        if self.training:
            scaling = config.scaling_steps < 0 or step < config.scaling_steps
            if scaling:
                target = config.threshold * self.target_lengths(frame_mask).to(weights.dtype) + SCALING_EPS
                weights = weights * (target / weight_sum.clamp(min=1e-12))[:, None]
            keywords, lengths = integrate_and_fire(frames, weights, config.threshold, config.max_keywords, None)
        else:
            keywords, lengths = integrate_and_fire(frames, weights, config.threshold, config.max_keywords, config.tail_threshold)
        return Fired(keywords, lengths, weight_sum)

    def quantity_loss(self, fired: Fired, frame_mask: torch.Tensor) -> torch.Tensor:
        """Mean |sum of weights - target length| (reference: L1Loss), unweighted."""
        return (fired.weight_sum - self.target_lengths(frame_mask).to(fired.weight_sum.dtype)).abs().mean()
