"""The demo's SpeechCLIP runs: each trained once (a finished run of the same configuration on encoders of
the same pre-training spec is reused), as jobs of the demo's schedule (`schedule.py`)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from ..train.config import run_config_from_dict
from ..train.run import fit
from .memory import release_free_memory


def finished_run(values: dict, encoders: dict, run_dir: Path) -> dict | None:
    """The summary of a finished run in run_dir of the same configuration on encoders of the same
    pre-training spec, if there is one."""
    marker = run_dir / "demo_run.json"
    if marker.is_file() and (run_dir / "final" / "model.safetensors").is_file():
        saved = json.loads(marker.read_text())
        if saved["config"] == values and saved.get("encoders") == encoders:
            print(f"[demo] reusing {run_dir} (same configuration; --retrain to train again)", flush=True)
            return {**saved["summary"], "reused": True}
    return None


def train_one(values: dict, encoders: dict, run_dir: Path, name: str, bars: bool = True) -> dict:
    """One SpeechCLIP run (also a job of the demo's schedule, `schedule.run_jobs`); bars=False, in worker
    processes that share a terminal: step lines instead of progress bars."""
    print(f"[demo] {name}: training ({torch.get_num_threads()} threads)", flush=True)
    callbacks = [ReleaseFreeMemory()] + ([] if bars else [StepLines(name)])
    # the demo owns its run folders: a run it decided to train again replaces the old one
    summary = fit(run_config_from_dict(values), run_dir, progress=bars, callbacks=callbacks, overwrite=True)
    (run_dir / "demo_run.json").write_text(json.dumps({"config": values, "encoders": encoders, "summary": summary}) + "\n")
    return {**summary, "reused": False}


class ReleaseFreeMemory(Callback):
    """Trims the heap (memory.release_free_memory) after each validation, whose batches leave blocks of other
    sizes behind, and, given `every`, every `every` training steps. The demo trimmed every 3 steps while its
    batches took every length: since they are padded to 8-frame multiples (train.state_cache.FRAME_MULTIPLE),
    a run's heap stops growing untrimmed and its steps are 18-22 % faster (RESULTS.md "demo stages", stop 29)."""

    def __init__(self, every: int = 0):
        self.every = every

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.every and trainer.global_step % self.every == 0:
            release_free_memory()

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        release_free_memory()


class StepLines(Callback):
    """A line every tenth of training: runs sharing a terminal cannot share progress bars."""

    def __init__(self, name: str):
        self.name = name
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step, total = trainer.global_step, trainer.max_steps
        if step % max(1, total // 10) == 0 or step == total:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            print(f"[demo] {self.name}: step {step}/{total}, loss {float(loss):.3f}, "
                  f"{time.perf_counter() - self.started:.0f} s", flush=True)

