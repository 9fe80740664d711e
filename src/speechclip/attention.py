"""The layers the heads are built from: learnable query tokens before the frames, the two attention layers
of the reference (a Transformer encoder with a final LayerNorm; one attention layer + residual + LayerNorm
without feed-forward), and the projections after them (a Linear, or the reference's MLP)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .dropout import Dropout, fast_dropout


def prepend(tokens: torch.Tensor, frames: torch.Tensor, frame_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Put learnable query tokens (N, D) before (B, T, D) frames; return the sequence and its padding mask
    (True = ignore, PyTorch's convention)."""
    batch = frames.shape[0]
    sequence = torch.cat([tokens.expand(batch, -1, -1).to(frames.dtype), frames], dim=1)
    keep = torch.cat([frame_mask.new_ones(batch, tokens.shape[0]), frame_mask], dim=1)
    return sequence, ~keep


class MultiheadAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention (batch_first, same parameters and state-dict names) that, in training on CPU,
    computes the attention itself so the dropout on its weights draws the cheaper mask (dropout.py).

    Why: torch's path (scaled_dot_product_attention's math kernel, the only CPU one with dropout) draws the
    (B, heads, T, T) mask with `bernoulli_` and guards fully masked rows; with it and the keyword quantizer's
    batched products the demo's training steps took 1.17x as long (benchmarks/head_dropout.py, RESULTS.md stop
    36). Here: softmax in fp32 over the scaled scores plus the padding mask, the cheaper dropout at the module's
    rate, then the values. No guard: a row whose keys are all padding would give NaN where torch's gives the
    output bias, and none reaches a head (a clip shorter than the upstream's minimum is refused before, so every
    clip has a frame). Evaluation, other devices, attention masks and returned weights go through torch's path.
    """

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__(width, heads, dropout=dropout, batch_first=True)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                need_weights: bool = True, attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        explicit = (self.training and self.dropout > 0.0 and query.device.type == "cpu" and not need_weights
                    and attn_mask is None and not is_causal and query.dim() == 3 and key is value)
        if not explicit:
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        return self._attend(query, key, key_padding_mask), None

    def _attend(self, query: torch.Tensor, memory: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, Tq, D) queries over (B, S, D) keys-and-values; key_padding_mask (B, S): True or -inf = ignore."""
        batch, width, heads = query.shape[0], self.embed_dim, self.num_heads
        if query is memory:
            q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:  # the last layer of encode_queries: its first positions only, over the whole sequence
            q = F.linear(query, self.in_proj_weight[:width], self.in_proj_bias[:width])
            k, v = F.linear(memory, self.in_proj_weight[width:], self.in_proj_bias[width:]).chunk(2, dim=-1)
        q, k, v = (x.reshape(batch, -1, heads, self.head_dim).transpose(1, 2) for x in (q, k, v))
        scores = ((q * self.head_dim**-0.5) @ k.transpose(-2, -1)).float()  # (B, heads, Tq, S)
        if key_padding_mask is not None:  # bool from callers, or the -inf/0 float mask nn.TransformerEncoderLayer makes
            if key_padding_mask.dtype == torch.bool:
                scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
            else:
                scores = scores + key_padding_mask[:, None, None, :]
        weights = fast_dropout(scores.softmax(-1), self.dropout)
        attended = (weights.to(v.dtype) @ v).transpose(1, 2).reshape(batch, -1, width)
        return F.linear(attended, self.out_proj.weight, self.out_proj.bias)


class AttentionLayer(nn.Module):
    """LayerNorm(x + MultiheadAttention(x, seq, seq)): the reference's `MultiheadAttentionAndNorm` (dropout on
    the attention weights, none on the residual, no feed-forward).

    `queries` = N computes the outputs of the first N positions only: the same values as the full layer
    (a position's output depends on the others only through keys and values), at a fraction of the cost.
    """

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.attention = MultiheadAttention(width, heads, dropout)
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
        # the cheaper CPU mask (dropout.py), also on the attention weights (MultiheadAttention above)
        layer.dropout, layer.dropout1, layer.dropout2 = Dropout(dropout), Dropout(dropout), Dropout(dropout)
        layer.self_attn = MultiheadAttention(width, heads, dropout)
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
