"""A training run's configuration: YAML with `model`, `data` and `train` sections, overridable with
`--set section.field=value` on the CLI. Unknown fields are errors that name them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ..config import ConfigError, SpeechCLIPConfig, _build


@dataclass
class DataConfig:
    kind: str = "manifest"  # flickr8k | spokencoco | manifest
    root: str = ""  # dataset root folder (manifest: folder of <split>.jsonl, or one file)
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    options: dict = field(default_factory=dict)  # reader options, e.g. SpokenCOCO {images, karpathy}
    on_error: str = "raise"  # raise | skip: a bad sample stops the run, or is skipped and counted


@dataclass
class TrainConfig:
    # Reference values (base model, Flickr8k) from the public configs of the SpeechCLIP code.
    batch_size: int = 256  # reference 256
    lr: float = 1e-4  # reference Adam lr 1e-4
    weight_decay: float = 1e-6  # reference 1e-6
    warmup_steps: int = 5000  # reference linear warm-up 5,000 steps
    max_steps: int = 50000  # reference: linear decay ends at 50,000 steps
    final_lr: float = 1e-8  # reference decay target
    grad_clip: float = 4.0  # reference gradient clipping 4
    max_audio_samples: int | None = 102400  # reference random crop 6.4 s in training; full length in eval
    precision: str = "auto"  # auto = 16-mixed on GPU (reference fp16), 32 on CPU
    accelerator: str = "auto"
    devices: Any = "auto"  # Lightning: int, list or "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # e.g. ddp, ddp_find_unused_parameters_false
    val_every_steps: int = 1000
    checkpoint_every_steps: int = 1000
    log_every_steps: int = 50
    num_workers: int = 2
    seed: int = 7
    keyword_vocab_size: int | None = None  # cascaded: keep the N most frequent caption subwords (None = all seen)
    image_cache: bool = True  # False = run the CLIP image tower every step (benchmarks only)
    cache_upstream_states: bool = False  # run the frozen upstream once per clip, keep its states in memory (small data only)
    cache_dir: str = ".cache/speechclip"
    length_bucket: int = 50  # batches are formed from pools of length_bucket * batch_size similar-length clips
    eval_batch_size: int = 32

    def resolved_precision(self) -> str:
        """Lightning's precision string: `auto` = 16-mixed on a GPU (reference fp16), 32-true on CPU."""
        if self.precision != "auto":
            return self.precision
        gpu = self.accelerator in ("gpu", "cuda") or (self.accelerator == "auto" and torch.cuda.is_available())
        return "16-mixed" if gpu else "32-true"


@dataclass
class RunConfig:
    model: SpeechCLIPConfig = field(default_factory=SpeechCLIPConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    values: dict = {}
    if path is not None:
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise ConfigError(f"{path}: cannot read config: {error}") from error
    return run_config_from_dict(apply_overrides(values, overrides or []))


def run_config_from_dict(values: dict) -> RunConfig:
    unknown = set(values) - {"model", "data", "train"}
    if unknown:
        raise ConfigError(f"unknown section(s) {sorted(unknown)}; expected model, data, train")
    return RunConfig(
        model=SpeechCLIPConfig.from_dict(values.get("model") or {}),
        data=_build(DataConfig, values.get("data") or {}, "data"),
        train=_build(TrainConfig, values.get("train") or {}, "train"),
    )


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply `--set` overrides to a config dict in place (and return it)."""
    for override in overrides:
        _apply(values, override)
    return values


def _apply(values: dict, override: str) -> None:
    """`train.lr=3e-4` or `model.cascaded.num_keywords=4` -> nested dict update (value parsed as YAML)."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {override!r}: expected section.field=value")
    *parents, leaf = key.strip().split(".")
    node = values
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {override!r}: {part} is not a section")
    node[leaf] = yaml.safe_load(raw)
