"""Shared fixtures: tiny encoders of the real HF formats, written to a temp folder once per session."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers.utils import logging as hf_logging  # noqa: E402

from speechclip.mini_encoders import (  # noqa: E402
    mini_clip_config,
    mini_speech_config,
    save_mini_clip,
    save_mini_speech,
    train_clip_tokenizer,
)

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()
torch.set_num_threads(2)

CAPTIONS = [
    "a red circle on the left",
    "two blue squares in the middle",
    "a small green triangle above a yellow star",
    "a big purple heart next to an orange moon",
    "three black dots under a white cloud",
]


@pytest.fixture(scope="session")
def encoders(tmp_path_factory) -> dict[str, str]:
    """Folders of tiny HuBERT / WavLM / wav2vec2 / data2vec-audio (+ a layer-norm HuBERT) and CLIP."""
    root = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(0)
    tokenizer = train_clip_tokenizer(CAPTIONS * 4, vocab_size=320)
    paths = {"clip": str(save_mini_clip(root / "clip", tokenizer, mini_clip_config(len(tokenizer))))}
    for kind in ("hubert", "wavlm", "wav2vec2", "data2vec-audio"):
        paths[kind] = str(save_mini_speech(root / kind, mini_speech_config(kind)))
    paths["hubert-layernorm"] = str(save_mini_speech(root / "hubert-ln", mini_speech_config("hubert", group_norm=False)))
    return paths


def tiny_heads(variant: str) -> dict:
    """The head settings of a tiny model: only the sections the variant reads (others would be refused)."""
    values: dict = {}
    if variant == "parallel":
        values["parallel"] = dict(num_heads=4, ffn_dim=128)
    if variant in ("cascaded", "hybrid"):
        values["cascaded"] = dict(num_keywords=4)
    if variant.endswith("_plus"):
        values["cif"] = dict(max_keywords=8)  # the tiny CLIP has 32 text positions
    return values


def tiny_model_config(encoders: dict[str, str], variant: str = "parallel", upstream: str = "hubert", **overrides):
    from speechclip import SpeechCLIPConfig

    values = dict(upstream=encoders[upstream], clip=encoders["clip"], variant=variant, **tiny_heads(variant))
    values.update(overrides)
    return SpeechCLIPConfig(**values)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def write_wav(path: Path, samples: np.ndarray, rate: int = 16_000) -> Path:
    import soundfile

    soundfile.write(str(path), samples, rate)
    return path


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> str:
    """A miniature offline corpus (espeak-ng speech, rendered scenes, clip-art) in the manifest layout."""
    from speechclip.data.synthetic import CorpusSpec, build_corpus

    root = tmp_path_factory.mktemp("corpus")
    build_corpus(root, CorpusSpec(num_scenes=30, num_clipart=6, captions_per_image=2, val_images=6, test_images=8,
                                  seed=1), progress=False)
    return str(root)


def tiny_run_config(encoders: dict[str, str], corpus: str, cache_dir: str, variant: str = "parallel", **train):
    from speechclip.train.config import run_config_from_dict

    values = dict(batch_size=8, max_steps=6, warmup_steps=2, lr=1e-3, val_every_steps=3, checkpoint_every_steps=3,
                  num_workers=0, cache_dir=cache_dir, log_every_steps=1)
    values.update(train)
    return run_config_from_dict({
        "model": {"upstream": encoders["hubert"], "clip": encoders["clip"], "variant": variant, **tiny_heads(variant)},
        "data": {"kind": "manifest", "root": corpus},
        "train": values,
    })


def cli_error_line(capsys, *args: str) -> str:
    """Run the CLI in-process; it must exit 2 with one error line and no traceback. Returns that line."""
    from speechclip.cli import main

    with pytest.raises(SystemExit) as stop:
        main(list(args))
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def dead_pid() -> int:
    """The pid of a process that has ended: the owner of a staging folder left by a killed run."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid
