"""A SpeechCLIP checkpoint folder: `config.json` (the model config, the frozen encoders named by hub id or by a
path relative to the folder, and a fingerprint of each encoder) and `model.safetensors` (trainable weights only).

Reading checks everything a wrong or damaged folder could get wrong, each failure one line naming the file and
the tensor or field: unreadable or truncated files, missing or extra tensors, shapes the config does not build,
NaN/inf weights, and encoders other than the ones the heads were trained on (a different model of the same
shape would otherwise load without a word). Writing replaces each file atomically.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ConfigError, SpeechCLIPConfig
from .file_modes import follow_umask

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FINGERPRINTS = "encoder_fingerprints"  # config.json key beside the model config
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


class CheckpointError(ValueError):
    """A checkpoint folder cannot be used as it is; the message starts with the file."""


def model_folder(path: str | Path) -> Path:
    """The SpeechCLIP folder (config.json + model.safetensors) meant by what a user may pass as a checkpoint:
    the folder, a file in it, or a run folder (its final/). A training checkpoint (.ckpt) is refused with what
    to give instead: it holds the optimiser and loops for --resume, not a model folder. (Paths only: what `eval`,
    `embed`, `search`, `keywords` and `serve` accept, with no training code loaded.)"""
    path = Path(path)
    if path.is_file() and path.name in ("model.safetensors", "config.json"):
        return path.parent
    if path.suffix == ".ckpt" and path.parent.name == "checkpoints":
        run = path.parent.parent
        raise CheckpointError(f"{path}: a training checkpoint (what --resume continues from), not a model; give the run "
                              f"folder {run} (its final/) or {run / 'best'}")
    if path.suffix == ".ckpt":
        raise CheckpointError(f"{path}: a .ckpt file, not a SpeechCLIP folder (config.json + model.safetensors); a "
                              f"released SpeechCLIP checkpoint becomes one with `speechclip convert {path} --out DIR`")
    if path.is_dir() and not (path / "config.json").exists() and (path / "run.yaml").is_file():
        if not (path / "final").is_dir():
            best = f"give {path / 'best'}, or " if (path / "best").is_dir() else ""
            raise CheckpointError(f"{path}: the run has not finished (no final/); {best}finish it with speechclip train --resume")
        return path / "final"
    return path


def encoder_location(name: str, folder: Path, field: str) -> str:
    """Where a frozen encoder loads from: a folder relative to the checkpoint, an existing path, or a hub id.
    A name that looks like a path and names no folder is an error here, never a hub request."""
    if not os.path.isabs(name) and (folder / name).is_dir():
        return str(folder / name)
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    first = Path(name).parts[0] if Path(name).parts else ""
    local = (folder / first).is_dir() or Path(first).is_dir()  # "encoders/hubert" beside an "encoders" folder
    if _HUB_ID.fullmatch(name) and not name.startswith(".") and not local:
        return name
    raise CheckpointError(f"{folder / CONFIG_NAME}: {field} {name!r} is not a folder (looked in {folder / name}) "
                          "and does not look like a hub id")


def stored_location(location: str, folder: Path) -> str:
    """The name config.json keeps for an encoder: local folders relative to the checkpoint folder, so the
    checkpoint loads from any working directory and moves with the tree it sits in; hub ids as they are."""
    path = Path(location).expanduser()
    if path.is_dir():
        return os.path.relpath(path.resolve(), folder.resolve())
    return location


def read_config(folder: Path) -> tuple[SpeechCLIPConfig, dict[str, str]]:
    """The model config and the encoder fingerprints (empty for checkpoints written before they existed)."""
    path = folder / CONFIG_NAME
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name}: missing; a SpeechCLIP checkpoint folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        values = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: cannot read model config: {error}") from error
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    fingerprints = values.pop(FINGERPRINTS, {}) or {}
    try:
        return SpeechCLIPConfig.from_dict(values), dict(fingerprints)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from error


def read_weights(folder: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """model.safetensors, checked against the tensors the config builds (`expected`: name -> tensor)."""
    path = folder / WEIGHTS_NAME
    try:
        with safe_open(str(path), framework="pt") as file:
            weights = {key: file.get_tensor(key) for key in file.keys()}
    except (SafetensorError, OSError, RuntimeError) as error:
        raise CheckpointError(f"{path}: unreadable weights ({error})") from error
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    for key, tensor in weights.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{path}: tensor {key} has shape {tuple(tensor.shape)}, the config builds "
                                  f"{tuple(expected[key].shape)}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: tensor {key} holds NaN or infinite values")
    return weights


def check_fingerprints(folder: Path, saved: dict[str, str], current: dict[str, str]) -> None:
    for field, digest in saved.items():
        if field in current and current[field] != digest:
            raise CheckpointError(
                f"{folder / CONFIG_NAME}: the {field} loaded is not the one these heads were trained on "
                f"(fingerprint {current[field]}, expected {digest}); pass check_encoders=False "
                "(CLI: --allow-other-encoders) to load it anyway")


def write_checkpoint(folder: Path, config: SpeechCLIPConfig, weights: dict[str, torch.Tensor], fingerprints: dict[str, str]) -> Path:
    """config.json (encoders stored relative to `folder`) and model.safetensors, each replaced atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    values = config.to_dict()
    values["upstream"] = stored_location(config.upstream, folder)
    values["clip"] = stored_location(config.clip, folder)
    values[FINGERPRINTS] = fingerprints
    staged_weights = folder / f".{WEIGHTS_NAME}.{os.getpid()}.tmp"
    staged_config = folder / f".{CONFIG_NAME}.{os.getpid()}.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(staged_weights))
    follow_umask(staged_weights)
    staged_config.write_text(json.dumps(values, indent=2) + "\n")
    staged_weights.replace(folder / WEIGHTS_NAME)
    staged_config.replace(folder / CONFIG_NAME)
    return folder
