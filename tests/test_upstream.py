import pytest
import torch

from speechclip.upstream import SpeechUpstream, WeightedLayerSum

KINDS = ["hubert", "wavlm", "wav2vec2", "data2vec-audio", "hubert-layernorm"]


@pytest.mark.parametrize("kind", KINDS)
def test_loads_frozen_with_all_hidden_states(encoders, kind):
    upstream = SpeechUpstream(encoders[kind])
    assert not any(p.requires_grad for p in upstream.parameters())
    upstream.train()
    assert not upstream.model.training  # frozen model stays in eval mode under .train()
    waves = torch.randn(2, 16000)
    states, mask = upstream(waves, torch.tensor([16000, 9600]))
    assert states.shape[:2] == (upstream.num_hidden_states, 2)
    assert states.shape[-1] == upstream.hidden_size
    assert mask.sum(1).tolist() == upstream.frame_lengths(torch.tensor([16000, 9600])).tolist()
    assert mask.sum(1).tolist() == [49, 29]  # 320x downsampling, 400-sample receptive field
    assert not states.requires_grad


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [1, 2, 3])  # GroupNorm conv stacks: clips a call (1: the model's own layers)
def test_batching_does_not_change_a_clip(encoders, kind, rows, monkeypatch):
    upstream = SpeechUpstream(encoders[kind])
    config = upstream.model.config
    monkeypatch.setattr("speechclip.upstream.CONV_CHUNK_BYTES", rows * config.conv_dim[0] * (16000 // config.conv_stride[0]) * 4)
    short = torch.randn(6400)
    alone, _ = upstream(short[None], torch.tensor([6400]))
    padded = torch.zeros(3, 16000)
    padded[0, :6400] = short
    padded[1:] = torch.randn(2, 16000)
    batched, mask = upstream(padded, torch.tensor([6400, 16000, 12000]))
    frames = int(mask[0].sum())
    torch.testing.assert_close(batched[:, 0, :frames], alone[:, 0], atol=1e-4, rtol=1e-4)


def test_weighted_sum_starts_uniform_and_checks_layers():
    featurizer = WeightedLayerSum(3, 4)
    states = torch.randn(3, 2, 5, 4)
    torch.testing.assert_close(featurizer(states), states.mean(0))
    with pytest.raises(ValueError, match="expected 3 hidden states, got 2"):
        featurizer(states[:2])


def test_concurrent_calls_from_threads_do_not_mix(encoders):
    """A server runs forwards in threads: per-call state (clip lengths, the last layer) must stay per call."""
    from concurrent.futures import ThreadPoolExecutor

    for kind in ("hubert", "hubert-layernorm"):
        upstream = SpeechUpstream(encoders[kind])
        torch.manual_seed(0)
        jobs = [(torch.randn(2, n), torch.tensor([n, n - 1500])) for n in (6000, 9000, 12000, 7000)]
        alone = [upstream(w, l)[0] for w, l in jobs]
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda job: upstream(*job)[0], jobs * 3))
        for i, states in enumerate(together):
            torch.testing.assert_close(states, alone[i % 4], atol=1e-5, rtol=1e-5)


def test_encoders_load_without_transformers_bars_and_leave_the_setting_as_it_was(encoders, capfd):
    """A model loads two frozen encoders: no weight-loading bar for either, and a caller who shows transformers'
    bars still has them after (the tests themselves run with bars off: switched on here to see the difference)."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    from speechclip.clip import FrozenCLIP

    hf_logging.enable_progress_bar()
    try:
        capfd.readouterr()
        SpeechUpstream(encoders["hubert"])
        FrozenCLIP(encoders["clip"])
        assert "Loading weights" not in capfd.readouterr().err
        assert hf_logging.is_progress_bar_enabled()
        AutoModel.from_pretrained(encoders["hubert"])  # the caller's own load: transformers' bar, as before
        assert "Loading weights" in capfd.readouterr().err
    finally:
        hf_logging.disable_progress_bar()
