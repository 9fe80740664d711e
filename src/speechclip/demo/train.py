"""The demo's SpeechCLIP runs: each trained once (a finished run of the same configuration on encoders of
the same pre-training spec is reused), side by side in spawned processes of one thread each."""

from __future__ import annotations

import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from ..quiet import quiet_libraries
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


def train_one(values: dict, encoders: dict, run_dir: Path, name: str, bars: bool = True,
              take_threads: tuple[int, int] | None = None) -> dict:
    """bars=False: step lines instead of progress bars; take_threads: (step, threads) from which to use more threads."""
    print(f"[demo] {name}: training ({torch.get_num_threads()} threads)", flush=True)
    callbacks = [ReleaseFreeMemory()] + ([] if bars else [StepLines(name)]) + ([TakeThreads(*take_threads, name)] if take_threads else [])
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


class TakeThreads(Callback):
    """From a fixed step on, use `threads` threads: the step at which a shorter run beside this one has ended.
    A fixed step, not the moment the other run ends: thread counts change a step's rounding, so a switch timed
    by the clock would make the model depend on the machine's load."""

    def __init__(self, step: int, threads: int, name: str):
        self.step, self.threads, self.name = step, threads, name

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step >= self.step and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
            print(f"[demo] {self.name}: {self.threads} threads from step {trainer.global_step}", flush=True)


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


def _train_in_process(threads: int, take_threads: tuple[int, int] | None, *job) -> dict:
    quiet_libraries()
    torch.set_num_threads(threads)
    return train_one(*job, bars=False, take_threads=take_threads)


def takeover_step(jobs: dict[str, tuple]) -> tuple[str, int] | None:
    """Two runs side by side of unequal length: the longer one, and the step after which it runs alone (the
    shorter one's steps and a tenth more, for its last validation and save; no sooner, or three threads
    would share two cores). Both start together and build their state caches in about the same time."""
    if len(jobs) != 2:
        return None
    (short, short_steps), (long, long_steps) = sorted(((name, job[0]["train"]["max_steps"]) for name, job in jobs.items()),
                                                      key=lambda pair: pair[1])
    step = short_steps + max(10, short_steps // 10)
    return (long, step) if step < long_steps else None


def train_all(jobs: dict[str, tuple], retrain: bool) -> dict:
    """name -> (values, encoders, run_dir): finished runs are reused (unless `retrain`); the others train in
    spawned processes of one thread each, as many at once as there are threads (the rest queue, in order).
    Why: the head's small matmuls use extra threads poorly. On 2 cores a head step took 31 ms with 2 threads
    and 49 ms with 1, also while a second 1-thread process ran (benchmarks/demo_threads.py); the two demo
    runs took 304 s side by side against 211 + 231 s one after the other (benchmarks/RESULTS.md). Of two runs
    of unequal length, the longer takes every thread once the shorter has ended (`takeover_step`).
    With one thread or on a GPU they run one after the other in this process."""
    runs = {name: None if retrain else finished_run(*job) for name, job in jobs.items()}
    todo = {name: job for name, job in jobs.items() if runs[name] is None}
    threads = torch.get_num_threads()
    if len(todo) < 2 or threads < 2 or torch.cuda.is_available():
        runs.update({name: train_one(*job, name) for name, job in todo.items()})
        return runs
    failure = None
    workers = min(len(todo), threads)
    takeover = takeover_step(todo)
    take = lambda name: (takeover[1], threads) if takeover and takeover[0] == name else None  # noqa: E731
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_train_in_process, threads // workers, take(name), *job, name): name for name, job in todo.items()}
        for future in as_completed(futures):
            try:
                runs[futures[future]] = future.result()
            except Exception as error:  # say so now; the other runs go on, and what they train is kept
                print(f"[demo] {futures[future]}: failed: {error!r}", flush=True)
                failure = failure or error
    if failure is not None:
        raise failure
    return runs
