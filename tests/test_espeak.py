"""libespeak-ng in process (data/espeak.py) against its reference, the `espeak-ng` program itself."""

import ctypes.util

import numpy as np
import pytest

from speechclip.data import DataError, espeak
from speechclip.data.tts import VOICES, Speaker, all_speakers, program_wave, synthesize

CAPTIONS = ("a small red square next to a blue circle", "three big purple rings in the middle",
            "a picture of a yellow star, and two green triangles")

# Skipped only where there is no libespeak-ng at all: where there is one, it must load and reset.
pytestmark = pytest.mark.skipif(ctypes.util.find_library("espeak-ng") is None, reason="no libespeak-ng here")


def test_the_library_loads_and_resets_here():
    assert espeak.available()


def spread_of_speakers() -> list[Speaker]:
    """Every voice, the Klatt variants (which draw noise from rand()) and every speed and pitch."""
    speakers = all_speakers()
    chosen = [next(s for s in speakers if s.voice == voice) for voice in VOICES]
    chosen += [s for s in speakers if s.variant in ("klatt", "klatt2") and s.voice == "en-gb"][::5]
    return chosen + [s for s in speakers if s.voice == "en-us" and s.variant == "f3"][::3]


def test_in_process_speech_is_the_programs_sample_for_sample():
    speakers = spread_of_speakers()
    assert len(speakers) >= 16
    for n, speaker in enumerate(speakers):
        text = CAPTIONS[n % len(CAPTIONS)]
        samples, rate = espeak.speak(text, speaker.espeak_voice, speaker.speed, speaker.pitch)
        assert rate == 22_050 and samples.dtype == np.int16
        theirs, their_rate = program_wave(text, speaker)  # `espeak-ng -w`'s own wav
        assert their_rate == rate
        np.testing.assert_array_equal(samples, theirs, err_msg=speaker.name)


def test_a_clip_does_not_depend_on_the_clips_spoken_before_it():
    klatt = Speaker("en-us", "klatt", 160, 45)
    first = espeak.speak(CAPTIONS[0], klatt.espeak_voice, klatt.speed, klatt.pitch)[0]
    for speaker in spread_of_speakers()[:6]:
        espeak.speak(CAPTIONS[1], speaker.espeak_voice, speaker.speed, speaker.pitch)
    again = espeak.speak(CAPTIONS[0], klatt.espeak_voice, klatt.speed, klatt.pitch)[0]
    np.testing.assert_array_equal(first, again)


def test_synthesize_writes_the_same_wav_either_way(tmp_path):
    for n, speaker in enumerate(spread_of_speakers()[::4]):
        text = CAPTIONS[n % len(CAPTIONS)]
        ours, theirs = tmp_path / f"in-process-{n}.wav", tmp_path / f"program-{n}.wav"
        assert synthesize(text, speaker, ours, in_process=True) == synthesize(text, speaker, theirs, in_process=False)
        assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize("in_process", [True, False])
def test_an_unknown_voice_is_one_line_naming_the_file_and_the_speaker(tmp_path, in_process):
    speaker = Speaker("xx-nowhere", "m1", 160, 45)
    with pytest.raises(DataError) as error:
        synthesize("hello", speaker, tmp_path / "clip.wav", in_process=in_process)
    message = str(error.value)
    assert "\n" not in message.strip() and str(tmp_path / "clip.wav") in message and speaker.name in message


def test_the_library_held_by_someone_else_is_left_to_them():
    """A process that has libespeak-ng loaded already (another binding) would not get a fresh library per
    clip: `available()` then says no, and speech goes through the program."""
    espeak.available.cache_clear()
    holder = ctypes.CDLL(espeak.LIBRARY)
    try:
        assert not espeak.available()
    finally:
        espeak._unload(holder)
        espeak.available.cache_clear()
    assert espeak.available()


def test_the_process_keeps_its_own_locale():
    """espeak_Initialize switches LC_CTYPE to a UTF-8 locale for itself; the caller's comes back after each clip."""
    import locale

    before = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")
    try:
        espeak.speak(CAPTIONS[0], "en-us+m1", 160, 45)
        assert locale.setlocale(locale.LC_CTYPE) == "C"
    finally:
        locale.setlocale(locale.LC_CTYPE, before)
