"""Train and evaluate runs: a run folder holds run.yaml, checkpoints/last.ckpt (resume), best/ and final/
(SpeechCLIP checkpoints: config.json + model.safetensors), logs/ and train_summary.json.

Order of `fit`: check the config's ranges and what the folder allows (resume/overwrite) -> load the
encoders and data (nothing written to the run folder yet, so a bad setting or clip loses nothing) ->
open the folder (write run.yaml; replace or resume the old run) -> train -> final/ and the summary."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

import lightning as L
import torch.distributed as dist
import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback

from ..clip import FrozenCLIP
from ..config import ConfigError
from ..data import DataError, check_items, read_dataset
from ..evaluate import evaluate
from ..image_cache import ImageEmbeddingCache
from ..model import SpeechCLIP
from ..upstream import SpeechUpstream
from .config import RunConfig, check_global_batch, check_heads, check_run_config, config_warnings, run_config_from_dict
from .datamodule import SpeechImageDataModule
from .resume import RNGState, RunCheckpoint, RunCSVLogger, metrics_history
from .run_folder import RunFolderError, RunPlan, open_run, plan_run, replace_folder, write_text_atomic
from .system import SpeechCLIPSystem


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped `fit` (Lightning catches it and exits 1 with nothing said): the message gives the step
    and how to go on; checkpoints/last.ckpt holds the progress a resume continues from."""


def keyword_vocab(model_clip, captions: list[str], size: int | None) -> list[int]:
    """CLIP subword ids seen in the training captions, most frequent first (reference: VQ restricted to
    the caption vocabulary). Only the text of the captions is used, never paired with the speech."""
    counts = Counter(t for ids in model_clip.tokenize(captions)["input_ids"].tolist() for t in ids)
    for special in model_clip.special_token_ids:
        counts.pop(special, None)
    return [t for t, _ in counts.most_common(size)]


def _trainer(config: RunConfig, run_dir: Path, progress: bool, extra_callbacks: Sequence[Callback], history: list[dict]) -> L.Trainer:
    train = config.train
    callbacks = [*extra_callbacks, RNGState(),  # last: the checkpoint holds the caller's callbacks' state of the step
                 RunCheckpoint(run_dir / "checkpoints" / "last.ckpt", train.checkpoint_every_steps, train.val_every_steps, train.max_steps)]
    loggers = [RunCSVLogger(run_dir / "logs", history)]
    try:
        from lightning.pytorch.loggers import TensorBoardLogger
        import tensorboard  # noqa: F401

        loggers.append(TensorBoardLogger(run_dir, name="tensorboard", version=""))
    except ImportError:
        pass
    try:
        return L.Trainer(
            max_steps=train.max_steps, accelerator=train.accelerator, devices=train.devices, num_nodes=train.num_nodes,
            strategy=train.strategy, precision=train.resolved_precision(), gradient_clip_val=train.grad_clip or None,
            val_check_interval=train.val_every_steps, check_val_every_n_epoch=None, log_every_n_steps=train.log_every_steps,
            callbacks=callbacks, logger=loggers, default_root_dir=run_dir, use_distributed_sampler=False,
            enable_checkpointing=False, enable_progress_bar=progress, enable_model_summary=False, num_sanity_val_steps=0,
        )
    except (MisconfigurationException, ValueError, RuntimeError) as error:
        raise ConfigError(f"train: {error}".splitlines()[0]) from None


def _primary_process() -> bool:
    """The process that decides about and writes the run folder: not a DDP worker that Lightning (or the
    cluster) started beside it; those run `fit` again with the same arguments."""
    return all(os.environ.get(name, "0") == "0" for name in ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID"))


def _plan(config: RunConfig, run_dir: Path, resume: bool, overwrite: bool) -> RunPlan:
    if _primary_process():
        plan = plan_run(run_dir, config, resume, overwrite)
        lines = [plan.note] if plan.note else []
        lines += [f"allowed change: {change}" for change in plan.changes] + config_warnings(config.train)
        for line in lines:
            print(f"speechclip: {line}", flush=True)
        return plan
    last = run_dir / "checkpoints" / "last.ckpt"
    return RunPlan("worker", last if resume and last.is_file() else None)


def _load(config: RunConfig, progress: bool) -> tuple[SpeechCLIP, SpeechImageDataModule]:
    """Encoders, data checks, keyword vocabulary and the model: everything that may fail on bad input."""
    upstream = SpeechUpstream(config.model.upstream, config.model.normalize_waveform)
    check_heads(config.model, upstream.hidden_size)
    crop = config.train.max_audio_samples
    if crop is not None and crop < upstream.min_samples:
        raise ConfigError(f"train.max_audio_samples={crop}: must be >= {upstream.min_samples} (the upstream's shortest clip)")
    clip = FrozenCLIP(config.model.clip)
    datamodule = SpeechImageDataModule(config.data, config.train, clip, upstream, progress)
    _check_batch_fits(config, len(datamodule.read("train")))  # header reads only: before any cache is built
    if config.model.uses_cascaded and config.model.cascaded.keyword_vocab is None:
        captions = [i.text for i in datamodule.read("train") if i.text]
        if captions:  # the vocabulary is part of the model's config: known before the model is built
            config.model.cascaded.keyword_vocab = keyword_vocab(clip, captions, config.train.keyword_vocab_size)
    model = SpeechCLIP(config.model, upstream=upstream, clip=clip)
    return model, datamodule


def _check_batch_fits(config: RunConfig, clips: int) -> None:
    """A global batch larger than the training split cannot be formed: refuse rather than train on smaller ones."""
    if config.train.batch_size > clips:
        raise ConfigError(f"train.batch_size={config.train.batch_size}: more than the {clips} usable clips of "
                          f"data.train_split={config.data.train_split!r}; set train.batch_size <= {clips}")


def _fit_or_interrupted(trainer: L.Trainer, system: SpeechCLIPSystem, datamodule: SpeechImageDataModule, plan: RunPlan,
                        run_dir: Path) -> None:
    """trainer.fit; Ctrl-C (which Lightning turns into exit 1 and silence, leaving SIGINT ignored) becomes a
    TrainingInterrupted naming the step, with the SIGINT handler restored."""
    handler = signal.getsignal(signal.SIGINT)
    try:
        trainer.fit(system, datamodule=datamodule, ckpt_path=plan.checkpoint, weights_only=True)
    except SystemExit:
        if not trainer.interrupted:
            raise
        raise TrainingInterrupted(f"interrupted at step {trainer.global_step}; run the same command with --resume to go on "
                                  f"(from {run_dir / 'checkpoints' / 'last.ckpt'})") from None
    finally:
        if handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, handler)


def fit(config: RunConfig, run_dir: str | Path, resume: bool = False, progress: bool = True,
        callbacks: Sequence[Callback] = (), overwrite: bool = False) -> dict:
    """Train into `run_dir`. A folder holding a run needs `resume` (continue from checkpoints/last.ckpt:
    step, optimiser, schedule, batch position, RNGs; bit-identical to an uninterrupted run on CPU) or
    `overwrite` (replace it). progress: the bars; callbacks: more Lightning callbacks."""
    run_dir = Path(run_dir)
    check_run_config(config)
    plan = _plan(config, run_dir, resume, overwrite)
    history = metrics_history(run_dir / "logs" / "metrics.csv", plan.step) if plan.mode == "resume" else []
    trainer = _trainer(config, run_dir, progress, callbacks, history)
    check_global_batch(config.train, trainer.world_size)
    L.seed_everything(config.train.seed, workers=True, verbose=False)
    started = time.perf_counter()
    model, datamodule = _load(config, progress)
    datamodule.setup("fit")
    if plan.mode != "worker":
        open_run(run_dir, plan, config)
    system = SpeechCLIPSystem(model, config.train, export_dir=run_dir)
    system.image_table = datamodule.image_table
    _fit_or_interrupted(trainer, system, datamodule, plan, run_dir)
    _write_rank_fingerprint(model, run_dir, trainer.global_rank)
    summary = {"global_step": trainer.global_step, "start_step": system.start_step,
               "seconds": round(time.perf_counter() - started, 1),
               "best_val_recall_mean": system.best_recall if system.best_recall > float("-inf") else None,
               "best_step": system.best_step, "skipped": _skipped_report(datamodule.skipped, _all_ranks(system.skipped))}
    if trainer.is_global_zero:
        replace_folder(run_dir / "final", model.save_pretrained)
        write_text_atomic(run_dir / "train_summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _all_ranks(skipped: dict[str, str]) -> dict[str, str]:
    """Clips skipped in training by any process (each decodes its own share of the batches)."""
    if not (dist.is_available() and dist.is_initialized()):
        return skipped
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, skipped)
    return {k: v for part in everyone for k, v in part.items()}


def _skipped_report(checked: dict[str, dict[str, str]], in_training: dict[str, str]) -> dict:
    """Per split: how many clips were left out, how many for each reason, and which (file -> reason).
    `checked`: before training (missing, unreadable, empty, too short, undecodable in the state cache);
    `in_training`: decode failures met while training (with on_error: skip)."""
    report = {}
    for split, files in {**checked, "train": {**checked.get("train", {}), **in_training}}.items():
        reasons = Counter(reason.split(" (")[0] for reason in files.values())
        report[split] = {"count": len(files), "reasons": dict(reasons), "files": dict(files)}
    return report


def _write_rank_fingerprint(model: SpeechCLIP, run_dir: Path, rank: int) -> None:
    """sha256 of this process's trainable weights: under DDP every rank must write the same one."""
    digest = hashlib.sha256()
    for key, value in sorted(model.trainable_state_dict().items()):
        digest.update(key.encode())
        digest.update(value.float().cpu().numpy().tobytes())
    folder = run_dir / "ranks"
    folder.mkdir(exist_ok=True)
    (folder / f"rank{rank}.txt").write_text(digest.hexdigest() + "\n")


def evaluate_checkpoint(checkpoint: str | Path, config: RunConfig, split: str = "test", out: str | Path | None = None) -> dict:
    """The paper's tables for `split` of the run's dataset, written to JSON when `out` is given. Bad clips stop
    it naming the file, or with data.on_error=skip are left out and listed under "skipped" (as in training);
    `out` is checked before any work."""
    if out is not None:
        check_eval_out(Path(out))
    data = config.data
    name = getattr(data, f"{split}_split", split)
    report = check_items(read_dataset(data.kind, data.root, name, **data.options), data.on_error)
    if not report.good:
        raise DataError(f"data.{split}_split={name!r}: no usable clips ({len(report.bad)} skipped)")
    model = SpeechCLIP.from_pretrained(checkpoint)
    cache = ImageEmbeddingCache(config.train.cache_dir, model.clip)
    result = evaluate(model, report.good, cache, batch_size=config.train.eval_batch_size)
    result["checkpoint"], result["split"] = str(checkpoint), split
    result["skipped"] = _skipped_report({split: dict(report.bad)}, {})[split]
    if out is not None:
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def check_eval_out(out: Path) -> None:
    """Where the evaluation's JSON goes must be writable as a file: said before the evaluation, not after it."""
    if out.is_dir():
        raise RunFolderError(f"--out {out}: a folder; give a file name, e.g. {out / 'eval_test.json'}")
    if not out.parent.is_dir():
        what = "is not a folder" if out.parent.exists() else "does not exist"
        raise RunFolderError(f"--out {out}: {out.parent} {what}")


def load_run(run_dir: str | Path) -> RunConfig:
    return run_config_from_dict(yaml.safe_load((Path(run_dir) / "run.yaml").read_text()))
