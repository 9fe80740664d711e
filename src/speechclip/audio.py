"""Waveform I/O: load, downmix, resample to 16 kHz, validate, pad into batches.

Every failure raises `AudioError` naming the file, so a long data pass says which item broke.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import BinaryIO, Sequence, Union

import numpy as np
import soundfile
import soxr
import torch

SAMPLE_RATE = 16_000
# The longest query clip `serve`, `search` and `keywords` take by default: a clip is encoded whole, and memory
# grows with its length (a 10-minute clip took 4 GB through a tiny model's `keywords`)
MAX_QUERY_SECONDS = 60.0
AudioInput = Union[str, Path, np.ndarray, torch.Tensor]


class AudioError(ValueError):
    """Unreadable, empty, silent or non-finite audio; the message starts with the file or field."""


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE, allow_silence: bool = True) -> np.ndarray:
    """Read any soundfile-supported file as float32 mono at `sample_rate` (stereo is averaged)."""
    path = Path(path)
    if path.is_dir():
        raise AudioError(f"{path}: a folder, not an audio file")
    if not path.is_file():
        raise AudioError(f"{path}: no such audio file")
    return decode_audio(str(path), str(path), sample_rate, allow_silence)


def decode_audio(source: str | BinaryIO, name: str, sample_rate: int = SAMPLE_RATE, allow_silence: bool = True) -> np.ndarray:
    """Decode a file path or file-like object (an upload) the same way: mono, resampled, checked."""
    try:
        with soundfile.SoundFile(source) as file:
            cut = cut_short(file.extra_info)
            samples, file_rate = file.read(dtype="float32", always_2d=True), file.samplerate
    except (RuntimeError, soundfile.LibsndfileError) as error:
        raise AudioError(f"{name}: unreadable audio ({reason(error)})") from error
    if cut:
        raise AudioError(f"{name}: {cut}")
    samples = samples.mean(axis=1)
    if file_rate != sample_rate and samples.size:
        samples = soxr.resample(samples, file_rate, sample_rate).astype(np.float32)
    return check_waveform(samples, name, allow_silence)


def reason(error: Exception) -> str:
    """libsndfile's own words: soundfile's message also names what it opened, which for an upload is the repr
    of a temporary file object (`<tempfile.SpooledTemporaryFile object at 0x...>`), not the file's name."""
    return getattr(error, "error_string", None) or str(error)


# libsndfile's header log (`SoundFile.extra_info`) for a WAV whose data chunk is shorter than its header says
_DATA_SIZE = re.compile(r"^data\s*:\s*(\d+) \(should be (\d+)\)", re.MULTILINE)
_STREAMING_SIZES = {0xFFFFFFFF, 0x7FFFFFFF}  # written by streaming encoders that could not seek back: complete files


def cut_short(header_log: str) -> str | None:
    """Why a file is a truncated WAV (an interrupted copy or download), or None. libsndfile reads such a file
    as the samples it holds, so the clip would be trained on or embedded as a fragment without a word."""
    match = _DATA_SIZE.search(header_log)
    if match is None:
        return None
    declared, present = int(match.group(1)), int(match.group(2))
    if declared <= present or declared in _STREAMING_SIZES:
        return None
    return f"cut short: its header promises {declared:,} bytes of samples, the file holds {present:,} (an interrupted copy?)"


def check_waveform(samples: np.ndarray, name: str, allow_silence: bool = True) -> np.ndarray:
    """Reject empty, non-finite and (optionally) all-zero waveforms with an error naming `name`."""
    if samples.ndim != 1:
        raise AudioError(f"{name}: expected a 1-D mono waveform, got shape {tuple(samples.shape)}")
    if samples.size == 0:
        raise AudioError(f"{name}: empty audio (0 samples)")
    if not np.isfinite(samples).all():
        raise AudioError(f"{name}: audio contains NaN or infinite samples")
    if not allow_silence and not np.any(samples):
        raise AudioError(f"{name}: silent audio (all samples are zero)")
    return samples


def to_waveform(audio: AudioInput, name: str = "audio") -> torch.Tensor:
    """Turn a path, numpy array or tensor (already 16 kHz) into a float32 1-D tensor. Integer PCM (int16,
    int32, uint8) is scaled to [-1, 1) as soundfile reads it; other non-float types are refused."""
    if isinstance(audio, (str, Path)):
        return torch.from_numpy(load_audio(audio))
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().cpu().numpy()
    array = _as_float(np.asarray(audio), name)
    if array.ndim == 2 and 1 in array.shape:
        array = array.reshape(-1)
    return torch.from_numpy(check_waveform(array, name).copy())


_PCM_SCALE = {np.dtype(np.int16): 32768.0, np.dtype(np.int32): 2147483648.0, np.dtype(np.int8): 128.0}


def _as_float(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype.kind == "f":
        return array.astype(np.float32, copy=False)
    if array.dtype in _PCM_SCALE:
        return (array / _PCM_SCALE[array.dtype]).astype(np.float32)
    if array.dtype == np.uint8:  # 8-bit WAV PCM is unsigned, centred on 128
        return ((array.astype(np.float32) - 128.0) / 128.0).astype(np.float32)
    raise AudioError(f"{name}: expected float or integer PCM samples, got dtype {array.dtype}")


def pad_batch(waves: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad 1-D waveforms to the longest: returns (B, S) samples and (B,) lengths."""
    lengths = torch.tensor([int(w.numel()) for w in waves], dtype=torch.long)
    batch = torch.zeros(len(waves), int(lengths.max()), dtype=torch.float32)
    for row, wave in enumerate(waves):
        batch[row, : wave.numel()] = wave
    return batch, lengths


def crop(wave: torch.Tensor, max_samples: int | None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Crop to `max_samples`: a random window when a generator is given (training), else the start."""
    if max_samples is None or wave.numel() <= max_samples:
        return wave
    if generator is None:
        return wave[:max_samples]
    start = int(torch.randint(0, wave.numel() - max_samples + 1, (1,), generator=generator))
    return wave[start : start + max_samples]
