"""A training run's configuration: YAML with `model`, `data` and `train` sections, overridable with
`--set section.field=value` on the CLI. Unknown fields are errors that name them; every numeric or
choice field of `data`/`train` is range-checked before anything is loaded or written
(`check_run_config`), with the field and the allowed range in one line."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ..config import ConfigError, SpeechCLIPConfig, _build

DATA_KINDS = ("flickr8k", "spokencoco", "manifest", "synthetic")
ON_ERROR = ("raise", "skip")
PRECISIONS = ("auto", "32-true", "32", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true", "64")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")


@dataclass
class DataConfig:
    kind: str = "manifest"  # flickr8k | spokencoco | manifest
    root: str = ""  # dataset root folder (manifest: folder of <split>.jsonl, or one file)
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    options: dict = field(default_factory=dict)  # reader options, e.g. SpokenCOCO {images, karpathy}
    # raise | skip: a bad clip (unreadable, NaN, shorter than the upstream's minimum) stops the run naming
    # it, or is skipped and counted in train_summary.json; in every data path, the state cache included
    on_error: str = "raise"


@dataclass
class TrainConfig:
    # Reference values (base model, Flickr8k) from the public configs of the SpeechCLIP code.
    # GLOBAL contrastive batch (reference 256 is global): under DDP each of the devices x num_nodes
    # processes takes batch_size / processes clips, and the negatives are gathered back to 256.
    batch_size: int = 256
    lr: float = 1e-4  # reference Adam lr 1e-4
    weight_decay: float = 1e-6  # reference 1e-6
    warmup_steps: int = 5000  # reference linear warm-up 5,000 steps
    max_steps: int = 50000  # reference: linear decay ends at 50,000 steps
    final_lr: float = 1e-8  # reference decay target
    grad_clip: float = 4.0  # reference gradient clipping 4 (0 = no clipping)
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
    # run the frozen upstream once per clip and keep its fp16 states in a file under cache_dir (read per
    # batch, shared by workers and runs): epochs 2..N skip the upstream
    cache_upstream_states: bool = False
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


# ---- ranges: (low, high) inclusive, None = unbounded; a note says why where it is not obvious ----------------
_INT_RANGES: dict[str, tuple[int | None, int | None, str]] = {
    "batch_size": (2, None, " (a contrastive batch needs negatives)"),
    "warmup_steps": (0, None, ""),
    "max_steps": (1, None, ""),
    "num_nodes": (1, None, ""),
    "val_every_steps": (1, None, ""),
    "checkpoint_every_steps": (1, None, ""),
    "log_every_steps": (1, None, ""),
    "num_workers": (0, None, ""),
    "seed": (0, 2**32 - 1, ""),
    "keyword_vocab_size": (1, None, ""),
    "max_audio_samples": (1, None, ""),
    "length_bucket": (1, None, ""),
    "eval_batch_size": (1, None, ""),
}
_FLOAT_RANGES: dict[str, tuple[float, str]] = {  # (low, "open"/"closed" bound)
    "lr": (0.0, "open"), "weight_decay": (0.0, "closed"), "final_lr": (0.0, "closed"), "grad_clip": (0.0, "closed"),
}
_CHOICES = {"precision": PRECISIONS, "accelerator": ACCELERATORS}
_NULLABLE = {"keyword_vocab_size", "max_audio_samples"}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(where: str, value: Any, low: int | None, high: int | None, note: str) -> None:
    if not _is_int(value):
        raise ConfigError(f"{where}={value!r}: must be an integer")
    if low is not None and value < low:
        raise ConfigError(f"{where}={value}: must be >= {low}{note}")
    if high is not None and value > high:
        raise ConfigError(f"{where}={value}: must be <= {high}{note}")


def _check_float(where: str, value: Any, low: float, bound: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"{where}={value!r}: must be a finite number")
    if (bound == "open" and value <= low) or value < low:
        raise ConfigError(f"{where}={value}: must be {'>' if bound == 'open' else '>='} {low:g}")


def _check_devices(value: Any) -> None:
    ok = value == "auto" or (_is_int(value) and (value >= 1 or value == -1))
    ok |= isinstance(value, list) and bool(value) and all(_is_int(v) and v >= 0 for v in value)
    ok |= isinstance(value, str) and (value.strip() == "-1" or (
        any(p.strip() for p in value.split(",")) and all(p.strip().isdigit() for p in value.split(",") if p.strip())))
    if not ok:
        raise ConfigError(f"train.devices={value!r}: must be 'auto', an integer >= 1 (-1 = all), a list of device "
                          "indices or a string such as '0,1'")


def check_train_config(train: TrainConfig) -> None:
    """Every field of `train` in its range, or a ConfigError naming `train.<field>` and the range."""
    for name, (low, high, note) in _INT_RANGES.items():
        value = getattr(train, name)
        if not (value is None and name in _NULLABLE):
            _check_int(f"train.{name}", value, low, high, note)
    for name, (low, bound) in _FLOAT_RANGES.items():
        _check_float(f"train.{name}", getattr(train, name), low, bound)
    _check_step_counts(train)
    if train.final_lr > train.lr:
        raise ConfigError(f"train.final_lr={train.final_lr}: must be <= train.lr={train.lr} (the schedule decays to it)")
    for name, allowed in _CHOICES.items():
        if str(getattr(train, name)) not in allowed:  # YAML reads `precision: 32` as a number
            raise ConfigError(f"train.{name}={getattr(train, name)!r}: must be one of {', '.join(allowed)}")
    from lightning.pytorch.strategies import StrategyRegistry

    strategies = ("auto", *StrategyRegistry.available_strategies())
    if train.strategy not in strategies:
        raise ConfigError(f"train.strategy={train.strategy!r}: must be one of {', '.join(strategies)}")
    _check_devices(train.devices)
    for name in ("image_cache", "cache_upstream_states"):
        if not isinstance(getattr(train, name), bool):
            raise ConfigError(f"train.{name}={getattr(train, name)!r}: must be true or false")
    if not isinstance(train.cache_dir, str) or not train.cache_dir:
        raise ConfigError(f"train.cache_dir={train.cache_dir!r}: must be a folder path")


def _check_step_counts(train: TrainConfig) -> None:
    """A warm-up longer than the run never reaches `lr` nor decays: almost surely a typo for another length."""
    if train.warmup_steps > train.max_steps:
        raise ConfigError(f"train.warmup_steps={train.warmup_steps}: must be <= train.max_steps={train.max_steps} "
                          "(the learning rate would still be warming up when the run ends)")


def config_warnings(train: TrainConfig) -> list[str]:
    """Settings that run but probably not as meant, one line each (printed before training)."""
    if train.val_every_steps > train.max_steps:
        return [f"train.val_every_steps={train.val_every_steps} > train.max_steps={train.max_steps}: no validation "
                "will run, so the run writes no best/ folder; set train.val_every_steps <= train.max_steps for one"]
    return []


def check_heads(model: SpeechCLIPConfig, width: int) -> None:
    """Multi-head attention splits the upstream's width into equal heads: each head count the variant uses must
    divide it (torch would otherwise assert deep inside the model, naming no field)."""
    used = [("model.parallel.num_heads", model.parallel.num_heads)] if model.variant == "parallel" else []
    if model.uses_cascaded:  # the keyword layer; the hybrids' shared layers too
        used.append(("model.cascaded.num_heads", model.cascaded.num_heads))
    for name, heads in used:
        if width % heads:
            raise ConfigError(f"{name}={heads}: must divide the upstream's width {width} (each head takes width / num_heads)")


def check_data_config(data: DataConfig) -> None:
    if data.kind not in DATA_KINDS:
        raise ConfigError(f"data.kind={data.kind!r}: must be one of {', '.join(DATA_KINDS)}")
    if data.on_error not in ON_ERROR:
        raise ConfigError(f"data.on_error={data.on_error!r}: must be one of {', '.join(ON_ERROR)}")
    if not isinstance(data.root, str) or not data.root:
        raise ConfigError(f"data.root={data.root!r}: must name the dataset folder or manifest")
    for name in ("train_split", "val_split", "test_split"):
        if not isinstance(getattr(data, name), str) or not getattr(data, name):
            raise ConfigError(f"data.{name}={getattr(data, name)!r}: must be a split name")
    if not isinstance(data.options, dict):
        raise ConfigError(f"data.options={data.options!r}: must be a mapping")


def check_run_config(config: RunConfig) -> None:
    """The data and train ranges (the model's are checked when its config is built)."""
    check_data_config(config.data)
    check_train_config(config.train)


def check_global_batch(train: TrainConfig, processes: int) -> int:
    """The per-process share of the global contrastive batch; it must divide evenly."""
    if train.batch_size % processes:
        raise ConfigError(f"train.batch_size={train.batch_size}: must be divisible by the {processes} training "
                          f"processes (devices x num_nodes): it is the global contrastive batch")
    if train.batch_size // processes < 1:
        raise ConfigError(f"train.batch_size={train.batch_size}: must be >= the {processes} training processes")
    return train.batch_size // processes


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    values: dict = {}
    if path is not None:
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise ConfigError(f"{path}: cannot read config: {error}") from error
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping with model, data and train sections")
    return run_config_from_dict(apply_overrides(values, overrides or []))


def run_config_from_dict(values: dict) -> RunConfig:
    unknown = set(values) - {"model", "data", "train"}
    if unknown:
        raise ConfigError(f"unknown section(s) {sorted(unknown)}; expected model, data, train")
    _check_model_sections(values.get("model"))
    return RunConfig(
        model=SpeechCLIPConfig.from_dict(values.get("model") or {}),
        data=_build(DataConfig, values.get("data") or {}, "data"),
        train=_build(TrainConfig, values.get("train") or {}, "train"),
    )


def _check_model_sections(model: Any) -> None:
    """`model.parallel: 3` (or `--set model.parallel=3`) gives a section a value: name it, not an AttributeError."""
    if not isinstance(model, dict):
        return  # `model: 3` is refused by name when the config is built
    for name in ("parallel", "cascaded", "cif"):
        if name in model and not isinstance(model[name], dict):
            raise ConfigError(f"model.{name}={model[name]!r}: a section, not a value; set its fields as "
                              f"model.{name}.FIELD=VALUE")


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
