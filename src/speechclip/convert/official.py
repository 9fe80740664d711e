"""The official run config (as the checkpoint stores it) -> our `SpeechCLIPConfig` values.

Facts from atosystem/SpeechCLIP and ShampooWang/SpeechCLIP_plus (`kwClip.py`, `kw_branches.py`, `cif.py`,
`speech_encoder_plus.py`, their configs). Sizes are read from the tensors where the tensors hold them (keyword
count, MLP widths, CIF convolutions); heads, dropout and switches from the config. A setting this library
cannot reproduce is refused by name rather than converted into a model that computes something else.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

from torch import Tensor

from .errors import ConversionError

# model_settings.cascaded_branch.type, with "KW_" dropped and "dynamic" read as "plus" (as the reference does)
BRANCH_VARIANTS = {"CascadedBranch": "cascaded", "CascadedBranch_plus": "cascaded_plus",
                   "HybridBranch": "hybrid", "HybridBranch_plus": "hybrid_plus"}
LARGE_UPSTREAMS = ("hubert_large_ll60k",)  # fairseq task normalize=True: waveforms layer-normed before HuBERT
BASE_UPSTREAMS = ("hubert", "hubert_base")
SETTINGS = "model_settings."  # where the branch fields live, for messages


def get(config: Mapping, path: str, source: str, default: Any = KeyError, within: str = "") -> Any:
    """config["a"]["b"]... for "a.b", naming the missing field (as `within` + path) instead of a KeyError."""
    node: Any = config
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            if default is KeyError:
                raise ConversionError(f"{source}: config field {within}{path} is missing")
            return default
        node = node[part]
    return node


def official_variant(config: Mapping, source: str) -> str:
    settings = get(config, "model_settings", source)
    cascaded = float(settings.get("cascaded_objective_weight", 0) or 0)
    parallel = float(settings.get("parallel_objective_weight", 0) or 0)
    if cascaded <= 0:
        if parallel <= 0:
            raise ConversionError(f"{source}: neither objective weight is positive: no branch to convert")
        return "parallel"
    kind = str(get(settings, "cascaded_branch.type", source, within=SETTINGS)).replace("KW_", "").replace("dynamic", "plus")
    if kind not in BRANCH_VARIANTS:
        raise ConversionError(f"{source}: model_settings.cascaded_branch.type {kind!r} is not one of the released "
                              f"branches {sorted(BRANCH_VARIANTS)}")
    variant = BRANCH_VARIANTS[kind]
    if variant == "cascaded" and parallel > 0:
        raise ConversionError(f"{source}: separate cascaded and parallel branches are not a released layout")
    return variant


def upstream_settings(config: Mapping, source: str) -> tuple[bool, dict]:
    """(layer_norm_first, our upstream-side values) from the audio_encoder and data sections."""
    encoder = get(config, "audio_encoder", source)
    name = str(encoder.get("name", ""))
    if encoder.get("type") != "FairseqHubert" or name not in LARGE_UPSTREAMS + BASE_UPSTREAMS:
        raise ConversionError(f"{source}: audio_encoder {encoder.get('type')}/{name}: only the released fairseq "
                              f"HuBERT upstreams {BASE_UPSTREAMS + LARGE_UPSTREAMS} convert")
    if encoder.get("feat_select_idx") != "weighted_sum":
        raise ConversionError(f"{source}: audio_encoder.feat_select_idx {encoder.get('feat_select_idx')!r}: "
                              "only the weighted sum of all hidden states converts")
    normalize_states = bool(encoder.get("normalize_hiddenstates", False))
    if normalize_states and encoder.get("normalize_type", "s3prl") != "s3prl":
        raise ConversionError(f"{source}: audio_encoder.normalize_type {encoder['normalize_type']!r} does not convert")
    large = name in LARGE_UPSTREAMS
    dataset_norm = bool(get(config, "data.dataset.normalize_waveform", source, False))
    return large, {"normalize_waveform": large or dataset_norm, "normalize_hidden_states": normalize_states,
                   "upstream_final_norm": False}  # the official forward takes the last layer before its LayerNorm


def temperature_settings(config: Mapping, state: Mapping[str, Tensor], source: str) -> dict:
    args = get(config, "cl_loss.args", source)
    if bool(args.get("temperature_trainable", False)):
        stored = state.get("criterion.temperature")
        if stored is None:
            raise ConversionError(f"{source}: criterion.temperature missing though cl_loss says it is trainable")
        return {"learn_logit_scale": True, "logit_scale_init": math.exp(float(stored))}  # stored as log(1 / tau)
    return {"learn_logit_scale": False, "logit_scale_init": 1.0 / float(args.get("temperature", 0.07))}


def mlp_hidden(state: Mapping[str, Tensor], prefix: str, source: str) -> list[int]:
    """[] for a Linear at `prefix`, else the hidden widths of the reference's MLPLayers (Sequential 0, 3, ...)."""
    if prefix + ".weight" in state:
        return []
    indices = sorted(int(m.group(1)) for key in state if (m := re.fullmatch(re.escape(prefix) + r"\.sequential\.(\d+)\.weight", key)))
    if not indices:
        raise ConversionError(f"{source}: {prefix}: neither a Linear nor an MLP in the checkpoint")
    return [int(state[f"{prefix}.sequential.{i}.weight"].shape[0]) for i in indices[:-1]]


def attention_settings(args: Mapping, kind: str, field: str, width: int | None, source: str) -> dict:
    """Attention type, heads and dropout of a branch from its `field` (model_settings.X.transformer_args)."""
    kinds = {"MultiheadAttentionAndNorm": "attention", "TransformerEncoder": "transformer"}
    if kind not in kinds:
        raise ConversionError(f"{source}: transformer type {kind!r} does not convert (expected {sorted(kinds)})")
    # dropout acts in training only; 0.1 is the reference modules' own default
    return {"attention": kinds[kind], "num_heads": num_heads(args, field, width, source),
            "dropout": float(args.get("dropout", 0.1))}


def num_heads(args: Mapping, field: str, width: int | None, source: str) -> int:
    """`nhead`, which no tensor shape reveals and which changes what attention computes: never guessed."""
    if "nhead" not in args:
        raise ConversionError(f"{source}: config field {field}.nhead is missing (the number of attention heads "
                              "cannot be read from the tensors)")
    heads = args["nhead"]
    if not isinstance(heads, int) or heads < 1 or (width is not None and width % heads):
        raise ConversionError(f"{source}: {field}.nhead={heads!r} does not divide the width {width}")
    return heads


def vq_temperature(vq: Mapping, state: Mapping[str, Tensor], source: str) -> float:
    """'fixed=0.1' or 'learnable=...' (its trained value is in the state); inference never uses it."""
    temp = str(get(vq, "args.temp", source, "fixed=0.1"))
    if temp.startswith("fixed="):
        return float(temp.split("=", 1)[1])
    stored = state.get("cascaded_branch.vector_quantizer.curr_temp")
    if stored is not None:
        return float(stored.reshape(-1)[0])
    raise ConversionError(f"{source}: vector quantizer temperature {temp!r} does not convert")
