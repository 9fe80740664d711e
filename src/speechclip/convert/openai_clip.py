"""OpenAI CLIP weights (as the released SpeechCLIP checkpoints hold them) -> a Hugging Face `CLIPModel` folder
with OpenAI's tokenizer and image preprocessing.

The mapping is data (`CLIP_RULES`, as transformers' convert_clip_original_pytorch_to_hf.py: `in_proj` split
in three, the two projections transposed); `names.apply_name_table` applies it and fails on any key
it cannot place. The config is derived from shapes exactly as OpenAI's `clip.model.build_model` does. The
tokenizer's BPE merges come from the `open-clip-torch` wheel, which ships OpenAI's own file.
"""

from __future__ import annotations

import gzip
import importlib.util
import re
from pathlib import Path
from typing import Mapping

import torch
from PIL import Image
from torch import Tensor
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

from ..file_modes import follow_umask
from .errors import ConversionError
from .names import Rule, apply_name_table, check_against_model, layer_indices, require_tensor

HEAD_DIM = 64  # OpenAI's build_model: heads = width // 64 in both towers
CONTEXT_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # OpenAI's SimpleTokenizer keeps lines[1 : 49152 - 256 - 2 + 1] of the file
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# Inside one residual block, the same in both towers.
_BLOCK = (
    (r"attn\.in_proj_weight", r"self_attn.{}_proj.weight", "split_qkv"),
    (r"attn\.in_proj_bias", r"self_attn.{}_proj.bias", "split_qkv"),
    (r"attn\.out_proj\.(weight|bias)", r"self_attn.out_proj.\2", "copy"),
    (r"ln_1\.(weight|bias)", r"layer_norm1.\2", "copy"),
    (r"ln_2\.(weight|bias)", r"layer_norm2.\2", "copy"),
    (r"mlp\.c_fc\.(weight|bias)", r"mlp.fc1.\2", "copy"),
    (r"mlp\.c_proj\.(weight|bias)", r"mlp.fc2.\2", "copy"),
)
_TOWERS = ((r"visual\.transformer", "vision_model.encoder"), (r"transformer", "text_model.encoder"))

CLIP_RULES: tuple[Rule, ...] = (
    Rule(r"visual\.conv1\.weight", "vision_model.embeddings.patch_embedding.weight"),
    Rule(r"visual\.class_embedding", "vision_model.embeddings.class_embedding"),
    Rule(r"visual\.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
    Rule(r"visual\.ln_pre\.(weight|bias)", r"vision_model.pre_layrnorm.\1"),
    Rule(r"visual\.ln_post\.(weight|bias)", r"vision_model.post_layernorm.\1"),
    Rule(r"visual\.proj", "visual_projection.weight", "transpose"),  # x @ proj  ->  Linear(weight = proj.T)
    Rule(r"token_embedding\.weight", "text_model.embeddings.token_embedding.weight"),
    Rule(r"positional_embedding", "text_model.embeddings.position_embedding.weight"),
    Rule(r"ln_final\.(weight|bias)", r"text_model.final_layer_norm.\1"),
    Rule(r"text_projection", "text_projection.weight", "transpose"),
    Rule(r"logit_scale", "logit_scale"),
) + tuple(
    Rule(rf"{tower}\.resblocks\.(\d+)\.{inner}", rf"{hf}.layers.\1.{target}", op)
    for tower, hf in _TOWERS for inner, target, op in _BLOCK
)
CLIP_DROPPED: tuple[str, ...] = ()  # everything under clip.model. is model


def clip_config_from_state(state: Mapping[str, Tensor], prefix: str, vocab_size: int, source: str) -> CLIPConfig:
    """OpenAI's build_model, read for a ViT CLIP: widths, layers, patch and grid, context, embed dim."""
    p, get = re.escape(prefix), (lambda name: require_tensor(state, prefix, name, source))
    vision_width, _, patch, _ = get("visual.conv1.weight").shape
    grid = round((get("visual.positional_embedding").shape[0] - 1) ** 0.5)
    width = get("ln_final.weight").shape[0]
    vision = dict(
        hidden_size=vision_width, num_attention_heads=vision_width // HEAD_DIM, patch_size=patch, image_size=patch * grid,
        num_hidden_layers=len(layer_indices(state, p + r"visual\.transformer\.resblocks\.(\d+)\.attn\.in_proj_weight")),
        intermediate_size=get("visual.transformer.resblocks.0.mlp.c_fc.weight").shape[0],
    )
    text = dict(
        hidden_size=width, num_attention_heads=width // HEAD_DIM, vocab_size=vocab_size,
        num_hidden_layers=len(layer_indices(state, p + r"transformer\.resblocks\.(\d+)\.attn\.in_proj_weight")),
        intermediate_size=get("transformer.resblocks.0.mlp.c_fc.weight").shape[0],
        max_position_embeddings=get("positional_embedding").shape[0],
        # The EOT token is the largest id (OpenAI pools at argmax(id)); HF pools at the first eos_token_id.
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=1,
    )
    embed_dim = get("text_projection").shape[1]
    for tower in (vision, text):
        tower.update(hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=embed_dim)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=embed_dim,
                      logit_scale_init_value=float(get("logit_scale")))


def convert_openai_clip(state: Mapping[str, Tensor], prefix: str, token_embedding: Tensor | None,
                        source: str) -> tuple[CLIPConfig, dict[str, Tensor], set[str]]:
    """OpenAI CLIP keys under `prefix` -> (HF config, HF state dict, consumed source keys).

    `token_embedding` is the FULL (49408, D) table (the checkpoint's `clip.original_text_emb_weight`); it
    replaces the reduced table under `prefix` so that the folder is OpenAI's CLIP again. The caller marks its
    key consumed. None keeps the table under `prefix` (then it must be a full one, EOT = last id)."""
    reduced = require_tensor(state, prefix, "token_embedding.weight", source)
    table = reduced if token_embedding is None else token_embedding
    if table.ndim != 2 or table.shape[1] != reduced.shape[1] or table.shape[0] < reduced.shape[0]:
        raise ConversionError(f"{source}: full token table of shape {tuple(table.shape)} does not extend "
                              f"{prefix}token_embedding.weight {tuple(reduced.shape)}")
    config = clip_config_from_state(state, prefix, table.shape[0], source)
    converted, origin, consumed = apply_name_table(state, prefix, CLIP_RULES, CLIP_DROPPED, source)
    converted["text_model.embeddings.token_embedding.weight"] = table.float()
    with torch.device("meta"):
        model = CLIPModel(config)
    check_against_model(model, converted, origin, source)
    return config, converted, consumed


def openai_bpe_path() -> Path:
    """OpenAI's merges file as shipped in the open-clip-torch wheel, found without importing open_clip
    (its __init__ imports torchvision, which does not load beside the CPU torch here)."""
    spec = importlib.util.find_spec("open_clip")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        if (Path(folder) / BPE_FILE).is_file():
            return Path(folder) / BPE_FILE
    raise ConversionError(f"{BPE_FILE}: OpenAI's CLIP BPE merges not found (they ship in the open-clip-torch "
                          "wheel): pip install --no-deps open-clip-torch")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table, in OpenAI's order (the vocab's first 256)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return {b: chr(c) for b, c in zip(printable + rest, printable + [256 + n for n in range(len(rest))])}


def openai_clip_tokenizer() -> CLIPTokenizer:
    """OpenAI's CLIP tokenizer rebuilt from its BPE file as SimpleTokenizer builds it: 256 byte characters,
    the same with `</w>`, the 48,894 merges joined, then BOS (49406) and EOS (49407); pad = EOS, 77 tokens."""
    path = openai_bpe_path()
    with gzip.open(path, "rt", encoding="utf-8") as file:
        lines = file.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1: NUM_MERGES + 1]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ConversionError(f"{path}: expected {NUM_MERGES} merges of two symbols, not OpenAI's BPE file")
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ConversionError(f"{path}: merges repeat a token; OpenAI's file gives {len(tokens)} distinct ones")
    return CLIPTokenizer(vocab=vocab, merges=merges, unk_token=EOS, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                         model_max_length=CONTEXT_LENGTH)


def openai_image_processor(resolution: int) -> CLIPImageProcessorPil:
    """OpenAI's preprocess: resize the shortest edge (bicubic), centre crop, CLIP mean/std; Pillow only."""
    return CLIPImageProcessorPil(
        do_resize=True, size={"shortest_edge": resolution}, resample=Image.Resampling.BICUBIC,
        do_center_crop=True, crop_size={"height": resolution, "width": resolution},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=OPENAI_MEAN, image_std=OPENAI_STD,
        do_convert_rgb=True,
    )


def save_clip_folder(config: CLIPConfig, state: Mapping[str, Tensor], tokenizer: CLIPTokenizer,
                     folder: str | Path) -> Path:
    """Write CLIPModel + tokenizer + image processor, as the hub's openai/clip-vit-* folders hold them."""
    folder = Path(folder)
    with torch.device("meta"):
        model = CLIPModel(config)
    model.load_state_dict(dict(state), strict=True, assign=True)  # position_ids (not saved) stay on meta
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    openai_image_processor(config.vision_config.image_size).save_pretrained(folder)
    follow_umask(folder)  # transformers writes its safetensors 0600
    return folder
