"""Run folders: a run is never overwritten or continued by accident, a refused command changes nothing,
--overwrite replaces whole, resume refuses a changed config by field, and resume state never unpickles code."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from speechclip.config import ConfigError
from speechclip.cli import main
from speechclip.model import SpeechCLIP
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
    assert (run / "resumes.log").read_text() == ("resumed at step 2: train.max_steps: 2 -> 3: the learning-rate schedule is "
                                                 "stretched to the new length; the run will differ from a fresh 3-step run\n")
    assert yaml.safe_load((run / "run.yaml").read_text())["train"]["max_steps"] == 3


def test_overwrite_replaces_the_whole_run_and_a_failed_overwrite_keeps_the_old_one(encoders, tiny_corpus, finished_run, run):
    (run / "notes.txt").write_text("from the old run")
    before = snapshot(run)
    broken = config(encoders, tiny_corpus, finished_run[1])
    broken.data.root = str(run.parent / "no-such-corpus")  # fails while loading, before the folder is touched
    with pytest.raises(Exception, match="no-such-corpus"):
        fit(broken, run, overwrite=True, progress=False)
    assert snapshot(run) == before
    summary = fit(config(encoders, tiny_corpus, finished_run[1], max_steps=1, warmup_steps=1), run, overwrite=True, progress=False)
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


def test_resume_says_a_longer_max_steps_stretches_the_schedule_and_compares_paths_as_folders(
        encoders, tiny_corpus, finished_run, run, capsys):
    respelled = config(encoders, tiny_corpus.rstrip("/") + "/", finished_run[1], max_steps=3)  # corpus/ for corpus
    respelled.model.clip = encoders["clip"] + "/"
    assert fit(respelled, run, resume=True, progress=False)["global_step"] == 3
    assert ("speechclip: allowed change: train.max_steps: 2 -> 3: the learning-rate schedule is stretched to the new "
            "length; the run will differ from a fresh 3-step run\n") in capsys.readouterr().out


def bad_model(encoders: dict) -> list[tuple[str, str, str]]:
    clip, hubert = encoders["clip"], encoders["hubert"]
    return [
        ("upstream", "/nonexistent/hubert", "model.upstream=/nonexistent/hubert: no such folder"),
        ("upstream", "nohub", "model.upstream='nohub': no such folder, and the hub id cannot be fetched (offline, or no "
                              "such model on the Hub); give a model folder or a reachable hub id"),
        ("upstream", clip, f"model.upstream={clip}: a clip model, not a speech model (HuBERT, WavLM, wav2vec 2.0, data2vec-audio)"),
        ("clip", hubert, f"model.clip={hubert}: a hubert model, not a CLIP model"),
        ("clip", "/nonexistent/clip", "model.clip=/nonexistent/clip: no such folder"),
    ]


def test_bad_encoder_paths_and_head_counts_are_one_line_naming_the_field(encoders, tiny_corpus, finished_run, tmp_path):
    for field, value, message in bad_model(encoders):
        bad = config(encoders, tiny_corpus, finished_run[1])
        setattr(bad.model, field, value)
        with pytest.raises(ValueError) as error:
            fit(bad, tmp_path / "run", progress=False)
        assert str(error.value) == message
    bad = config(encoders, tiny_corpus, finished_run[1])
    bad.model.parallel.num_heads = 3
    with pytest.raises(ConfigError, match=r"^model.parallel.num_heads=3: must divide the upstream's width 64 "):
        fit(bad, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_batch_larger_than_the_training_split_is_refused_naming_both(encoders, tiny_corpus, finished_run, tmp_path):
    with pytest.raises(ConfigError, match=r"^train.batch_size=100000: more than the \d+ usable clips of "
                                          r"data.train_split='train'; set train.batch_size <= \d+$"):
        fit(config(encoders, tiny_corpus, finished_run[1], batch_size=100000), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_eval_takes_a_run_folder_or_a_file_of_its_model(finished_run, tmp_path, capsys):
    run = finished_run[0]
    for given in (run, run / "final" / "model.safetensors"):
        code, out, err = cli(capsys, "eval", "--checkpoint", str(given), "--out", str(tmp_path / "e.json"))
        assert code == 0, err
        assert yaml.safe_load((tmp_path / "e.json").read_text())["checkpoint"] == str(run / "final")
    last = run / "checkpoints" / "last.ckpt"
    assert cli(capsys, "eval", "--checkpoint", str(last))[1:] == ("", (
        f"speechclip: error: {last}: a training checkpoint (what --resume continues from), not a model; give the run "
        f"folder {run} (its final/) or {run / 'best'}\n"))
    shutil.copytree(run / "final", tmp_path / "model")
    code, _, err = cli(capsys, "eval", "--checkpoint", str(tmp_path / "model"))
    assert (code, err) == (2, f"speechclip: error: {tmp_path / 'model'}: not inside a run folder (no run.yaml beside it); "
                              "give --config with the run's YAML (its data section names the dataset)\n")


def test_embed_takes_a_run_folder_and_a_released_ckpt_is_sent_to_convert(finished_run, tmp_path, capsys):
    run = finished_run[0]
    code, out, err = cli(capsys, "embed", "--checkpoint", str(run), "--what", "text", "--out", str(tmp_path / "emb"), "--no-progress")
    assert code == 0, err
    assert json.loads(out)["kinds"]["text"] > 0  # the run's data section, as from its final/
    released = tmp_path / "SpeechCLIP_base_flickr.ckpt"
    released.write_bytes(b"")
    assert cli(capsys, "keywords", "--checkpoint", str(released), "x.wav")[1:] == ("", (
        f"speechclip: error: {released}: a .ckpt file, not a SpeechCLIP folder (config.json + model.safetensors); a released "
        f"SpeechCLIP checkpoint becomes one with `speechclip convert {released} --out DIR`\n"))


def test_eval_checks_out_before_any_work(finished_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(SpeechCLIP, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    for out, why in ((tmp_path, f"a folder; give a file name, e.g. {tmp_path / 'eval_test.json'}"),
                     (tmp_path / "no" / "x.json", f"{tmp_path / 'no'} does not exist")):
        code, _, err = cli(capsys, "eval", "--checkpoint", str(finished_run[0]), "--out", str(out))
        assert (code, err) == (2, f"speechclip: error: --out {out}: {why}\n")


def test_eval_honours_on_error_skip_and_reports_the_skipped_clips(finished_run, tiny_corpus, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("audio", "images"):
        (corpus / name).symlink_to(Path(tiny_corpus) / name)
    lines = (Path(tiny_corpus) / "test.jsonl").read_text().splitlines()
    gone = json.loads(lines[0])
    gone["audio"] = str(tmp_path / "gone.wav")
    (corpus / "test.jsonl").write_text("\n".join(lines + [json.dumps(gone)]) + "\n")
    args = ["eval", "--checkpoint", str(finished_run[0]), "--out", str(tmp_path / "e.json"), "--set", f"data.root={corpus}"]
    code, _, err = cli(capsys, *args)
    assert (code, err) == (2, f"speechclip: error: {tmp_path / 'gone.wav'}: missing audio\n")
    code, out, err = cli(capsys, *args, "--set", "data.on_error=skip")
    assert code == 0, err
    assert (f"skipped 1 clip(s) of the test split (data.on_error=skip; missing audio: 1); listed under 'skipped' in "
            f"{tmp_path / 'e.json'}\n") in out
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["captions"] == len(lines) and result["skipped"]["files"] == {str(tmp_path / "gone.wav"): "missing audio"}
