"""The trained heads of a released checkpoint -> our config values and `model.safetensors` names.

`HEAD_RULES` renames every official head key to ours (one table for all five variants: the reference
names each module the same way wherever it appears); `HEAD_DROPPED` lists what is not model. Together with
the encoder prefixes, every key of a released checkpoint is either converted or deliberately dropped.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import Tensor

from .errors import ConversionError
from .names import Rule, apply_name_table, layer_indices, require_tensor
from .official import (SETTINGS, attention_settings, get, mlp_hidden, num_heads, official_variant,
                       temperature_settings, upstream_settings, vq_temperature)

UPSTREAM_PREFIX = "audio_encoder.encoder."  # fairseq HuBERT (convert.hubert)
CLIP_PREFIX = "clip.model."  # OpenAI CLIP with the REDUCED token table (convert.openai_clip)
FULL_TABLE = "clip.original_text_emb_weight"  # CLIP's full token table, kept by the reference beside the reduced one
DUPLICATE_CLIP = "cascaded_branch.clip."  # the cascaded branches hold the same CLIP module a second time
VQ_MASKED = (0, 2, 3)  # the reference VQ never picks these rows of its table (prob_msk): "!", BOS, EOS when reduced

HEAD_RULES: tuple[Rule, ...] = (
    Rule(r"audio_encoder\.weightedsum_layer\.weights", "featurizer.layer_weights"),
    Rule(r"criterion\.temperature", "logit_scale"),  # log(1 / tau), trainable (Large); Base keeps 1 / 0.07 fixed
    Rule(r"parallel_branch\.cls", "head.cls"),
    Rule(r"parallel_branch\.self_att\.model\.(layers\.\d+\..+|norm\.(?:weight|bias))", r"head.encoder.encoder.\1"),
    Rule(r"parallel_branch\.linear_proj\.(?:sequential\.)?(\d+\.(?:weight|bias)|weight|bias)", r"head.projection.\1"),
    Rule(r"cascaded_branch\.(cls|parallel_cls|cascaded_cls)", r"head.\1"),
    Rule(r"cascaded_branch\.self_att\.multihead_attn_layer\.(.+)", r"head.attention.attention.\1"),
    Rule(r"cascaded_branch\.self_att\.attentionBlock_Norm\.(weight|bias)", r"head.attention.norm.\1"),
    Rule(r"cascaded_branch\.self_att\.model\.(layers\.\d+\..+|norm\.(?:weight|bias))", r"head.attention.encoder.\1"),
    Rule(r"cascaded_branch\.parallel_proj\.(?:sequential\.)?(\d+\.(?:weight|bias)|weight|bias)", r"head.projection.\1"),
    Rule(r"cascaded_branch\.linear_proj\.(?:sequential\.)?(\d+\.(?:weight|bias)|weight|bias)", r"head.keywords.projection.\1"),
    # one BatchNorm over K*D channels in the order d*K + k (fixed K), or over D (CIF): our KeywordNorm as it is
    Rule(r"cascaded_branch\.bn_layer\.bn_layer\.(weight|bias|running_mean|running_var|num_batches_tracked)",
         r"head.keywords.norm.norm.\1"),
    Rule(r"cascaded_branch\.downsampling\.conv\.(\d+\.(?:weight|bias))", r"head.cif.conv.\1"),
    Rule(r"cascaded_branch\.downsampling\.weight_proj\.1\.(weight|bias)", r"head.cif.weight_proj.1.\1"),
)
HEAD_DROPPED: tuple[str, ...] = (
    r"criterion\.(eye_mat|neg_eye_mat|eye_mat_fl)",  # the loss's identity buffers (256 or 1024 square)
    r"cascaded_branch\.vector_quantizer\.curr_temp",  # read into cascaded.vq_temperature
    r"cascaded_branch\.clip\..+",  # the duplicate CLIP, checked equal to clip.* first
)
CLS_NAMES = ("head.cls", "head.parallel_cls", "head.cascaded_cls")  # (1, N, D) there, (N, D) here


def model_values(config: Mapping, state: Mapping[str, Tensor], source: str) -> tuple[dict, bool]:
    """Our SpeechCLIPConfig values (encoders and keyword vocabulary aside) and whether the upstream is Large."""
    variant = official_variant(config, source)
    settings = get(config, "model_settings", source)
    for extra in ("image_encoder_projection", "parallel_branch_projection", "cascaded_branch_projection"):
        if settings.get(extra) is not None:
            raise ConversionError(f"{source}: model_settings.{extra}: an extra projection network does not convert")
    large, values = upstream_settings(config, source)
    values.update(temperature_settings(config, state, source), variant=variant)
    if variant.startswith("hybrid"):
        values["parallel_loss_weight"] = float(get(settings, "parallel_objective_weight", source, within=SETTINGS))
        values["cascaded_loss_weight"] = float(get(settings, "cascaded_objective_weight", source, within=SETTINGS))
        values["parallel"] = {"projection_hidden": mlp_hidden(state, "cascaded_branch.parallel_proj", source),
                              "projection_dropout": float(get(settings, "parallel_branch.projection_config.dropout", source, 0.1))}
    if variant == "parallel":
        values["parallel"] = _parallel(settings, state, source)
    else:
        values["cascaded"] = _cascaded(settings, state, variant, source)
    if variant.endswith("_plus"):
        values["cif"] = _cif(settings, state, source)
    return values, large


def _parallel(settings: Mapping, state: Mapping[str, Tensor], source: str) -> dict:
    branch = get(settings, "parallel_branch", source, within=SETTINGS)
    args = get(branch, "transformer_args", source, within=SETTINGS + "parallel_branch.")
    kind = args.get("type", branch.get("transformer_type"))
    if kind != "TransformerEncoder" or not branch.get("need_projection", True):
        raise ConversionError(f"{source}: parallel branch {kind!r} without projection does not convert")
    prefix = "parallel_branch.self_att.model."
    layers = encoder_layers(state, prefix, args, source)
    heads = num_heads(args, SETTINGS + "parallel_branch.transformer_args", _width(state, prefix), source)
    return {"num_layers": layers, "num_heads": heads, "dropout": float(args.get("dropout", 0.1)),
            "ffn_dim": int(state[prefix + "layers.0.linear1.weight"].shape[0]),
            "final_norm": prefix + "norm.weight" in state,
            "projection_hidden": mlp_hidden(state, "parallel_branch.linear_proj", source)}


def _cascaded(settings: Mapping, state: Mapping[str, Tensor], variant: str, source: str) -> dict:
    branch = get(settings, "cascaded_branch", source, within=SETTINGS)
    args = get(branch, "transformer_args", source, within=SETTINGS + "cascaded_branch.")
    prefix = "cascaded_branch.self_att."
    values = attention_settings(args, args.get("type", branch.get("transformer_type")),
                                SETTINGS + "cascaded_branch.transformer_args", _width(state, prefix), source)
    if values["attention"] == "transformer":
        values["num_layers"] = encoder_layers(state, prefix + "model.", args, source)
        values["ffn_dim"] = int(state[prefix + "model.layers.0.linear1.weight"].shape[0])
    vq = branch.get("vq", {})
    if vq.get("type", "SimpleVectorQuantizer") != "SimpleVectorQuantizer":
        raise ConversionError(f"{source}: vector quantizer {vq.get('type')!r} does not convert")
    if get(branch, "keyword.batchnorms", source, None) is None:
        raise ConversionError(f"{source}: a cascaded branch without keyword BatchNorm does not convert")
    values.update(vq_temperature=vq_temperature(vq, state, source), hard=bool(get(vq, "args.hard", source, True)),
                  keywords_shown=int(get(branch, "keyword.detokenized_K_neighbors", source, 10)),  # the reference default
                  projection_hidden=mlp_hidden(state, "cascaded_branch.linear_proj", source),
                  projection_dropout=float(get(branch, "keyword.kw_projection.dropout", source, 0.1)))
    if variant in ("cascaded", "hybrid"):
        cls = "cascaded_branch.cls" if variant == "cascaded" else "cascaded_branch.cascaded_cls"
        values["num_keywords"] = int(require_tensor(state, "", cls, source).shape[1])
    return values


def _width(state: Mapping[str, Tensor], prefix: str) -> int | None:
    """The attention width of the branch under `prefix` (in_proj is (3 D, D)); None if absent (named later)."""
    key = next((k for k in state if k.startswith(prefix) and k.endswith("in_proj_weight")), None)
    return None if key is None else int(state[key].shape[1])


def encoder_layers(state: Mapping[str, Tensor], prefix: str, args: Mapping, source: str) -> int:
    """How many nn.TransformerEncoder layers the state holds under `prefix`; it must be what the config says."""
    layers = layer_indices(state, re.escape(prefix) + r"layers\.(\d+)\..+")
    if not layers or layers != list(range(len(layers))):
        raise ConversionError(f"{source}: {prefix}layers.*: layers {layers} are not 0..n-1")
    if int(args.get("n_layers", len(layers))) != len(layers):
        raise ConversionError(f"{source}: transformer_args.n_layers is {args['n_layers']} but the checkpoint holds "
                              f"{len(layers)} layers under {prefix}layers")
    return len(layers)


def _cif(settings: Mapping, state: Mapping[str, Tensor], source: str) -> dict:
    downsampling = get(settings, "cascaded_branch.downsampling", source, within=SETTINGS)
    cif = downsampling.get("cif", {})
    if downsampling.get("type") != "cif" or cif.get("produce_weight_type", "conv") != "conv":
        raise ConversionError(f"{source}: downsampling {downsampling.get('type')!r}/{cif.get('produce_weight_type')!r}: "
                              "only CIF with convolutional weights converts")
    if not cif.get("apply_tail_handling", True) or any(k.startswith("cascaded_branch.downsampling.cif_output_proj") for k in state):
        raise ConversionError(f"{source}: CIF without tail handling or with an output projection does not convert")
    convs = sorted(k for k in state if k.startswith("cascaded_branch.downsampling.conv.") and k.endswith(".weight"))
    return {"threshold": float(cif.get("cif_threshold", 1.0)), "conv_layers": len(convs),
            "conv_width": int(state[convs[0]].shape[-1]), "scaling_steps": int(cif.get("scaling_step", -1)),
            "tail_threshold": float(cif.get("tail_handling_firing_threshold", 0.5)),
            "quantity_loss_weight": float(cif.get("quantity_loss_weight", 1.0))}  # the reference's getattr default


def keyword_vocab(state: Mapping[str, Tensor], source: str) -> tuple[list[int], Tensor]:
    """The VQ vocabulary as full-table CLIP ids, and the full table. The checkpoint keeps no id list: each row
    of the reduced table is found in the full one; the rows the reference VQ masks are left out."""
    reduced = state[CLIP_PREFIX + "token_embedding.weight"]
    full = state.get(FULL_TABLE)
    ids = list(range(len(reduced))) if full is None else match_rows(reduced, full, source)
    masked = {ids[p] for p in VQ_MASKED if p < len(ids)}
    return sorted(set(ids) - masked), reduced if full is None else full


def match_rows(reduced: Tensor, full: Tensor, source: str) -> list[int]:
    """For each row of `reduced`, the index of the identical row of `full` (the lowest if repeated)."""
    if reduced.shape[1] != full.shape[1]:
        raise ConversionError(f"{source}: {CLIP_PREFIX}token_embedding.weight width {reduced.shape[1]} != {FULL_TABLE} width {full.shape[1]}")
    _, group = torch.unique(torch.cat([full.float(), reduced.float()]), dim=0, return_inverse=True)
    first: dict[int, int] = {}
    for row, g in enumerate(group[: len(full)].tolist()):
        first.setdefault(g, row)
    ids = [first.get(g) for g in group[len(full):].tolist()]
    if None in ids:
        raise ConversionError(f"{source}: row {ids.index(None)} of {CLIP_PREFIX}token_embedding.weight is not a row of "
                              f"{FULL_TABLE}: the reduced vocabulary cannot be recovered")
    return ids


def head_weights(state: Mapping[str, Tensor], source: str) -> tuple[dict[str, Tensor], set[str]]:
    """Our trainable tensors from the official head keys, and the keys consumed (mapped or dropped)."""
    _check_duplicate_clip(state, source)
    heads = {k: v for k, v in state.items() if not k.startswith((UPSTREAM_PREFIX, CLIP_PREFIX)) and k != FULL_TABLE}
    weights, _, consumed = apply_name_table(heads, "", HEAD_RULES, HEAD_DROPPED, source)
    for name in CLS_NAMES:
        if name in weights:
            weights[name] = weights[name].reshape(-1, weights[name].shape[-1])
    return weights, consumed


def _check_duplicate_clip(state: Mapping[str, Tensor], source: str) -> None:
    for key, value in state.items():
        if key.startswith(DUPLICATE_CLIP):
            twin = "clip." + key[len(DUPLICATE_CLIP):]
            if twin not in state or not torch.equal(state[twin], value):
                raise ConversionError(f"{source}: {key} differs from {twin}: two different CLIPs, cannot choose")
