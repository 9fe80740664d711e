"""The keyword path of the cascaded branches: keyword vectors -> projection to CLIP's token width ->
BatchNorm -> vector quantization onto CLIP's subword table -> CLIP's frozen text tower."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import projection
from .clip import FrozenCLIP
from .config import CascadedConfig
from .outputs import KeywordOutput


class KeywordNorm(nn.Module):
    """BatchNorm of the keyword vectors, started on the keyword vocabulary's own scale: gamma = the per-dim
    std and beta = the per-dim mean of its CLIP token embeddings (reference init).

    Fixed K (cascaded, hybrid): ONE BatchNorm over K*D channels in the reference's channel order d*K + k
    (its `eachKw` + `parallel`), so each keyword slot keeps its own statistics. (The reference tiles its
    initial values in the order k*D + d; here each channel starts at its own dimension's value.)
    Variable count (CIF): one BatchNorm over D shared by every keyword position (reference
    `Kw_BatchNorm_dynamic`, which also counts the padded positions of a batch in its statistics).
    """

    def __init__(self, table: torch.Tensor, keywords: int | None):
        super().__init__()
        self.keywords = keywords
        slots = keywords or 1
        self.norm = nn.BatchNorm1d(table.shape[1] * slots)
        with torch.no_grad():
            self.norm.weight.copy_(table.std(0).repeat_interleave(slots))
            self.norm.bias.copy_(table.mean(0).repeat_interleave(slots))

    def forward(self, keywords: torch.Tensor) -> torch.Tensor:
        """(B, K, D) -> (B, K, D)."""
        batch, slots, dim = keywords.shape
        if self.keywords is None:
            return self.norm(keywords.transpose(1, 2)).transpose(1, 2)
        flat = keywords.transpose(1, 2).reshape(batch, dim * slots)  # channel d*K + k
        return self.norm(flat).reshape(batch, dim, slots).transpose(1, 2)


class KeywordQuantizer(nn.Module):
    """Cosine-similarity vector quantization onto a subset of CLIP's subword embeddings.

    The forward value is exactly the chosen subword's embedding; in training the gradient follows the
    softmax mixture at the temperature (straight-through, reference `SimpleVectorQuantizer`). With
    hard=False training uses the soft mixture itself; inference always picks the nearest subword.
    """

    def __init__(self, vocab_ids: torch.Tensor, temperature: float, hard: bool):
        super().__init__()
        self.register_buffer("vocab_ids", vocab_ids.long(), persistent=False)
        self.temperature = temperature
        self.hard = hard

    def forward(self, keywords: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, K, D_tok) keywords, (V, D_tok) full CLIP table -> quantized (B, K, D_tok), ids (B, K), cosine (B, K, V')."""
        vocab = table[self.vocab_ids]
        # products of (B*K, D) rows, not batched: (B, K, D) @ (D, V) with a gradient became a batched product
        # over B copies of the table (3.5 of the quantizer's 5.8 ms in the demo's step)
        cosine = _rows(F.normalize(keywords, dim=-1), F.normalize(vocab, dim=-1).T.to(keywords.dtype))
        choice = cosine.argmax(-1)
        chosen = vocab[choice]
        if not (self.training and torch.is_grad_enabled()):
            return chosen, self.vocab_ids[choice], cosine
        mixture = _rows((cosine / self.temperature).softmax(-1).to(vocab.dtype), vocab)
        quantized = chosen + (mixture - mixture.detach()) if self.hard else mixture
        return quantized, self.vocab_ids[choice], cosine


def _rows(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """(..., N) @ (N, M) as one 2-D product over the flattened leading dims."""
    return (left.reshape(-1, left.shape[-1]) @ right).reshape(*left.shape[:-1], right.shape[-1])


class KeywordHead(nn.Module):
    """Keyword states (B, K, D) -> projection to CLIP's token width -> KeywordNorm -> VQ -> frozen CLIP text
    tower (BOS k_1..k_n EOS) -> (B, D_clip). `keywords` = K for a fixed count, None for CIF."""

    def __init__(self, width: int, clip: FrozenCLIP, config: CascadedConfig, vocab_ids: torch.Tensor, keywords: int | None):
        super().__init__()
        table = clip.token_embedding.detach()[vocab_ids]
        self.projection = projection(width, table.shape[1], config.projection_hidden, config.projection_dropout)
        self.norm = KeywordNorm(table, keywords)
        self.quantizer = KeywordQuantizer(vocab_ids, config.vq_temperature, config.hard)

    def forward(self, states: torch.Tensor, clip: FrozenCLIP, lengths: torch.Tensor | None = None) -> KeywordOutput:
        keywords = self.norm(self.projection(states))
        quantized, token_ids, cosine = self.quantizer(keywords, clip.token_embedding)
        return KeywordOutput(clip.text_features_from_embeddings(quantized, lengths), token_ids, cosine, lengths)
