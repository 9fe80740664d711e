"""The frozen-encoder half of `speechclip convert`: fairseq HuBERT and OpenAI CLIP -> Hugging Face folders.

Parity is against the independent reference forwards of tests/official_layout.py (plain torch over the raw
tensors); the tokenizer against OpenAI's BPE algorithm run here on the merges file itself."""

from __future__ import annotations

import gzip
import importlib.util
import re

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import HubertModel

from speechclip.clip import FrozenCLIP
from speechclip.convert import ConversionError
from speechclip.convert.hubert import convert_fairseq_hubert, save_hubert_folder
from speechclip.convert.openai_clip import convert_openai_clip, openai_bpe_path, openai_clip_tokenizer, save_clip_folder
from speechclip.upstream import SpeechUpstream
from tests.official_layout import (
    fairseq_hubert_state,
    official_waveform_normalisation,
    openai_clip_state,
    reduce_vocabulary,
    reference_fairseq_hubert_layer_results,
    reference_openai_image_features,
    reference_openai_text_features,
)

HUBERT_PREFIX, CLIP_PREFIX, SOURCE = "audio_encoder.encoder.", "clip.model.", "released.ckpt"
TOL = 1e-4  # float32; the measured differences are ~1e-6
LAYOUTS = {"base": False, "large": True}  # name -> fairseq layer_norm_first


def prefixed(state: dict, prefix: str) -> dict:
    return {prefix + key: value for key, value in state.items()}


@pytest.fixture(scope="module")
def hubert_folders(tmp_path_factory) -> dict:
    """Each layout: its official state (bare names) and the converted, saved folder."""
    out = {}
    for name, layer_norm_first in LAYOUTS.items():
        state = fairseq_hubert_state(layer_norm_first, seed=1)
        config, converted, _ = convert_fairseq_hubert(prefixed(state, HUBERT_PREFIX), HUBERT_PREFIX, layer_norm_first, SOURCE)
        folder = save_hubert_folder(config, converted, tmp_path_factory.mktemp(name), normalize_waveform=layer_norm_first)
        out[name] = (state, str(folder))
    return out


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> tuple[dict, str]:
    """A checkpoint-like CLIP: reduced token table under clip.model., the full one passed beside it."""
    state = openai_clip_state(seed=2)
    kept = [49406, 49407, *range(200, 900)]
    config, converted, _ = convert_openai_clip(prefixed(reduce_vocabulary(state, kept), CLIP_PREFIX), CLIP_PREFIX,
                                               state["token_embedding.weight"], SOURCE)
    folder = save_clip_folder(config, converted, openai_clip_tokenizer(), tmp_path_factory.mktemp("clip"))
    return state, str(folder)


@pytest.fixture(scope="module")
def frozen_clip(clip_folder) -> tuple[dict, FrozenCLIP]:
    """The converted folder loaded as the library loads a CLIP (once for the module)."""
    state, folder = clip_folder
    return state, FrozenCLIP(folder)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_hubert_every_key_is_consumed_and_config_read_from_shapes(layout):
    layer_norm_first = LAYOUTS[layout]
    state = prefixed(fairseq_hubert_state(layer_norm_first), HUBERT_PREFIX)
    state["audio_encoder.weightedsum_layer.weights"] = torch.zeros(3)  # outside the prefix: not ours
    config, converted, consumed = convert_fairseq_hubert(state, HUBERT_PREFIX, layer_norm_first, SOURCE)
    assert consumed == {k for k in state if k.startswith(HUBERT_PREFIX)}
    assert set(converted) == set(HubertModel(config).state_dict())
    assert not any("final_proj" in k or "label_embs" in k for k in converted)
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers, config.intermediate_size) == (128, 2, 2, 256)
    assert config.conv_dim == (32, 32, 32, 32, 32, 32, 48) and config.conv_kernel == (10, 3, 3, 3, 3, 2, 2)
    assert (config.num_conv_pos_embeddings, config.num_conv_pos_embedding_groups) == (16, 4)
    assert config.conv_bias is layer_norm_first and config.do_stable_layer_norm is layer_norm_first
    assert config.feat_extract_norm == ("layer" if layer_norm_first else "group")


def test_hubert_unknown_key_and_wrong_shape_name_the_key():
    state = prefixed(fairseq_hubert_state(False), HUBERT_PREFIX)
    extra = dict(state, **{HUBERT_PREFIX + "encoder.layers.0.adapter.weight": torch.zeros(4)})
    with pytest.raises(ConversionError, match=rf"^{SOURCE}: {re.escape(HUBERT_PREFIX)}encoder\.layers\.0\.adapter\.weight"):
        convert_fairseq_hubert(extra, HUBERT_PREFIX, False, SOURCE)
    bad = dict(state, **{HUBERT_PREFIX + "encoder.layers.1.fc2.bias": torch.zeros(127)})
    with pytest.raises(ConversionError, match=rf"^{SOURCE}: {re.escape(HUBERT_PREFIX)}encoder\.layers\.1\.fc2\.bias: shape"):
        convert_fairseq_hubert(bad, HUBERT_PREFIX, False, SOURCE)
    missing = {k: v for k, v in state.items() if not k.endswith("encoder.layers.1.fc1.bias")}
    with pytest.raises(ConversionError, match=rf"^{SOURCE}: no source key provides encoder\.layers\.1\.feed_forward"):
        convert_fairseq_hubert(missing, HUBERT_PREFIX, False, SOURCE)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch", [1, 3])
def test_hubert_hidden_states_equal_the_fairseq_forward(hubert_folders, layout, batch):
    """HF's hidden_states are SpeechCLIP's layer_results, the Large-like last one WITHOUT the final encoder
    LayerNorm (this transformers records each layer's output); last_hidden_state is fairseq's output."""
    state, folder = hubert_folders[layout]
    wave = torch.randn(batch, 6400, generator=torch.Generator().manual_seed(batch))
    reference = reference_fairseq_hubert_layer_results(state, wave, LAYOUTS[layout])
    model = HubertModel.from_pretrained(folder).eval()
    with torch.no_grad():
        output = model(wave, output_hidden_states=True)
    assert len(output.hidden_states) == len(reference.layer_results) == 3
    for ours, theirs in zip(output.hidden_states, reference.layer_results):
        assert ours.shape == theirs.shape == (batch, 19, 128)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=TOL)
    torch.testing.assert_close(output.last_hidden_state, reference.last_hidden_state, rtol=0, atol=TOL)
    if LAYOUTS[layout]:  # the two differ by the final LayerNorm: the comparison above can tell them apart
        assert (output.hidden_states[-1] - reference.last_hidden_state).abs().max() > 0.1

    # SpeechUpstream normalises the waveform of pre-norm (Large) models by default, as the official
    # preprocess_input does; its states are then the official ones on the normalised clips.
    upstream = SpeechUpstream(folder)
    states, mask = upstream(wave, torch.full((batch,), wave.shape[1]))
    official = official_waveform_normalisation(wave) if LAYOUTS[layout] else wave
    expected = reference_fairseq_hubert_layer_results(state, official, LAYOUTS[layout]).layer_results
    assert bool(mask.all()) and states.shape[0] == 3
    torch.testing.assert_close(states, torch.stack(expected), rtol=0, atol=TOL)


def test_hubert_folder_feature_extractor(hubert_folders):
    import json
    from pathlib import Path

    for layout, (_, folder) in hubert_folders.items():
        config = json.loads((Path(folder) / "preprocessor_config.json").read_text())
        assert config["sampling_rate"] == 16_000 and config["return_attention_mask"] is True
        assert config["do_normalize"] is LAYOUTS[layout]


def test_clip_every_key_is_consumed_and_config_read_from_shapes():
    state = openai_clip_state(vocab=300)
    checkpoint = prefixed(reduce_vocabulary(state, range(0, 300, 3)), CLIP_PREFIX)
    checkpoint["clip.original_text_emb_weight"] = state["token_embedding.weight"]  # the caller's key
    config, converted, consumed = convert_openai_clip(checkpoint, CLIP_PREFIX, state["token_embedding.weight"], SOURCE)
    assert consumed == {k for k in checkpoint if k.startswith(CLIP_PREFIX)}
    assert converted["text_model.embeddings.token_embedding.weight"] is state["token_embedding.weight"]
    vision, text = config.vision_config, config.text_config
    assert (vision.hidden_size, vision.num_attention_heads, vision.num_hidden_layers) == (128, 2, 2)
    assert (vision.image_size, vision.patch_size, vision.intermediate_size) == (32, 8, 512)
    assert (text.vocab_size, text.hidden_size, text.num_attention_heads, text.max_position_embeddings) == (300, 128, 2, 77)
    assert (text.eos_token_id, config.projection_dim, vision.hidden_act, text.layer_norm_eps) == (299, 64, "quick_gelu", 1e-5)
    torch.testing.assert_close(converted["visual_projection.weight"], state["visual.proj"].t())
    q, k, v = state["transformer.resblocks.1.attn.in_proj_bias"].chunk(3)
    torch.testing.assert_close(converted["text_model.encoder.layers.1.self_attn.k_proj.bias"], k)


def test_clip_unknown_key_wrong_shape_and_half_precision():
    state = prefixed(openai_clip_state(vocab=300), CLIP_PREFIX)
    extra = dict(state, **{CLIP_PREFIX + "visual.layer1.0.conv1.weight": torch.zeros(2)})  # a ResNet CLIP's key
    with pytest.raises(ConversionError, match=rf"^{SOURCE}: clip\.model\.visual\.layer1\.0\.conv1\.weight"):
        convert_openai_clip(extra, CLIP_PREFIX, None, SOURCE)
    bad = dict(state, **{CLIP_PREFIX + "transformer.resblocks.1.mlp.c_fc.weight": torch.zeros(500, 128)})
    with pytest.raises(ConversionError, match=rf"^{SOURCE}: clip\.model\.transformer\.resblocks\.1\.mlp\.c_fc\.weight: shape"):
        convert_openai_clip(bad, CLIP_PREFIX, None, SOURCE)
    with pytest.raises(ConversionError, match=rf"^{SOURCE}: full token table"):
        convert_openai_clip(state, CLIP_PREFIX, torch.zeros(300, 64), SOURCE)
    # clip.load on a GPU leaves fp16 weights: they convert to float32 exactly.
    half = {k: v.half() if k.endswith("c_fc.weight") else v for k, v in state.items()}
    _, converted, _ = convert_openai_clip(half, CLIP_PREFIX, None, SOURCE)
    fc1 = converted["vision_model.encoder.layers.0.mlp.fc1.weight"]
    assert fc1.dtype == torch.float32 and torch.equal(fc1, half[CLIP_PREFIX + "visual.transformer.resblocks.0.mlp.c_fc.weight"].float())


def test_clip_features_equal_the_openai_forward(frozen_clip):
    state, clip = frozen_clip
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(clip.image_features(pixels), reference_openai_image_features(state, pixels), rtol=0, atol=TOL)
    sentences = ["a photo of a dog", "two people riding bikes down a hill", "a red circle"]
    tokens = clip.tokenize(sentences)
    first = tokens["input_ids"][0].tolist()
    assert first[:7] == [49406, 320, 1125, 539, 320, 1929, 49407] and set(first[7:]) == {49407}  # padded with EOS
    expected = reference_openai_text_features(state, tokens["input_ids"])
    torch.testing.assert_close(clip.text_features(tokens["input_ids"], tokens["attention_mask"]), expected, rtol=0, atol=TOL)
    assert clip.max_text_tokens == 77 and clip.token_embedding.shape == (49408, 128)
    # The keyword path (embeddings in, BOS/EOS added) agrees with the token path on real tokens.
    table = state["token_embedding.weight"]
    ids = torch.tensor([[49406, 320, 1125, 539, 49407]])
    torch.testing.assert_close(clip.text_features_from_embeddings(table[ids[:, 1:-1]]),
                               reference_openai_text_features(state, ids), rtol=0, atol=TOL)


def test_clip_image_processor_is_openai_preprocessing(frozen_clip):
    _, clip = frozen_clip
    processor = clip.image_processor
    assert processor.size == {"shortest_edge": 32} and processor.crop_size == {"height": 32, "width": 32}
    assert int(processor.resample) == int(Image.Resampling.BICUBIC)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    pixels = clip.preprocess_images([image])
    # OpenAI: Resize(32, bicubic) -> CenterCrop(32) -> /255 -> (x - mean) / std, written out with Pillow.
    resized = image.resize((48, 32), Image.Resampling.BICUBIC).crop((8, 0, 40, 32))
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    manual = torch.from_numpy(((np.asarray(resized) / 255.0 - mean) / std).transpose(2, 0, 1)).float()[None]
    torch.testing.assert_close(pixels, manual, rtol=0, atol=1e-5)


def openai_bpe_ids(text: str, merges: list[tuple[str, str]]) -> list[int]:
    """OpenAI's SimpleTokenizer on lower-case ASCII text, written here: split into words, end each word with
    </w>, merge the lowest-ranked pair until none is left. Ids come from the merge ranks: a byte is its own
    position (+256 with </w>), the result of merge r is 512 + r; BOS/EOS are 49406/49407."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    byte_id = {chr(b): i for i, b in enumerate(printable)}  # ASCII bytes keep their own character
    rank = {pair: r for r, pair in enumerate(merges)}
    ids = [49406]
    for word in re.findall(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+", text.lower()):
        parts = [(c, byte_id[c]) for c in word[:-1]] + [(word[-1] + "</w>", byte_id[word[-1]] + 256)]
        while len(parts) > 1:
            best = min(range(len(parts) - 1), key=lambda i: rank.get((parts[i][0], parts[i + 1][0]), 10**9))
            pair = (parts[best][0], parts[best + 1][0])
            if pair not in rank:
                break
            merged, i, out = "".join(pair), 0, []
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i][0], parts[i + 1][0]) == pair:
                    out.append((merged, 512 + rank[pair]))
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            parts = out
        ids += [i for _, i in parts]
    return ids + [49407]


def test_tokenizer_matches_openai_bpe_on_its_own_file():
    tokenizer = openai_clip_tokenizer()
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (49406, 49407, 49407)
    lines = gzip.open(openai_bpe_path(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    sentences = ["a photo of a dog", "A man's bicycle leans against 3 red-brick walls!",
                 "two children are playing soccer in the park", "zyxw qqq electroencephalography, isn't it?"]
    for sentence in sentences:
        assert tokenizer(sentence)["input_ids"] == openai_bpe_ids(sentence, merges), sentence
    assert openai_bpe_ids("a photo of a dog", merges) == [49406, 320, 1125, 539, 320, 1929, 49407]


def test_tokenizer_without_open_clip_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "open_clip" else real(name, *a))
    with pytest.raises(ConversionError, match=r"bpe_simple_vocab_16e6\.txt\.gz: .*pip install --no-deps open-clip-torch"):
        openai_clip_tokenizer()
