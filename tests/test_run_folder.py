"""Run folders: a run is never overwritten or continued by accident, a refused command changes nothing,
--overwrite replaces whole, resume refuses a changed config by field, and resume state never unpickles code."""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from speechclip.config import ConfigError
from speechclip.train.run import fit
from speechclip.train.run_folder import RunFolderError, recover, replace_folder
from tests.conftest import tiny_run_config

TINY = dict(max_steps=2, val_every_steps=2, checkpoint_every_steps=2, cache_upstream_states=True)


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(encoders, tiny_corpus, tmp_path_factory) -> tuple[Path, str]:
    """A finished 2-step run, copied by each test that changes it."""
    root = tmp_path_factory.mktemp("runs")
    fit(tiny_run_config(encoders, tiny_corpus, str(root / "cache"), **TINY), root / "run", progress=False)
    return root / "run", str(root / "cache")


@pytest.fixture
def run(finished_run, tmp_path) -> Path:
    shutil.copytree(finished_run[0], tmp_path / "run")
    return tmp_path / "run"


def config(encoders, corpus, cache, **train):
    return tiny_run_config(encoders, corpus, cache, **{**TINY, **train})


def test_training_into_a_run_without_resume_or_overwrite_is_refused_and_changes_nothing(encoders, tiny_corpus, finished_run, run):
    before = snapshot(run)
    with pytest.raises(RunFolderError, match=f"^{run}: holds a run; pass --resume to continue it or --overwrite to replace it$"):
        fit(config(encoders, tiny_corpus, finished_run[1]), run, progress=False)
    with pytest.raises(RunFolderError, match="exclude each other"):
        fit(config(encoders, tiny_corpus, finished_run[1]), run, resume=True, overwrite=True, progress=False)
    with pytest.raises(ConfigError, match=r"^train.batch_size=-4: must be >= 2"):  # checked before the folder
        fit(config(encoders, tiny_corpus, finished_run[1], batch_size=-4), run, resume=True, progress=False)
    assert snapshot(run) == before


def test_resume_refuses_a_changed_setting_naming_it_and_logs_allowed_changes(encoders, tiny_corpus, finished_run, run):
    before = snapshot(run)
    changed = config(encoders, tiny_corpus, finished_run[1])
    changed.model.parallel.ffn_dim = 64
    with pytest.raises(RunFolderError, match=r"^resume: model.parallel.ffn_dim differs from the run \(128 in run.yaml, 64 now\); "
                                             r"only train.max_steps, .* may change on resume"):
        fit(changed, run, resume=True, progress=False)
    with pytest.raises(RunFolderError, match=r"^resume: train.lr differs"):
        fit(config(encoders, tiny_corpus, finished_run[1], lr=0.5), run, resume=True, progress=False)
    assert snapshot(run) == before  # run.yaml included: a refused resume rewrites nothing
    summary = fit(config(encoders, tiny_corpus, finished_run[1], max_steps=3), run, resume=True, progress=False)
    assert (summary["start_step"], summary["global_step"]) == (2, 3)
    assert (run / "resumes.log").read_text() == "resumed at step 2: train.max_steps: 2 -> 3\n"
    assert yaml.safe_load((run / "run.yaml").read_text())["train"]["max_steps"] == 3


def test_overwrite_replaces_the_whole_run_and_a_failed_overwrite_keeps_the_old_one(encoders, tiny_corpus, finished_run, run):
    (run / "notes.txt").write_text("from the old run")
    before = snapshot(run)
    broken = config(encoders, tiny_corpus, finished_run[1])
    broken.data.root = str(run.parent / "no-such-corpus")  # fails while loading, before the folder is touched
    with pytest.raises(Exception, match="no-such-corpus"):
        fit(broken, run, overwrite=True, progress=False)
    assert snapshot(run) == before
    summary = fit(config(encoders, tiny_corpus, finished_run[1], max_steps=1), run, overwrite=True, progress=False)
    assert summary["global_step"] == 1 and not (run / "notes.txt").exists()
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1
    assert not list(run.parent.glob(".run.replaced*"))


def test_a_folder_that_holds_no_run_is_never_written_nor_deleted(encoders, tiny_corpus, finished_run, tmp_path):
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "thesis.tex").write_text("years of work")
    for flags in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(RunFolderError, match="not empty and holds no run"):
            fit(config(encoders, tiny_corpus, finished_run[1]), tmp_path / "project", progress=False, **flags)
    assert [p.name for p in (tmp_path / "project").iterdir()] == ["thesis.tex"]


class RunsCode:
    def __reduce__(self):
        return os.system, (f"touch {MARKER}",)


MARKER = Path("/tmp") / f"speechclip-pickle-ran-{os.getpid()}"


def test_a_checkpoint_whose_pickle_would_run_code_is_refused_and_nothing_runs(encoders, tiny_corpus, finished_run, run):
    MARKER.unlink(missing_ok=True)
    last = run / "checkpoints" / "last.ckpt"
    torch.save({"global_step": 2, "state_dict": {}, "payload": RunsCode()}, last)
    with pytest.raises(RunFolderError, match=rf"^{last}: refused: it asks to call posix.system, and resume state is only read weights-only"):
        fit(config(encoders, tiny_corpus, finished_run[1]), run, resume=True, progress=False)
    assert not MARKER.exists()
    last.write_bytes(last.read_bytes()[:100])
    with pytest.raises(RunFolderError, match=rf"^{last}: unreadable checkpoint \(.*\); delete it to restart the run from step 0$"):
        fit(config(encoders, tiny_corpus, finished_run[1]), run, resume=True, progress=False)


def test_interrupted_folder_swaps_are_finished(tmp_path):
    def write(folder: Path, text: str) -> None:
        folder.mkdir()
        (folder / "weights").write_text(text)

    replace_folder(tmp_path / "best", lambda f: write(f, "one"))
    replace_folder(tmp_path / "best", lambda f: write(f, "two"))
    assert (tmp_path / "best" / "weights").read_text() == "two" and sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    os.rename(tmp_path / "best", tmp_path / "best.old")  # killed between the two renames of a swap
    write(tmp_path / "best.new", "three")
    recover(tmp_path)
    assert (tmp_path / "best" / "weights").read_text() == "three" and sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    write(tmp_path / "best.new", "half")  # killed while writing the new one: the old one stays
    recover(tmp_path)
    assert (tmp_path / "best" / "weights").read_text() == "three" and sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_cli_refusal_is_one_line_without_traceback(encoders, tiny_corpus, finished_run, run, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config(encoders, tiny_corpus, finished_run[1]).to_dict()))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "speechclip.cli", "train", "--config", str(path), "--run-dir", str(run),
                           "--set", "train.val_every_steps=0"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr == "speechclip: error: train.val_every_steps=0: must be >= 1\n"
    done = subprocess.run([sys.executable, "-m", "speechclip.cli", "train", "--config", str(path), "--run-dir", str(run)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr == f"speechclip: error: {run}: holds a run; pass --resume to continue it or --overwrite to replace it\n"


def test_a_checkpoint_of_another_model_is_refused_naming_the_tensors(encoders, tiny_corpus, finished_run, run):
    last = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    checkpoint["state_dict"]["model.head.extra"] = checkpoint["state_dict"].pop("model.head.cls")
    torch.save(checkpoint, last)
    with pytest.raises(ValueError, match=r"^resume: checkpoints/last.ckpt does not match the model \(missing \['model.head.cls'\], "
                                         r"unexpected \['model.head.extra'\]\)"):
        fit(config(encoders, tiny_corpus, finished_run[1]), run, resume=True, progress=False)
