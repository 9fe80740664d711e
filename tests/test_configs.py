from pathlib import Path

import pytest

from speechclip.train.config import load_run_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
VARIANTS = ("parallel", "cascaded", "hybrid", "cascaded_plus", "hybrid_plus")


def test_every_experiment_has_a_config():
    names = {c.stem for c in CONFIGS}
    for data in ("flickr8k", "spokencoco"):
        for variant in VARIANTS:
            for size in ("base", "large"):
                assert f"{data}_{variant}_{size}" in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_configs_load_with_reference_values(path):
    config = load_run_config(path)  # also refuses any setting the variant would ignore
    model, train = config.model, config.train
    assert train.lr == 1e-4 and train.max_audio_samples == 102400 and train.batch_size in (64, 128, 256)
    variant = next(v for v in sorted(VARIANTS, key=len, reverse=True) if f"_{v}_" in path.stem)
    assert model.variant == variant and config.data.kind in path.stem
    large = "large" in path.stem
    assert model.upstream == ("facebook/hubert-large-ll60k" if large else "facebook/hubert-base-ls960")
    assert model.normalize_waveform == (large or variant not in ("parallel", "cascaded"))
    assert model.upstream_final_norm is False  # the official forward's last hidden state
    if variant == "parallel":
        assert model.parallel.ffn_dim == (4096 if large else 3072) and model.parallel.final_norm
    if variant in ("parallel", "cascaded"):  # SpeechCLIP: Large learns its temperature and LayerNorms its states
        assert model.learn_logit_scale == large and model.normalize_hidden_states == large
    if variant in ("cascaded", "hybrid"):
        assert model.cascaded.num_keywords == 8
    if model.uses_cascaded:
        assert model.cascaded.vq_temperature == 0.1 and model.cascaded.hard
    if model.uses_cif:
        assert model.cif.max_keywords == 75 and model.cif.frames_per_keyword == 20.0 and model.cif.quantity_loss_weight == 0.25
