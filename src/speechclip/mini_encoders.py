"""Small, randomly initialised encoders in the exact Hugging Face formats of the real ones.

Used by the tests (tiny HuBERT/WavLM/wav2vec2 and CLIP saved to a temp folder and loaded back through
`from_pretrained`) and by the offline demo, which pre-trains them on its own corpus. A folder written
here is indistinguishable, to the loading code, from `facebook/hubert-base-ls960` or
`openai/clip-vit-base-patch32` on the hub.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPTokenizer,
    Data2VecAudioConfig,
    Data2VecAudioModel,
    HubertConfig,
    HubertModel,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Model,
    WavLMConfig,
    WavLMModel,
)

from .file_modes import follow_umask

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's own pre-tokenisation (transformers' CLIPTokenizer), so a trained vocabulary splits text the same way.
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

SPEECH_MODELS = {
    "hubert": (HubertConfig, HubertModel),
    "wavlm": (WavLMConfig, WavLMModel),
    "wav2vec2": (Wav2Vec2Config, Wav2Vec2Model),
    "data2vec-audio": (Data2VecAudioConfig, Data2VecAudioModel),
}
# HuBERT Base's conv stack: 7 layers, 320x downsampling (20 ms frames at 16 kHz), 400-sample receptive field.
CONV_KERNELS = (10, 3, 3, 3, 3, 2, 2)
CONV_STRIDES = (5, 2, 2, 2, 2, 2, 2)


def train_clip_tokenizer(texts: Iterable[str], vocab_size: int = 1000) -> CLIPTokenizer:
    """Train a byte-level BPE with CLIP's normaliser, pre-tokeniser and `</w>` word ends."""
    tokenizer = Tokenizer(BPE(unk_token=EOS, end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    # The trainer gives ids to word-final tokens ("e</w>") in hash-map order, and breaks ties between equally
    # frequent merges by id, so two trainings on the same text differ (huggingface/tokenizers#1794). Listing
    # those tokens up front, sorted, fixes their ids and makes the tokenizer the same every time.
    texts = list(texts)
    finals = sorted({piece[-1] + "</w>" for text in texts
                     for piece, _ in tokenizer.pre_tokenizer.pre_tokenize_str(tokenizer.normalizer.normalize_str(text))})
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, *finals],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    state = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    return CLIPTokenizer(vocab=state["vocab"], merges=merges)


def mini_clip_config(vocab_size: int, width: int = 64, layers: int = 2, heads: int = 4, image_size: int = 32,
                     patch_size: int = 8, projection_dim: int = 64, max_tokens: int = 32) -> CLIPConfig:
    """A CLIP of the real architecture, scaled down (ViT image tower + causal text transformer)."""
    text = dict(vocab_size=vocab_size, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                num_attention_heads=heads, max_position_embeddings=max_tokens, bos_token_id=0, eos_token_id=1,
                pad_token_id=1)
    vision = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads,
                  image_size=image_size, patch_size=patch_size)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def save_mini_clip(folder: str | Path, tokenizer: CLIPTokenizer, config: CLIPConfig, model: CLIPModel | None = None) -> Path:
    """Write model, tokenizer and image processor, as on the hub; `model` defaults to a random one."""
    folder = Path(folder)
    model = model or CLIPModel(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    mini_image_processor(config.vision_config.image_size).save_pretrained(folder)
    follow_umask(folder)  # transformers writes its safetensors 0600
    return folder


def mini_image_processor(size: int) -> CLIPImageProcessorPil:
    """CLIP's own preprocessing (resize, centre crop, CLIP mean/std) at the mini ViT's resolution."""
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def mini_speech_config(kind: str = "hubert", width: int = 64, layers: int = 2, heads: int = 4, conv_dim: int | tuple = 64,
                       group_norm: bool = True, **overrides) -> object:
    """A speech SSL config of the real architecture (320x conv downsampling), scaled down."""
    if kind not in SPEECH_MODELS:
        raise ValueError(f"kind: expected one of {sorted(SPEECH_MODELS)}, got {kind!r}")
    config_class, _ = SPEECH_MODELS[kind]
    values = dict(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=4 * width,
                  conv_dim=(conv_dim,) * 7 if isinstance(conv_dim, int) else tuple(conv_dim), conv_kernel=CONV_KERNELS, conv_stride=CONV_STRIDES,
                  num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                  feat_extract_norm="group" if group_norm else "layer", do_stable_layer_norm=not group_norm,
                  mask_time_prob=0.0, layerdrop=0.0)
    if kind == "data2vec-audio":
        values.pop("num_conv_pos_embedding_groups")
        values.pop("feat_extract_norm")
        values.pop("do_stable_layer_norm")
        values.update(num_conv_pos_embeddings=5, conv_pos_kernel_size=5)
    values.update(overrides)
    return config_class(**values)


def save_mini_speech(folder: str | Path, config, model=None) -> Path:
    """Write a speech SSL model folder (weights + config + feature-extractor config)."""
    folder = Path(folder)
    kind = next(k for k, (c, _) in SPEECH_MODELS.items() if isinstance(config, c))
    model = model or SPEECH_MODELS[kind][1](config)
    model.save_pretrained(folder)
    Wav2Vec2FeatureExtractor(sampling_rate=16_000, do_normalize=False, return_attention_mask=True).save_pretrained(folder)
    follow_umask(folder)  # transformers writes its safetensors 0600
    return folder
