"""Read a released Lightning checkpoint without executing it.

The `.ckpt` files are pickles: tensors, plain containers, and the run's config as the reference code's
custom class `avssl.base.ordered_namespace.OrderedNamespace`. They are read by torch's weights-only
unpickler, which builds only tensors and plain containers and refuses any other global; the config class is
allowed as an inert stand-in that merely keeps the values it is given. A pickle that would call anything else
(an `os.system` reduce, say) is refused with an error naming the file, and nothing runs. Tensors are
memory-mapped, so a 3 GB Large checkpoint is paged in as it is converted, not read whole.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ConversionError


class Namespace:
    """Inert stand-in for the reference code's OrderedNamespace: its pickled state is a mapping of values."""

    def __setstate__(self, state: Any) -> None:
        self.values = dict(state) if isinstance(state, (dict, OrderedDict)) else {}

    def to_dict(self) -> dict:
        return {k: v.to_dict() if isinstance(v, Namespace) else _plain(v) for k, v in getattr(self, "values", {}).items()}


# Data-only classes a released checkpoint names, by the fully qualified name its pickle uses. (Lightning 1.5
# saves hyper_parameters as a plain dict and callback states under string keys, so nothing else is needed.)
INERT_CLASSES = {"avssl.base.ordered_namespace.OrderedNamespace": Namespace}
NOT_READABLE = "not a readable PyTorch checkpoint: damaged, or a file of another format"


def _plain(value: Any) -> Any:
    if isinstance(value, Namespace):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclass
class ReleasedCheckpoint:
    path: Path
    state: dict[str, torch.Tensor]  # the LightningModule's state_dict (memory-mapped tensors)
    config: dict  # the run's config (hyper_parameters["config"]) as plain nested dicts
    extras: list[str]  # the other top-level entries (optimiser states, loops, ...): not model, not converted


def read_checkpoint(path: str | Path) -> ReleasedCheckpoint:
    """Load `path` safely; raise ConversionError naming it if it is not a readable Lightning checkpoint."""
    path = Path(path)
    if path.is_dir():
        raise ConversionError(f"{path}: a folder, not a .ckpt file")
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    check_archive(path)
    raw = _load(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("state_dict"), dict):
        raise ConversionError(f"{path}: not a Lightning checkpoint (no state_dict inside)")
    hyper = raw.get("hyper_parameters") or {}
    config = hyper.get("config") if isinstance(hyper, dict) else None
    if not isinstance(config, Namespace):
        raise ConversionError(f"{path}: no SpeechCLIP config in hyper_parameters['config']; "
                              "is this a checkpoint of atosystem/SpeechCLIP or ShampooWang/SpeechCLIP_plus?")
    state = raw["state_dict"]
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(f"{path}: state_dict entry {bad[0]!r} is not a tensor")
    extras = sorted(k for k in raw if k not in ("state_dict", "hyper_parameters"))
    return ReleasedCheckpoint(path, dict(state), config.to_dict(), extras)


def check_archive(path: Path) -> None:
    """Read every entry of a zip checkpoint through `zipfile`, which checks each one's CRC-32: torch memory-maps
    the tensors without checking, so a corrupted download would otherwise convert into wrong weights. (Legacy
    pickle files carry no checksums; a file that is no zip at all is left to torch.load to name.)"""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            for entry in archive.infolist():
                with archive.open(entry) as data:
                    while data.read(1 << 22):
                        pass
    except zipfile.BadZipFile as error:
        bad = re.search(r"Bad CRC-32 for file '(.+)'", str(error))
        if bad:
            raise ConversionError(f"{path}: damaged (CRC mismatch in {bad.group(1)}); download it again") from None
        raise ConversionError(f"{path}: {NOT_READABLE} (detail: {_first_line(error)})") from None
    except (OSError, EOFError, ValueError) as error:
        raise ConversionError(f"{path}: {NOT_READABLE} (detail: {_first_line(error)})") from None


def _load(path: Path) -> Any:
    inert = [(cls, name) for name, cls in INERT_CLASSES.items()]
    try:
        with torch.serialization.safe_globals(inert):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:
                if "mmap" not in str(error):  # pre-zip (legacy) files cannot be memory-mapped
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        wanted = _refusal(error)
        if wanted is None:
            raise ConversionError(f"{path}: {NOT_READABLE} (detail: {_unpickler_reason(error)})") from error
        raise ConversionError(f"{path}: refused: {wanted}; a released checkpoint holds only tensors, "
                              "containers and its config, so nothing in it was run") from error
    except (RuntimeError, EOFError, ValueError, OSError, KeyError) as error:
        raise ConversionError(f"{path}: {NOT_READABLE} (detail: {_first_line(error)})") from error


def _refusal(error: Exception) -> str | None:
    """The global the pickle wanted, from torch's message (which goes on about allowlisting it); None when the
    unpickler stopped for another reason (not a pickle at all)."""
    text = str(error)
    for marker in ("GLOBAL ", "unrecognized function ", "Can only build", "Can only create new object"):
        if marker in text:
            name = text.split(marker, 1)[1].split()[0].rstrip(".,") if "GLOBAL" in marker or "function" in marker else ""
            return f"loading it would call or build {name or 'an object of a class it names'}"
    return None


def _unpickler_reason(error: Exception) -> str:
    text = str(error)
    return text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0] if "WeightsUnpickler error:" in text else _first_line(error)


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(error).__name__
