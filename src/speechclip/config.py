"""Typed model configuration, saved as `config.json` beside the trained weights.

Defaults are the reference settings of the base model on Flickr8k (DESIGN §1, taken from the public
configs of the SpeechCLIP reference code); the Large model overrides a few of them (see `configs/`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VARIANTS = ("parallel", "cascaded", "hybrid")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range (the message names the field)."""


@dataclass
class ParallelConfig:
    num_layers: int = 1  # reference: one Transformer encoder layer over [CLS] + frames
    num_heads: int = 8  # reference: 8 heads at d_model = upstream width
    ffn_dim: int = 3072  # reference: 3072 (Base), 4096 (Large)
    dropout: float = 0.1  # reference: 0.1, post-norm, GELU


@dataclass
class CascadedConfig:
    num_keywords: int = 8  # K: reference uses 8 keyword tokens
    num_heads: int = 1  # reference: one attention layer with a single head, no FFN
    dropout: float = 0.1
    vq_temperature: float = 0.1  # reference: fixed cosine-similarity temperature 0.1
    hard: bool = True  # straight-through hard choice (reference); False = soft mixture of subwords
    keywords_shown: int = 5  # reference: 5 nearest subwords listed per keyword
    # CLIP token ids the quantizer may choose; the reference keeps the subwords seen in the training
    # captions. None = the whole CLIP table less BOS/EOS/padding.
    keyword_vocab: list[int] | None = None


@dataclass
class SpeechCLIPConfig:
    upstream: str = "facebook/hubert-base-ls960"  # any HF speech SSL model id or local folder
    clip: str = "openai/clip-vit-base-patch32"  # DESIGN: the paper's table uses ViT-B/32
    variant: str = "parallel"  # parallel | cascaded | hybrid
    normalize_waveform: bool = False  # Large: zero-mean unit-variance waveform (as its pre-training)
    normalize_hidden_states: bool = False  # Large: LayerNorm each hidden state before the weighted sum
    logit_scale_init: float = 1 / 0.07  # reference contrastive temperature 0.07
    learn_logit_scale: bool = False  # Base keeps 0.07 fixed; Large learns it
    logit_scale_max: float = 100.0  # clamp as in CLIP
    parallel_loss_weight: float = 1.0  # hybrid: losses weighted 1:1
    cascaded_loss_weight: float = 1.0
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cascaded: CascadedConfig = field(default_factory=CascadedConfig)

    def __post_init__(self) -> None:
        if isinstance(self.parallel, dict):
            self.parallel = _build(ParallelConfig, self.parallel, "parallel")
        if isinstance(self.cascaded, dict):
            self.cascaded = _build(CascadedConfig, self.cascaded, "cascaded")
        if self.variant not in VARIANTS:
            raise ConfigError(f"variant: expected one of {VARIANTS}, got {self.variant!r}")
        if self.cascaded.num_keywords < 1:
            raise ConfigError("cascaded.num_keywords must be >= 1")
        if self.cascaded.vq_temperature <= 0:
            raise ConfigError("cascaded.vq_temperature must be > 0")

    @property
    def uses_parallel(self) -> bool:
        return self.variant in ("parallel", "hybrid")

    @property
    def uses_cascaded(self) -> bool:
        return self.variant in ("cascaded", "hybrid")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SpeechCLIPConfig":
        return _build(cls, values, "model")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "SpeechCLIPConfig":
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ConfigError(f"{path}: cannot read model config: {error}") from error
        return cls.from_dict(values)


def _build(kind: type, values: dict[str, Any], where: str) -> Any:
    """Build a config dataclass, naming any unknown field instead of a bare TypeError."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
    fields = {f.name: str(f.type) for f in dataclasses.fields(kind)}
    return kind(**{name: _coerce(value, fields[name], f"{where}.{name}") for name, value in values.items()})


def _coerce(value: Any, annotation: str, where: str) -> Any:
    """YAML 1.1 reads `3e-4` as a string; turn numeric strings into the field's number type."""
    if not isinstance(value, str):
        return value
    for name, cast in (("float", float), ("int", int)):
        if annotation.startswith(name):
            try:
                return cast(value)
            except ValueError as error:
                if "None" in annotation and value.lower() in ("none", "null"):
                    return None
                raise ConfigError(f"{where}: expected {name}, got {value!r}") from error
    return value
