"""Dropout for the trainable heads: nn.Dropout's contract with a cheaper mask on CPU.

Why: ATen's CPU `bernoulli_` calls the random generator once per element. In a demo head step on two threads
it took a quarter of the step's CPU time (RESULTS.md, stop 31), 41-42 ms for one 128 x 96 x 512 mask;
drawing a quarter as many 64-bit words and comparing their 16-bit shares takes 15-18 ms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_LANE_BITS = 15  # of each 16-bit share of a random word: `random_()` on int64 draws from [0, 2^63)
_LANES = 1 << _LANE_BITS


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout(x, p, training) with the cheaper mask on CPU (see Dropout); other devices use F.dropout."""
    if not training or p == 0.0 or x.device.type != "cpu":
        return F.dropout(x, p, training)
    threshold = round(p * _LANES)
    if threshold >= _LANES:  # nothing can be kept (and an int16 comparison with 2^15 would wrap)
        return x * 0.0
    words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_()
    shares = words.view(torch.int16)[: x.numel()].view(x.shape)
    keep = (shares & (_LANES - 1)) >= threshold
    # the mask in x's dtype: a bool operand takes a slow mixed-type path (21 ms against 5 ms here)
    return x * keep.to(x.dtype).mul_(1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """nn.Dropout (zero with probability p, scale the rest by 1 / (1 - p)); on CPU an element is kept when 15
    bits of its share of a random 64-bit word are at least t = round(p * 2^15), so the drop probability is
    t / 2^15 (p = 0.1 -> 0.100006: the expected value is 7e-6 low, far below the noise dropout adds; the scale
    stays F.dropout's, as the demo's figures were measured). Other devices use F.dropout. No parameters: a module
    built with it saves and loads as with nn.Dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_dropout(x, self.p, self.training)
