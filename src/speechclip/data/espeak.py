"""espeak-ng in this process (libespeak-ng through ctypes), loaded afresh for every clip.

Why: the offline corpus speaks about 17,700 clips, and a process start per clip (`espeak-ng -w`) cost more
system time than the speech itself (RESULTS.md, "demo stages"). Why afresh: libespeak-ng keeps its wave
generator's state from one utterance to the next, so a library kept loaded makes a clip depend on the clips
before it (18 of 300 matched the command line's, benchmarks/espeak_startup.py). Loaded, initialised and
unloaded per clip, with libc's rand() reseeded as a new process has it, every clip is the command line's
sample for sample (tests/test_espeak.py; the whole demo corpus, RESULTS.md).

The library's state is global: one clip at a time per process (a lock serialises threads), so the corpus
speaks in processes. Where the library cannot be loaded, or unloading it does not reset it, `available()`
is False and callers use the command line (data/tts.py).
"""

from __future__ import annotations

import ctypes
import functools
import locale
import os
import sys
import threading

import numpy as np

LIBRARY = "libespeak-ng.so.1"
# espeak_AUDIO_OUTPUT AUDIO_OUTPUT_SYNCHRONOUS, espeakINITIALIZE_DONT_EXIT, espeak_POSITION_TYPE POS_CHARACTER,
# espeak_PARAMETER espeakRATE / espeakPITCH: the values of espeak-ng's speak_lib.h
_SYNCHRONOUS, _DONT_EXIT, _POSITION_CHARACTER = 2, 0x8000, 1
_RATE, _PITCH = 1, 3
# espeakCHARS_AUTO | espeakPHONEMES | espeakENDPAUSE: the flags `espeak-ng` itself synthesises with
_SYNTH_FLAGS = 0x100 | 0x1000

_Callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
_one_at_a_time = threading.Lock()


class EspeakError(RuntimeError):
    """libespeak-ng refused a voice or gave no sample rate."""


class _Voice(ctypes.Structure):  # espeak_VOICE: only `languages` is filled, to choose a voice by language
    _fields_ = [("name", ctypes.c_char_p), ("languages", ctypes.c_char_p), ("identifier", ctypes.c_char_p),
                ("gender", ctypes.c_ubyte), ("age", ctypes.c_ubyte), ("variant", ctypes.c_ubyte),
                ("xx1", ctypes.c_ubyte), ("score", ctypes.c_int), ("spec", ctypes.c_void_p)]


def speak(text: str, voice: str, speed: int, pitch: int) -> tuple[np.ndarray, int]:
    """`text` spoken as `espeak-ng -v voice -s speed -p pitch -w` would: (int16 samples, sample rate)."""
    with _one_at_a_time:
        ctypes.CDLL(None).srand(1)  # espeak-ng draws noise from rand(), which a new process starts at seed 1
        own_locale = locale.setlocale(locale.LC_CTYPE)  # espeak_Initialize sets a UTF-8 one for itself
        library = _load()
        try:
            rate = _initialise(library)
            return _synthesize(library, text, voice, speed, pitch), rate
        finally:
            library.espeak_Terminate()
            _unload(library)
            locale.setlocale(locale.LC_CTYPE, own_locale)


@functools.cache
def available() -> bool:
    """Whether this process can load libespeak-ng and unloading it resets it (the same clip, spoken again
    after another, comes out the same): checked once, with three short clips. Not where something else in
    this process holds the library already: it would not unload, and a second initialisation can hang."""
    if not sys.platform.startswith("linux") or _loaded_already():  # LIBRARY is the Linux file name
        return False
    try:
        first = speak("a red circle", "en-us+klatt", 160, 45)[0]
        speak("two blue squares", "en-gb+f2", 180, 60)
        again = speak("a red circle", "en-us+klatt", 160, 45)[0]
    except (OSError, EspeakError):  # no library here, or no data for it: the command line it is
        return False
    return first.size > 0 and np.array_equal(first, again)


def _loaded_already() -> bool:
    try:
        holder = ctypes.CDLL(LIBRARY, mode=os.RTLD_NOLOAD)  # a handle only if it is loaded
    except OSError:
        return False
    _unload(holder)
    return True


def _load() -> ctypes.CDLL:
    library = ctypes.CDLL(LIBRARY)
    library.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    library.espeak_SetSynthCallback.argtypes = [_Callback]
    library.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    library.espeak_SetVoiceByProperties.argtypes = [ctypes.POINTER(_Voice)]
    library.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    library.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    return library


def _unload(library: ctypes.CDLL) -> None:
    """dlclose: the next dlopen maps the library again, with its static state as at a process start."""
    import _ctypes  # dlclose is POSIX only: `available()` is False off Linux

    _ctypes.dlclose(library._handle)


def _initialise(library: ctypes.CDLL) -> int:
    """As `espeak-ng -w` initialises it (synchronous, wave to a callback); returns the sample rate (22,050 Hz)."""
    rate = library.espeak_Initialize(_SYNCHRONOUS, 0, None, _DONT_EXIT)
    if rate <= 0:
        raise EspeakError("libespeak-ng could not initialise (is espeak-ng-data installed?)")
    return rate


def _synthesize(library: ctypes.CDLL, text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """One utterance from an initialised library: its int16 samples."""
    chunks: list[np.ndarray] = []

    def collect(wave: ctypes.POINTER(ctypes.c_short), samples: int, events: ctypes.c_void_p) -> int:
        if samples > 0:
            chunks.append(np.ctypeslib.as_array(wave, (samples,)).copy())
        return 0

    callback = _Callback(collect)  # kept referenced until synthesis ends
    library.espeak_SetSynthCallback(callback)
    _set_voice(library, voice)
    library.espeak_SetParameter(_RATE, speed, 0)
    library.espeak_SetParameter(_PITCH, pitch, 0)
    data = text.encode() + b"\0"
    if library.espeak_Synth(data, len(data), 0, _POSITION_CHARACTER, 0, _SYNTH_FLAGS, None, None) != 0:
        raise EspeakError(f"libespeak-ng could not synthesise {text[:60]!r}")
    library.espeak_Synchronize()
    return np.concatenate(chunks) if chunks else np.zeros(0, np.int16)


def _set_voice(library: ctypes.CDLL, voice: str) -> None:
    """As the command line chooses `-v voice`: by name (with its +variant), else by language (a voice such as
    en-gb has no file of that name)."""
    if library.espeak_SetVoiceByName(voice.encode()) == 0:
        return
    by_language = _Voice(None, voice.encode(), None, 0, 0, 0, 0, 0, None)
    if library.espeak_SetVoiceByProperties(ctypes.byref(by_language)) != 0:
        raise EspeakError(f"espeak-ng has no voice {voice!r}")
