"""The layers the heads are built from: learnable query tokens before the frames, the two attention layers
of the reference (a Transformer encoder with a final LayerNorm; one attention layer + residual + LayerNorm
without feed-forward), and the projections after them (a Linear, or the reference's MLP)."""

from __future__ import annotations

import torch
from torch import nn

from .dropout import Dropout


def prepend(tokens: torch.Tensor, frames: torch.Tensor, frame_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Put learnable query tokens (N, D) before (B, T, D) frames; return the sequence and its padding mask
    (True = ignore, PyTorch's convention)."""
    batch = frames.shape[0]
    sequence = torch.cat([tokens.expand(batch, -1, -1).to(frames.dtype), frames], dim=1)
    keep = torch.cat([frame_mask.new_ones(batch, tokens.shape[0]), frame_mask], dim=1)
    return sequence, ~keep


class AttentionLayer(nn.Module):
    """LayerNorm(x + MultiheadAttention(x, seq, seq)): the reference's `MultiheadAttentionAndNorm` (dropout on
    the attention weights, none on the residual, no feed-forward).

    `queries` = N computes the outputs of the first N positions only: the same values as the full layer
    (a position's output depends on the others only through keys and values), at a fraction of the cost.
    """

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.attention = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(width)

    def forward(self, sequence: torch.Tensor, padding: torch.Tensor, queries: int | None = None) -> torch.Tensor:
        query = sequence if queries is None else sequence[:, :queries]
        attended = self.attention(query, sequence, sequence, key_padding_mask=padding, need_weights=False)[0]
        return self.norm(query + attended)


class EncoderStack(nn.Module):
    """Post-norm Transformer encoder layers (GELU) and, as the reference's `TransformerEncoder`, a final
    LayerNorm after them. With `queries`, the last layer runs for the first N positions only."""

    def __init__(self, width: int, layers: int, heads: int, ffn_dim: int, dropout: float, final_norm: bool = True):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model=width, nhead=heads, dim_feedforward=ffn_dim, dropout=dropout,
                                           activation="gelu", batch_first=True, norm_first=False)
        # the cheaper CPU mask (dropout.py); the attention weights' dropout inside self_attn stays torch's
        layer.dropout, layer.dropout1, layer.dropout2 = Dropout(dropout), Dropout(dropout), Dropout(dropout)
        norm = nn.LayerNorm(width) if final_norm else None
        self.encoder = nn.TransformerEncoder(layer, layers, norm=norm, enable_nested_tensor=False)

    def forward(self, sequence: torch.Tensor, padding: torch.Tensor, queries: int | None = None) -> torch.Tensor:
        if queries is None:
            out = self.encoder(sequence, src_key_padding_mask=padding)  # applies the final norm itself
            return out
        out = encode_queries(self.encoder, sequence, padding, queries)
        return self.encoder.norm(out) if self.encoder.norm is not None else out


def encode_queries(encoder: nn.TransformerEncoder, sequence: torch.Tensor, padding: torch.Tensor, queries: int) -> torch.Tensor:
    """Run `encoder`'s layers (not its final norm) over `sequence` and return the states of its first
    `queries` tokens; the last layer computes attention and FFN for those tokens alone."""
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


def projection(width: int, out: int, hidden: list[int], dropout: float) -> nn.Module:
    """A Linear, or with hidden widths the reference's `MLPLayers`: Linear-ReLU-Dropout blocks ending in a
    Linear (its parameters at indices 0, 3, ... of the Sequential, as in the released checkpoints)."""
    if not hidden:
        return nn.Linear(width, out)
    dims = [width, *hidden, out]
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU(), Dropout(dropout)]
    return nn.Sequential(*layers[:-2])
