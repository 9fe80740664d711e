import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from speechclip import AudioError, ConfigError, SpeechCLIP
from speechclip.loss import contrastive_loss
from tests.conftest import tiny_model_config, write_wav

VARIANTS = ["parallel", "cascaded", "hybrid", "cascaded_plus", "hybrid_plus"]


def _step(model: SpeechCLIP) -> None:
    waves = torch.randn(4, 8000)
    output = model(waves, torch.tensor([8000, 6000, 7000, 5000]))
    images = torch.randn(4, model.clip.embed_dim)
    loss = 0
    if output.parallel is not None:
        loss = loss + contrastive_loss(output.parallel, images, model.scale())
    if output.cascaded is not None:
        loss = loss + contrastive_loss(output.cascaded.embeds, images, model.scale())
    loss.backward()


@pytest.mark.parametrize("variant", VARIANTS)
def test_only_trainable_parameters_get_gradients(encoders, variant):
    torch.manual_seed(0)
    model = SpeechCLIP(tiny_model_config(encoders, variant)).train()
    frozen_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("upstream.model", "clip.model"))}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    _step(model)
    for name, param in model.named_parameters():
        if name.startswith(("upstream.", "clip.")) or name == "logit_scale":
            assert param.grad is None, name
    assert all(p.grad is not None for p in trainable)
    optimizer.step()
    for key, value in model.state_dict().items():
        if key in frozen_before:
            assert torch.equal(value, frozen_before[key]), key


@pytest.mark.parametrize("variant", ["cascaded", "hybrid", "cascaded_plus", "hybrid_plus"])
def test_gradient_reaches_cascaded_branch_through_quantizer(encoders, variant):
    model = SpeechCLIP(tiny_model_config(encoders, variant)).train()
    output = model(torch.randn(3, 8000), torch.tensor([8000, 8000, 6000]))
    contrastive_loss(output.cascaded.embeds, torch.randn(3, model.clip.embed_dim), model.scale()).backward()
    head = model.head.keywords
    assert head.projection.weight.grad.abs().sum() > 0
    assert model.featurizer.layer_weights.grad.abs().sum() > 0
    if not model.config.uses_cif:
        assert output.cascaded.token_ids.shape == (3, 4)
    else:  # training targets round(frames / 20): 24, 24 and 18 frames -> 1 keyword each
        assert output.cascaded.lengths.tolist() == [1, 1, 1]
    vocab = set(head.quantizer.vocab_ids.tolist())
    assert set(output.cascaded.token_ids.flatten().tolist()) <= vocab
    assert not vocab & model.clip.special_token_ids


@pytest.mark.parametrize("variant", VARIANTS)
def test_embedding_unchanged_when_batched_with_longer_clips(encoders, variant):
    torch.manual_seed(0)
    model = SpeechCLIP(tiny_model_config(encoders, variant)).eval()
    short = torch.randn(5000)
    alone = model.encode_speech([short])
    together = model.encode_speech([torch.randn(16000), short, torch.randn(12000)], batch_size=3)
    torch.testing.assert_close(together[1:2], alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_and_load_give_identical_outputs(encoders, variant, tmp_path):
    torch.manual_seed(0)
    config = tiny_model_config(encoders, variant)
    if config.uses_cascaded:
        config.cascaded.keyword_vocab = list(range(250, 320))
    model = SpeechCLIP(config)
    _step(model)  # move BatchNorm statistics away from their initial values
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    model.eval()
    clips = [np.random.default_rng(1).standard_normal(9000).astype(np.float32), torch.randn(7000)]
    folder = model.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((folder / "config.json").read_text())
    # local encoders are recorded relative to the checkpoint folder, so it loads from any working directory
    assert (folder / saved["upstream"]).resolve() == Path(encoders["hubert"]).resolve()
    assert (folder / saved["clip"]).resolve() == Path(encoders["clip"]).resolve()
    from safetensors.torch import load_file

    assert not any(k.startswith(("upstream.model", "clip.model")) for k in load_file(str(folder / "model.safetensors")))
    loaded = SpeechCLIP.from_pretrained(folder)
    torch.testing.assert_close(loaded.encode_speech(clips), model.encode_speech(clips))
    if config.uses_cascaded:
        assert loaded.keywords(clips, top_k=3) == model.keywords(clips, top_k=3)
        slots = loaded.keywords(clips)[0]
        assert len(slots[0]) == 5 and (len(slots) == 4 or config.uses_cif)


def test_encode_image_text_and_paths(encoders, tmp_path):
    model = SpeechCLIP(tiny_model_config(encoders))
    Image.new("RGB", (40, 30), "blue").save(tmp_path / "a.png")
    images = model.encode_image([tmp_path / "a.png", Image.new("RGB", (8, 8))])
    texts = model.encode_text(["a red circle", "two blue squares on the left"])
    wav = write_wav(tmp_path / "a.wav", np.random.default_rng(0).standard_normal(8000).astype(np.float32) * 0.1)
    speech = model.encode_speech([wav])
    for embeds in (images, texts, speech):
        assert embeds.shape[1] == model.clip.embed_dim
        torch.testing.assert_close(embeds.norm(dim=-1), torch.ones(len(embeds)))
    with pytest.raises(ValueError, match="parallel"):
        model.keywords([wav])


def test_bad_inputs_give_clear_errors(encoders, tmp_path):
    model = SpeechCLIP(tiny_model_config(encoders))
    with pytest.raises(AudioError, match="audio\\[1\\]: empty audio"):
        model.encode_speech([torch.randn(800), torch.zeros(0)])
    with pytest.raises(AudioError, match="missing.wav: no such audio file"):
        model.encode_speech([tmp_path / "missing.wav"])
    with pytest.raises(FileNotFoundError, match="config.json"):
        SpeechCLIP.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="variant"):
        tiny_model_config(encoders, variant="serial")
    with pytest.raises(ConfigError, match="keyword_vocab"):
        SpeechCLIP(tiny_model_config(encoders, "cascaded", cascaded=dict(keyword_vocab=[5, 99999])))
    with pytest.raises(ConfigError, match="unknown field"):
        tiny_model_config(encoders, parallel=dict(layers=2))
    with pytest.raises(ConfigError, match="cascaded.num_layers: 2 layers need cascaded.attention=transformer"):
        tiny_model_config(encoders, "hybrid", cascaded=dict(num_layers=2))
    with pytest.raises(ConfigError, match="cascaded.num_layers"):
        tiny_model_config(encoders, "hybrid", cascaded=dict(attention="transformer", num_layers=0))


def test_checkpoint_of_other_variant_is_refused(encoders, tmp_path):
    SpeechCLIP(tiny_model_config(encoders, "parallel")).save_pretrained(tmp_path / "p")
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    config["variant"] = "cascaded"
    del config["parallel"]  # else refused earlier: parallel settings a cascaded model would ignore
    (tmp_path / "p" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not match the config"):
        SpeechCLIP.from_pretrained(tmp_path / "p")
