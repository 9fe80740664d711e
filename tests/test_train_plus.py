"""The SpeechCLIP+ variants train end to end: CIF's quantity loss reaches the optimiser and the log, the length
scaling follows the trainer's step, and the trained model fires a number of keywords that follows the speech."""

import csv

import torch

from speechclip import SpeechCLIP
from speechclip.train.run import fit
from tests.conftest import tiny_run_config


def test_hybrid_plus_trains_with_the_quantity_loss(encoders, tiny_corpus, tmp_path):
    torch.manual_seed(0)
    config = tiny_run_config(encoders, tiny_corpus, str(tmp_path / "cache"), variant="hybrid_plus", max_steps=8,
                             val_every_steps=4, checkpoint_every_steps=4)
    config.model.cif.scaling_steps = 4  # scaled to the target length for steps 0-3, free afterwards
    summary = fit(config, tmp_path / "run", progress=False)
    assert summary["global_step"] == 8
    with open(tmp_path / "run" / "logs" / "metrics.csv", newline="") as file:
        rows = [r for r in csv.DictReader(file) if r.get("train/loss_quantity")]
    assert rows, "the quantity loss is logged"
    for row in rows:  # the total is the weighted sum of the three losses
        parts = float(row["train/loss_parallel"]) + float(row["train/loss_cascaded"]) + float(row["train/loss_quantity"])
        assert abs(float(row["train/loss"]) - parts) < 1e-4
    model = SpeechCLIP.from_pretrained(tmp_path / "run" / "final")
    short, long = torch.randn(8000) * 0.1, torch.randn(48000) * 0.1
    counts = [len(model.keywords(clip)[0]) for clip in (short, long)]
    assert all(1 <= n <= model.config.cif.max_keywords for n in counts)


def test_cif_length_scaling_follows_the_trainer_step(encoders):
    from tests.conftest import tiny_model_config

    model = SpeechCLIP(tiny_model_config(encoders, "cascaded_plus")).train()
    waves, lengths = torch.randn(2, 32000) * 0.1, torch.tensor([32000, 16000])
    model.set_training_step(0)
    scaled = model(waves, lengths).cascaded.lengths.tolist()
    assert scaled == [5, 2]  # round(99 / 20), round(49 / 20): the targets while scaling
    model.set_training_step(model.config.cif.scaling_steps)
    free = model(waves, lengths)
    assert "quantity" in free.aux_losses and free.aux_losses["quantity"].requires_grad
