"""Exact resume: a CLI training killed with SIGKILL at random moments and resumed each time ends
bit-identical to the uninterrupted run (weights, best/, metrics history); the pieces that make it so."""

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

from speechclip.train.config import load_run_config, run_config_from_dict
from speechclip.train.datamodule import LengthGroupedBatchSampler
from speechclip.train.resume import capture_rng, metrics_history, restore_rng
from speechclip.train.run import fit
from speechclip.train.system import SpeechCLIPSystem

CLI = [sys.executable, "-m", "speechclip.cli"]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # 2 shared cores: oversubscription is 5-10x slower


def resume_config(encoders: dict, corpus: str, cache: str, upstream: str = "hubert", **train) -> dict:
    """Parallel head (dropout on) over cached upstream states with 1 s random crops: every RNG matters.
    132 training clips: 16 batches of 8 an epoch, so 24 steps cross an epoch boundary."""
    values = dict(batch_size=8, max_steps=24, warmup_steps=3, lr=3e-3, val_every_steps=5, checkpoint_every_steps=1,
                  log_every_steps=1, num_workers=0, cache_dir=cache, cache_upstream_states=True, max_audio_samples=16000)
    values.update(train)
    return {"model": {"upstream": encoders[upstream], "clip": encoders["clip"], "variant": "parallel",
                      "parallel": {"num_heads": 4, "ffn_dim": 128}},
            "data": {"kind": "manifest", "root": corpus}, "train": values}


def _env() -> dict:
    return {**os.environ, **ONE_THREAD, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def _same_weights(a: Path, b: Path) -> None:
    left, right = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert left.keys() == right.keys()
    different = [k for k in left if not torch.equal(left[k], right[k])]
    assert not different, f"tensors differ: {different[:5]}"


def _step(last: Path) -> int | None:
    return torch.load(last, weights_only=True)["global_step"] if last.is_file() else None


def _wait_for_step(process: subprocess.Popen, last: Path, step: int, seconds: float = 120) -> None:
    """Returns once the checkpoint reaches `step`, the process ends, or `seconds` pass."""
    seen, deadline = None, time.time() + seconds
    while time.time() < deadline and process.poll() is None:
        stamp = last.stat().st_mtime_ns if last.is_file() else None
        if stamp != seen:
            seen = stamp
            if stamp is not None and _step(last) >= step:
                return
        time.sleep(0.01)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bit_identical(encoders, tiny_corpus, tmp_path):
    config_path = tmp_path / "c.yaml"
    config_path.write_text(yaml.safe_dump(resume_config(encoders, tiny_corpus, str(tmp_path / "cache"))))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CLI runs below
    try:
        expected = fit(load_run_config(config_path), tmp_path / "uninterrupted", progress=False)
    finally:
        torch.set_num_threads(threads)
    run, rng, kills = tmp_path / "killed", random.Random(17), []
    last = run / "checkpoints" / "last.ckpt"
    command = CLI + ["train", "--config", str(config_path), "--run-dir", str(run), "--no-progress"]
    for attempt, target in enumerate([rng.randint(2, 8), None, rng.randint(12, 20)]):
        process = subprocess.Popen(command + (["--resume"] if attempt else []), env=_env(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if target is None:  # any moment from launch (imports, loading or training), yet before the run ends
            _wait_for_step(process, last, (_step(last) or 0) + 4, seconds=rng.uniform(0.0, 8.0))
        else:  # a random moment of training step `target` (its step, validation or checkpoint write)
            _wait_for_step(process, last, target)
            time.sleep(rng.uniform(0.0, 0.05))
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills.append(_step(last))
    done = subprocess.run(command + ["--resume"], env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len({k for k in kills if k not in (None, 24)}) >= 2, f"kills did not land inside training: {kills}"
    _same_weights(tmp_path / "uninterrupted" / "final", run / "final")
    _same_weights(tmp_path / "uninterrupted" / "best", run / "best")
    assert (run / "best" / "best.json").read_text() == (tmp_path / "uninterrupted" / "best" / "best.json").read_text()
    assert _rows(run / "logs" / "metrics.csv") == _rows(tmp_path / "uninterrupted" / "logs" / "metrics.csv")
    print(f"killed at checkpoint steps {kills}; best step {expected['best_step']}")


class Crash(Exception):
    pass


class CrashAt(Callback):
    """Stops a run as a crash would, just before optimiser step `step` + 1."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Crash()


def test_crash_between_checkpoint_write_and_metrics_row_loses_no_row(encoders, tiny_corpus, tmp_path, monkeypatch):
    """The checkpoint of a training step reaches last.ckpt only once the step's row is logged: a run stopped
    in between (the module's on_train_batch_end runs after every callback's, before Lightning logs the row)
    resumes from the checkpoint before, runs the step again, and logs every row once."""
    values = resume_config(encoders, tiny_corpus, str(tmp_path / "cache"), max_steps=6, val_every_steps=5,
                           checkpoint_every_steps=2)
    straight = fit(run_config_from_dict(values), tmp_path / "straight", progress=False)

    def crash_at_step_4(self, outputs, batch, batch_idx):
        if self.trainer.global_step == 4:
            raise Crash()

    with monkeypatch.context() as patch:
        patch.setattr(SpeechCLIPSystem, "on_train_batch_end", crash_at_step_4, raising=False)
        with pytest.raises(Crash):
            fit(run_config_from_dict(values), tmp_path / "split", progress=False)
    assert torch.load(tmp_path / "split" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    resumed = fit(run_config_from_dict(values), tmp_path / "split", resume=True, progress=False)
    assert resumed["start_step"] == 2 and resumed["global_step"] == straight["global_step"] == 6
    _same_weights(tmp_path / "straight" / "final", tmp_path / "split" / "final")
    assert _rows(tmp_path / "split" / "logs" / "metrics.csv") == _rows(tmp_path / "straight" / "logs" / "metrics.csv")


def test_crashed_run_resumed_in_process_matches_the_straight_one(encoders, tiny_corpus, tmp_path):
    """A run crashed after step 3 and resumed to 6 equals 6 straight: the waveform path (crops drawn per
    clip from the sampler's seeds), dropout and the schedule continue."""
    values = resume_config(encoders, tiny_corpus, str(tmp_path / "cache"), "hubert-layernorm", cache_upstream_states=False,
                           max_steps=6, val_every_steps=4, checkpoint_every_steps=3)
    straight = fit(run_config_from_dict(values), tmp_path / "straight", progress=False)
    with pytest.raises(Crash):
        fit(run_config_from_dict(values), tmp_path / "split", progress=False, callbacks=[CrashAt(3)])
    resumed = fit(run_config_from_dict(values), tmp_path / "split", resume=True, progress=False)
    assert resumed["start_step"] == 3 and resumed["global_step"] == straight["global_step"] == 6
    _same_weights(tmp_path / "straight" / "final", tmp_path / "split" / "final")
    assert _rows(tmp_path / "split" / "logs" / "metrics.csv") == _rows(tmp_path / "straight" / "logs" / "metrics.csv")


def test_sampler_continues_where_it_stopped():
    sampler = LengthGroupedBatchSampler(list(range(40)), 4, bucket=2, seed=5)
    whole = list(sampler)
    sampler.seek(0, 3)
    assert list(sampler) == whole[3:]
    assert LengthGroupedBatchSampler(list(range(40)), 4, bucket=2, seed=5).batches(1) != whole  # a new epoch, a new order
    seeds = [seed for batch in whole for _, seed in batch]
    assert len(set(seeds)) == len(seeds)  # each clip of the epoch its own crop


def test_rng_state_round_trips_through_weights_only_checkpoint(tmp_path):
    import numpy as np

    state = capture_rng()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(2), random.random())
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), np.random.rand(2), random.random())
    assert torch.equal(expected[0], again[0]) and (expected[1] == again[1]).all() and expected[2] == again[2]


def test_metrics_history_keeps_rows_before_the_checkpoint_and_drops_torn_ones(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,train/loss\n0,0,1.5\n0,1,1.25\n0,2,1.0\n0,3,0.5\n0,4")
    assert metrics_history(path, before_step=3) == [{"epoch": 0, "step": 0, "train/loss": 1.5},
                                                    {"epoch": 0, "step": 1, "train/loss": 1.25},
                                                    {"epoch": 0, "step": 2, "train/loss": 1.0}]
    assert metrics_history(path, before_step=99)[-1]["step"] == 3  # the half-written last row is dropped


class Keys(torch.utils.data.Dataset):
    """Hands back what the sampler asked for: (clip, crop seed)."""

    def __len__(self):
        return 40

    def __getitem__(self, key):
        return key


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_state_continues_the_same_batches_with_workers(workers):
    from speechclip.train.datamodule import ResumableLoader

    def loader():
        sampler = LengthGroupedBatchSampler(list(range(40)), 4, bucket=2, seed=5)
        return ResumableLoader(Keys(), batch_sampler=sampler, num_workers=workers, collate_fn=list,
                               persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))

    straight = loader()
    whole = [batch for _ in range(2) for batch in straight]  # two epochs
    first = loader()
    seen = []
    for batch in first:
        seen.append(batch)
        if len(seen) == 7:  # stopped mid-epoch with workers still prefetching ahead
            break
    state = first.state_dict()
    assert state == {"consumed": 7}
    resumed = loader()
    resumed.load_state_dict(state)
    rest = list(resumed) + list(resumed)  # the rest of epoch 0, then epoch 1
    assert seen + rest == whole[: 7 + len(rest)] and len(seen + rest) == len(whole)


class CtrlCAt(Callback):
    """Sends this process SIGINT (a Ctrl-C) just before optimiser step `step` + 1."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_in_training_names_the_step_and_resume_finishes_the_run(encoders, tiny_corpus, tmp_path):
    """Lightning catches Ctrl-C and exits 1 silently, leaving SIGINT ignored: fit raises a KeyboardInterrupt naming
    the step and how to go on (the CLI: exit 130), restores the handler, and --resume ends as the straight run."""
    from speechclip.train.run import TrainingInterrupted

    values = resume_config(encoders, tiny_corpus, str(tmp_path / "cache"), max_steps=6, val_every_steps=4,
                           checkpoint_every_steps=3)
    straight = fit(run_config_from_dict(values), tmp_path / "straight", progress=False)
    with pytest.raises(KeyboardInterrupt) as error:
        fit(run_config_from_dict(values), tmp_path / "split", progress=False, callbacks=[CtrlCAt(4)])
    assert isinstance(error.value, TrainingInterrupted)
    assert str(error.value) == (f"interrupted at step 4; run the same command with --resume to go on "
                                f"(from {tmp_path / 'split' / 'checkpoints' / 'last.ckpt'})")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    resumed = fit(run_config_from_dict(values), tmp_path / "split", resume=True, progress=False)
    assert resumed["start_step"] == 3 and resumed["global_step"] == straight["global_step"] == 6
    _same_weights(tmp_path / "straight" / "final", tmp_path / "split" / "final")
