"""`speechclip convert` on checkpoints built here in the official layouts: every layout converts, every key is
used or deliberately dropped, the converted model computes what the official pipeline computes, and nothing in
a checkpoint's pickle ever runs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from speechclip import SpeechCLIP
from speechclip.convert import ConversionError, convert_checkpoint
from tests.official_checkpoints import CASES, official_checkpoint, reference_speech, save_official_checkpoint

if __import__("importlib.util").util.find_spec("open_clip") is None:  # never imported: it needs torchvision
    pytest.fail("OpenAI's BPE merges ship in open-clip-torch: scripts/setup.sh installs it (pip install --no-deps)")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Each case: (case, official state, official config, our converted model)."""
    root = tmp_path_factory.mktemp("converted")
    results = {}
    for case in CASES:
        state, config = official_checkpoint(case)
        path = save_official_checkpoint(root / f"{case.name}.ckpt", state, config)
        folder = convert_checkpoint(path, root / case.name)
        results[case.name] = (case, state, config, SpeechCLIP.from_pretrained(folder))
    return results


def _clips() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randn(16000, generator=generator) * 0.1, torch.randn(23500, generator=generator) * 0.3]


@pytest.mark.parametrize("name", [case.name for case in CASES])
def test_converted_model_computes_what_the_official_pipeline_computes(converted, name):
    case, state, config, model = converted[name]
    assert model.config.variant == case.variant
    for clip in _clips():
        expected = reference_speech(case, state, config, clip)
        output = model.speech_outputs([clip])[0]
        if "parallel" in expected:
            torch.testing.assert_close(output.parallel[0], expected["parallel"], atol=2e-5, rtol=2e-5)
        if "cascaded" in expected:
            assert output.cascaded.token_ids[0].tolist() == expected["keywords"]
            torch.testing.assert_close(output.cascaded.embeds[0], expected["cascaded"], atol=2e-5, rtol=2e-5)
        main = expected.get("parallel", expected.get("cascaded"))
        torch.testing.assert_close(model.encode_speech([clip])[0], main / main.norm(), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", [case.name for case in CASES if case.variant != "parallel"])
def test_keywords_name_the_official_choice_first(converted, name):
    case, state, config, model = converted[name]
    clip = _clips()[0]
    words = model.keywords([clip], top_k=3)[0]
    expected = reference_speech(case, state, config, clip)["keywords"]
    assert [slot[0][0] for slot in words] == [model.subword(i) for i in expected]


def test_settings_carried_over(converted):
    large = converted["speechclip-large-cascaded"][3]
    assert large.config.normalize_waveform and large.config.normalize_hidden_states and not large.config.upstream_final_norm
    assert large.config.learn_logit_scale and abs(float(large.logit_scale) - np.log(1 / 0.05)) < 1e-6
    base = converted["speechclip-base-cascaded"][3]
    assert not base.config.normalize_waveform and not base.config.learn_logit_scale
    torch.testing.assert_close(base.scale(), torch.tensor(1 / 0.07))
    # the VQ vocabulary: the reduced table's ids less the rows the reference masks ("!" = 0, BOS, EOS)
    assert base.head.keywords.quantizer.vocab_ids.tolist() == sorted(set(__import__("tests.official_checkpoints", fromlist=["x"]).REDUCED_IDS) - {0, 49406, 49407})
    plus = converted["plus-large-flickr-hybrid+"][3].config
    assert (plus.parallel_loss_weight, plus.cascaded_loss_weight) == (0.5, 1.5) and plus.cascaded.num_heads == 8
    coco = converted["plus-large-coco-cascaded+"][3].config
    assert (coco.cif.conv_width, coco.cif.conv_layers, coco.cascaded.projection_hidden) == (5, 2, [96])
    assert converted["plus-base-hybrid"][3].config.normalize_waveform  # SpeechCLIP+ Base normalises in its dataset
    two = converted["two-layer-hybrid"][3].config.cascaded
    assert (two.attention, two.num_layers, two.num_heads) == ("transformer", 2, 4)


def test_converted_folder_is_self_contained(converted, tmp_path):
    """Loads from another working directory with the hub switched off; the encoders are inside the folder."""
    case, _, _, model = converted["speechclip-base-cascaded"]
    folder = model.config.upstream.rsplit("/hubert", 1)[0]
    code = ("import torch; from speechclip import SpeechCLIP; "
            f"m = SpeechCLIP.from_pretrained({folder!r}); print(m.encode_text('a dog').shape[1])")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-800:]
    saved = json.loads((model_folder := __import__("pathlib").Path(folder)).joinpath("config.json").read_text())
    assert saved["upstream"] == "hubert" and saved["clip"] == "clip"
    report = json.loads((model_folder / "conversion.json").read_text())
    assert report["variant"] == "cascaded" and "optimizer_states" in report["not_converted"]["checkpoint entries"]


def test_an_unknown_key_stops_the_conversion_naming_it(tmp_path):
    state, config = official_checkpoint(CASES[0])
    state["parallel_branch.mystery.weight"] = torch.zeros(3)
    path = save_official_checkpoint(tmp_path / "odd.ckpt", state, config)
    with pytest.raises(ConversionError, match=r"odd.ckpt: parallel_branch.mystery.weight: no conversion rule"):
        convert_checkpoint(path, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_a_wrong_shape_is_named(tmp_path):
    state, config = official_checkpoint(CASES[1])
    state["cascaded_branch.linear_proj.weight"] = torch.zeros(7, 128)
    path = save_official_checkpoint(tmp_path / "bad.ckpt", state, config)
    with pytest.raises(ConversionError, match=r"bad.ckpt: head.keywords.projection.weight: shape \(7, 128\)"):
        convert_checkpoint(path, tmp_path / "out")


def test_layers_that_disagree_with_n_layers_are_named(tmp_path):
    two = next(case for case in CASES if case.name == "two-layer-hybrid")
    state, config = official_checkpoint(two)
    config["model_settings"]["cascaded_branch"]["transformer_args"]["n_layers"] = 3
    path = save_official_checkpoint(tmp_path / "three.ckpt", state, config)
    with pytest.raises(ConversionError, match=r"three.ckpt: transformer_args.n_layers is 3 but the checkpoint holds 2 "
                                              r"layers under cascaded_branch.self_att.model.layers"):
        convert_checkpoint(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {Evil.marker}",))


def test_a_checkpoint_whose_pickle_would_run_code_is_refused_and_nothing_runs(tmp_path):
    Evil.marker = tmp_path / "pwned"
    state, config = official_checkpoint(CASES[0])
    path = save_official_checkpoint(tmp_path / "evil.ckpt", state, config, extra={"loops": Evil()})
    with pytest.raises(ConversionError, match=r"evil.ckpt: refused: loading it would call or build (posix|os)\.system"):
        convert_checkpoint(path, tmp_path / "out")
    assert not Evil.marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "text", "empty", "missing"])
def test_damaged_or_foreign_files_get_one_line_naming_them(tmp_path, damage):
    path = tmp_path / "model.ckpt"
    if damage == "truncated":
        state, config = official_checkpoint(CASES[0])
        save_official_checkpoint(path, state, config)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "text":
        path.write_text("not a checkpoint\n")
    elif damage == "empty":
        path.write_bytes(b"")
    with pytest.raises(ConversionError, match=r"model.ckpt: (not a readable PyTorch checkpoint|no such file)"):
        convert_checkpoint(path, tmp_path / "out")


def test_a_legacy_pickle_file_converts_too(tmp_path):
    state, config = official_checkpoint(CASES[0])
    path = save_official_checkpoint(tmp_path / "old.ckpt", state, config, legacy=True)
    folder = convert_checkpoint(path, tmp_path / "out")
    assert (folder / "model.safetensors").is_file()
    with pytest.raises(ConversionError, match="holds a converted model"):
        convert_checkpoint(path, folder)


def test_cli_convert_and_its_errors(tmp_path):
    state, config = official_checkpoint(CASES[1])
    path = save_official_checkpoint(tmp_path / "c.ckpt", state, config)
    run = lambda *a: subprocess.run([sys.executable, "-m", "speechclip.cli", *a], capture_output=True, text=True)  # noqa: E731
    done = run("convert", str(path), "--out", str(tmp_path / "c"))
    assert done.returncode == 0 and "cascaded model converted" in done.stdout, done.stderr[-800:]
    again = run("convert", str(path), "--out", str(tmp_path / "c"))
    assert again.returncode == 2 and again.stderr.strip().endswith("holds a converted model; choose another folder or pass overwrite=True (--overwrite)")
    assert "Traceback" not in again.stderr
    words = run("keywords", "--checkpoint", str(tmp_path / "c"), "--top-k", "2", str(_wav(tmp_path)))
    assert words.returncode == 0 and words.stdout.count("keyword ") == 4, words.stderr[-800:]


def _wav(folder):
    import soundfile

    path = folder / "clip.wav"
    soundfile.write(str(path), np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1, 16000)
    return path
