"""What makes a killed run resume bit-identical, as Lightning pieces: when last.ckpt is written, every RNG
in it (callback state), and a metrics log that keeps its history.

The rest of the state is Lightning's own or lives beside its owner: loops, optimiser and schedule
(Lightning), the training loader's position (`datamodule.ResumableLoader`, a stateful loader), the best
validation recall and skipped clips (`system.SpeechCLIPSystem.on_save_checkpoint`)."""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only


class RunCheckpoint(Callback):
    """checkpoints/last.ckpt every `every` steps and at the last step; on a validation step only after the
    validation, so the checkpoint records that validation's best (and a resume neither skips nor repeats
    it). Written to a temporary file and renamed: a kill never leaves a torn checkpoint.

    A training step's checkpoint must capture the state at the end of the step (`on_train_batch_end`), but
    Lightning hands that step's metrics row to the loggers only after the hook; a checkpoint renamed in
    place at once would let a kill in between lose the row for good (the resume does not run the step
    again). So it is written then and renamed at the next hook, once the row is on disk, or, when the run
    stops with an exception (a crash, SIGTERM, Ctrl-C), as it stops if the row was logged by then."""

    def __init__(self, path: Path, every: int, val_every: int, max_steps: int):
        self.path, self.every, self.val_every, self.max_steps = Path(path), every, val_every, max_steps
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self._written = False  # the temporary file holds a checkpoint not yet renamed into place
        self._stepped_at: int | None = None  # Lightning's count of logged optimiser steps when it was written

    def _due(self, step: int) -> bool:
        return step % self.every == 0 or step >= self.max_steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self._due(step) and step % self.val_every != 0:
            self.write(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit" and self._due(trainer.global_step):
            self.write(trainer)  # the validation's row is logged before this hook
            self.commit(trainer)

    # The first hooks after Lightning logged the row of the step the checkpoint was written at.
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.commit(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.commit(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.commit(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.commit(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        stepped = _steps_logged(trainer)
        if stepped is not None and self._stepped_at is not None and stepped > self._stepped_at:
            self.commit(trainer)  # the row of the step it was written at is logged: keep the progress

    def write(self, trainer: L.Trainer) -> None:
        trainer.save_checkpoint(self.tmp, weights_only=False)  # the full state: optimiser, loops, callbacks
        self._written, self._stepped_at = True, _steps_logged(trainer)

    def commit(self, trainer: L.Trainer) -> None:
        if self._written and trainer.is_global_zero:
            os.replace(self.tmp, self.path)
        self._written = False


def _steps_logged(trainer: L.Trainer) -> int | None:
    """Lightning's count of optimiser steps whose training row was handed to the loggers (it grows just after
    the row is logged); None where a Lightning version lacks it (a pending checkpoint then waits for a hook)."""
    return getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", None)


def capture_rng() -> dict:
    """Every RNG a training step may draw from (dropout, any numpy/python use), as plain data and tensors
    so the checkpoint loads weights-only."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(gauss)]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RNGState(Callback):
    """The RNG states in each checkpoint (captured as it is written), restored as training resumes: the
    next step then draws the dropout masks the uninterrupted run drew."""

    def __init__(self):
        self._pending: dict | None = None

    def state_dict(self) -> dict:
        return capture_rng()

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending = state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is not None:
            restore_rng(self._pending)
            self._pending = None


class RunCSVLogger(Logger):
    """logs/metrics.csv, Lightning's CSV columns (sorted keys, `step`), that a resume appends to: the rows
    logged up to the checkpoint are kept (`history`), later ones (logged again by the resumed run) dropped.
    Rows are appended as they come; a new column rewrites the file through a temporary file."""

    def __init__(self, folder: Path, history: list[dict] | None = None):
        super().__init__()
        self.folder, self.path = Path(folder), Path(folder) / "metrics.csv"
        self.rows: list[dict] = list(history or [])
        self.keys: list[str] = sorted({k for row in self.rows for k in row})
        self._pending: list[dict] = []
        self._rewrite = True

    @property
    def name(self) -> str:
        return "logs"

    @property
    def version(self) -> str:
        return ""

    @property
    def log_dir(self) -> str:
        return str(self.folder)

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        row = {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}
        row["step"] = step
        self._pending.append(row)

    @rank_zero_only
    def save(self) -> None:
        if not self._pending and not self._rewrite:
            return
        new_keys = {k for row in self._pending for k in row} - set(self.keys)
        self.rows += self._pending
        if new_keys or self._rewrite:
            self.keys = sorted(set(self.keys) | new_keys)
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(".metrics.csv.tmp")
            with open(tmp, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=self.keys)
                writer.writeheader()
                writer.writerows(self.rows)
            os.replace(tmp, self.path)
        else:
            with open(self.path, "a", newline="") as file:
                csv.DictWriter(file, fieldnames=self.keys).writerows(self._pending)
        self._pending, self._rewrite = [], False

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.save()


def metrics_history(path: Path, before_step: int) -> list[dict]:
    """The rows of a metrics.csv logged before `before_step` (Lightning logs global step N as step N-1),
    skipping a row a kill left half-written. Empty cells are dropped, as they were never logged."""
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        for row in reader:
            try:
                step = int(float(row.get("step") or ""))
            except ValueError:
                continue
            if None in row or any(v is None for v in row.values()):
                continue
            if step < before_step:
                rows.append({k: _number(v) for k, v in row.items() if v != ""})
    return rows


def _number(value: str) -> Any:
    try:
        number = float(value)
    except ValueError:
        return value
    return int(number) if value.lstrip("-").isdigit() else number
