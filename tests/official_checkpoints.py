"""Whole released-checkpoint layouts (SpeechCLIP and SpeechCLIP+, Base-like and Large-like, tiny sizes) and the
official speech pipeline over them, written from the raw tensors (no speechclip, no transformers).

`official_checkpoint(case)` returns (state_dict, config) as atosystem/SpeechCLIP and ShampooWang/SpeechCLIP_plus
save them (their module names, their config sections); `save_official_checkpoint` writes them as a Lightning 1.5
`.ckpt` whose config is pickled as `avssl.base.ordered_namespace.OrderedNamespace`; `reference_speech` runs
the official forward of `encode_speech` (waveform normalisation, HuBERT layer results, weighted sum, the branch,
VQ over the reduced table with its masked rows, `encode_keywords`, CIF) for one clip.
"""

from __future__ import annotations

import math
import sys
import types
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from tests.official_layout import (_ln, _openai_blocks, fairseq_hubert_state, official_waveform_normalisation,
                                   openai_clip_state, reduce_vocabulary, reference_fairseq_hubert_layer_results)
from tests.test_cif import reference_fire

BOS, EOS = 49406, 49407
# the reduced vocabulary in the reference's by-frequency order: "!" (padding id 0), "a</w>", BOS, EOS, then words
REDUCED_IDS = [0, 320, BOS, EOS, 1125, 539, 1929, 2368, 736, 1579, 3564, 1237, 2533, 4558, 786, 2403, 518, 1310,
               1746, 3144, 2014, 4996, 5046, 6431, 7034, 8853, 9920, 11032, 12345, 23456, 34567, 45678]
WIDTH, CLIP_WIDTH, KEYWORDS, FFN, MLP_HIDDEN = 128, 128, 4, 256, 96  # tiny; official_heads takes any sizes


@dataclass
class Sizes:
    width: int = WIDTH  # upstream width (768 Base, 1024 Large)
    clip_width: int = CLIP_WIDTH  # CLIP text width = its embedding size (512 ViT-B/32, 768 ViT-L/14)
    keywords: int = KEYWORDS  # K (8 released)
    ffn: int = FFN  # feed-forward width (3072 Base, 4096 Large)
    mlp_hidden: int = MLP_HIDDEN  # kw_projection / projection_config hidden width (1024 Large)
    layers: int = 2  # upstream layers: the weighted sum has layers + 1 weights


@dataclass
class Case:
    name: str
    variant: str  # official branch: parallel | cascaded | hybrid | cascaded_plus | hybrid_plus
    large: bool = False
    attention: str = "MultiheadAttentionAndNorm"  # or TransformerEncoder (SpeechCLIP+ Large COCO hybrid)
    heads: int = 1
    kw_mlp: bool = False  # SpeechCLIP+ Large: kw_projection MLP
    parallel_mlp: bool = False  # SpeechCLIP+ Large Flickr hybrid: parallel projection MLP
    conv_width: int = 3
    conv_layers: int = 1
    weights: tuple[float, float] = (1.0, 1.0)  # (parallel, cascaded) objective weights of the hybrids
    data_normalize: bool = False  # SpeechCLIP+ Base: data.dataset.normalize_waveform
    encoder_layers: int = 1  # transformer_args.n_layers of a TransformerEncoder keyword encoder (1 in every release)
    extra: dict = field(default_factory=dict)


CASES = [
    Case("speechclip-base-parallel", "parallel"),
    Case("speechclip-base-cascaded", "cascaded"),
    Case("speechclip-large-parallel", "parallel", large=True),
    Case("speechclip-large-cascaded", "cascaded", large=True),
    Case("plus-base-hybrid", "hybrid", data_normalize=True),
    Case("plus-large-coco-hybrid", "hybrid", large=True, attention="TransformerEncoder", kw_mlp=True),
    Case("plus-large-flickr-hybrid", "hybrid", large=True, kw_mlp=True, parallel_mlp=True),
    Case("plus-base-cascaded+", "cascaded_plus", data_normalize=True),
    Case("plus-large-coco-cascaded+", "cascaded_plus", large=True, heads=8, kw_mlp=True, conv_width=5, conv_layers=2),
    Case("plus-base-hybrid+", "hybrid_plus", data_normalize=True),
    Case("plus-large-flickr-hybrid+", "hybrid_plus", large=True, heads=8, kw_mlp=True, weights=(0.5, 1.5)),
    # not released: the layout a user's own run of the reference with transformer_args.n_layers=2 saves
    Case("two-layer-hybrid", "hybrid", large=True, attention="TransformerEncoder", heads=4, kw_mlp=True, encoder_layers=2),
]


# ---- the layout ----------------------------------------------------------------------------------------------
def _rand(generator: torch.Generator, *shape: int, std: float = 0.1) -> Tensor:
    return torch.randn(*shape, generator=generator) * std


def _linear(g: torch.Generator, prefix: str, out: int, inp: int) -> dict[str, Tensor]:
    return {prefix + "weight": _rand(g, out, inp, std=1 / math.sqrt(inp)), prefix + "bias": _rand(g, out)}


def _norm(g: torch.Generator, prefix: str, dim: int) -> dict[str, Tensor]:
    return {prefix + "weight": 1 + _rand(g, dim), prefix + "bias": _rand(g, dim)}


def _mha(g: torch.Generator, prefix: str, dim: int) -> dict[str, Tensor]:
    return {prefix + "in_proj_weight": _rand(g, 3 * dim, dim, std=1 / math.sqrt(dim)), prefix + "in_proj_bias": _rand(g, 3 * dim),
            **_linear(g, prefix + "out_proj.", dim, dim)}


def _encoder_layer(g: torch.Generator, prefix: str, dim: int, ffn: int) -> dict[str, Tensor]:
    return {**_mha(g, prefix + "self_attn.", dim), **_linear(g, prefix + "linear1.", ffn, dim),
            **_linear(g, prefix + "linear2.", dim, ffn), **_norm(g, prefix + "norm1.", dim), **_norm(g, prefix + "norm2.", dim)}


def _projection(g: torch.Generator, prefix: str, sizes: Sizes, mlp: bool) -> dict[str, Tensor]:
    out, width, hidden = sizes.clip_width, sizes.width, sizes.mlp_hidden
    if not mlp:
        return _linear(g, prefix, out, width)
    return {**_linear(g, prefix + "sequential.0.", hidden, width), **_linear(g, prefix + "sequential.3.", out, hidden)}


def _batchnorm(g: torch.Generator, prefix: str, channels: int) -> dict[str, Tensor]:
    return {prefix + "weight": 1 + _rand(g, channels), prefix + "bias": _rand(g, channels),
            prefix + "running_mean": _rand(g, channels), prefix + "running_var": 0.5 + torch.rand(channels, generator=g),
            prefix + "num_batches_tracked": torch.tensor(1234)}


def official_heads(case: Case, sizes: Sizes = Sizes(), seed: int = 0) -> dict[str, Tensor]:
    """The trained part of a released checkpoint (weighted sum, branch, trainable temperature), in its names."""
    g = torch.Generator().manual_seed(seed + 7)
    w, k = sizes.width, sizes.keywords
    state = {"audio_encoder.weightedsum_layer.weights": _rand(g, sizes.layers + 1, std=1.0)}
    if case.large and case.attention != "TransformerEncoder":  # cl_loss.temperature_trainable
        state["criterion.temperature"] = torch.tensor(math.log(1 / 0.05))
    if case.variant == "parallel":
        state.update({"parallel_branch.cls": _rand(g, 1, 1, w, std=1.0), **_encoder_layer(g, "parallel_branch.self_att.model.layers.0.", w, sizes.ffn),
                      **_norm(g, "parallel_branch.self_att.model.norm.", w), **_projection(g, "parallel_branch.linear_proj.", sizes, False)})
        return state
    c = "cascaded_branch."
    state[c + "vector_quantizer.curr_temp"] = torch.tensor([0.1])
    if case.attention == "TransformerEncoder":
        for n in range(case.encoder_layers):
            state.update(_encoder_layer(g, c + f"self_att.model.layers.{n}.", w, sizes.ffn))
        state.update(_norm(g, c + "self_att.model.norm.", w))
    else:
        state.update(_mha(g, c + "self_att.multihead_attn_layer.", w))
        state.update(_norm(g, c + "self_att.attentionBlock_Norm.", w))
    state.update(_projection(g, c + "linear_proj.", sizes, case.kw_mlp))
    fixed = case.variant in ("cascaded", "hybrid")
    state.update(_batchnorm(g, c + "bn_layer.bn_layer.", sizes.clip_width * (k if fixed else 1)))
    if case.variant == "cascaded":
        state[c + "cls"] = _rand(g, 1, k, w, std=1.0)
    if case.variant == "hybrid":
        state[c + "parallel_cls"], state[c + "cascaded_cls"] = _rand(g, 1, 1, w, std=1.0), _rand(g, 1, k, w, std=1.0)
    if case.variant == "hybrid_plus":
        state[c + "cls"] = _rand(g, 1, 1, w, std=1.0)
    if case.variant.startswith("hybrid"):
        state.update(_projection(g, c + "parallel_proj.", sizes, case.parallel_mlp))
    if case.variant.endswith("_plus"):
        for i in range(case.conv_layers):
            state[f"{c}downsampling.conv.{3 * i}.weight"] = _rand(g, w, w, case.conv_width, std=1 / math.sqrt(w * case.conv_width))
            state[f"{c}downsampling.conv.{3 * i}.bias"] = _rand(g, w)
        state.update(_linear(g, c + "downsampling.weight_proj.1.", 1, w))
        state[c + "downsampling.weight_proj.1.bias"] = torch.tensor([-1.0])  # ~0.25 per frame: a few keywords
    return state


def official_checkpoint(case: Case, seed: int = 0) -> tuple[dict[str, Tensor], dict]:
    hubert = fairseq_hubert_state(layer_norm_first=case.large, hidden=WIDTH, seed=seed)
    clip = openai_clip_state(width=CLIP_WIDTH, embed_dim=CLIP_WIDTH, seed=seed + 1)
    state = {"audio_encoder.encoder." + k: v for k, v in hubert.items()}
    state.update({"clip.model." + k: v for k, v in reduce_vocabulary(clip, REDUCED_IDS).items()})
    state["clip.original_text_emb_weight"] = clip["token_embedding.weight"]
    if case.variant != "parallel":  # the cascaded branches register the same CLIP module a second time
        state.update({"cascaded_branch." + k: v for k, v in state.items() if k.startswith("clip.")})
    eye = torch.eye(1024 if case.large else 256, dtype=torch.bool)
    state.update({"criterion.eye_mat": eye, "criterion.neg_eye_mat": ~eye, "criterion.eye_mat_fl": eye.float()})
    state.update(official_heads(case, seed=seed))
    return state, _config(case, "criterion.temperature" in state)


def _config(case: Case, trainable_temperature: bool) -> dict:
    attention_args = {"type": case.attention, "n_layers": case.encoder_layers, "d_model": WIDTH, "nhead": case.heads, "dim_feedforward": 256,
                      "dropout": 0.1, "activation": "gelu", "layer_norm_eps": 1e-5, "batch_first": True, "norm_first": False}
    keyword = {"number": KEYWORDS, "detokenized_K_neighbors": 5, "batchnorms": {"type": "eachKw", "std_scale": 1.0, "learnable": True, "parallel": True}}
    if case.kw_mlp:
        keyword["kw_projection"] = {"dropout": 0.1, "dimensions": [WIDTH, 96, CLIP_WIDTH]}
    types_ = {"parallel": "KW_CascadedBranch", "cascaded": "KW_CascadedBranch", "hybrid": "HybridBranch",
              "cascaded_plus": "CascadedBranch_dynamic", "hybrid_plus": "HybridBranch_dynamic"}
    weights = {"parallel": (1.0, 0.0), "cascaded": (0.0, 1.0)}.get(case.variant, case.weights)
    parallel_branch = {"transformer_type": "TransformerEncoder", "need_projection": True,
                       "transformer_args": {**attention_args, "type": "TransformerEncoder", "nhead": 4, "n_layers": 1}}
    if case.parallel_mlp:
        parallel_branch["projection_config"] = {"dropout": 0.1, "dimensions": [WIDTH, 96, CLIP_WIDTH]}
    return {
        "data": {"dataset": {"name": "flickr", "normalize_waveform": case.data_normalize}, "batch_size": 256},
        "model_settings": {
            "parallel_objective_weight": weights[0], "cascaded_objective_weight": weights[1],
            "parallel_branch": parallel_branch,
            "cascaded_branch": {
                "type": types_[case.variant], "transformer_type": case.attention, "transformer_args": attention_args,
                "keyword": keyword,
                "vq": {"type": "SimpleVectorQuantizer", "args": {"temp": "fixed=0.1", "time_first": True, "use_gumbel": False, "hard": True}},
                "downsampling": {"type": "cif", "cif": {"quantity_loss_weight": 0.25, "cif_threshold": 1.0, "conv_cif_width": case.conv_width,
                                                        "num_layer": case.conv_layers, "produce_weight_type": "conv", "apply_scaling": True,
                                                        "scaling_step": 5000, "apply_tail_handling": True,
                                                        "tail_handling_firing_threshold": 0.5}},
            },
        },
        "cl_loss": {"type": "MaskedContrastiveLoss", "args": {"temperature": 0.07, "temperature_trainable": trainable_temperature}},
        "clip": {"name": "ViT-B/32", "reduce_subword_embbedding": "./avssl/data/flickr_stat/text_clip_vocab_usage_byfreq.npy"},
        "audio_encoder": {"type": "FairseqHubert", "name": "hubert_large_ll60k" if case.large else "hubert",
                          "feat_select_idx": "weighted_sum", "normalize_hiddenstates": case.large, "max_audio_len": 102400},
    }


# ---- the file: a Lightning 1.5 checkpoint, config pickled as the reference's own class ---------------------------
class _OrderedNamespace:
    """Pickles exactly as avssl.base.ordered_namespace.OrderedNamespace does: __getstate__ -> its OrderedDict."""

    def __init__(self, values: dict):
        self._odict = OrderedDict((k, _OrderedNamespace(v) if isinstance(v, dict) else v) for k, v in values.items())

    def __getstate__(self):
        return self._odict


def save_official_checkpoint(path: Path, state: dict[str, Tensor], config: dict, legacy: bool = False,
                             extra: dict | None = None) -> Path:
    modules = {name: types.ModuleType(name) for name in ("avssl", "avssl.base", "avssl.base.ordered_namespace")}
    _OrderedNamespace.__module__, _OrderedNamespace.__qualname__ = "avssl.base.ordered_namespace", "OrderedNamespace"
    modules["avssl.base.ordered_namespace"].OrderedNamespace = _OrderedNamespace
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        checkpoint = {
            "epoch": 131, "global_step": 15443, "pytorch-lightning_version": "1.5.10", "state_dict": state,
            "callbacks": {"ModelCheckpoint{'monitor': 'val_recall_mean_1', 'mode': 'max'}": {"best_model_score": torch.tensor(36.01)}},
            "optimizer_states": [{"state": {0: {"step": 15443, "exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4, "params": [0]}]}],
            "lr_schedulers": [{"base_lrs": [1e-4], "last_epoch": 15443, "lr_lambdas": [None]}],
            "native_amp_scaling_state": {"scale": 65536.0, "growth_factor": 2.0},
            "hparams_name": "config", "hyper_parameters": {"config": _OrderedNamespace(config)}, **(extra or {}),
        }
        torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return path


# ---- the official forward ---------------------------------------------------------------------------------------
def _self_attention(x: Tensor, state: dict, p: str, heads: int) -> Tensor:
    """torch.nn.MultiheadAttention (packed in_proj, no mask: one clip) over the whole sequence."""
    q, k, v = F.linear(x, state[p + "in_proj_weight"], state[p + "in_proj_bias"]).chunk(3, dim=-1)
    b, t, d = x.shape
    split = lambda y: y.view(b, t, heads, d // heads).transpose(1, 2)  # noqa: E731
    weights = (split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // heads)).softmax(-1)
    out = (weights @ split(v)).transpose(1, 2).reshape(b, t, d)
    return F.linear(out, state[p + "out_proj.weight"], state[p + "out_proj.bias"])


def _transformer_encoder(x: Tensor, state: dict, p: str, heads: int) -> Tensor:
    """The reference's TransformerEncoder: post-norm nn.TransformerEncoderLayer(s), GELU, then its final LayerNorm."""
    layers = sorted({int(k[len(p) + 7:].split(".")[0]) for k in state if k.startswith(p + "layers.")})
    for n in layers:
        q = f"{p}layers.{n}."
        x = _ln(x + _self_attention(x, state, q + "self_attn.", heads), state, q + "norm1.")
        ffn = F.linear(F.gelu(F.linear(x, state[q + "linear1.weight"], state[q + "linear1.bias"])), state[q + "linear2.weight"], state[q + "linear2.bias"])
        x = _ln(x + ffn, state, q + "norm2.")
    return _ln(x, state, p + "norm.")


def _attention_layer(x: Tensor, state: dict, case: Case) -> Tensor:
    c = "cascaded_branch.self_att."
    if case.attention == "TransformerEncoder":
        return _transformer_encoder(x, state, c + "model.", case.heads)
    return _ln(_self_attention(x, state, c + "multihead_attn_layer.", case.heads) + x, state, c + "attentionBlock_Norm.")


def _project(x: Tensor, state: dict, p: str) -> Tensor:
    if p + "weight" in state:
        return F.linear(x, state[p + "weight"], state[p + "bias"])
    h = F.relu(F.linear(x, state[p + "sequential.0.weight"], state[p + "sequential.0.bias"]))
    return F.linear(h, state[p + "sequential.3.weight"], state[p + "sequential.3.bias"])


def _batchnorm_eval(x: Tensor, state: dict, p: str) -> Tensor:
    return (x - state[p + "running_mean"]) / torch.sqrt(state[p + "running_var"] + 1e-5) * state[p + "weight"] + state[p + "bias"]


def _vq_and_text(keywords: Tensor, state: dict) -> tuple[Tensor, list[int]]:
    """Cosine to the REDUCED table with rows 0, 2, 3 masked, hard choice, then encode_keywords: a 77-token text of
    reduced ids (sot, n keywords, eot, zeros) through CLIP's text transformer; the state at eot @ text_projection."""
    table = state["clip.model.token_embedding.weight"]
    cosine = F.cosine_similarity(keywords[:, None, :], table[None], dim=-1)
    cosine[:, [0, 2, 3]] = float("-inf")
    chosen = cosine.argmax(-1)
    count = len(chosen)
    text = torch.zeros(77, dtype=torch.long)
    text[0], text[count + 1] = REDUCED_IDS.index(BOS), REDUCED_IDS.index(EOS)
    x = table[text].clone()
    x[1 : 1 + count] = table[chosen]
    clip = {k[len("clip.model."):]: v for k, v in state.items() if k.startswith("clip.model.")}
    x = (x + clip["positional_embedding"])[None]
    x = _ln(_openai_blocks(x, clip, "transformer", torch.full((77, 77), float("-inf")).triu(1)), clip, "ln_final.")
    return x[0, 1 + count] @ clip["text_projection"], [REDUCED_IDS[i] for i in chosen.tolist()]


def _cif(frames: Tensor, state: dict) -> Tensor:
    """CIF at inference (dropout off): conv-ReLU layers, Linear, sigmoid -> weights -> fire with tail handling."""
    x = frames.transpose(1, 2)
    convs = sorted(int(k.split(".")[3]) for k in state if k.startswith("cascaded_branch.downsampling.conv.") and k.endswith("weight"))
    for i in convs:
        w = state[f"cascaded_branch.downsampling.conv.{i}.weight"]
        x = F.relu(F.conv1d(x, w, state[f"cascaded_branch.downsampling.conv.{i}.bias"], padding=w.shape[-1] // 2))
    p = "cascaded_branch.downsampling.weight_proj.1."
    weights = torch.sigmoid(F.linear(x.transpose(1, 2), state[p + "weight"], state[p + "bias"])).squeeze(-1).clamp(0, 1)
    keywords, lengths = reference_fire(frames, weights, 1.0, 75, 0.5)
    return keywords[0, : int(lengths[0])]


def reference_speech(case: Case, state: dict, config: dict, wave: Tensor) -> dict:
    """One clip through the official encode_speech: {"parallel": (D,), "cascaded": (D,), "keywords": [ids]}."""
    wave = wave[None]
    if case.large or case.data_normalize:
        wave = official_waveform_normalisation(wave)
    hubert = {k[len("audio_encoder.encoder."):]: v for k, v in state.items() if k.startswith("audio_encoder.encoder.")}
    layers = torch.stack(reference_fairseq_hubert_layer_results(hubert, wave, case.large).layer_results)
    if config["audio_encoder"]["normalize_hiddenstates"]:
        layers = F.layer_norm(layers, layers.shape[-1:])
    frames = (state["audio_encoder.weightedsum_layer.weights"].softmax(0)[:, None, None, None] * layers).sum(0)
    out: dict = {}
    c = "cascaded_branch."
    if case.variant == "parallel":
        p = "parallel_branch."
        x = _transformer_encoder(torch.cat([state[p + "cls"], frames], 1), state, p + "self_att.model.", 4)
        out["parallel"] = _project(x[0, 0], state, p + "linear_proj.")
        return out
    if case.variant in ("cascaded", "hybrid"):
        tokens = state[c + "cls"] if case.variant == "cascaded" else torch.cat([state[c + "parallel_cls"], state[c + "cascaded_cls"]], 1)
        x = _attention_layer(torch.cat([tokens, frames], 1), state, case)[0]
        if case.variant == "hybrid":
            out["parallel"], x = _project(x[0], state, c + "parallel_proj."), x[1:]
        keywords = _project(x[:KEYWORDS], state, c + "linear_proj.")
        flat = _batchnorm_eval(keywords.T.reshape(-1), state, c + "bn_layer.bn_layer.")  # channel d*K + k
        keywords = flat.reshape(-1, KEYWORDS).T
    else:
        if case.variant == "hybrid_plus":
            x = _attention_layer(torch.cat([state[c + "cls"], frames], 1), state, case)
            out["parallel"], x = _project(x[0, 0], state, c + "parallel_proj."), x[:, 1:]
        else:
            x = _attention_layer(frames, state, case)
        keywords = _batchnorm_eval(_project(_cif(x, state), state, c + "linear_proj."), state, c + "bn_layer.bn_layer.")
    out["cascaded"], out["keywords"] = _vq_and_text(keywords, state)
    return out
