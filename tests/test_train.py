import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from speechclip.data import image_table, read_dataset
from speechclip.image_cache import ImageEmbeddingCache
from speechclip.model import SpeechCLIP
from speechclip.train.config import ConfigError, load_run_config
from speechclip.train.datamodule import LengthGroupedBatchSampler, SpeechImageDataModule
from speechclip.train.run import evaluate_checkpoint, fit
from speechclip.train.system import SpeechCLIPSystem, warmup_then_linear_decay
from tests.conftest import tiny_run_config

CLI = [sys.executable, "-m", "speechclip.cli"]


def test_schedule_warms_up_then_decays():
    assert warmup_then_linear_decay(0, 10, 100, 0.0) == pytest.approx(0.1)
    assert warmup_then_linear_decay(9, 10, 100, 0.0) == pytest.approx(1.0)
    assert warmup_then_linear_decay(55, 10, 100, 0.0) == pytest.approx(0.5)
    assert warmup_then_linear_decay(500, 10, 100, 1e-4) == pytest.approx(1e-4)


def test_length_grouped_batches_cover_ranks_evenly():
    lengths = list(range(100, 0, -1))
    one = LengthGroupedBatchSampler(lengths, 10, bucket=5, seed=3)
    batches = [[i for i, _ in b] for b in one]  # keys are (item, crop seed)
    assert len(batches) == 10 and sorted(i for b in batches for i in b) == list(range(100))
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]
    assert max(spread) <= 49  # sorted inside pools of 50: a batch never spans the whole range
    ranks = [list(LengthGroupedBatchSampler(lengths, 10, bucket=5, seed=3, rank=r, world_size=3)) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1
    assert not set(map(tuple, ranks[0])) & set(map(tuple, ranks[1]))
    # one permutation for all ranks, every third batch each (the tenth batch left out: ranks stay equal)
    assert sorted(map(tuple, ranks[0] + ranks[1] + ranks[2])) == sorted(map(tuple, list(one)[:9]))


def test_config_overrides_and_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"variant": "cascaded"}, "train": {"lr": 0.5}}))
    config = load_run_config(path, ["train.lr=3e-4", "model.cascaded.num_keywords=4"])
    assert config.train.lr == 3e-4 and config.model.cascaded.num_keywords == 4 and config.model.variant == "cascaded"
    with pytest.raises(ConfigError, match="unknown field.*'lrr'"):
        load_run_config(path, ["train.lrr=1"])
    with pytest.raises(ConfigError, match="expected section.field=value"):
        load_run_config(path, ["train.lr"])


@pytest.mark.parametrize("variant", ["parallel", "hybrid"])
def test_overfits_one_batch(encoders, tiny_corpus, tmp_path, variant):
    torch.manual_seed(0)
    config = tiny_run_config(encoders, tiny_corpus, str(tmp_path / "cache"), variant=variant, batch_size=12)
    model = SpeechCLIP(config.model)
    datamodule = SpeechImageDataModule(config.data, config.train, model.clip)
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))
    # A random tiny CLIP maps all these images to nearly one direction (cosine > 0.95), which no speech
    # head can separate; give each image its own random target so the test measures the speech side.
    targets = torch.randn(int(batch["image_ids"].max()) + 1, model.clip.embed_dim, generator=torch.Generator().manual_seed(0))
    batch["image_embeds"] = targets[batch["image_ids"]]
    system = SpeechCLIPSystem(model, config.train)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        loss = system.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.3 * losses[0]


def test_fit_checkpoint_resume_and_eval(encoders, tiny_corpus, tmp_path):
    run = tmp_path / "run"
    config = tiny_run_config(encoders, tiny_corpus, str(tmp_path / "cache"), variant="cascaded")
    first = fit(config, run, progress=False)
    assert first["global_step"] == 6 and first["start_step"] == 0
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "final" / "model.safetensors").is_file()
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any(k.startswith(("model.upstream.model", "model.clip.model")) for k in checkpoint["state_dict"])
    # best/ is the model of the best validation, and the summary says which
    with open(run / "logs" / "metrics.csv", newline="") as file:
        validations = [(int(r["step"]) + 1, float(r["val/recall_mean"])) for r in csv.DictReader(file) if r["val/recall_mean"]]
    assert [step for step, _ in validations] == [3, 6]
    best_step, best = max(validations, key=lambda v: (v[1], -v[0]))
    assert (first["best_step"], first["best_val_recall_mean"]) == (best_step, pytest.approx(best))
    assert json.loads((run / "best" / "best.json").read_text())["step"] == best_step
    assert first["best_step"] == 6 or not _same_file(run / "best", run / "final")  # best/ is not the last model then
    at_step_6 = (run / "final" / "model.safetensors").read_bytes()
    config.train.max_steps = 9
    resumed = fit(config, run, resume=True, progress=False)
    assert resumed["start_step"] == 6 and resumed["global_step"] == 9
    assert (run / "final" / "model.safetensors").read_bytes() != at_step_6  # the resumed steps trained
    model = SpeechCLIP.from_pretrained(run / "final")
    result = evaluate_checkpoint(run / "final", config, "test")
    test = read_dataset("manifest", tiny_corpus, "test")
    outputs = model.speech_outputs([item.audio for item in test])
    # speech->image R@1 and the keyword hit rate recomputed by hand from the trained model's own outputs
    table = image_table(test)
    images = ImageEmbeddingCache(config.train.cache_dir, model.clip).embeddings(table.paths)
    speech = torch.nn.functional.normalize(torch.cat([o.cascaded.embeds for o in outputs]), dim=-1)
    top = (speech @ torch.nn.functional.normalize(images, dim=-1).T).argmax(dim=1)
    r1 = (top == torch.tensor(table.caption_rows)).float().mean().item()
    assert result["cascaded"]["speech_to_image"]["recall"][1] == pytest.approx(r1, abs=1e-6)
    vocab = set(model.head.keywords.quantizer.vocab_ids.tolist())
    hits = []
    for item, output in zip(test, outputs):
        caption = set(model.clip.tokenize([item.text])["input_ids"][0].tolist()) & vocab
        hits += [bool(caption & set(slot)) for slot in model.nearest_subwords(output)[0][0]]
    assert result["keywords"]["hit_rate"] == pytest.approx(sum(hits) / len(hits)) and len(result["keywords"]["per_keyword"]) == 4


def _same_file(a: Path, b: Path) -> bool:
    return (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_image_tower_runs_once_per_image(encoders, tiny_corpus, tmp_path, monkeypatch):
    from speechclip.clip import FrozenCLIP

    calls = []
    original = FrozenCLIP.image_features
    monkeypatch.setattr(FrozenCLIP, "image_features", lambda self, pixels: calls.append(len(pixels)) or original(self, pixels))
    config = tiny_run_config(encoders, tiny_corpus, str(tmp_path / "cache"), max_steps=12)  # several epochs
    fit(config, tmp_path / "a", progress=False)
    distinct = image_table(read_dataset("manifest", tiny_corpus, "train") + read_dataset("manifest", tiny_corpus, "val"))
    assert sum(calls) == len(distinct.ids) > 0  # the tower ran, once per distinct image
    calls.clear()
    fit(config, tmp_path / "b", progress=False)  # a new run reuses the on-disk cache
    assert calls == []


def _cli_env():
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}


def _write_config(path, encoders, corpus, cache, **train):
    config = tiny_run_config(encoders, corpus, cache, **train)
    path.write_text(yaml.safe_dump(config.to_dict()))
    return path


@pytest.mark.slow
def test_two_process_ddp_ranks_agree(encoders, tiny_corpus, tmp_path):
    config = _write_config(tmp_path / "c.yaml", encoders, tiny_corpus, str(tmp_path / "cache"),
                           max_steps=4, batch_size=4, accelerator="cpu", devices=2, strategy="ddp")
    run = tmp_path / "run"
    done = subprocess.run(CLI + ["train", "--config", str(config), "--run-dir", str(run), "--no-progress"],
                          env=_cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = sorted((run / "ranks").glob("rank*.txt"))
    assert [r.name for r in ranks] == ["rank0.txt", "rank1.txt"]
    assert ranks[0].read_text() == ranks[1].read_text()
    start = SpeechCLIP.from_pretrained(run / "final")
    assert start.config.variant == "parallel"
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["global_step"] == 4


def test_global_batch_must_split_evenly_across_processes(encoders, tiny_corpus, tmp_path):
    config = tiny_run_config(encoders, tiny_corpus, str(tmp_path / "cache"), batch_size=5, accelerator="cpu", devices=2,
                             strategy="ddp")
    with pytest.raises(ConfigError, match=r"^train.batch_size=5: must be divisible by the 2 training processes"):
        fit(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_aux_losses_are_added_and_logged_and_the_step_reaches_the_model(encoders, tiny_corpus, tmp_path):
    """hybrid_plus: CIF's (already weighted) quantity loss joins the two contrastive losses."""
    config = tiny_run_config(encoders, tiny_corpus, str(tmp_path / "cache"), variant="hybrid_plus", max_steps=3,
                             cache_upstream_states=True, val_every_steps=3, checkpoint_every_steps=3)
    steps = []
    original = SpeechCLIP.set_training_step
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SpeechCLIP, "set_training_step", lambda self, step: steps.append(step) or original(self, step))
        fit(config, tmp_path / "run", progress=False)
    assert steps == [0, 1, 2]
    with open(tmp_path / "run" / "logs" / "metrics.csv", newline="") as file:
        rows = [r for r in csv.DictReader(file) if r["train/loss"]]
    assert len(rows) == 3
    for row in rows:
        parts = [float(row[f"train/loss_{name}"]) for name in ("parallel", "cascaded", "quantity")]
        assert parts[2] > 0 and float(row["train/loss"]) == pytest.approx(sum(parts), rel=1e-5)
