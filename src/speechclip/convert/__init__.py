"""The authors' released SpeechCLIP / SpeechCLIP+ checkpoints -> self-contained speechclip folders.

    convert_checkpoint("epoch_131-step_15443-val_recall_mean_1_36.0100.ckpt", "speechclip-base-flickr-parallel")
    SpeechCLIP.from_pretrained("speechclip-base-flickr-parallel")   # no network

The folder holds our `config.json` + `model.safetensors` and the frozen encoders converted from the weights
inside the checkpoint: `hubert/` (HF HubertModel + feature extractor) and `clip/` (HF CLIPModel + OpenAI's
tokenizer + image processor), plus `conversion.json` (where it came from, what was dropped and why).
Reading never executes the checkpoint's pickle (`reader`). Every key of the checkpoint is converted or
deliberately dropped (`heads.HEAD_DROPPED`, `hubert.HUBERT_DROPPED`, `openai_clip.CLIP_DROPPED`); anything
else stops the conversion with its name. The folder appears complete or not at all.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

from safetensors import SafetensorError

from ..folders import remove, remove_leftovers, swap_in
from .errors import ConversionError
from .heads import CLIP_PREFIX, FULL_TABLE, UPSTREAM_PREFIX, head_weights, keyword_vocab, model_values
from .reader import read_checkpoint
from .target import REPORT, check_target

__all__ = ["ConversionError", "convert_checkpoint"]
UPSTREAM_FOLDER, CLIP_FOLDER = "hubert", "clip"


def convert_checkpoint(checkpoint: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Convert one released `.ckpt` into the folder `out`: a new or empty folder, or, with `overwrite`, one that
    holds a converted model (`target.check_target`: nothing else is ever replaced)."""
    out, checkpoint = Path(out), Path(checkpoint)
    check_target(out, checkpoint, overwrite)
    released = read_checkpoint(checkpoint)
    remove_leftovers(out, "converting")  # of killed conversions (other pids)
    staging = out.parent / f".{out.name}.converting-{os.getpid()}"
    remove(staging)
    try:
        _convert_into(staging, released)
        swap_in(staging, out)
    except (OSError, SafetensorError) as error:
        raise _write_error(error, out) from error
    finally:
        remove(staging)
    return out


def _convert_into(staging: Path, released) -> None:
    """Write the whole converted folder to `staging`: encoders, heads, config and report."""
    from ..model import SpeechCLIP  # the model imports nothing from here; the converter builds one
    from .hubert import convert_fairseq_hubert, save_hubert_folder
    from .openai_clip import convert_openai_clip, openai_clip_tokenizer, save_clip_folder

    source, state = str(released.path), released.state
    values, large = model_values(released.config, state, source)
    weights, head_keys = head_weights(state, source)
    weights = {k: v.clone() for k, v in weights.items()}  # small; the memory-mapped file can then be let go
    vocab, full_table = keyword_vocab(state, source)
    hubert_config, hubert_state, upstream_keys = convert_fairseq_hubert(state, UPSTREAM_PREFIX, large, source)
    save_hubert_folder(hubert_config, hubert_state, staging / UPSTREAM_FOLDER, values["normalize_waveform"])
    del hubert_state
    clip_config, clip_state, clip_keys = convert_openai_clip(state, CLIP_PREFIX, full_table, source)
    save_clip_folder(clip_config, clip_state, openai_clip_tokenizer(), staging / CLIP_FOLDER)
    del clip_state, full_table
    unused = sorted(set(state) - upstream_keys - clip_keys - head_keys - {FULL_TABLE})
    if unused:
        raise ConversionError(f"{source}: {unused[0]}: no conversion rule for this key ({len(unused)} left)")
    released.state, state = {}, None  # unmap the checkpoint before the model loads its own copy of the encoders
    if values["variant"] != "parallel":
        values.setdefault("cascaded", {})["keyword_vocab"] = vocab
    values.update(upstream=str(staging / UPSTREAM_FOLDER), clip=str(staging / CLIP_FOLDER))
    model = _assemble(SpeechCLIP, values, weights, source)
    model.save_pretrained(staging)
    _write_report(staging / REPORT, released, values, model)  # last: its presence marks a finished folder


def _write_error(error: Exception, out: Path) -> ConversionError:
    """One line for a failed write; safetensors reports a full disk as its own error with the OS code inside."""
    text = str(error)
    if getattr(error, "errno", None) == errno.ENOSPC or "code: 28," in text or "No space left" in text:
        return ConversionError(f"no space left on device writing {out}")
    detail = getattr(error, "strerror", None) or (text.splitlines()[0] if text else type(error).__name__)
    return ConversionError(f"{out}: cannot write the converted folder ({detail})")


def _assemble(model_class, values: dict, weights: dict, source: str):
    """Build our model on the converted encoders and load the heads, every tensor checked."""
    from ..config import ConfigError, SpeechCLIPConfig

    try:
        model = model_class(SpeechCLIPConfig.from_dict(values))
    except ConfigError as error:
        raise ConversionError(f"{source}: the converted settings are refused: {error}") from error
    expected = model.trainable_state_dict()
    if "logit_scale" not in weights:  # Base: the reference keeps 1 / 0.07 fixed, not as a tensor
        weights["logit_scale"] = expected["logit_scale"]
    missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or extra:
        raise ConversionError(f"{source}: heads do not match the {values['variant']} layout "
                              f"(missing {missing[:3]}, unexpected {extra[:3]})")
    for name, tensor in weights.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ConversionError(f"{source}: {name}: shape {tuple(tensor.shape)}, the model builds {tuple(expected[name].shape)}")
    model.load_trainable({k: v.to(expected[k].dtype) for k, v in weights.items()}, source)
    return model.eval()


def _write_report(path: Path, released, values: dict, model) -> None:
    report = {
        "source": released.path.name, "bytes": released.path.stat().st_size, "sha256": _sha256(released.path),
        "variant": values["variant"], "official_config": released.config,
        "not_converted": {"checkpoint entries": released.extras,
                          "state_dict": "criterion.eye_mat* (loss buffers), cascaded_branch.clip.* (duplicate CLIP), "
                                        "HuBERT final_proj / label_embs_concat (pre-training heads)"},
        "parameters": model.parameter_counts(),
    }
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


