import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from speechclip.data import read_dataset
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
    batches = list(one)
    assert len(batches) == 10 and sorted(i for b in batches for i in b) == list(range(100))
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]
    assert max(spread) <= 49  # sorted inside pools of 50: a batch never spans the whole range
    ranks = [list(LengthGroupedBatchSampler(lengths, 10, bucket=5, seed=3, rank=r, world_size=3)) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1
    assert not set(map(tuple, ranks[0])) & set(map(tuple, ranks[1]))


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
    assert (run / "best" / "config.json").is_file()
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert not any(k.startswith(("model.upstream.model", "model.clip.model")) for k in checkpoint["state_dict"])
    config.train.max_steps = 9
    resumed = fit(config, run, resume=True, progress=False)
    assert resumed["start_step"] == 6 and resumed["global_step"] == 9
    result = evaluate_checkpoint(run / "final", config, "test")
    for task in ("speech_to_image", "image_to_speech", "speech_to_text", "text_to_speech"):
        recall = result["cascaded"][task]["recall"]
        assert {1, 5} <= set(recall) and set(recall) == set(result["cascaded"][task]["chance"])
    assert set(result["cascaded"]["image_to_speech"]["recall"]) == {1, 5, 10}  # 16 captions; 8 images caps K at 5
    keywords = result["keywords"]
    assert len(keywords["per_keyword"]) == 4 and keywords["mean_keywords"] == 4.0
    # the hit rate recounted by hand from the checkpoint's own keywords (known hit rates: tests/test_evaluate.py)
    model = SpeechCLIP.from_pretrained(run / "final")
    items = read_dataset(config.data.kind, config.data.root, "test", **config.data.options)
    vocab = set(model.head.keywords.quantizer.vocab_ids.tolist())
    hits = 0
    for item, output in zip(items, model.speech_outputs([i.audio for i in items], batch_size=config.train.eval_batch_size)):
        caption = set(model.clip.tokenize([item.text])["input_ids"][0].tolist()) & vocab
        hits += sum(bool(caption & set(slot)) for slot in model.nearest_subwords(output)[0][0])
    assert keywords["hit_rate"] == pytest.approx(hits / (4 * len(items)))


def test_image_tower_runs_once_per_image(encoders, tiny_corpus, tmp_path, monkeypatch):
    from speechclip.clip import FrozenCLIP

    calls = []
    original = FrozenCLIP.image_features
    monkeypatch.setattr(FrozenCLIP, "image_features", lambda self, pixels: calls.append(len(pixels)) or original(self, pixels))
    config = tiny_run_config(encoders, tiny_corpus, str(tmp_path / "cache"), max_steps=12)  # several epochs
    fit(config, tmp_path / "a", progress=False)
    train_val_images = 30 + 6 - 8  # scenes + clip-art - test images
    assert sum(calls) <= train_val_images  # a few drawings may fail to render and be dropped
    calls.clear()
    fit(config, tmp_path / "b", progress=False)  # a new run reuses the on-disk cache
    assert calls == []


def test_cached_states_follow_the_training_precision(encoders, tiny_corpus, tmp_path):
    from speechclip.clip import FrozenCLIP
    from speechclip.train.state_cache import upstream_states
    from speechclip.upstream import SpeechUpstream

    states = {}
    for precision in ("32-true", "bf16-mixed"):
        config = tiny_run_config(encoders, tiny_corpus, str(tmp_path / "cache"), cache_upstream_states=True, precision=precision)
        upstream = SpeechUpstream(config.model.upstream).eval()
        module = SpeechImageDataModule(config.data, config.train, FrozenCLIP(config.model.clip), upstream)
        module.setup("fit")
        states[precision] = module.states["train"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = upstream_states(upstream, module.items["train"], module.lengths["train"], progress=False)
    assert all(torch.equal(a, b) for a, b in zip(states["bf16-mixed"], expected))
    differences = [(a.float() - b.float()).abs().max() for a, b in zip(states["32-true"], states["bf16-mixed"])]
    assert max(differences) > 0  # the training autocast was applied ...
    scale = max(a.float().abs().max() for a in states["32-true"])
    assert max(differences) < 0.1 * scale  # ... and stays a rounding difference


def _cli_env():
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}


def _write_config(path, encoders, corpus, cache, **train):
    config = tiny_run_config(encoders, corpus, cache, **train)
    path.write_text(yaml.safe_dump(config.to_dict()))
    return path


@pytest.mark.slow
def test_killed_training_resumes_from_last_checkpoint(encoders, tiny_corpus, tmp_path):
    config = _write_config(tmp_path / "c.yaml", encoders, tiny_corpus, str(tmp_path / "cache"),
                           max_steps=400, checkpoint_every_steps=2, val_every_steps=1000)
    run = tmp_path / "run"
    process = subprocess.Popen(CLI + ["train", "--config", str(config), "--run-dir", str(run), "--no-progress"],
                               env=_cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while time.time() < deadline and not (last.is_file() and torch.load(last, weights_only=False)["global_step"] >= 4):
        time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = torch.load(last, weights_only=False)["global_step"]
    assert killed_at >= 4
    done = subprocess.run(CLI + ["train", "--config", str(config), "--run-dir", str(run), "--resume", "--no-progress",
                                 "--set", f"train.max_steps={killed_at + 2}"],
                          env=_cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["start_step"] == killed_at and summary["global_step"] == killed_at + 2


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
