"""Batches of (waveform or cached upstream states, cached image embedding, image id): splits, checks,
length grouping, collation, and a training loader whose position is part of the checkpoint.

What a batch holds is a pure function of (seed, epoch, batch number): the batch order comes from the
sampler's own RNG and each clip's random crop from a seed drawn with it, never from a process-wide or
worker RNG. So the loader's whole state is one number (batches handed out), and a resumed run sees
exactly the batches and crops the uninterrupted run would have seen, with any number of workers."""

from __future__ import annotations

import functools
import random
from typing import Iterator, Sequence

import lightning as L
import soundfile
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..audio import SAMPLE_RATE, AudioError, crop, load_audio, pad_batch
from ..clip import FrozenCLIP
from ..data import DataError, SpokenCaption, check_items, image_table, read_dataset
from ..image_cache import ImageEmbeddingCache
from ..images import load_image
from ..upstream import SpeechUpstream
from .config import DataConfig, TrainConfig, check_global_batch
from .state_cache import StateStore, build_state_cache, pad_states

Key = tuple[int, "int | None"]  # (item index, crop seed or None = no crop)


class SpokenCaptionDataset(Dataset):
    """Key (i, crop seed) -> 16 kHz waveform (or cached states), cropped at random by that seed when
    given, + the row of its image.

    A clip that fails to decode (corrupt data behind a good header, NaN) stops the run naming the file,
    or, with on_error="skip", is replaced by the next clip and reported in the item's `skipped` (the
    system counts it: workers' own records would never reach the main process), so batch sizes stay
    equal across processes."""

    def __init__(self, items: Sequence[SpokenCaption], image_rows: Sequence[int], max_samples: int | None,
                 on_error: str = "raise", states: StateStore | None = None, state_rows: Sequence[int] | None = None,
                 max_frames: int | None = None):
        self.items, self.image_rows = list(items), list(image_rows)
        self.max_samples, self.on_error = max_samples, on_error
        self.states, self.state_rows, self.max_frames = states, state_rows, max_frames

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: Key) -> dict:
        index, crop_seed = key
        generator = None if crop_seed is None else torch.Generator().manual_seed(crop_seed)
        if self.states is not None:
            states = self.states.read(self.state_rows[index], self.max_frames if generator else None, generator)
            return {"states": states, "image_row": self.image_rows[index], "index": index}
        skipped = []
        for attempt in range(len(self.items)):
            row = (index + attempt) % len(self.items)
            try:
                wave = torch.from_numpy(load_audio(self.items[row].audio))
            except AudioError as error:
                if self.on_error != "skip":
                    raise
                skipped.append((str(self.items[row].audio), str(error).split(": ", 1)[-1]))
                continue
            wave = crop(wave, self.max_samples if generator else None, generator)
            return {"wave": wave, "image_row": self.image_rows[row], "index": row, "skipped": skipped}
        raise AudioError("no readable audio in the dataset")


class LengthGroupedBatchSampler(Sampler[list[Key]]):
    """Shuffled batches of similar-length clips (less padding), split evenly across processes.

    Pools of `bucket * batch_size` random clips are sorted by length and cut into batches; the batch
    order is shuffled. Each rank takes every world_size-th batch of the same permutation. Everything
    (order and each clip's crop seed) is drawn from Random(seed + epoch); `seek` sets where `__iter__`
    starts, so a resumed epoch continues at its next batch."""

    def __init__(self, lengths: Sequence[int], batch_size: int, bucket: int = 50, shuffle: bool = True,
                 seed: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = True):
        self.lengths, self.batch_size, self.bucket = list(lengths), batch_size, bucket
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.drop_last = drop_last
        self.epoch, self.start = 0, 0
        self._cached: tuple[int, list[list[Key]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.seek(epoch, 0)

    def seek(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def batches(self, epoch: int) -> list[list[Key]]:
        """This rank's batches of `epoch`, each a list of (item index, crop seed; None when not shuffling)."""
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, self._draw(epoch))
        return self._cached[1]

    def _draw(self, epoch: int) -> list[list[Key]]:
        order = list(range(len(self.lengths)))
        rng = random.Random(self.seed + epoch)
        if self.shuffle:
            rng.shuffle(order)
        pool = self.batch_size * self.bucket
        batches = []
        for start in range(0, len(order), pool):
            chunk = sorted(order[start : start + pool], key=lambda i: self.lengths[i])
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        if self.shuffle:
            rng.shuffle(batches)
        keyed = [[(i, rng.getrandbits(62) if self.shuffle else None) for i in b] for b in batches]
        usable = len(keyed) - len(keyed) % self.world_size if self.world_size > 1 else len(keyed)
        return keyed[:usable][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[Key]]:
        epoch, start = self.epoch, self.start  # read when iteration begins, after the loader's seek
        yield from self.batches(epoch)[start:]

    def __len__(self) -> int:
        return len(self.batches(self.epoch))


class ResumableLoader(DataLoader):
    """The training loader as a Lightning stateful loader (`state_dict`/`load_state_dict`, saved in
    each checkpoint by the fit loop): its state is the number of batches handed out, which fixes the
    epoch and the next batch; `__iter__` continues from there."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.consumed = 0

    def __iter__(self) -> Iterator[dict]:
        epoch, start = divmod(self.consumed, max(1, len(self.batch_sampler)))
        self.batch_sampler.seek(epoch, start)
        for batch in super().__iter__():
            self.consumed += 1
            yield batch

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = int(state["consumed"])


def collate(batch: list[dict], image_table: torch.Tensor | None, image_paths: list | None, clip: FrozenCLIP | None) -> dict:
    rows = torch.tensor([b["image_row"] for b in batch])
    out = {"image_ids": rows, "index": torch.tensor([b["index"] for b in batch])}
    if "states" in batch[0]:
        out["states"], out["frame_mask"] = pad_states([b["states"] for b in batch])
    else:
        out["waves"], out["lengths"] = pad_batch([b["wave"] for b in batch])
    skipped = [s for b in batch for s in b.get("skipped", ())]
    if skipped:
        out["skipped"] = skipped
    if image_table is not None:
        out["image_embeds"] = image_table[rows]
    else:  # naive path: pixels every step, for the benchmark that measures what the cache saves
        out["pixel_values"] = clip.preprocess_images([load_image(image_paths[r]) for r in rows.tolist()])
    return out


def sample_length(info) -> int:
    """Samples at 16 kHz after loading (resampling), from the header alone."""
    return int(info.frames * SAMPLE_RATE // info.samplerate)


class SpeechImageDataModule(L.LightningDataModule):
    def __init__(self, data: DataConfig, train: TrainConfig, clip: FrozenCLIP, upstream: SpeechUpstream | None = None,
                 progress: bool = True):
        super().__init__()
        self.data_config, self.train_config, self.clip, self.upstream = data, train, clip, upstream
        self.progress = progress  # bars for the image embeddings and the state cache
        if train.cache_upstream_states and upstream is None:
            raise ValueError("train.cache_upstream_states needs the upstream")
        self.min_samples = upstream.min_samples if upstream is not None else 1
        self.items: dict[str, list[SpokenCaption]] = {}
        self.lengths: dict[str, list[int]] = {}
        self.states: dict[str, StateStore] = {}
        self.state_rows: dict[str, list[int]] = {}
        self.skipped: dict[str, dict[str, str]] = {}  # split -> file -> why it was left out
        self.image_paths: list = []
        self.image_table: torch.Tensor | None = None
        self.cache = ImageEmbeddingCache(train.cache_dir, clip) if train.image_cache else None

    def read(self, split: str) -> list[SpokenCaption]:
        """Read and check a split once (header reads): missing, unreadable, empty and too-short clips stop
        the run naming the file, or are skipped and counted (data.on_error)."""
        if split not in self.items:
            name = getattr(self.data_config, f"{split}_split", split)
            on_error = self.data_config.on_error
            report = check_items(read_dataset(self.data_config.kind, self.data_config.root, name, **self.data_config.options), on_error)
            skipped, good, lengths = dict(report.bad), [], []
            for item in report.good:
                samples = sample_length(soundfile.info(str(item.audio)))
                if samples < self.min_samples:
                    reason = f"shorter than the upstream's minimum ({samples} < {self.min_samples} samples at 16 kHz)"
                    if on_error != "skip":
                        raise DataError(f"{item.audio}: {reason}; data.on_error=skip skips such clips")
                    skipped[str(item.audio)] = reason
                    continue
                good.append(item)
                lengths.append(samples)
            if not good:
                raise DataError(f"data.{split}_split={name!r}: no usable clips ({len(skipped)} skipped)")
            self.items[split], self.lengths[split], self.skipped[split] = good, lengths, skipped
        return self.items[split]

    def setup(self, stage: str | None = None) -> None:
        if self.image_paths:
            return
        images = image_table(self.read("train") + self.read("val"))
        self.image_paths = images.paths
        self.image_row = {image_id: row for row, image_id in enumerate(images.ids)}
        if self.cache is not None:
            self.image_table = self.cache.embeddings(self.image_paths, progress=self.progress)
        if self.train_config.cache_upstream_states:
            for split in ("train", "val"):
                self._cache_states(split)

    def _cache_states(self, split: str) -> None:
        """The split's states from the disk cache (built on first use); clips that failed to decode are
        dropped from the split here, so every batch is full."""
        store = build_state_cache(self.upstream, self.items[split], self.lengths[split], self.train_config.cache_dir,
                                  self.train_config.eval_batch_size, self.data_config.on_error, self._training_autocast,
                                  self.train_config.resolved_precision(), self.progress)
        keep = [row for row in range(len(store)) if store.has(row)]
        self.skipped[split].update(store.skipped)
        if not keep:
            raise DataError(f"data.{split}_split: no usable clips ({len(store.skipped)} skipped)")
        self.states[split], self.state_rows[split] = store, keep
        self.items[split] = [self.items[split][r] for r in keep]
        self.lengths[split] = [self.lengths[split][r] for r in keep]

    def _training_autocast(self) -> torch.autocast:
        """bf16-mixed: the states in bf16, as the training forward would make them (and 1.4x faster on a CPU with
        bf16 units). 16-mixed keeps fp32 states: the cache may be built before the upstream reaches the GPU."""
        device = next(self.upstream.model.parameters()).device.type
        return torch.autocast(device, dtype=torch.bfloat16, enabled=self.train_config.resolved_precision() == "bf16-mixed")

    def _world(self, train: bool) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None and train else (0, 1)

    def _loader(self, split: str, train: bool) -> DataLoader:
        items, config = self.read(split), self.train_config
        max_frames = None
        if config.max_audio_samples and self.upstream is not None:
            max_frames = int(self.upstream.frame_lengths(torch.tensor(config.max_audio_samples)))
        dataset = SpokenCaptionDataset(items, [self.image_row[i.image_id] for i in items], config.max_audio_samples,
                                       self.data_config.on_error, self.states.get(split), self.state_rows.get(split), max_frames)
        rank, world = self._world(train)
        # training: the global batch split across processes (small data: at most what the split holds)
        size = min(check_global_batch(config, world), len(items) // world) if train else config.eval_batch_size
        sampler = LengthGroupedBatchSampler(self.lengths[split], size, config.length_bucket, shuffle=train, seed=config.seed,
                                            rank=rank, world_size=world, drop_last=train)
        clip = None if self.image_table is not None else self.clip
        kind = ResumableLoader if train else DataLoader
        return kind(dataset, batch_sampler=sampler, num_workers=config.num_workers,
                    collate_fn=functools.partial(collate, image_table=self.image_table, image_paths=self.image_paths, clip=clip),
                    persistent_workers=config.num_workers > 0, generator=torch.Generator().manual_seed(config.seed))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)
