"""`speechclip convert` and the settings a released config must state: a hyperparameter the tensors do not hold
and the official code has no safe default for is refused by its field name, never guessed."""

from __future__ import annotations

from pathlib import Path

import pytest

from speechclip.convert import ConversionError, convert_checkpoint
from tests.official_checkpoints import CASES, official_checkpoint, save_official_checkpoint

PARALLEL, CASCADED = CASES[0], CASES[1]


def _convert_edited(tmp_path: Path, case, edit) -> None:
    state, config = official_checkpoint(case)
    edit(config["model_settings"])
    convert_checkpoint(save_official_checkpoint(tmp_path / "e.ckpt", state, config), tmp_path / "out")


@pytest.mark.parametrize("case, branch", [(CASCADED, "cascaded_branch"), (PARALLEL, "parallel_branch")])
def test_a_missing_nhead_is_refused_naming_the_field(tmp_path, case, branch):
    with pytest.raises(ConversionError, match=rf"e.ckpt: config field model_settings.{branch}.transformer_args.nhead is missing"):
        _convert_edited(tmp_path, case, lambda settings: settings[branch]["transformer_args"].pop("nhead"))
    assert not (tmp_path / "out").exists()


def test_a_missing_parallel_branch_is_named(tmp_path):
    with pytest.raises(ConversionError, match=r"e.ckpt: config field model_settings.parallel_branch is missing"):
        _convert_edited(tmp_path, PARALLEL, lambda settings: settings.pop("parallel_branch"))


def test_an_nhead_that_does_not_divide_the_width_is_named(tmp_path):
    with pytest.raises(ConversionError, match=r"e.ckpt: model_settings.cascaded_branch.transformer_args.nhead=3 "
                                              r"does not divide the width 128"):
        _convert_edited(tmp_path, CASCADED, lambda settings: settings["cascaded_branch"]["transformer_args"].update(nhead=3))
