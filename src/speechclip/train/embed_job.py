"""`speechclip embed` on several GPUs or nodes: Lightning's `trainer.predict` with a prediction writer.

The same shards and manifest as the single-process export (`speechclip.embed`), so a run can be resumed
by either. Every rank first checks every existing shard (a refusal is then one line on every rank, not
a failure on one and a wait on the others). Shard s goes to rank s % world_size (fixed by the shard's
number, not by what is left to do, so ranks agree without talking); each rank skips its finished shards,
reads its batches in DataLoader workers and writes each shard when its last batch is predicted. After a
barrier, rank 0 writes the manifest.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

from ..data.items import SpokenCaption
from ..embed import (KINDS, SHARD_SIZE, Collection, batches, bound_kernel_cache, check_export, collections, embed_meta,
                     encode_prepared, finished_shards, prepare_batch, shard_path, write_manifest, write_shard)
from ..model import SpeechCLIP


@dataclass
class _Batch:
    collection: Collection
    shard: int
    start: int  # the shard's first row
    stop: int
    rows: list[int]
    last: bool  # the shard's last batch: write it after this one


class _BatchDataset(Dataset):
    """One element = one prepared batch (read and padded in a DataLoader worker)."""

    def __init__(self, model: SpeechCLIP, work: list[_Batch]):
        self.model, self.work = model, work

    def __len__(self) -> int:
        return len(self.work)

    def __getitem__(self, index: int) -> dict[str, Any]:
        job = self.work[index]
        inputs = [job.collection.inputs[r] for r in job.rows]
        return {"job": index, "tensors": prepare_batch(self.model, job.collection.kind, inputs)}


class EmbedSystem(L.LightningModule):
    """Wraps the plain model for `trainer.predict`; plans this rank's batches once the rank is known."""

    def __init__(self, model: SpeechCLIP, todo: list[Collection], done: set[tuple[str, int]], batch_size: int,
                 shard_size: int, workers: int):
        super().__init__()
        self.model, self.todo, self.done = model, todo, done
        self.batch_size, self.shard_size, self.workers = batch_size, shard_size, workers
        self.work: list[_Batch] = []

    def predict_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        self.work = []
        for collection in self.todo:
            for number, (start, stop) in enumerate(collection.shards(self.shard_size)):
                if number % world != rank or (collection.kind, number) in self.done:
                    continue
                groups = batches(collection, start, stop, self.batch_size)
                self.work += [_Batch(collection, number, start, stop, rows, i == len(groups) - 1) for i, rows in enumerate(groups)]
        return DataLoader(_BatchDataset(self.model, self.work), batch_size=None, shuffle=False, num_workers=self.workers)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        job = self.work[int(batch["job"])]
        return {"job": job, "embeddings": encode_prepared(self.model, job.collection.kind, batch["tensors"])}


class ShardWriter(BasePredictionWriter):
    """Collects a shard's batches and writes it (atomically) after its last one."""

    def __init__(self, out: Path, todo: list[Collection], shard_size: int, meta: dict):
        super().__init__(write_interval="batch")
        self.out, self.todo, self.shard_size, self.meta = Path(out), todo, shard_size, meta
        self.pending: dict[tuple[str, int], torch.Tensor] = {}

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0) -> None:
        job: _Batch = prediction["job"]
        key = (job.collection.kind, job.shard)
        embeddings = prediction["embeddings"]
        if key not in self.pending:
            self.pending[key] = torch.empty(job.stop - job.start, embeddings.shape[1])
        self.pending[key][torch.tensor(job.rows) - job.start] = embeddings
        if job.last:
            write_shard(shard_path(self.out, key[0], key[1]), self.pending.pop(key), job.collection.ids[job.start : job.stop],
                        {**self.meta, "kind": key[0], "shard": key[1]})


def run_embed_job(model: SpeechCLIP, items: Sequence[SpokenCaption], out: str | Path, what: Sequence[str] = KINDS,
                  batch_size: int = 32, shard_size: int = SHARD_SIZE, accelerator: str = "auto", devices: int | str = "auto",
                  num_nodes: int = 1, strategy: str = "auto", workers: int = 0, progress: bool = False) -> Path | None:
    """Embed into shards under `out` with Lightning (the training settings' devices / num_nodes / strategy).
    Returns manifest.json on global rank 0 (after every rank's shards), None on the others."""
    bound_kernel_cache()
    out = Path(out)
    todo = collections(items, what)
    meta = embed_meta(model)
    check_export(out, todo, batch_size, shard_size)
    done = finished_shards(out, todo, shard_size, meta)  # every rank checks the folder before any work
    trainer = L.Trainer(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy, logger=False,
                        callbacks=[ShardWriter(out, todo, shard_size, meta)], enable_checkpointing=False,
                        enable_progress_bar=progress, enable_model_summary=False, use_distributed_sampler=False)
    # our batches are whole shard batches (batch_size=None); the writer needs no sampler indices
    warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")
    trainer.predict(EmbedSystem(model.eval(), todo, done, batch_size, shard_size, workers), return_predictions=False)
    # here, not in a predict hook: a rank with nothing left to do skips the predict loop and its hooks
    trainer.strategy.barrier("embed shards written")
    return write_manifest(out, todo, shard_size, meta) if trainer.is_global_zero else None
