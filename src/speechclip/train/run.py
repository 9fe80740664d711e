"""Train and evaluate runs: a run folder holds run.yaml, checkpoints/ (resume), best/ and final/
(SpeechCLIP checkpoints: config.json + model.safetensors), logs/ and results."""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from ..data import read_dataset
from ..evaluate import evaluate
from ..clip import FrozenCLIP
from ..image_cache import ImageEmbeddingCache
from ..model import SpeechCLIP
from ..upstream import SpeechUpstream
from .config import RunConfig, run_config_from_dict
from .datamodule import SpeechImageDataModule
from .system import SpeechCLIPSystem


def keyword_vocab(model_clip, captions: list[str], size: int | None) -> list[int]:
    """CLIP subword ids seen in the training captions, most frequent first (reference: VQ restricted to
    the caption vocabulary). Only the text of the captions is used, never paired with the speech."""
    counts = Counter(t for ids in model_clip.tokenize(captions)["input_ids"].tolist() for t in ids)
    for special in model_clip.special_token_ids:
        counts.pop(special, None)
    return [t for t, _ in counts.most_common(size)]


def _trainer(config: RunConfig, run_dir: Path, progress: bool, extra_callbacks: Sequence[Callback]) -> L.Trainer:
    train = config.train
    precision = train.resolved_precision()
    callbacks = [*extra_callbacks,
        ModelCheckpoint(dirpath=run_dir / "checkpoints", every_n_train_steps=train.checkpoint_every_steps,
                        save_last=True, save_top_k=0),
        ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor="val/recall_mean", mode="max",
                        save_top_k=1, save_on_train_epoch_end=False),
    ]
    loggers = [CSVLogger(run_dir, name="logs", version="")]
    try:
        from lightning.pytorch.loggers import TensorBoardLogger
        import tensorboard  # noqa: F401

        loggers.append(TensorBoardLogger(run_dir, name="tensorboard", version=""))
    except ImportError:
        pass
    return L.Trainer(
        max_steps=train.max_steps, accelerator=train.accelerator, devices=train.devices, num_nodes=train.num_nodes,
        strategy=train.strategy, precision=precision, gradient_clip_val=train.grad_clip,
        val_check_interval=train.val_every_steps, check_val_every_n_epoch=None, log_every_n_steps=train.log_every_steps,
        callbacks=callbacks, logger=loggers, default_root_dir=run_dir, use_distributed_sampler=False,
        enable_progress_bar=progress, enable_model_summary=False, num_sanity_val_steps=0,
    )


def fit(config: RunConfig, run_dir: str | Path, resume: bool = False, progress: bool = True,
        callbacks: Sequence[Callback] = ()) -> dict:
    """Train; with `resume`, continue from run_dir/checkpoints/last.ckpt (step counter, optimiser, schedule).
    progress: the bars (image embeddings, state cache, training); callbacks: more Lightning callbacks."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(config.train.seed, workers=True, verbose=False)
    started = time.perf_counter()
    upstream = SpeechUpstream(config.model.upstream, config.model.normalize_waveform)
    clip = FrozenCLIP(config.model.clip)
    datamodule = SpeechImageDataModule(config.data, config.train, clip, upstream, progress)
    if config.model.uses_cascaded and config.model.cascaded.keyword_vocab is None:
        captions = [i.text for i in datamodule.read("train") if i.text]
        if captions:  # the vocabulary is part of the model's config: known before the model is built
            config.model.cascaded.keyword_vocab = keyword_vocab(clip, captions, config.train.keyword_vocab_size)
    model = SpeechCLIP(config.model, upstream=upstream, clip=clip)
    (run_dir / "run.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    datamodule.setup("fit")
    system = SpeechCLIPSystem(model, config.train, export_dir=run_dir)
    system.image_table = datamodule.image_table
    trainer = _trainer(config, run_dir, progress, callbacks)
    last = run_dir / "checkpoints" / "last.ckpt"
    if resume and not last.is_file():
        raise FileNotFoundError(f"{last}: nothing to resume from")
    trainer.fit(system, datamodule=datamodule, ckpt_path=str(last) if resume else None)
    _write_rank_fingerprint(model, run_dir, trainer.global_rank)
    summary = {"global_step": trainer.global_step, "start_step": system.start_step, "seconds": round(time.perf_counter() - started, 1),
               "best_val_recall_mean": system.best_recall if system.best_recall > float("-inf") else None,
               "data_checks": datamodule.reports, "skipped_while_training": _skipped(trainer)}
    if trainer.is_global_zero:
        model.save_pretrained(run_dir / "final")
        (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _skipped(trainer: L.Trainer) -> dict:
    loader = trainer.train_dataloader
    return dict(getattr(getattr(loader, "dataset", None), "skipped", {}) or {})


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
    """The paper's tables for `split` of the run's dataset, written to JSON when `out` is given."""
    model = SpeechCLIP.from_pretrained(checkpoint)
    data = config.data
    items = read_dataset(data.kind, data.root, getattr(data, f"{split}_split", split), **data.options)
    cache = ImageEmbeddingCache(config.train.cache_dir, model.clip)
    result = evaluate(model, items, cache, batch_size=config.train.eval_batch_size)
    result["checkpoint"], result["split"] = str(checkpoint), split
    if out is not None:
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def load_run(run_dir: str | Path) -> RunConfig:
    return run_config_from_dict(yaml.safe_load((Path(run_dir) / "run.yaml").read_text()))
