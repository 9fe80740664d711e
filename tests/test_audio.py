import numpy as np
import pytest
import torch

from speechclip.audio import SAMPLE_RATE, AudioError, crop, load_audio, pad_batch, to_waveform
from tests.conftest import write_wav


def test_resamples_and_downmixes(tmp_path, rng):
    stereo = rng.standard_normal((8000, 2)).astype(np.float32) * 0.1
    path = write_wav(tmp_path / "stereo.wav", stereo, rate=8000)
    wave = load_audio(path)
    assert wave.ndim == 1 and wave.dtype == np.float32
    assert abs(len(wave) - SAMPLE_RATE) <= 2  # 1 s at 8 kHz -> 1 s at 16 kHz


def test_missing_file_names_it(tmp_path):
    with pytest.raises(AudioError, match="nope.wav: no such audio file"):
        load_audio(tmp_path / "nope.wav")


def test_corrupt_file_names_it(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF0000WAVEjunkjunkjunk")
    with pytest.raises(AudioError, match="bad.wav: unreadable audio"):
        load_audio(bad)


def test_empty_file_names_it(tmp_path):
    path = write_wav(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32))
    with pytest.raises(AudioError, match="empty.wav: empty audio"):
        load_audio(path)


def test_silence_rejected_only_when_asked(tmp_path):
    path = write_wav(tmp_path / "quiet.wav", np.zeros(1600, dtype=np.float32))
    assert load_audio(path).shape == (1600,)
    with pytest.raises(AudioError, match="quiet.wav: silent audio"):
        load_audio(path, allow_silence=False)


def test_non_finite_array_rejected():
    with pytest.raises(AudioError, match="clip7: audio contains NaN"):
        to_waveform(np.array([0.0, np.nan, 0.1]), name="clip7")


def test_pad_batch_and_crop():
    batch, lengths = pad_batch([torch.ones(3), torch.ones(5)])
    assert batch.shape == (2, 5) and lengths.tolist() == [3, 5]
    assert batch[0, 3:].abs().sum() == 0
    wave = torch.arange(10.0)
    assert crop(wave, 4).tolist() == [0, 1, 2, 3]
    window = crop(wave, 4, torch.Generator().manual_seed(1))
    assert len(window) == 4 and (window.diff() == 1).all()
    assert crop(wave, None) is wave
