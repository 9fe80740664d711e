"""Frozen-upstream hidden states computed once per clip and kept on disk, read per batch.

The upstream is frozen and in eval mode, so its states for an uncropped clip never change: when every
clip fits the crop length, epochs 2..N need not run it again. Opt-in (`train.cache_upstream_states`).
Why a file and not a list of tensors: a Python list of per-clip fp16 tensors is resident in every
training process (the demo's two side-by-side runs held ~10 GB each), while one fp16 file per split is
written once and read with `os.preadv` per clip, so a process holds only the batch it is building; the
file sits in the page cache, shared by dataloader workers and runs, and the kernel may drop it.

Layout of a cache folder `<cache_dir>/upstream_states/<key>/` (renamed into place only when complete,
so a killed build is never reused; the key hashes the upstream and the clips, so a stale one neither):
  states.f16   the clips back to back, each one (L+1, T_i, D) float16 block
  index.npz    offset (in rows of D values, -1 = skipped) and frames per item row
  meta.json    L+1, D, the key's inputs and the clips skipped (file -> reason)
Clips longer than the crop are cropped at the frame level (a window's edge frames then keep the
context they had in the full clip: an approximation the waveform path does not make).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..audio import AudioError, load_audio, pad_batch
from ..data import SpokenCaption
from ..fingerprint import folder_files
from ..folders import remove_stale
from ..upstream import SpeechUpstream


class StateStore:
    """Read side: item row -> (L+1, T_i, D) float16 states, by `os.preadv` of the clip's bytes only."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        meta = json.loads((self.folder / "meta.json").read_text())
        self.num_states, self.width = int(meta["num_states"]), int(meta["width"])
        self.skipped: dict[str, str] = dict(meta.get("skipped", {}))
        with np.load(self.folder / "index.npz") as index:
            self.offsets, self.frames = index["offsets"].astype(np.int64), index["frames"].astype(np.int64)
        self._fd: int | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.offsets)

    def has(self, row: int) -> bool:
        return bool(self.offsets[row] >= 0)

    def __getstate__(self) -> dict:  # to spawned dataloader workers: they open the file themselves
        return {**self.__dict__, "_fd": None, "_pid": -1}

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.folder / "states.f16", os.O_RDONLY), os.getpid()
        return self._fd

    def read(self, row: int, max_frames: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """(L+1, T, D) float16 of item `row`: whole, or a window of `max_frames` (random with a generator).
        One read of the clip's block; a window reads its frames of each state only."""
        if not self.has(row):
            raise KeyError(f"item {row} has no cached states (skipped when the cache was built)")
        total, row_bytes = int(self.frames[row]), self.width * 2
        count, start = total, 0
        if max_frames is not None and total > max_frames:
            count = max_frames
            if generator is not None:
                start = int(torch.randint(0, total - max_frames + 1, (1,), generator=generator))
        out = np.empty((self.num_states, count, self.width), dtype=np.float16)
        base = int(self.offsets[row]) * row_bytes
        if count == total:
            self._read_into(out, base)
        else:
            for state in range(self.num_states):
                self._read_into(out[state], base + (state * total + start) * row_bytes)
        return torch.from_numpy(out)

    def _read_into(self, out: np.ndarray, offset: int) -> None:
        if os.preadv(self._file(), [out], offset) != out.nbytes:
            raise OSError(f"{self.folder / 'states.f16'}: shorter than its index (a damaged cache: delete the folder)")


class StateCacheWriter:
    """Write side: clips appended one by one into a temporary folder, renamed into place by `commit`."""

    def __init__(self, folder: str | Path, rows: int):
        self.folder = Path(folder)
        remove_stale(self.folder, "tmp")  # left by a killed build (another pid): 1.1 GiB each at the demo's size
        self.tmp = self.folder.with_name(f".{self.folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self._out = open(self.tmp / "states.f16", "wb")
        self.offsets = np.full(rows, -1, dtype=np.int64)
        self.frames = np.zeros(rows, dtype=np.int64)
        self.shape: tuple[int, int] | None = None
        self._written = 0  # in rows of D values

    def add(self, row: int, states: torch.Tensor) -> None:
        """states: (L+1, T, D) of item `row`, stored as float16, one contiguous block per clip."""
        self.shape = self.shape or (int(states.shape[0]), int(states.shape[2]))
        block = states.detach().to("cpu", torch.float16).contiguous()
        self._out.write(block.numpy().tobytes())
        self.offsets[row], self.frames[row] = self._written, block.shape[1]
        self._written += block.shape[0] * block.shape[1]

    def commit(self, meta: dict, skipped: dict[str, str]) -> StateStore:
        self._out.close()
        np.savez(self.tmp / "index.npz", offsets=self.offsets, frames=self.frames)
        num_states, width = self.shape or (0, 0)
        info = {**meta, "num_states": num_states, "width": width, "skipped": skipped}
        (self.tmp / "meta.json").write_text(json.dumps(info, indent=1) + "\n")
        try:
            os.rename(self.tmp, self.folder)
        except OSError:  # another process finished the same cache first: theirs is identical
            shutil.rmtree(self.tmp, ignore_errors=True)
        return StateStore(self.folder)

    def abort(self) -> None:
        self._out.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def cache_key(upstream: SpeechUpstream, items: Sequence[SpokenCaption], precision: str) -> tuple[str, dict]:
    """A key that changes with the upstream (name, files, a weight sample, settings), the precision the
    states were computed in, and each clip (path, size, modification time). Layout 3: GroupNorm conv stacks
    run several clips a call (upstream.CONV_CHUNK_BYTES), other rounding than layout 2's one length a call, so
    the same code gives the same states whether or not an older cache is on disk."""
    digest = hashlib.sha256()
    inputs = {"layout": 3, "upstream": str(upstream.name_or_path), "precision": precision,
              "normalize_waveform": bool(upstream.normalize_waveform), "final_norm": bool(getattr(upstream, "final_norm", False)),
              "upstream_files": folder_files(upstream.name_or_path)}
    digest.update(json.dumps(inputs, sort_keys=True).encode())
    parameters = list(upstream.model.parameters())  # a sample of the weights (this recipe kept: old caches stay valid)
    for parameter in parameters[:: max(1, len(parameters) // 8)]:
        digest.update(parameter.detach().float().cpu().numpy().tobytes()[:4096])
    for item in items:
        stat = os.stat(item.audio)
        digest.update(f"{item.audio}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24], {**inputs, "clips": len(items)}


def _load_batch(items: Sequence[SpokenCaption], rows: list[int], on_error: str,
                skipped: dict[str, str]) -> tuple[list[int], list[torch.Tensor]]:
    """Decode a batch; a bad clip raises (naming it) or, with on_error='skip', is recorded and left out."""
    good, waves = [], []
    for row in rows:
        try:
            waves.append(torch.from_numpy(load_audio(items[row].audio)))
            good.append(row)
        except AudioError as error:
            if on_error != "skip":
                raise
            skipped[str(items[row].audio)] = str(error).split(": ", 1)[-1]
    return good, waves


def state_caches_folder(cache_dir: str | Path) -> Path:
    """Where a run's `cache_dir` keeps its upstream-state caches, one subfolder per key."""
    return Path(cache_dir) / "upstream_states"


@torch.no_grad()
def build_state_cache(upstream: SpeechUpstream, items: Sequence[SpokenCaption], lengths: Sequence[int], cache_dir: str | Path,
                      batch_size: int = 32, on_error: str = "raise", autocast: Callable[[], object] = nullcontext,
                      precision: str = "32-true", progress: bool = True) -> StateStore:
    """The states of every clip of `items` (row order), computed once, batched by similar length, or the
    cache a previous run made of the same upstream and clips."""
    key, inputs = cache_key(upstream, items, precision)
    folder = state_caches_folder(cache_dir) / key
    if (folder / "meta.json").is_file():
        return StateStore(folder)
    writer = StateCacheWriter(folder, len(items))
    skipped: dict[str, str] = {}
    order = sorted(range(len(items)), key=lambda i: lengths[i])
    device = next(upstream.model.parameters()).device
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="upstream states", disable=not progress, unit="batch"):
            rows, waves = _load_batch(items, order[start : start + batch_size], on_error, skipped)
            if not rows:
                continue
            waves, sample_lengths = pad_batch(waves)
            with autocast():
                hidden, mask = upstream(waves.to(device), sample_lengths.to(device))
            for position, row in enumerate(rows):
                writer.add(row, hidden[:, position, : int(mask[position].sum())])
    except BaseException:
        writer.abort()
        raise
    return writer.commit(inputs, skipped)


@torch.no_grad()
def upstream_states(upstream: SpeechUpstream, items: Sequence[SpokenCaption], lengths: Sequence[int],
                    batch_size: int = 32, progress: bool = True) -> list[torch.Tensor]:
    """Per clip: (L+1, T_i, D) float16 hidden states in memory (small data and probes only; training
    uses `build_state_cache`)."""
    order = sorted(range(len(items)), key=lambda i: lengths[i])
    states: list[torch.Tensor | None] = [None] * len(items)
    device = next(upstream.model.parameters()).device
    for start in tqdm(range(0, len(order), batch_size), desc="upstream states", disable=not progress, unit="batch"):
        rows = order[start : start + batch_size]
        waves, sample_lengths = pad_batch([torch.from_numpy(load_audio(items[r].audio)) for r in rows])
        hidden, mask = upstream(waves.to(device), sample_lengths.to(device))
        for position, row in enumerate(rows):
            states[row] = hidden[:, position, : int(mask[position].sum())].half().cpu().clone()
    return states


def crop_states(states: torch.Tensor, max_frames: int | None, generator: torch.Generator | None) -> torch.Tensor:
    if max_frames is None or states.shape[1] <= max_frames:
        return states
    start = int(torch.randint(0, states.shape[1] - max_frames + 1, (1,), generator=generator)) if generator else 0
    return states[:, start : start + max_frames]


# A batch's frames are padded up to a multiple of this. Why: a training step's buffers take the batch's
# length; at every length the data gives (the demo's batches: 34 lengths from 95 to 129 frames) the C heap
# kept freed blocks of sizes no later step asked for, and grew (2.4 GiB after 300 demo steps, still climbing).
# The demo held it down by trimming the heap every 3 steps, at a fifth of its step time in page faults.
# Padded to multiples of 8 (6 lengths), a run reuses its few sizes of blocks and stops growing untrimmed, and
# its steps are 18-22 % faster than trimmed (benchmarks/demo_trim.py, RESULTS.md "demo stages", stop 29). The
# extra frames are masked like any padding (tests/test_state_cache.py).
FRAME_MULTIPLE = 8


def pad_states(states: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-clip (L+1, T_i, D) -> (L+1, B, T, D) float32 and a (B, T) valid mask; T: the longest clip's
    frames rounded up to a multiple of FRAME_MULTIPLE."""
    frames = torch.tensor([s.shape[1] for s in states])
    first = states[0]
    padded = -(-int(frames.max()) // FRAME_MULTIPLE) * FRAME_MULTIPLE
    out = torch.zeros(first.shape[0], len(states), padded, first.shape[2])
    for row, s in enumerate(states):
        out[:, row, : s.shape[1]].copy_(s)
    return out, torch.arange(out.shape[2])[None, :] < frames[:, None]
