"""Run folders that never lose work: what `speechclip train` may do with a folder, decided before anything
is loaded or written, and the few writes that must be all-or-nothing.

A run folder holds run.yaml (the config, written once the run starts), checkpoints/last.ckpt, best/
and final/ (SpeechCLIP checkpoints), logs/metrics.csv and train_summary.json. Training into a folder
that holds a run needs `resume` (continue it; only the settings in RESUMABLE may differ) or `overwrite`
(replace it: the old run is moved aside, and deleted only once the new one has started)."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from .config import RunConfig

# settings a resumed run may change: none of them alters what the model computes or which batches it sees
# (max_steps moves the end of the learning-rate decay: the schedule follows the new value from there on)
RESUMABLE = ("train.max_steps", "train.val_every_steps", "train.checkpoint_every_steps", "train.log_every_steps",
             "train.num_workers", "train.eval_batch_size", "train.cache_dir")
PATHS = ("data.root", "model.upstream", "model.clip", "train.cache_dir")  # compared as the files they name
RUN_MARKERS = ("run.yaml", "checkpoints", "best", "final", "train_summary.json")


class RunFolderError(ValueError):
    """The run folder cannot be used as asked; the message names the folder or file and what to do."""


@dataclass
class RunPlan:
    mode: str  # "new" | "resume" | "overwrite"
    checkpoint: Path | None = None  # resume: the last.ckpt to continue from (None: restart from step 0)
    changes: list[str] = field(default_factory=list)  # resume: "train.max_steps: 6 -> 9", ...
    note: str = ""  # a line to print (e.g. nothing to resume yet)
    step: int = 0  # resume: the checkpoint's global step


def holds_run(folder: Path) -> bool:
    return any((folder / marker).exists() for marker in RUN_MARKERS)


def plan_run(run_dir: Path, config: RunConfig, resume: bool, overwrite: bool) -> RunPlan:
    """What training into `run_dir` will do, or a RunFolderError. Reads only; writes nothing."""
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite exclude each other: continue the run, or replace it")
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"{run_dir}: exists and is not a folder")
    empty = not run_dir.exists() or not any(run_dir.iterdir())
    if empty:
        note = f"{run_dir}: nothing to resume yet; starting the run" if resume else ""
        return RunPlan("new", note=note)
    if not holds_run(run_dir):
        raise RunFolderError(f"{run_dir}: not empty and holds no run (no run.yaml); choose another --run-dir")
    if overwrite:
        return RunPlan("overwrite", note=f"{run_dir}: replacing the run there")
    if not resume:
        raise RunFolderError(f"{run_dir}: holds a run; pass --resume to continue it or --overwrite to replace it")
    saved = read_run_yaml(run_dir / "run.yaml")
    changes = adopt_saved(config, saved)
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return RunPlan("resume", changes=changes, note=f"{run_dir}: no checkpoint yet; the run restarts from step 0")
    step = int(check_checkpoint(last)["global_step"])
    return RunPlan("resume", last, changes, note=f"{run_dir}: resuming at step {step}", step=step)


def read_run_yaml(path: Path) -> dict:
    try:
        values = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise RunFolderError(f"{path}: cannot read the run's config ({error}); --overwrite starts a new run") from error
    if not isinstance(values, dict):
        raise RunFolderError(f"{path}: not a run config; --overwrite starts a new run")
    return values


def _flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(values, dict):
        return {prefix: values}
    out: dict[str, Any] = {}
    for key, value in values.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def adopt_saved(config: RunConfig, saved: dict) -> list[str]:
    """Check that `config` continues the run saved as `saved`. Model fields left unset (None: derived when
    the model is built, e.g. the keyword vocabulary) take the run's values; a field outside RESUMABLE
    that differs is refused by name. Returns the allowed changes, as lines."""
    old, new = _flatten(saved), _flatten(config.to_dict())
    for key, value in old.items():  # lists (keyword_vocab) flatten to themselves
        section, _, name = key.partition(".")
        if section == "model" and new.get(key, "missing") is None and value is not None:
            _set(config, key, value)
            new[key] = value
    changes = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key) or (key in PATHS and _same_path(old.get(key), new.get(key))):
            continue
        if key not in RESUMABLE:
            raise RunFolderError(f"resume: {key} differs from the run ({old.get(key)!r} in run.yaml, {new.get(key)!r} now); "
                                 f"only {', '.join(RESUMABLE)} may change on resume (or --overwrite)")
        changes.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}" + _consequence(key, old.get(key), new.get(key)))
    return changes


def _same_path(a: Any, b: Any) -> bool:
    """`corpus/` and `./corpus` (or an absolute spelling) name the same folder: not a change."""
    if not (isinstance(a, str) and isinstance(b, str) and a and b):
        return False
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _consequence(key: str, old: Any, new: Any) -> str:
    """What an allowed change does to the run, where it is not obvious: the linear decay is re-timed to the new
    max_steps from the resumed step on, so the learning rate jumps (up for a longer run) and the result differs
    from a run trained to that length from the start."""
    if key != "train.max_steps":
        return ""
    how = "stretched" if new > old else "shortened"
    return (f": the learning-rate schedule is {how} to the new length; the run will differ from a fresh "
            f"{new}-step run")


def _set(config: RunConfig, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node: Any = config
    for part in parents:
        node = getattr(node, part)
    setattr(node, leaf, value)


def check_checkpoint(path: Path) -> dict:
    """Load `path` with weights-only unpickling (tensors and plain data; nothing in it can run code), or
    refuse it in one line naming the file."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)", str(error))
        what = f"it asks to call {found.group(1)}" if found else "it holds more than tensors and plain data"
        raise RunFolderError(f"{path}: refused: {what}, and resume state is only read weights-only; "
                             "delete it (or --overwrite) to start again") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RunFolderError(f"{path}: unreadable checkpoint ({first}); delete it to restart the run from step 0") from None
    if not isinstance(checkpoint, dict) or "global_step" not in checkpoint or "state_dict" not in checkpoint:
        raise RunFolderError(f"{path}: not a speechclip training checkpoint (no global_step / state_dict)")
    return checkpoint


# ---- all-or-nothing writes -----------------------------------------------------------------------------------
def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def replace_folder(target: Path, write: Callable[[Path], Any]) -> None:
    """Write a folder (best/, final/) so that a kill at any moment leaves the old or the new one whole:
    write `<target>.new`, move the old aside, move the new in, delete the old (`recover` finishes a swap
    a kill interrupted)."""
    new, old = target.with_name(target.name + ".new"), target.with_name(target.name + ".old")
    shutil.rmtree(new, ignore_errors=True)
    write(new)
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)


def recover(run_dir: Path) -> None:
    """Finish folder swaps a kill interrupted: a complete `.new` with no target is moved in; leftovers go."""
    for name in ("best", "final"):
        target = run_dir / name
        new, old = target.with_name(name + ".new"), target.with_name(name + ".old")
        if not target.exists() and new.exists() and old.exists():  # killed between the two renames
            os.rename(new, target)
        elif not target.exists() and old.exists():
            os.rename(old, target)
        shutil.rmtree(new, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    for tmp in list(run_dir.glob(".*.tmp")) + list((run_dir / "checkpoints").glob("*.tmp")):
        tmp.unlink(missing_ok=True)


def open_run(run_dir: Path, plan: RunPlan, config: RunConfig) -> None:
    """Make the planned change to the folder (called once the run is ready to train): overwrite moves the
    old run aside and deletes it after the new config is written; resume finishes interrupted swaps and
    logs the allowed changes; every mode writes run.yaml atomically."""
    aside = None
    if plan.mode == "overwrite":
        aside = run_dir.with_name(f".{run_dir.name}.replaced")
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(run_dir, aside)
    run_dir.mkdir(parents=True, exist_ok=True)
    if plan.mode == "resume":
        recover(run_dir)
        if plan.changes:
            with open(run_dir / "resumes.log", "a") as log:
                log.write(f"resumed at step {plan.step}: " + "; ".join(plan.changes) + "\n")
    write_text_atomic(run_dir / "run.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
