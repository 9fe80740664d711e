"""Offline-corpus speech: what one espeak-ng process per clip costs against synthesising in this process.

The corpus speaks every clip with a fresh `espeak-ng` process (data/tts.py). Most of such a call is the
program's start-up, not the speech, so this measures three ways of making the same clips, one after another
on one thread, and how many clips come out sample for sample the same as the command line's:
  cli:       `espeak-ng -w` per clip (what the corpus does);
  library:   libespeak-ng loaded once through ctypes, every clip synthesised in turn (its wave generator keeps
             state from one utterance to the next, so a clip depends on the ones before it);
  reloaded:  libespeak-ng loaded, initialised and unloaded per clip, with libc's rand() reseeded as at a
             process start (a fresh state each time, as the command line has).
The voice is chosen as the command line chooses it: by name, else by language (`en-gb+m5` has no file).
Not part of the library: a measurement of why the corpus keeps the command line.
Usage: python benchmarks/espeak_startup.py [--clips 300]
"""

from __future__ import annotations

import _ctypes
import argparse
import ctypes
import random
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile

from common import table
from speechclip.data.tts import Speaker, all_speakers, espeak_command

CAPTIONS = ("three big purple rings in the middle", "a small red square next to a blue circle",
            "two green triangles on a white background", "a picture of a yellow star")
SYNCHRONOUS, DONT_EXIT, POSITION_CHARACTER = 2, 0x8000, 1
RATE, PITCH = 1, 3
FLAGS = 0x100 | 0x1000  # espeakPHONEMES | espeakENDPAUSE: the command line's flags


class Voice(ctypes.Structure):  # espeak_VOICE
    _fields_ = [("name", ctypes.c_char_p), ("languages", ctypes.c_char_p), ("identifier", ctypes.c_char_p),
                ("gender", ctypes.c_ubyte), ("age", ctypes.c_ubyte), ("variant", ctypes.c_ubyte), ("xx1", ctypes.c_ubyte),
                ("score", ctypes.c_int), ("spec", ctypes.c_void_p)]


Callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class Library:
    """libespeak-ng in this process, initialised as the command line initialises it for `-w`."""

    def __init__(self):
        self.lib = ctypes.CDLL("libespeak-ng.so.1")
        self.lib.espeak_Initialize(SYNCHRONOUS, 0, None, DONT_EXIT)  # returns the sample rate: 22,050 Hz
        self.chunks: list[np.ndarray] = []
        self.callback = Callback(self._collect)
        self.lib.espeak_SetSynthCallback(self.callback)

    def _collect(self, wave, samples: int, events) -> int:
        if samples > 0:
            self.chunks.append(np.ctypeslib.as_array(wave, (samples,)).copy())
        return 0

    def speak(self, text: str, speaker: Speaker) -> np.ndarray:
        self.chunks.clear()
        voice = speaker.espeak_voice
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            by_language = Voice(None, voice.encode(), None, 0, 0, 0, 0, 0, None)
            if self.lib.espeak_SetVoiceByProperties(ctypes.byref(by_language)) != 0:
                raise RuntimeError(f"espeak-ng: no voice {voice}")
        self.lib.espeak_SetParameter(RATE, speaker.speed, 0)
        self.lib.espeak_SetParameter(PITCH, speaker.pitch, 0)
        data = text.encode() + b"\0"
        self.lib.espeak_Synth(data, len(data), 0, POSITION_CHARACTER, 0, FLAGS, None, None)
        self.lib.espeak_Synchronize()
        return np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.int16)

    def unload(self) -> None:
        self.lib.espeak_Terminate()
        _ctypes.dlclose(self.lib._handle)


def cli(text: str, speaker: Speaker, folder: Path) -> np.ndarray:
    """The corpus's own command line (data/tts.py), its wav read back unchanged."""
    out = folder / "cli.wav"
    subprocess.run(espeak_command(text, speaker, str(out)), check=True)
    return soundfile.read(out, dtype="int16")[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=300)
    args = parser.parse_args()
    rng = random.Random(0)
    speakers = all_speakers()
    jobs = [(rng.choice(CAPTIONS), rng.choice(speakers)) for _ in range(args.clips)]
    libc = ctypes.CDLL(None)
    outputs, seconds = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        outputs["cli"] = [cli(*job, Path(folder)) for job in jobs]
        seconds["cli"] = time.perf_counter() - started
    started = time.perf_counter()
    kept = Library()
    outputs["library"] = [kept.speak(*job) for job in jobs]
    seconds["library"] = time.perf_counter() - started
    kept.unload()
    started, outputs["reloaded"] = time.perf_counter(), []
    for job in jobs:
        libc.srand(1)  # espeak-ng draws from rand(): a process starts at seed 1
        fresh = Library()
        outputs["reloaded"].append(fresh.speak(*job))
        fresh.unload()
    seconds["reloaded"] = time.perf_counter() - started
    rows = []
    for name in ("cli", "library", "reloaded"):
        same = sum(np.array_equal(a, b) for a, b in zip(outputs[name], outputs["cli"]))
        rows.append([name, f"{1000 * seconds[name] / len(jobs):.1f}", f"{seconds['cli'] / seconds[name]:.2f}x",
                     f"{same} / {len(jobs)}"])
    print(table(rows, ("way", "ms per clip (one thread)", "speed-up", "clips identical to the command line's")))


if __name__ == "__main__":
    main()
