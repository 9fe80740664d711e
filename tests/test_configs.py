from pathlib import Path

import pytest

from speechclip.train.config import load_run_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_every_experiment_has_a_config():
    names = {c.stem for c in CONFIGS}
    for data in ("flickr8k", "spokencoco"):
        for variant in ("parallel", "cascaded", "hybrid"):
            for size in ("base", "large"):
                assert f"{data}_{variant}_{size}" in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_configs_load_with_reference_values(path):
    config = load_run_config(path)
    assert config.train.lr == 1e-4 and config.train.batch_size == 256 and config.train.max_audio_samples == 102400
    assert config.model.variant in path.stem and config.data.kind in path.stem
    large = "large" in path.stem
    assert config.model.upstream == ("facebook/hubert-large-ll60k" if large else "facebook/hubert-base-ls960")
    assert config.model.parallel.ffn_dim == (4096 if large else 3072)
    assert config.model.learn_logit_scale == large and config.model.normalize_hidden_states == large
    assert config.model.cascaded.num_keywords == 8 and config.model.cascaded.vq_temperature == 0.1
