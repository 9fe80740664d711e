"""Lightning system: owns the loss, the optimiser and its schedule, validation recall and the best/
export, and keeps the frozen encoders out of checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch

from ..loss import contrastive_loss, gather_batch
from ..metrics import speech_image_retrieval
from ..model import FROZEN_PREFIXES, SpeechCLIP
from .config import TrainConfig
from .run_folder import replace_folder

BEST_RECORD = "best.json"  # inside best/: the step and validation recall it was chosen for


def warmup_then_linear_decay(step: int, warmup: int, total: int, final_ratio: float) -> float:
    """LR multiplier: linear 0 -> 1 over `warmup` steps, then linear 1 -> final_ratio at `total` steps."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 1.0 + (final_ratio - 1.0) * progress


class SpeechCLIPSystem(L.LightningModule):
    def __init__(self, model: SpeechCLIP, config: TrainConfig, export_dir: str | Path | None = None):
        super().__init__()
        self.model, self.config = model, config
        self.export_dir = Path(export_dir) if export_dir else None
        self.strict_loading = False  # checkpoints hold only the trainable weights
        self.best_recall = float("-inf")
        self.best_step: int | None = None
        self.skipped: dict[str, str] = {}  # clips that failed to decode in training (file -> reason)
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.image_table: torch.Tensor | None = None  # set by the runner: all train+val image embeddings
        self.start_step = 0  # the step training (re)started from: > 0 after a resume

    def on_train_start(self) -> None:
        self.start_step = self.global_step
        self._adopt_best_on_disk()

    def _adopt_best_on_disk(self) -> None:
        """best/ only ever improves: a run resumed from a checkpoint older than best/ (killed after a
        validation that improved it) keeps best/'s recall as the bar."""
        record = self.export_dir / "best" / BEST_RECORD if self.export_dir else None
        if record is not None and record.is_file():
            saved = json.loads(record.read_text())
            if saved["recall_mean"] > self.best_recall:
                self.best_recall, self.best_step = float(saved["recall_mean"]), int(saved["step"])

    # ---- training ---------------------------------------------------------------------------------
    def _image_embeds(self, batch: dict) -> torch.Tensor:
        if "image_embeds" in batch:
            return batch["image_embeds"]
        return self.model.clip.image_features(batch["pixel_values"])

    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return gather_batch(tensor, self.global_rank, self.trainer.world_size if self._trainer else 1)

    def _speech(self, batch: dict):
        if "states" in batch:
            return self.model.forward_states(batch["states"], batch["frame_mask"])
        return self.model(batch["waves"], batch["lengths"])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.model.set_training_step(self.global_step)  # CIF's length scaling follows the step
        self.skipped.update(dict(batch.get("skipped", ())))
        output = self._speech(batch)
        images = self._gather(self._image_embeds(batch).float())
        image_ids = self._gather(batch["image_ids"])
        scale = self.model.scale()
        losses = {}
        if output.parallel is not None:
            losses["parallel"] = contrastive_loss(self._gather(output.parallel), images, scale, image_ids)
        if output.cascaded is not None:
            losses["cascaded"] = contrastive_loss(self._gather(output.cascaded.embeds), images, scale, image_ids)
        weights = {"parallel": self.model.config.parallel_loss_weight, "cascaded": self.model.config.cascaded_loss_weight}
        loss = sum(weights[name] * value for name, value in losses.items())
        aux = dict(output.aux_losses or {})  # already weighted by the model (e.g. CIF's quantity loss)
        loss = loss + sum(aux.values())
        size = len(batch["image_ids"])
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        for name, value in {**losses, **aux}.items():
            self.log(f"train/loss_{name}", value, batch_size=size)
        self.log("train/logit_scale", scale, batch_size=size)
        return loss

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=self.config.lr, weight_decay=self.config.weight_decay)
        ratio = self.config.final_lr / self.config.lr
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_then_linear_decay(step, self.config.warmup_steps, self.config.max_steps, ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ---- validation: speech<->image recall on the whole validation split ------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        output = self._speech(batch)
        self._val.append((output.embeds.float().cpu(), batch["image_ids"].cpu()))

    def on_validation_epoch_end(self) -> None:
        if not self._val or self.image_table is None:
            self._val.clear()
            return
        speech = torch.cat([s for s, _ in self._val])
        rows = torch.cat([r for _, r in self._val])
        self._val.clear()
        images, caption_image = rows.unique(return_inverse=True)
        metrics = speech_image_retrieval(speech, self.image_table[images], caption_image)
        recalls = [v for task in metrics.values() for v in task["recall"].values()]
        mean = sum(recalls) / len(recalls)
        for task, values in metrics.items():
            for k, value in values["recall"].items():
                self.log(f"val/{task}_r{k}", value, sync_dist=False)
        self.log("val/recall_mean", mean, prog_bar=True, sync_dist=False)
        if mean > self.best_recall and not self.trainer.sanity_checking:
            self.best_recall, self.best_step = mean, self.global_step
            if self.export_dir is not None and self.trainer.is_global_zero:
                replace_folder(self.export_dir / "best", self._write_best)

    def _write_best(self, folder: Path) -> None:
        self.model.save_pretrained(folder)
        (folder / BEST_RECORD).write_text(json.dumps({"step": self.best_step, "recall_mean": self.best_recall}) + "\n")

    # ---- checkpoints: trainable weights only, and the run's bookkeeping ----------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        frozen = tuple(f"model.{p}" for p in FROZEN_PREFIXES)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(frozen)}
        checkpoint["speechclip"] = {"best_recall": self.best_recall, "best_step": self.best_step, "skipped": dict(self.skipped)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Before Lightning loads the weights (non-strictly, as the frozen encoders are not in the file):
        the trainable ones must all be there, and nothing else."""
        expected = {f"model.{k}" for k in self.model.trainable_state_dict()}
        missing, unexpected = sorted(expected - set(checkpoint["state_dict"])), sorted(set(checkpoint["state_dict"]) - expected)
        if missing or unexpected:
            raise ValueError(f"resume: checkpoints/last.ckpt does not match the model (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}); --overwrite starts a new run")
        state = checkpoint.get("speechclip", {})
        self.best_recall = float(state.get("best_recall", float("-inf")))
        self.best_step = state.get("best_step")
        self.skipped = dict(state.get("skipped", {}))
        self.start_step = int(checkpoint["global_step"])  # also when nothing is left to train
