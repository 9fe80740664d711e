"""fairseq HuBERT weights (as the released SpeechCLIP checkpoints hold them) -> a Hugging Face `HubertModel` folder.

The mapping is data: `HUBERT_RULES` renames each fairseq key (regex, as transformers' own
convert_hubert_original_pytorch_checkpoint_to_pytorch.py does) and `HUBERT_DROPPED` lists the pre-training
heads HubertModel has no place for. `names.apply_name_table` is the one loop that applies such a table; it
fails on any key it cannot place and on any shape the derived config does not expect, so a checkpoint either
converts completely or not at all. The config is derived from tensor shapes only: nothing is downloaded.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor
from transformers import HubertConfig, HubertModel, Wav2Vec2FeatureExtractor

from ..file_modes import follow_umask
from .errors import ConversionError
from .names import Rule, apply_name_table, check_against_model, layer_indices, require_tensor


HUBERT_RULES: tuple[Rule, ...] = (
    Rule(r"mask_emb", "masked_spec_embed"),
    Rule(r"feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias)", r"feature_extractor.conv_layers.\1.conv.\2"),
    # GroupNorm of conv layer 0 (Base, extractor mode "default") ...
    Rule(r"feature_extractor\.conv_layers\.(\d+)\.2\.(weight|bias)", r"feature_extractor.conv_layers.\1.layer_norm.\2"),
    # ... or a LayerNorm over channels wrapped in TransposeLast (Large, mode "layer_norm"): Sequential index 1.
    Rule(r"feature_extractor\.conv_layers\.(\d+)\.2\.1\.(weight|bias)", r"feature_extractor.conv_layers.\1.layer_norm.\2"),
    Rule(r"layer_norm\.(weight|bias)", r"feature_projection.layer_norm.\1"),
    Rule(r"post_extract_proj\.(weight|bias)", r"feature_projection.projection.\1"),
    # weight_norm(dim=2): g (1, 1, K) and v (D, D/groups, K); this transformers names them as parametrizations.
    Rule(r"encoder\.pos_conv\.0\.weight_g", "encoder.pos_conv_embed.conv.parametrizations.weight.original0"),
    Rule(r"encoder\.pos_conv\.0\.weight_v", "encoder.pos_conv_embed.conv.parametrizations.weight.original1"),
    Rule(r"encoder\.pos_conv\.0\.bias", "encoder.pos_conv_embed.conv.bias"),
    Rule(r"encoder\.layer_norm\.(weight|bias)", r"encoder.layer_norm.\1"),
    Rule(r"encoder\.layers\.(\d+)\.self_attn\.(q|k|v|out)_proj\.(weight|bias)", r"encoder.layers.\1.attention.\2_proj.\3"),
    Rule(r"encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)", r"encoder.layers.\1.layer_norm.\2"),
    Rule(r"encoder\.layers\.(\d+)\.fc1\.(weight|bias)", r"encoder.layers.\1.feed_forward.intermediate_dense.\2"),
    Rule(r"encoder\.layers\.(\d+)\.fc2\.(weight|bias)", r"encoder.layers.\1.feed_forward.output_dense.\2"),
    Rule(r"encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)", r"encoder.layers.\1.final_layer_norm.\2"),
)
# Pre-training heads (projection onto the k-means label embeddings): no part of the model SpeechCLIP runs.
HUBERT_DROPPED: tuple[str, ...] = (r"final_proj\.(weight|bias)", r"label_embs_concat")

# HuBERT's conv strides are fixed (320x downsampling); kernels are read from the weights.
HUBERT_CONV_STRIDES = (5, 2, 2, 2, 2, 2, 2)
HEAD_DIM = 64  # HuBERT Base 12 x 64, Large 16 x 64

def hubert_config_from_state(state: Mapping[str, Tensor], prefix: str, layer_norm_first: bool, source: str) -> HubertConfig:
    """The HF config, every size read from the tensors (what fairseq's checkpoint cfg would say)."""
    p = re.escape(prefix)
    convs = layer_indices(state, p + r"feature_extractor\.conv_layers\.(\d+)\.0\.weight")
    if convs != list(range(len(HUBERT_CONV_STRIDES))):
        raise ConversionError(f"{source}: {prefix}feature_extractor.conv_layers: expected 7 conv layers, found {convs}")
    conv = [require_tensor(state, prefix, f"feature_extractor.conv_layers.{i}.0.weight", source) for i in convs]
    layer_norm_convs = prefix + "feature_extractor.conv_layers.0.2.1.weight" in state
    layers = layer_indices(state, p + r"encoder\.layers\.(\d+)\.fc1\.weight")
    hidden = require_tensor(state, prefix, "post_extract_proj.weight", source).shape[0]
    pos = require_tensor(state, prefix, "encoder.pos_conv.0.weight_v", source)
    return HubertConfig(
        hidden_size=hidden,
        num_hidden_layers=len(layers),
        num_attention_heads=hidden // HEAD_DIM,
        intermediate_size=require_tensor(state, prefix, "encoder.layers.0.fc1.weight", source).shape[0],
        conv_dim=tuple(w.shape[0] for w in conv),
        conv_kernel=tuple(w.shape[2] for w in conv),
        conv_stride=HUBERT_CONV_STRIDES,
        conv_bias=prefix + "feature_extractor.conv_layers.0.0.bias" in state,
        feat_extract_norm="layer" if layer_norm_convs else "group",
        num_conv_pos_embeddings=pos.shape[2],
        num_conv_pos_embedding_groups=hidden // pos.shape[1],
        do_stable_layer_norm=layer_norm_first,
        layer_norm_eps=1e-5,  # fairseq LayerNorm / Fp32LayerNorm / Fp32GroupNorm default
        hidden_act="gelu",
        feat_extract_activation="gelu",
        layerdrop=0.0,  # frozen: never drop layers
    )


def convert_fairseq_hubert(state: Mapping[str, Tensor], prefix: str, layer_norm_first: bool,
                           source: str) -> tuple[HubertConfig, dict[str, Tensor], set[str]]:
    """fairseq HuBERT keys under `prefix` -> (HF config, HF state dict, consumed source keys).

    `layer_norm_first` is fairseq's encoder flag (True for Large: pre-norm layers = HF do_stable_layer_norm);
    it is not visible in the tensors. Raises ConversionError naming the key on any unknown key or shape."""
    config = hubert_config_from_state(state, prefix, layer_norm_first, source)
    converted, origin, consumed = apply_name_table(state, prefix, HUBERT_RULES, HUBERT_DROPPED, source)
    with torch.device("meta"):
        model = HubertModel(config)
    check_against_model(model, converted, origin, source)
    return config, converted, consumed


def save_hubert_folder(config: HubertConfig, state: Mapping[str, Tensor], folder: str | Path,
                       normalize_waveform: bool) -> Path:
    """Write a HubertModel folder + its feature extractor (16 kHz; `do_normalize` = the checkpoint's
    waveform normalisation, True for Large) that `AutoModel.from_pretrained` and `SpeechUpstream` load."""
    folder = Path(folder)
    with torch.device("meta"):
        model = HubertModel(config)
    model.load_state_dict(dict(state), strict=True, assign=True)  # the given tensors, no copy
    model.save_pretrained(folder)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16_000, padding_value=0.0, do_normalize=normalize_waveform,
                             return_attention_mask=True).save_pretrained(folder)
    follow_umask(folder)  # transformers writes its safetensors 0600
    return folder
