"""`speechclip convert` around the conversion itself: what --out it may replace (never unrelated files or the
source), what a damaged download or an incomplete config gives, and what a killed or failed run leaves. Each
refusal is one line naming the file, folder or field, through the API and the CLI (exit 2)."""

from __future__ import annotations

import errno
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from speechclip.convert import ConversionError, convert_checkpoint
from tests.conftest import cli_error_line, dead_pid
from tests.official_checkpoints import CASES, official_checkpoint, save_official_checkpoint

PARALLEL, CASCADED = CASES[0], CASES[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A good (tiny) parallel checkpoint, never modified by a test."""
    state, config = official_checkpoint(PARALLEL)
    return save_official_checkpoint(tmp_path_factory.mktemp("ckpt") / "a.ckpt", state, config)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---- 1. what --overwrite may replace -------------------------------------------------------------------------
def test_overwrite_refuses_a_folder_that_holds_no_converted_model(ckpt, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ConversionError, match=r"mine: not empty and holds no converted model \(no conversion.json\)"):
        convert_checkpoint(ckpt, out, overwrite=True)
    assert "holds no converted model" in cli_error_line(capsys, "convert", str(ckpt), "--out", str(out), "--overwrite")
    assert (out / "notes.txt").read_text() == "keep me" and _leftovers(tmp_path) == []


def test_overwrite_refuses_the_folder_holding_the_checkpoint(tmp_path, capsys):
    state, config = official_checkpoint(PARALLEL)
    (tmp_path / "dl").mkdir()
    source = save_official_checkpoint(tmp_path / "dl" / "a.ckpt", state, config)
    convert_checkpoint(source, tmp_path / "dl" / "model")  # even a folder that holds a converted model besides
    (tmp_path / "dl" / "conversion.json").write_text("{}")
    for out in (tmp_path / "dl", tmp_path):
        with pytest.raises(ConversionError, match=rf"{out}: holds the checkpoint being converted"):
            convert_checkpoint(source, out, overwrite=True)
    line = cli_error_line(capsys, "convert", str(source), "--out", str(tmp_path / "dl"), "--overwrite")
    assert "holds the checkpoint being converted" in line
    assert source.is_file() and (tmp_path / "dl" / "model" / "model.safetensors").is_file()


def test_an_empty_folder_is_accepted_without_overwrite(ckpt, tmp_path):
    (tmp_path / "out").mkdir()
    folder = convert_checkpoint(ckpt, tmp_path / "out")
    assert (folder / "conversion.json").is_file() and _leftovers(tmp_path) == []


def test_overwrite_replaces_a_converted_model(ckpt, tmp_path, capsys):
    convert_checkpoint(ckpt, tmp_path / "out")
    (tmp_path / "out" / "old-extra.txt").write_text("from the old model folder")
    with pytest.raises(ConversionError, match=r"out: holds a converted model; choose another folder"):
        convert_checkpoint(ckpt, tmp_path / "out")
    convert_checkpoint(ckpt, tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "old-extra.txt").exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_out_that_is_a_file_is_refused(ckpt, tmp_path, capsys, overwrite):
    out = tmp_path / "taken"
    out.write_text("a file")
    with pytest.raises(ConversionError, match=r"taken: a file, not a folder"):
        convert_checkpoint(ckpt, out, overwrite=overwrite)
    flags = ["--overwrite"] if overwrite else []
    assert "a file, not a folder" in cli_error_line(capsys, "convert", str(ckpt), "--out", str(out), *flags)
    assert out.read_text() == "a file" and _leftovers(tmp_path) == []


def test_an_out_inside_a_file_is_refused(ckpt, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    line = cli_error_line(capsys, "convert", str(ckpt), "--out", str(tmp_path / "afile" / "x"))
    assert line.endswith(f"{tmp_path / 'afile'}: a file, not a folder (on the way to --out {tmp_path / 'afile' / 'x'})")


def test_the_current_folder_is_refused(ckpt, tmp_path, capsys, monkeypatch):
    convert_checkpoint(ckpt, tmp_path / "out")
    monkeypatch.chdir(tmp_path / "out")
    assert "the current folder" in cli_error_line(capsys, "convert", str(ckpt), "--out", ".", "--overwrite")
    monkeypatch.chdir(tmp_path / "out" / "hubert")
    assert "the current folder" in cli_error_line(capsys, "convert", str(ckpt), "--out", "..", "--overwrite")
    assert (tmp_path / "out" / "model.safetensors").is_file()


# ---- 2. a damaged download -----------------------------------------------------------------------------------
def _flip_a_byte(path: Path, entry: str) -> None:
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(entry)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + info.file_size // 2] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_flipped_byte_inside_a_tensor_is_named(ckpt, tmp_path, capsys):
    damaged = tmp_path / "a.ckpt"
    damaged.write_bytes(ckpt.read_bytes())
    with zipfile.ZipFile(damaged) as archive:
        entry = sorted((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)[-2].filename
    _flip_a_byte(damaged, entry)
    message = rf"a.ckpt: damaged \(CRC mismatch in {entry}\); download it again"
    with pytest.raises(ConversionError, match=message):
        convert_checkpoint(damaged, tmp_path / "out")
    assert __import__("re").search(message, cli_error_line(capsys, "convert", str(damaged), "--out", str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["text", "half"])
def test_an_unreadable_file_says_what_it_is_not(ckpt, tmp_path, damage):
    path = tmp_path / "b.ckpt"
    path.write_bytes(b"not a checkpoint\n" if damage == "text" else ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(ConversionError, match=r"b.ckpt: not a readable PyTorch checkpoint: damaged, or a file of another "
                                              r"format \(detail: .+\)$"):
        convert_checkpoint(path, tmp_path / "out")


def test_a_folder_given_as_the_checkpoint_is_named(tmp_path, capsys):
    (tmp_path / "ckpts").mkdir()
    assert cli_error_line(capsys, "convert", str(tmp_path / "ckpts"), "--out", str(tmp_path / "out")).endswith(
        f"{tmp_path / 'ckpts'}: a folder, not a .ckpt file")


# ---- 3. what a killed or failed conversion leaves --------------------------------------------------------------
def test_staging_folders_of_killed_conversions_are_removed(ckpt, tmp_path):
    stale = tmp_path / f".out.converting-{dead_pid()}"
    (stale / "hubert").mkdir(parents=True)
    running = tmp_path / f".out.converting-{os.getppid()}"  # a live process: perhaps converting right now
    running.mkdir()
    other = tmp_path / f".other.converting-{dead_pid()}"  # another target's: not this conversion's business
    other.mkdir()
    convert_checkpoint(ckpt, tmp_path / "out")
    assert _leftovers(tmp_path) == sorted([running.name, other.name])


def test_a_conversion_killed_by_sigterm_is_cleaned_up_by_the_next(ckpt, tmp_path):
    out = tmp_path / "out"
    code = ("import os, signal, speechclip.convert as c\n"
            "def killed(*a, **k):\n    os.kill(os.getpid(), signal.SIGTERM)\n"
            "c._assemble = killed\n"
            f"c.convert_checkpoint({str(ckpt)!r}, {str(out)!r})\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert done.returncode == -15 and [n.split("-")[0] for n in _leftovers(tmp_path)] == [".out.converting"], done.stderr[-500:]
    convert_checkpoint(ckpt, out)
    assert _leftovers(tmp_path) == []


def test_no_space_left_is_one_line_and_leaves_nothing(ckpt, tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    import speechclip.convert.hubert as hubert

    full = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    for error in (OSError(errno.ENOSPC, "No space left on device"), SafetensorError(full)):
        def fail(*args, error=error, **kwargs):
            raise error
        monkeypatch.setattr(hubert, "save_hubert_folder", fail)
        line = cli_error_line(capsys, "convert", str(ckpt), "--out", str(tmp_path / "out"))
        assert line.endswith(f"no space left on device writing {tmp_path / 'out'}")
        assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
