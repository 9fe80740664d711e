"""Every train/data setting is range-checked before anything is loaded, in one line naming field and range."""

import dataclasses
from pathlib import Path

import pytest

from speechclip.config import ConfigError, SpeechCLIPConfig
from speechclip.train.config import (TrainConfig, _FLOAT_RANGES, _INT_RANGES, check_global_batch, check_heads,
                                     check_run_config, config_warnings, load_run_config, run_config_from_dict)

BAD = [
    ("train.batch_size", -4, "train.batch_size=-4: must be >= 2 (a contrastive batch needs negatives)"),
    ("train.batch_size", 1, "train.batch_size=1: must be >= 2 (a contrastive batch needs negatives)"),
    ("train.batch_size", 8.5, "train.batch_size=8.5: must be an integer"),
    ("train.batch_size", True, "train.batch_size=True: must be an integer"),
    ("train.max_steps", -1, "train.max_steps=-1: must be >= 1"),
    ("train.max_steps", 0, "train.max_steps=0: must be >= 1"),
    ("train.warmup_steps", -1, "train.warmup_steps=-1: must be >= 0"),
    ("train.val_every_steps", 0, "train.val_every_steps=0: must be >= 1"),
    ("train.checkpoint_every_steps", 0, "train.checkpoint_every_steps=0: must be >= 1"),
    ("train.log_every_steps", 0, "train.log_every_steps=0: must be >= 1"),
    ("train.num_workers", -2, "train.num_workers=-2: must be >= 0"),
    ("train.num_nodes", 0, "train.num_nodes=0: must be >= 1"),
    ("train.seed", -1, "train.seed=-1: must be >= 0"),
    ("train.seed", 2**32, "train.seed=4294967296: must be <= 4294967295"),
    ("train.keyword_vocab_size", 0, "train.keyword_vocab_size=0: must be >= 1"),
    ("train.max_audio_samples", 0, "train.max_audio_samples=0: must be >= 1"),
    ("train.length_bucket", 0, "train.length_bucket=0: must be >= 1"),
    ("train.eval_batch_size", 0, "train.eval_batch_size=0: must be >= 1"),
    ("train.max_steps", 10, "train.warmup_steps=5000: must be <= train.max_steps=10 (the learning rate would still be "
                            "warming up when the run ends)"),
    ("train.lr", 0.0, "train.lr=0.0: must be > 0"),
    ("train.lr", float("nan"), "train.lr=nan: must be a finite number"),
    ("train.lr", "fast", "train.lr: expected float, got 'fast'"),
    ("train.weight_decay", -1e-6, "train.weight_decay=-1e-06: must be >= 0"),
    ("train.final_lr", -1.0, "train.final_lr=-1.0: must be >= 0"),
    ("train.final_lr", 1.0, "train.final_lr=1.0: must be <= train.lr=0.0001 (the schedule decays to it)"),
    ("train.grad_clip", -4.0, "train.grad_clip=-4.0: must be >= 0"),
    ("train.precision", "fp16", "train.precision='fp16': must be one of auto, 32-true, 32, 16-mixed, bf16-mixed"),
    ("train.accelerator", "quantum", "train.accelerator='quantum': must be one of auto, cpu, gpu, cuda, mps, tpu"),
    ("train.strategy", "dpp", "train.strategy='dpp': must be one of auto, ddp, "),
    ("train.devices", 0, "train.devices=0: must be 'auto', an integer >= 1 (-1 = all)"),
    ("train.devices", "two", "train.devices='two': must be 'auto'"),
    ("train.devices", ",", "train.devices=',': must be 'auto'"),
    ("train.image_cache", "yes", "train.image_cache='yes': must be true or false"),
    ("train.cache_dir", "", "train.cache_dir='': must be a folder path"),
    ("data.on_error", "ignore", "data.on_error='ignore': must be one of raise, skip"),
    ("data.kind", "flickr30k", "data.kind='flickr30k': must be one of flickr8k, spokencoco, manifest, synthetic"),
    ("data.root", "", "data.root='': must name the dataset folder or manifest"),
    ("data.val_split", "", "data.val_split='': must be a split name"),
]


def _values(key: str, value) -> dict:
    section, field = key.split(".")
    values = {"data": {"root": "/data"}, "train": {}}
    values.setdefault(section, {})[field] = value
    return values


@pytest.mark.parametrize("key, value, message", BAD, ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_each_bad_value_is_refused_in_one_line_naming_field_and_range(key, value, message):
    with pytest.raises(ConfigError) as error:
        check_run_config(run_config_from_dict(_values(key, value)))
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_every_numeric_train_field_has_a_range():
    numeric = {f.name for f in dataclasses.fields(TrainConfig) if str(f.type).split(" ")[0] in ("int", "float")}
    assert numeric <= set(_INT_RANGES) | set(_FLOAT_RANGES), numeric - set(_INT_RANGES) - set(_FLOAT_RANGES)


def test_defaults_and_the_paper_configs_pass():
    check_run_config(run_config_from_dict({"data": {"root": "/data"}}))
    configs = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))
    assert configs
    for path in configs:
        check_run_config(load_run_config(path, ["data.root=/data"]))


def test_global_batch_is_split_across_processes():
    train = TrainConfig(batch_size=256)
    assert [check_global_batch(train, n) for n in (1, 2, 8)] == [256, 128, 32]
    with pytest.raises(ConfigError, match=r"^train.batch_size=256: must be divisible by the 3 training processes"):
        check_global_batch(train, 3)


def test_valid_edges_are_accepted():
    for values in ({"grad_clip": 0.0, "warmup_steps": 0, "num_workers": 0, "final_lr": 0.0, "devices": [0, 1]},
                   {"devices": "0,1", "max_audio_samples": None, "keyword_vocab_size": None, "strategy": "ddp"},
                   {"devices": -1, "precision": "bf16-mixed", "accelerator": "cpu", "seed": 0},
                   {"devices": "-1", "precision": 32}):
        check_run_config(run_config_from_dict({"data": {"root": "/data"}, "train": values}))


@pytest.mark.parametrize("override", ["model.parallel=3", "model.cascaded=[1, 2]", "model.cif=null"])
def test_a_model_section_given_a_value_is_refused_naming_it(override):
    name, _, value = override.partition("=")
    with pytest.raises(ConfigError) as error:
        load_run_config(None, ["data.root=/data", override])
    assert str(error.value).startswith(f"{name}=") and "a section, not a value" in str(error.value)


def test_head_counts_must_divide_the_upstream_width():
    with pytest.raises(ConfigError, match=r"^model.parallel.num_heads=3: must divide the upstream's width 128 "):
        check_heads(SpeechCLIPConfig(parallel={"num_heads": 3}), 128)
    with pytest.raises(ConfigError, match=r"^model.cascaded.num_heads=5: must divide the upstream's width 768 "):
        check_heads(SpeechCLIPConfig(variant="hybrid", cascaded={"num_heads": 5}), 768)
    check_heads(SpeechCLIPConfig(variant="hybrid", cascaded={"num_heads": 8}), 768)  # hybrid: parallel's heads unused


def test_a_validation_interval_beyond_the_run_is_said_before_training():
    train = TrainConfig(max_steps=500, warmup_steps=10, val_every_steps=1000)
    assert config_warnings(train) == ["train.val_every_steps=1000 > train.max_steps=500: no validation will run, so the "
                                      "run writes no best/ folder; set train.val_every_steps <= train.max_steps for one"]
    assert config_warnings(TrainConfig()) == []
