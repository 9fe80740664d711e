"""The trainable heads over the weighted upstream frames, one per variant (DESIGN §1; SpeechCLIP+ for the
hybrids and CIF). Each takes (B, T, D) frames and a (B, T) valid mask and returns a `SpeechOutput`.

- parallel: [CLS] + frames -> Transformer encoder + final LayerNorm -> CLS -> projection to CLIP space.
- cascaded: K [CLS_k] + frames -> one attention layer -> K keywords -> `KeywordHead` (VQ + CLIP text).
- hybrid: [CLS_p, CLS_1..K] + frames -> ONE shared attention layer built from the cascaded settings;
  CLS_p -> the parallel projection, CLS_1..K -> the keyword path (SpeechCLIP+ `KW_HybridBranch`).
- cascaded_plus: frames -> the attention layer -> CIF fires a variable number of keywords -> keyword path.
- hybrid_plus: [CLS] + frames -> the shared attention layer; CLS -> parallel projection, frames -> CIF.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import AttentionLayer, EncoderStack, prepend, projection
from .cif import ContinuousIntegrateAndFire
from .clip import FrozenCLIP
from .config import CascadedConfig, SpeechCLIPConfig
from .keywords import KeywordHead
from .outputs import SpeechOutput


def _cls(count: int, width: int) -> nn.Parameter:
    """Learnable query tokens, drawn from N(0, 1) as the reference's `torch.randn`."""
    return nn.Parameter(torch.randn(count, width))


def keyword_attention(width: int, config: CascadedConfig) -> nn.Module:
    """The cascaded settings' attention layer: attention + LayerNorm (reference) or a Transformer layer."""
    if config.attention == "transformer":
        return EncoderStack(width, config.num_layers, config.num_heads, config.ffn_dim, config.dropout, final_norm=True)
    return AttentionLayer(width, config.num_heads, config.dropout)


class ParallelBranch(nn.Module):
    def __init__(self, width: int, clip: FrozenCLIP, config: SpeechCLIPConfig, vocab_ids: torch.Tensor | None = None):
        super().__init__()
        p = config.parallel
        self.cls = _cls(1, width)
        self.encoder = EncoderStack(width, p.num_layers, p.num_heads, p.ffn_dim, p.dropout, p.final_norm)
        self.projection = projection(width, clip.embed_dim, p.projection_hidden, p.projection_dropout)

    def forward(self, frames: torch.Tensor, frame_mask: torch.Tensor, clip: FrozenCLIP, step: int = 0) -> SpeechOutput:
        sequence, padding = prepend(self.cls, frames, frame_mask)
        return SpeechOutput(self.projection(self.encoder(sequence, padding, queries=1)[:, 0]), None)


class CascadedBranch(nn.Module):
    def __init__(self, width: int, clip: FrozenCLIP, config: SpeechCLIPConfig, vocab_ids: torch.Tensor):
        super().__init__()
        c = config.cascaded
        self.cls = _cls(c.num_keywords, width)
        self.attention = keyword_attention(width, c)
        self.keywords = KeywordHead(width, clip, c, vocab_ids, keywords=c.num_keywords)

    def forward(self, frames: torch.Tensor, frame_mask: torch.Tensor, clip: FrozenCLIP, step: int = 0) -> SpeechOutput:
        sequence, padding = prepend(self.cls, frames, frame_mask)
        states = self.attention(sequence, padding, queries=self.cls.shape[0])
        return SpeechOutput(None, self.keywords(states, clip))


class HybridBranch(nn.Module):
    def __init__(self, width: int, clip: FrozenCLIP, config: SpeechCLIPConfig, vocab_ids: torch.Tensor):
        super().__init__()
        c, p = config.cascaded, config.parallel
        self.parallel_cls = _cls(1, width)
        self.cascaded_cls = _cls(c.num_keywords, width)
        self.attention = keyword_attention(width, c)
        self.projection = projection(width, clip.embed_dim, p.projection_hidden, p.projection_dropout)
        self.keywords = KeywordHead(width, clip, c, vocab_ids, keywords=c.num_keywords)

    def forward(self, frames: torch.Tensor, frame_mask: torch.Tensor, clip: FrozenCLIP, step: int = 0) -> SpeechOutput:
        queries = 1 + self.cascaded_cls.shape[0]
        sequence, padding = prepend(torch.cat([self.parallel_cls, self.cascaded_cls]), frames, frame_mask)
        states = self.attention(sequence, padding, queries=queries)
        return SpeechOutput(self.projection(states[:, 0]), self.keywords(states[:, 1:queries], clip))


class CascadedPlusBranch(nn.Module):
    def __init__(self, width: int, clip: FrozenCLIP, config: SpeechCLIPConfig, vocab_ids: torch.Tensor):
        super().__init__()
        self.attention = keyword_attention(width, config.cascaded)
        self.cif = ContinuousIntegrateAndFire(width, config.cif)
        self.keywords = KeywordHead(width, clip, config.cascaded, vocab_ids, keywords=None)

    def forward(self, frames: torch.Tensor, frame_mask: torch.Tensor, clip: FrozenCLIP, step: int = 0) -> SpeechOutput:
        states = self.attention(frames, ~frame_mask)
        return _fire_keywords(self, states, frame_mask, clip, step, parallel=None)


class HybridPlusBranch(nn.Module):
    def __init__(self, width: int, clip: FrozenCLIP, config: SpeechCLIPConfig, vocab_ids: torch.Tensor):
        super().__init__()
        p = config.parallel
        self.cls = _cls(1, width)
        self.attention = keyword_attention(width, config.cascaded)
        self.projection = projection(width, clip.embed_dim, p.projection_hidden, p.projection_dropout)
        self.cif = ContinuousIntegrateAndFire(width, config.cif)
        self.keywords = KeywordHead(width, clip, config.cascaded, vocab_ids, keywords=None)

    def forward(self, frames: torch.Tensor, frame_mask: torch.Tensor, clip: FrozenCLIP, step: int = 0) -> SpeechOutput:
        sequence, padding = prepend(self.cls, frames, frame_mask)
        states = self.attention(sequence, padding)
        return _fire_keywords(self, states[:, 1:], frame_mask, clip, step, parallel=self.projection(states[:, 0]))


def _fire_keywords(branch: nn.Module, states: torch.Tensor, frame_mask: torch.Tensor, clip: FrozenCLIP, step: int,
                   parallel: torch.Tensor | None) -> SpeechOutput:
    """CIF over the attended frames -> a variable number of keywords -> the keyword path; in training also
    CIF's quantity loss, weighted."""
    fired = branch.cif(states, frame_mask, step)
    output = SpeechOutput(parallel, branch.keywords(fired.keywords, clip, fired.lengths))
    if branch.training:
        output.aux_losses["quantity"] = branch.cif.config.quantity_loss_weight * branch.cif.quantity_loss(fired, frame_mask)
    return output


BRANCHES = {"parallel": ParallelBranch, "cascaded": CascadedBranch, "hybrid": HybridBranch,
            "cascaded_plus": CascadedPlusBranch, "hybrid_plus": HybridPlusBranch}
