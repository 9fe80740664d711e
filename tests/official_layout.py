"""Tiny random state dicts in the layouts the released SpeechCLIP checkpoints use, and independent reference
forwards over them (for the converter's tests; no tests in this module).

- `fairseq_hubert_state`: HuBERT in fairseq names (Base-like: no conv bias, GroupNorm on conv layer 0,
  post-norm layers; Large-like: conv bias, LayerNorm in every conv layer, pre-norm layers).
- `openai_clip_state`: a ViT CLIP in OpenAI names (`visual.*`, `transformer.resblocks.N.attn.in_proj_*`).
- `reference_*`: the official computations written from the raw tensors with plain torch ops, from the
  facts of fairseq's wav2vec2.py / hubert.py, OpenAI's clip/model.py and SpeechCLIP's custom HuBERT forward;
  nothing here goes through transformers or speechclip, so agreement with the converted models is evidence.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

HUBERT_CONV_KERNELS = (10, 3, 3, 3, 3, 2, 2)
HUBERT_CONV_STRIDES = (5, 2, 2, 2, 2, 2, 2)
LN_EPS = 1e-5  # fairseq LayerNorm / Fp32LayerNorm / Fp32GroupNorm and OpenAI's LayerNorm defaults


class _Random:
    """Seeded tensors of sensible scale: weights ~ 1/sqrt(fan_in), norm gains near 1, small biases."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def normal(self, *shape: int, std: float = 1.0) -> Tensor:
        return torch.randn(*shape, generator=self.generator) * std

    def weight(self, *shape: int) -> Tensor:
        return self.normal(*shape, std=1 / math.sqrt(math.prod(shape[1:])))

    def norm(self, prefix: str, dim: int) -> dict[str, Tensor]:
        return {prefix + "weight": 1 + self.normal(dim, std=0.1), prefix + "bias": self.normal(dim, std=0.1)}

    def linear(self, prefix: str, out_dim: int, in_dim: int) -> dict[str, Tensor]:
        return {prefix + "weight": self.weight(out_dim, in_dim), prefix + "bias": self.normal(out_dim, std=0.1)}


def fairseq_hubert_state(layer_norm_first: bool, hidden: int = 128, layers: int = 2, ffn: int = 256,
                         conv_dims: Sequence[int] = (32, 32, 32, 32, 32, 32, 48), pos_kernel: int = 16,
                         pos_groups: int = 4, final_dim: int = 32, num_labels: int = 50, seed: int = 0) -> dict[str, Tensor]:
    """A HuBERT state dict in fairseq names; `layer_norm_first` picks the Large-like layout (see module doc)."""
    r = _Random(seed)
    state: dict[str, Tensor] = {}
    in_dim = 1
    for i, (dim, kernel) in enumerate(zip(conv_dims, HUBERT_CONV_KERNELS)):
        state[f"feature_extractor.conv_layers.{i}.0.weight"] = r.weight(dim, in_dim, kernel)
        if layer_norm_first:  # Large: conv_bias=True, extractor mode "layer_norm"
            state[f"feature_extractor.conv_layers.{i}.0.bias"] = r.normal(dim, std=0.1)
            state.update(r.norm(f"feature_extractor.conv_layers.{i}.2.1.", dim))
        elif i == 0:  # Base: extractor mode "default", GroupNorm(dim, dim) on the first layer only
            state.update(r.norm("feature_extractor.conv_layers.0.2.", dim))
        in_dim = dim
    state.update(r.norm("layer_norm.", in_dim))
    state.update(r.linear("post_extract_proj.", hidden, in_dim))
    state["mask_emb"] = r.normal(hidden)
    state["encoder.pos_conv.0.weight_g"] = 1 + r.normal(1, 1, pos_kernel, std=0.1).abs()
    state["encoder.pos_conv.0.weight_v"] = r.weight(hidden, hidden // pos_groups, pos_kernel)
    state["encoder.pos_conv.0.bias"] = r.normal(hidden, std=0.1)
    state.update(r.norm("encoder.layer_norm.", hidden))
    for n in range(layers):
        p = f"encoder.layers.{n}."
        for proj in ("q", "k", "v", "out"):
            state.update(r.linear(f"{p}self_attn.{proj}_proj.", hidden, hidden))
        state.update(r.norm(p + "self_attn_layer_norm.", hidden))
        state.update(r.linear(p + "fc1.", ffn, hidden))
        state.update(r.linear(p + "fc2.", hidden, ffn))
        state.update(r.norm(p + "final_layer_norm.", hidden))
    state.update(r.linear("final_proj.", final_dim, hidden))  # pre-training heads: dropped by the converter
    state["label_embs_concat"] = r.normal(num_labels, final_dim)
    return state


def openai_clip_state(vocab: int = 49408, width: int = 128, layers: int = 2, context: int = 77,
                      vision_width: int = 128, vision_layers: int = 2, patch: int = 8, grid: int = 4,
                      embed_dim: int = 64, seed: int = 0) -> dict[str, Tensor]:
    """A ViT CLIP state dict in OpenAI names (heads = width // 64, as OpenAI's build_model derives them)."""
    r = _Random(seed)
    state: dict[str, Tensor] = {
        "visual.conv1.weight": r.weight(vision_width, 3, patch, patch),
        "visual.class_embedding": r.normal(vision_width, std=0.5),
        "visual.positional_embedding": r.normal(grid * grid + 1, vision_width, std=0.5),
        "visual.proj": r.weight(embed_dim, vision_width).t().contiguous(),  # (width, embed): x @ proj
        "token_embedding.weight": r.normal(vocab, width, std=0.5),
        "positional_embedding": r.normal(context, width, std=0.5),
        "text_projection": r.weight(embed_dim, width).t().contiguous(),
        "logit_scale": torch.tensor(math.log(1 / 0.07)),
    }
    state.update(r.norm("visual.ln_pre.", vision_width))
    state.update(r.norm("visual.ln_post.", vision_width))
    state.update(r.norm("ln_final.", width))
    for tower, dim, count in (("visual.transformer", vision_width, vision_layers), ("transformer", width, layers)):
        for n in range(count):
            p = f"{tower}.resblocks.{n}."
            state[p + "attn.in_proj_weight"] = r.weight(3 * dim, dim)
            state[p + "attn.in_proj_bias"] = r.normal(3 * dim, std=0.1)
            state.update(r.linear(p + "attn.out_proj.", dim, dim))
            state.update(r.norm(p + "ln_1.", dim))
            state.update(r.norm(p + "ln_2.", dim))
            state.update(r.linear(p + "mlp.c_fc.", 4 * dim, dim))
            state.update(r.linear(p + "mlp.c_proj.", dim, 4 * dim))
    return state


def reduce_vocabulary(state: dict[str, Tensor], ids: Sequence[int]) -> dict[str, Tensor]:
    """The state as SpeechCLIP's ClipModel leaves it: token_embedding reduced to the rows `ids` (the full
    table then lives beside it as `clip.original_text_emb_weight`)."""
    reduced = dict(state)
    reduced["token_embedding.weight"] = state["token_embedding.weight"][torch.as_tensor(list(ids))].clone()
    return reduced


# ---- reference forwards: plain torch ops over the raw tensors ----------------------------------------------

def _ln(x: Tensor, state: dict[str, Tensor], prefix: str) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], state[prefix + "weight"], state[prefix + "bias"], LN_EPS)


def _attention(q: Tensor, k: Tensor, v: Tensor, heads: int, mask: Tensor | None) -> Tensor:
    """(B, T, D) each -> (B, T, D); q already carries no scaling: both fairseq and OpenAI scale by hd^-0.5."""
    b, t, d = q.shape
    split = lambda x: x.view(b, t, heads, d // heads).transpose(1, 2)  # noqa: E731
    scores = (split(q) * (d // heads) ** -0.5) @ split(k).transpose(-1, -2)
    if mask is not None:
        scores = scores + mask
    return (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, t, d)


def _fairseq_layer(x: Tensor, state: dict[str, Tensor], p: str, layer_norm_first: bool) -> Tensor:
    """fairseq TransformerSentenceEncoderLayer: post-norm (Base) or pre-norm (Large), GELU FFN."""
    lin = lambda x, name: F.linear(x, state[p + name + ".weight"], state[p + name + ".bias"])  # noqa: E731
    heads = x.shape[-1] // 64

    def attend(h: Tensor) -> Tensor:
        q, k, v = (lin(h, f"self_attn.{n}_proj") for n in "qkv")
        return lin(_attention(q, k, v, heads, None), "self_attn.out_proj")

    ffn = lambda h: lin(F.gelu(lin(h, "fc1")), "fc2")  # noqa: E731
    if layer_norm_first:
        x = x + attend(_ln(x, state, p + "self_attn_layer_norm."))
        return x + ffn(_ln(x, state, p + "final_layer_norm."))
    x = _ln(x + attend(x), state, p + "self_attn_layer_norm.")
    return _ln(x + ffn(x), state, p + "final_layer_norm.")


def _fairseq_features(state: dict[str, Tensor], wave: Tensor, layer_norm_first: bool) -> Tensor:
    """Conv feature extractor -> feature LayerNorm -> post_extract_proj: (B, S) -> (B, T, D)."""
    x = wave[:, None, :]
    for i, stride in enumerate(HUBERT_CONV_STRIDES):
        p = f"feature_extractor.conv_layers.{i}."
        x = F.conv1d(x, state[p + "0.weight"], state.get(p + "0.bias"), stride=stride)
        if layer_norm_first:  # Fp32LayerNorm over channels, between two TransposeLast
            x = _ln(x.transpose(1, 2), state, p + "2.1.").transpose(1, 2)
        elif i == 0:  # Fp32GroupNorm(C, C): each channel normalised over time
            x = F.group_norm(x, x.shape[1], state[p + "2.weight"], state[p + "2.bias"], LN_EPS)
        x = F.gelu(x)
    x = _ln(x.transpose(1, 2), state, "layer_norm.")
    return F.linear(x, state["post_extract_proj.weight"], state["post_extract_proj.bias"])


def _fairseq_pos_conv(state: dict[str, Tensor], x: Tensor) -> Tensor:
    """weight_norm(Conv1d, dim=2) with padding K//2, SamePad (drop the last frame when K is even), GELU."""
    g, v = state["encoder.pos_conv.0.weight_g"], state["encoder.pos_conv.0.weight_v"]
    weight = g * v / v.pow(2).sum(dim=(0, 1), keepdim=True).sqrt()
    kernel, groups = v.shape[2], x.shape[-1] // v.shape[1]
    y = F.conv1d(x.transpose(1, 2), weight, state["encoder.pos_conv.0.bias"], padding=kernel // 2, groups=groups)
    if kernel % 2 == 0:
        y = y[:, :, :-1]
    return F.gelu(y).transpose(1, 2)


def official_waveform_normalisation(wave: Tensor) -> Tensor:
    """SpeechCLIP's preprocess_input for Large (task.cfg.normalize): F.layer_norm over each whole clip."""
    return torch.stack([F.layer_norm(w, w.shape) for w in wave])


class FairseqHubertOutput(NamedTuple):
    layer_results: list[Tensor]  # what SpeechCLIP's custom forward returns: [input to layer 1, each layer's output]
    last_hidden_state: Tensor  # fairseq's encoder output: the last layer (+ encoder LayerNorm when layer_norm_first)


def reference_fairseq_hubert_layer_results(state: dict[str, Tensor], wave: Tensor,
                                           layer_norm_first: bool) -> FairseqHubertOutput:
    """(B, S) waveform (already normalised if the model wants it) -> SpeechCLIP's hidden states, (B, T, D) each.

    The input to layer 1 is after the positional conv, + the encoder LayerNorm when NOT layer_norm_first;
    with layer_norm_first the last state stays WITHOUT the final LayerNorm (the official custom forward
    skips it; fairseq's own output, `last_hidden_state`, has it)."""
    x = _fairseq_features(state, wave, layer_norm_first)
    x = x + _fairseq_pos_conv(state, x)
    if not layer_norm_first:
        x = _ln(x, state, "encoder.layer_norm.")
    results = [x]
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    for n in layers:
        x = _fairseq_layer(x, state, f"encoder.layers.{n}.", layer_norm_first)
        results.append(x)
    last = _ln(x, state, "encoder.layer_norm.") if layer_norm_first else x
    return FairseqHubertOutput(results, last)


def _openai_blocks(x: Tensor, state: dict[str, Tensor], tower: str, mask: Tensor | None) -> Tensor:
    """OpenAI ResidualAttentionBlocks: x + attn(ln_1 x) with the packed in_proj; x + c_proj(QuickGELU(c_fc(ln_2 x)))."""
    count = len({k.split(".")[-3] for k in state if k.startswith(tower + ".resblocks.") and k.endswith("in_proj_weight")})
    heads = x.shape[-1] // 64
    for n in range(count):
        p = f"{tower}.resblocks.{n}."
        h = _ln(x, state, p + "ln_1.")
        q, k, v = F.linear(h, state[p + "attn.in_proj_weight"], state[p + "attn.in_proj_bias"]).chunk(3, dim=-1)
        x = x + F.linear(_attention(q, k, v, heads, mask), state[p + "attn.out_proj.weight"], state[p + "attn.out_proj.bias"])
        h = F.linear(_ln(x, state, p + "ln_2."), state[p + "mlp.c_fc.weight"], state[p + "mlp.c_fc.bias"])
        x = x + F.linear(h * torch.sigmoid(1.702 * h), state[p + "mlp.c_proj.weight"], state[p + "mlp.c_proj.bias"])
    return x


def reference_openai_image_features(state: dict[str, Tensor], pixels: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B, embed): patchify conv, class token, positions, ln_pre, blocks, ln_post(CLS) @ proj."""
    conv = state["visual.conv1.weight"]
    x = F.conv2d(pixels, conv, stride=conv.shape[-1]).flatten(2).transpose(1, 2)
    cls = state["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + state["visual.positional_embedding"]
    x = _openai_blocks(_ln(x, state, "visual.ln_pre."), state, "visual.transformer", None)
    return _ln(x[:, 0], state, "visual.ln_post.") @ state["visual.proj"]


def reference_openai_text_features(state: dict[str, Tensor], token_ids: Tensor) -> Tensor:
    """(B, L) full-vocabulary ids -> (B, embed): causal blocks, ln_final, state at argmax(id) (EOT) @ text_projection."""
    length = token_ids.shape[1]
    x = state["token_embedding.weight"][token_ids] + state["positional_embedding"][:length]
    mask = torch.full((length, length), float("-inf")).triu(1)
    x = _ln(_openai_blocks(x, state, "transformer", mask), state, "ln_final.")
    return x[torch.arange(x.shape[0]), token_ids.argmax(dim=-1)] @ state["text_projection"]
