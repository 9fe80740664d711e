"""Batches of (waveform, cached image embedding, image id): splits, length grouping, collation."""

from __future__ import annotations

import random
from typing import Iterator, Sequence

import lightning as L
import soundfile
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..audio import AudioError, crop, load_audio, pad_batch
from ..clip import FrozenCLIP
from ..data import SpokenCaption, check_items, image_table, read_dataset
from ..image_cache import ImageEmbeddingCache
from ..images import load_image
from ..upstream import SpeechUpstream
from .config import DataConfig, TrainConfig
from .state_cache import crop_states, pad_states, upstream_states


class SpokenCaptionDataset(Dataset):
    """Item i -> 16 kHz waveform (randomly cropped in training) + the row of its image.

    A clip that fails to decode (corrupt data behind a good header, NaN) stops the run naming the file,
    or, with on_error="skip", is recorded in `skipped` and replaced by the next clip, so batch sizes
    stay equal across processes."""

    def __init__(self, items: Sequence[SpokenCaption], image_rows: Sequence[int], max_samples: int | None,
                 train: bool, on_error: str = "raise", states: Sequence[torch.Tensor] | None = None,
                 max_frames: int | None = None):
        self.items, self.image_rows = list(items), list(image_rows)
        self.max_samples = max_samples if train else None
        self.states, self.max_frames = states, (max_frames if train else None)
        self.train, self.on_error = train, on_error
        self.skipped: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        if self.states is not None:
            generator = torch.default_generator if self.train else None
            return {"states": crop_states(self.states[index], self.max_frames, generator),
                    "image_row": self.image_rows[index], "index": index}
        for attempt in range(len(self.items)):
            item = self.items[(index + attempt) % len(self.items)]
            try:
                wave = torch.from_numpy(load_audio(item.audio))
            except AudioError as error:
                if self.on_error != "skip":
                    raise
                self.skipped[str(item.audio)] = str(error)
                continue
            # torch's default generator: seeded per worker and epoch by the DataLoader (and by seed_everything)
            generator = torch.default_generator if self.train else None
            row = (index + attempt) % len(self.items)
            return {"wave": crop(wave, self.max_samples, generator), "image_row": self.image_rows[row], "index": row}
        raise AudioError("no readable audio in the dataset")


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Shuffled batches of similar-length clips (less padding), split evenly across processes.

    Pools of `bucket * batch_size` random clips are sorted by length and cut into batches; the batch
    order is shuffled. Each rank takes every world_size-th batch of the same permutation."""

    def __init__(self, lengths: Sequence[int], batch_size: int, bucket: int = 50, shuffle: bool = True,
                 seed: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = True):
        self.lengths, self.batch_size, self.bucket = list(lengths), batch_size, bucket
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        order = list(range(len(self.lengths)))
        rng = random.Random(self.seed + self.epoch)
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
        usable = len(batches) - len(batches) % self.world_size if self.world_size > 1 else len(batches)
        return batches[:usable][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


def collate(batch: list[dict], image_table: torch.Tensor | None, image_paths: list | None, clip: FrozenCLIP | None) -> dict:
    rows = torch.tensor([b["image_row"] for b in batch])
    out = {"image_ids": rows, "index": torch.tensor([b["index"] for b in batch])}
    if "states" in batch[0]:
        out["states"], out["frame_mask"] = pad_states([b["states"] for b in batch])
    else:
        out["waves"], out["lengths"] = pad_batch([b["wave"] for b in batch])
    if image_table is not None:
        out["image_embeds"] = image_table[rows]
    else:  # naive path: pixels every step, for the benchmark that measures what the cache saves
        out["pixel_values"] = clip.preprocess_images([load_image(image_paths[r]) for r in rows.tolist()])
    return out


class SpeechImageDataModule(L.LightningDataModule):
    def __init__(self, data: DataConfig, train: TrainConfig, clip: FrozenCLIP, upstream: SpeechUpstream | None = None,
                 progress: bool = True):
        super().__init__()
        self.data_config, self.train_config, self.clip, self.upstream = data, train, clip, upstream
        self.progress = progress  # bars for the image embeddings and the state cache
        if train.cache_upstream_states and upstream is None:
            raise ValueError("train.cache_upstream_states needs the upstream")
        self.items: dict[str, list[SpokenCaption]] = {}
        self.lengths: dict[str, list[int]] = {}
        self.states: dict[str, list[torch.Tensor]] = {}
        self.reports: dict[str, str] = {}
        self.image_paths: list = []
        self.image_table: torch.Tensor | None = None
        self.cache = ImageEmbeddingCache(train.cache_dir, clip) if train.image_cache else None

    def read(self, split: str) -> list[SpokenCaption]:
        """Read and check a split once (header reads); bad items stop the run or are skipped and counted."""
        if split not in self.items:
            name = getattr(self.data_config, f"{split}_split", split)
            items = read_dataset(self.data_config.kind, self.data_config.root, name, **self.data_config.options)
            report = check_items(items, self.data_config.on_error)
            self.items[split], self.reports[split] = report.good, report.summary()
            self.lengths[split] = [soundfile.info(str(i.audio)).frames for i in report.good]
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
            with self._training_autocast():  # cached states = what the training step's own forward would compute
                for split in ("train", "val"):
                    self.states[split] = upstream_states(self.upstream, self.items[split], self.lengths[split],
                                                         self.train_config.eval_batch_size, self.progress)

    def _training_autocast(self) -> torch.autocast:
        """bf16-mixed: the states in bf16, as the training forward would make them (and 1.4x faster on a CPU with
        bf16 units). 16-mixed keeps fp32 states: the cache may be built before the upstream reaches the GPU."""
        device = next(self.upstream.model.parameters()).device.type
        return torch.autocast(device, dtype=torch.bfloat16, enabled=self.train_config.resolved_precision() == "bf16-mixed")

    def _loader(self, split: str, train: bool) -> DataLoader:
        items = self.read(split)
        config = self.train_config
        max_frames = None
        if config.max_audio_samples and self.upstream is not None:
            max_frames = int(self.upstream.frame_lengths(torch.tensor(config.max_audio_samples)))
        dataset = SpokenCaptionDataset(items, [self.image_row[i.image_id] for i in items], config.max_audio_samples,
                                       train, self.data_config.on_error, self.states.get(split), max_frames)
        lengths = self.lengths[split]
        trainer = self.trainer
        # training batches are split across processes; validation runs whole on each (it is small)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None and train else (0, 1)
        sampler = LengthGroupedBatchSampler(lengths, min(config.batch_size, len(items)) if train else config.eval_batch_size,
                                            config.length_bucket, shuffle=train, seed=config.seed, rank=rank,
                                            world_size=world, drop_last=train)
        clip = None if self.image_table is not None else self.clip
        return DataLoader(dataset, batch_sampler=sampler, num_workers=config.num_workers,
                          collate_fn=lambda b: collate(b, self.image_table, self.image_paths, clip),
                          persistent_workers=config.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)
