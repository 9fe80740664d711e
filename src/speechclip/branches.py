"""The trainable heads: parallel (CLS -> CLIP space) and cascaded (K keywords quantized onto CLIP's
subword table, read by CLIP's frozen text tower), and hybrid (both, over one shared attention layer)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .clip import FrozenCLIP
from .config import CascadedConfig, ParallelConfig


@dataclass
class KeywordOutput:
    embeds: torch.Tensor  # (B, D_clip) CLIP text-tower output for the K quantized keywords
    token_ids: torch.Tensor  # (B, K) CLIP token id chosen for each keyword
    similarity: torch.Tensor  # (B, K, V') cosine similarity of each keyword to the VQ vocabulary
    lengths: torch.Tensor | None = None  # (B,) keywords per utterance (CIF variants); None = all K


def _encoder_layer(width: int, config: ParallelConfig) -> nn.TransformerEncoderLayer:
    return nn.TransformerEncoderLayer(
        d_model=width,
        nhead=config.num_heads,
        dim_feedforward=config.ffn_dim,
        dropout=config.dropout,
        activation="gelu",
        batch_first=True,
        norm_first=False,
    )


def _prepend(tokens: torch.Tensor, frames: torch.Tensor, frame_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Put learnable query tokens (N, D) before (B, T, D) frames; return the sequence and its padding mask
    (True = ignore, PyTorch's convention)."""
    batch = frames.shape[0]
    sequence = torch.cat([tokens.expand(batch, -1, -1), frames], dim=1)
    keep = torch.cat([frame_mask.new_ones(batch, tokens.shape[0]), frame_mask], dim=1)
    return sequence, ~keep


def _encode_queries(encoder: nn.TransformerEncoder, sequence: torch.Tensor, padding: torch.Tensor, queries: int) -> torch.Tensor:
    """Run `encoder` over `sequence` and return the states of its first `queries` tokens.

    Only those tokens are read out, so the last layer computes attention and FFN for them alone: the
    same values as the full layer (each token's output depends on the others only through keys and
    values), at a fraction of the cost when frames outnumber queries a hundredfold.
    """
    *lower, last = encoder.layers
    for layer in lower:
        sequence = layer(sequence, src_key_padding_mask=padding)
    query = sequence[:, :queries]

    def attend(x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        out = last.self_attn(x, memory, memory, key_padding_mask=padding, need_weights=False)[0]
        return last.dropout1(out)

    if last.norm_first:
        memory = last.norm1(sequence)
        query = query + attend(memory[:, :queries], memory)
        return query + last._ff_block(last.norm2(query))
    query = last.norm1(query + attend(query, sequence))
    return last.norm2(query + last._ff_block(query))


class ParallelBranch(nn.Module):
    """[CLS] + frames -> Transformer encoder -> CLS state -> Linear -> (B, D_clip)."""

    def __init__(self, width: int, clip_dim: int, config: ParallelConfig):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, width) * 0.02)
        self.encoder = nn.TransformerEncoder(_encoder_layer(width, config), config.num_layers, enable_nested_tensor=False)
        self.projection = nn.Linear(width, clip_dim)

    def forward(self, frames: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        sequence, padding = _prepend(self.cls, frames, frame_mask)
        return self.projection(_encode_queries(self.encoder, sequence, padding, 1)[:, 0])


class KeywordQuantizer(nn.Module):
    """Cosine-similarity vector quantization onto a subset of CLIP's subword embeddings.

    The forward value is the chosen subword's embedding (hard) while gradients follow the softmax
    mixture (straight-through), so the speech side learns to point at useful subwords.
    """

    def __init__(self, vocab_ids: torch.Tensor, temperature: float, hard: bool):
        super().__init__()
        self.register_buffer("vocab_ids", vocab_ids.long(), persistent=False)
        self.temperature = temperature
        self.hard = hard

    def forward(self, keywords: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, K, D_tok) keywords, (V, D_tok) full CLIP table -> quantized (B, K, D_tok), ids (B, K), cosine (B, K, V')."""
        vocab = table[self.vocab_ids]
        cosine = F.normalize(keywords, dim=-1) @ F.normalize(vocab, dim=-1).T
        soft = (cosine / self.temperature).softmax(-1)
        choice = cosine.argmax(-1)
        if self.hard:
            one_hot = F.one_hot(choice, vocab.shape[0]).to(soft.dtype)
            weights = one_hot - soft.detach() + soft
        else:
            weights = soft
        return weights @ vocab, self.vocab_ids[choice], cosine


class KeywordHead(nn.Module):
    """K keyword states (B, K, D) -> projection to CLIP's token width -> per-keyword BatchNorm -> VQ ->
    frozen CLIP text tower -> (B, D_clip)."""

    def __init__(self, width: int, clip: FrozenCLIP, config: CascadedConfig, vocab_ids: torch.Tensor):
        super().__init__()
        table = clip.token_embedding.detach()[vocab_ids]
        token_width = table.shape[1]
        self.projection = nn.Linear(width, token_width)
        self.norms = nn.ModuleList(nn.BatchNorm1d(token_width) for _ in range(config.num_keywords))
        for norm in self.norms:  # start on the table's own scale (reference init)
            norm.weight.data.copy_(table.std(0))
            norm.bias.data.copy_(table.mean(0))
        self.quantizer = KeywordQuantizer(vocab_ids, config.vq_temperature, config.hard)

    def forward(self, states: torch.Tensor, clip: FrozenCLIP) -> KeywordOutput:
        keywords = self.projection(states)
        keywords = torch.stack([norm(keywords[:, k]) for k, norm in enumerate(self.norms)], dim=1)
        quantized, token_ids, cosine = self.quantizer(keywords, clip.token_embedding)
        return KeywordOutput(clip.text_features_from_embeddings(quantized), token_ids, cosine)


class CascadedBranch(nn.Module):
    """K [CLS_k] + frames -> one multi-head attention layer (+ residual, LayerNorm, no FFN) -> keywords."""

    def __init__(self, width: int, clip: FrozenCLIP, config: CascadedConfig, vocab_ids: torch.Tensor):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(config.num_keywords, width) * 0.02)
        self.attention = nn.MultiheadAttention(width, config.num_heads, dropout=config.dropout, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.keywords = KeywordHead(width, clip, config, vocab_ids)

    def forward(self, frames: torch.Tensor, frame_mask: torch.Tensor, clip: FrozenCLIP) -> KeywordOutput:
        sequence, padding = _prepend(self.cls, frames, frame_mask)
        queries = sequence[:, : self.cls.shape[0]]  # only the keyword tokens are read out
        attended, _ = self.attention(queries, sequence, sequence, key_padding_mask=padding, need_weights=False)
        return self.keywords(self.norm(queries + attended), clip)


class HybridBranch(nn.Module):
    """[CLS_p, CLS_1..K] + frames -> one shared Transformer layer; CLS_p feeds the parallel projection,
    the K keyword states feed the cascaded keyword head (SpeechCLIP+ hybrid)."""

    def __init__(self, width: int, clip: FrozenCLIP, parallel: ParallelConfig, cascaded: CascadedConfig, vocab_ids: torch.Tensor):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1 + cascaded.num_keywords, width) * 0.02)
        self.encoder = nn.TransformerEncoder(_encoder_layer(width, parallel), parallel.num_layers, enable_nested_tensor=False)
        self.projection = nn.Linear(width, clip.embed_dim)
        self.keywords = KeywordHead(width, clip, cascaded, vocab_ids)

    def forward(self, frames: torch.Tensor, frame_mask: torch.Tensor, clip: FrozenCLIP) -> tuple[torch.Tensor, KeywordOutput]:
        sequence, padding = _prepend(self.cls, frames, frame_mask)
        states = _encode_queries(self.encoder, sequence, padding, self.cls.shape[0])
        return self.projection(states[:, 0]), self.keywords(states[:, 1 : self.cls.shape[0]], clip)
