"""Typed model configuration, saved as `config.json` beside the trained weights.

Defaults are the reference settings of the base model on Flickr8k (DESIGN §1, taken from the public
configs of the SpeechCLIP reference code and, for CIF, of SpeechCLIP+); the Large model overrides a few
of them (see `configs/`). Every field is either used by the chosen variant or, when set away from its
default, refused with an error naming it: no setting is silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# parallel: [CLS] -> encoder -> CLIP space. cascaded: K keywords -> CLIP text tower. hybrid: both over one
# shared attention layer (SpeechCLIP+). *_plus: keywords by continuous integrate-and-fire (SpeechCLIP+).
VARIANTS = ("parallel", "cascaded", "hybrid", "cascaded_plus", "hybrid_plus")
ATTENTION_KINDS = ("attention", "transformer")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range (the message names the field)."""


@dataclass
class ParallelConfig:
    num_layers: int = 1  # reference: one Transformer encoder layer over [CLS] + frames
    num_heads: int = 8  # reference: 8 heads at d_model = upstream width
    ffn_dim: int = 3072  # reference: 3072 (Base), 4096 (Large)
    dropout: float = 0.1  # reference: 0.1, post-norm, GELU
    final_norm: bool = True  # reference: the encoder ends with a LayerNorm after its layer(s)
    # hidden widths of an MLP projection to CLIP space (SpeechCLIP+ Large hybrid: [1024]); [] = one Linear
    projection_hidden: list[int] = field(default_factory=list)
    projection_dropout: float = 0.1  # reference MLP dropout (only with projection_hidden)


@dataclass
class CascadedConfig:
    num_keywords: int = 8  # K: reference uses 8 keyword tokens (the CIF variants fire a variable number)
    # the keyword attention layer: "attention" = multi-head attention + residual + LayerNorm, no FFN
    # (reference); "transformer" = a Transformer encoder layer with a final LayerNorm (SpeechCLIP+ Large COCO)
    attention: str = "attention"
    num_heads: int = 1  # reference: one head (Base); SpeechCLIP+ Large cascaded+: 8
    num_layers: int = 1  # reference transformer_args.n_layers: 1; more only with attention="transformer"
    ffn_dim: int = 3072  # only with attention="transformer"
    dropout: float = 0.1
    # hidden widths of an MLP from the upstream width to CLIP's token width (SpeechCLIP+ Large: [1024]); [] = Linear
    projection_hidden: list[int] = field(default_factory=list)
    projection_dropout: float = 0.1  # reference MLP dropout (only with projection_hidden)
    vq_temperature: float = 0.1  # reference: fixed cosine-similarity temperature 0.1
    hard: bool = True  # straight-through hard choice (reference); False = soft mixture of subwords
    keywords_shown: int = 5  # reference: 5 nearest subwords listed per keyword
    # CLIP token ids the quantizer may choose; the reference keeps the subwords seen in the training
    # captions. None = the whole CLIP table less BOS/EOS/padding.
    keyword_vocab: list[int] | None = None


@dataclass
class CIFConfig:
    """Continuous integrate-and-fire (SpeechCLIP+ `cif.py` and its configs): a weight in [0, 1] per frame;
    a keyword fires each time the accumulated weight reaches the threshold."""

    threshold: float = 1.0  # reference cif_threshold
    max_keywords: int = 75  # reference MAX_FEAT_LEN: 75 keywords + BOS + EOS fill CLIP's 77 positions
    conv_width: int = 3  # reference conv_cif_width: 3 (Base, Large Flickr), 5 (Large COCO cascaded+)
    conv_layers: int = 1  # reference num_layer: 1; 2 on Large COCO cascaded+
    # reference code: nn.Dropout() with its default p=0.5 in the weight network (its configs' 0.1 is unused)
    dropout: float = 0.5
    frames_per_keyword: float = 20.0  # reference: target length round(frames / 20), 2.5 keywords/s at 50 Hz
    quantity_loss_weight: float = 0.25  # reference: 0.25 (L1 between summed weights and target length)
    scaling_steps: int = 5000  # reference scaling_step: weights scaled to the target for the first N steps
    tail_threshold: float = 0.5  # reference: at inference a leftover weight >= 0.5 fires one more keyword


@dataclass
class SpeechCLIPConfig:
    upstream: str = "facebook/hubert-base-ls960"  # any HF speech SSL model id or local folder
    clip: str = "openai/clip-vit-base-patch32"  # DESIGN: the paper's table uses ViT-B/32
    variant: str = "parallel"  # one of VARIANTS
    # None = from the upstream: a pre-norm ("stable layer norm") model such as HuBERT Large was pre-trained
    # on normalised waveforms, and the Large configs LayerNorm its hidden states; Base gets neither.
    normalize_waveform: bool | None = None
    normalize_hidden_states: bool | None = None
    # pre-norm upstreams only: apply the encoder's final LayerNorm to the last hidden state. The official
    # SpeechCLIP forward takes the last layer's output without it.
    upstream_final_norm: bool = False
    logit_scale_init: float = 1 / 0.07  # reference contrastive temperature 0.07
    learn_logit_scale: bool = False  # Base keeps 0.07 fixed; Large learns it
    logit_scale_max: float = 100.0  # clamp as in CLIP
    parallel_loss_weight: float = 1.0  # hybrid: losses weighted 1:1 (SpeechCLIP+ Large Flickr hybrid+: 0.5)
    cascaded_loss_weight: float = 1.0  # (SpeechCLIP+ Large Flickr hybrid+: 1.5)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cascaded: CascadedConfig = field(default_factory=CascadedConfig)
    cif: CIFConfig = field(default_factory=CIFConfig)

    def __post_init__(self) -> None:
        for name, kind in (("parallel", ParallelConfig), ("cascaded", CascadedConfig), ("cif", CIFConfig)):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, _build(kind, getattr(self, name), name))
        if self.variant not in VARIANTS:
            raise ConfigError(f"variant: expected one of {VARIANTS}, got {self.variant!r}")
        _check_ranges(self)
        _check_unused(self)

    @property
    def uses_parallel(self) -> bool:
        return self.variant in ("parallel", "hybrid", "hybrid_plus")

    @property
    def uses_cascaded(self) -> bool:
        return self.variant != "parallel"

    @property
    def uses_cif(self) -> bool:
        """Keywords by integrate-and-fire: a variable number per utterance."""
        return self.variant.endswith("_plus")

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
        try:
            return cls.from_dict(values)
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from error


# ---- which fields each variant reads ----------------------------------------------------------------
_PARALLEL_ENCODER = {"num_layers", "num_heads", "ffn_dim", "dropout", "final_norm"}
_PROJECTION = {"projection_hidden", "projection_dropout"}
_CASCADED_ALL = {f.name for f in dataclasses.fields(CascadedConfig)}
_CIF_ALL = {f.name for f in dataclasses.fields(CIFConfig)}
_USED = {  # variant -> section -> the fields it reads (the shared layers of the hybrids come from `cascaded`)
    "parallel": {"parallel": _PARALLEL_ENCODER | _PROJECTION},
    "cascaded": {"cascaded": _CASCADED_ALL},
    "hybrid": {"parallel": _PROJECTION, "cascaded": _CASCADED_ALL},
    "cascaded_plus": {"cascaded": _CASCADED_ALL - {"num_keywords"}, "cif": _CIF_ALL},
    "hybrid_plus": {"parallel": _PROJECTION, "cascaded": _CASCADED_ALL - {"num_keywords"}, "cif": _CIF_ALL},
}
_HYBRIDS = ("hybrid", "hybrid_plus")


def _check_unused(config: SpeechCLIPConfig) -> None:
    """A field the variant does not read must keep its default: otherwise the user believes it acts."""
    used = _USED[config.variant]
    for section, kind in (("parallel", ParallelConfig), ("cascaded", CascadedConfig), ("cif", CIFConfig)):
        default = kind()
        for f in dataclasses.fields(kind):
            if f.name not in used.get(section, set()) and getattr(getattr(config, section), f.name) != getattr(default, f.name):
                raise ConfigError(f"{section}.{f.name}: not used by the {config.variant} variant; remove it "
                                  f"(it would be silently ignored)")
    for name in ("parallel_loss_weight", "cascaded_loss_weight"):
        if config.variant not in _HYBRIDS and getattr(config, name) != 1.0:
            raise ConfigError(f"{name}: only the hybrid variants weigh two losses; remove it for {config.variant}")


# ---- ranges -------------------------------------------------------------------------------------------
def _check_ranges(config: SpeechCLIPConfig) -> None:
    p, c, f = config.parallel, config.cascaded, config.cif
    checks = [
        ("parallel.num_layers", p.num_layers, 1, None), ("parallel.num_heads", p.num_heads, 1, None),
        ("parallel.ffn_dim", p.ffn_dim, 1, None), ("cascaded.num_keywords", c.num_keywords, 1, 75),
        ("cascaded.num_heads", c.num_heads, 1, None), ("cascaded.num_layers", c.num_layers, 1, None),
        ("cascaded.ffn_dim", c.ffn_dim, 1, None),
        ("cascaded.keywords_shown", c.keywords_shown, 1, None), ("cif.max_keywords", f.max_keywords, 1, 75),
        ("cif.conv_width", f.conv_width, 1, None), ("cif.conv_layers", f.conv_layers, 1, None),
        ("cif.scaling_steps", f.scaling_steps, -1, None),
    ]
    for name, value, low, high in checks:
        _check_int(name, value, low, high)
    for name, value in (("parallel.dropout", p.dropout), ("parallel.projection_dropout", p.projection_dropout),
                        ("cascaded.dropout", c.dropout), ("cascaded.projection_dropout", c.projection_dropout),
                        ("cif.dropout", f.dropout)):
        _check_float(name, value, 0.0, 1.0, high_open=True)
    for name, value in (("cascaded.vq_temperature", c.vq_temperature), ("cif.threshold", f.threshold),
                        ("cif.frames_per_keyword", f.frames_per_keyword), ("logit_scale_init", config.logit_scale_init),
                        ("logit_scale_max", config.logit_scale_max)):
        _check_float(name, value, 0.0, None, low_open=True)
    for name, value in (("cif.quantity_loss_weight", f.quantity_loss_weight), ("cif.tail_threshold", f.tail_threshold),
                        ("parallel_loss_weight", config.parallel_loss_weight),
                        ("cascaded_loss_weight", config.cascaded_loss_weight)):
        _check_float(name, value, 0.0, None)
    if c.attention not in ATTENTION_KINDS:
        raise ConfigError(f"cascaded.attention: expected one of {ATTENTION_KINDS}, got {c.attention!r}")
    if c.num_layers != 1 and c.attention != "transformer":
        raise ConfigError(f"cascaded.num_layers: {c.num_layers} layers need cascaded.attention=transformer "
                          f"(the reference's attention layer does not stack)")
    for name, widths in (("parallel.projection_hidden", p.projection_hidden), ("cascaded.projection_hidden", c.projection_hidden)):
        if not isinstance(widths, list) or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths):
            raise ConfigError(f"{name}: expected a list of widths >= 1, got {widths!r}")


def _check_int(name: str, value: Any, low: int, high: int | None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{name}={value!r}: expected an integer")
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in {low}..{high}"
        raise ConfigError(f"{name}={value}: must be {allowed}")


def _check_float(name: str, value: Any, low: float, high: float | None, low_open: bool = False, high_open: bool = False) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"{name}={value!r}: expected a finite number")
    too_low = value <= low if low_open else value < low
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lower = f"> {low}" if low_open else f">= {low}"
        upper = "" if high is None else (f" and < {high}" if high_open else f" and <= {high}")
        raise ConfigError(f"{name}={value}: must be {lower}{upper}")


# ---- building from plain dicts (JSON / YAML) --------------------------------------------------------------
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
        if annotation.startswith("float") and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
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
