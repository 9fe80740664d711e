"""Offline-corpus speech: one espeak-ng process per clip against synthesising in this process.

Three ways of making the same clips, one after another on one thread, and how many clips come out sample
for sample the same as the command line's:
  cli:       `espeak-ng -w` per clip (the corpus's way where libespeak-ng cannot be loaded);
  library:   libespeak-ng loaded once, every clip synthesised in turn (its wave generator keeps state from
             one utterance to the next, so a clip depends on the ones before it);
  reloaded:  libespeak-ng loaded, initialised and unloaded per clip, with libc's rand() reseeded as at a
             process start (data/espeak.py: the corpus's way where it can).
Usage: python benchmarks/espeak_startup.py [--clips 300]
"""

from __future__ import annotations

import argparse
import ctypes
import random
import time

import numpy as np

from common import table
from speechclip.data import espeak
from speechclip.data.tts import all_speakers, program_wave

CAPTIONS = ("three big purple rings in the middle", "a small red square next to a blue circle",
            "two green triangles on a white background", "a picture of a yellow star")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=300)
    args = parser.parse_args()
    rng = random.Random(0)
    speakers = all_speakers()
    jobs = [(rng.choice(CAPTIONS), rng.choice(speakers)) for _ in range(args.clips)]
    outputs, seconds = {}, {}
    started = time.perf_counter()
    outputs["cli"] = [program_wave(*job)[0] for job in jobs]  # its wav written and read back, as the corpus does
    seconds["cli"] = time.perf_counter() - started
    started = time.perf_counter()
    ctypes.CDLL(None).srand(1)
    kept = espeak._load()
    espeak._initialise(kept)
    outputs["library"] = [espeak._synthesize(kept, text, s.espeak_voice, s.speed, s.pitch) for text, s in jobs]
    seconds["library"] = time.perf_counter() - started
    kept.espeak_Terminate()
    espeak._unload(kept)
    started = time.perf_counter()
    outputs["reloaded"] = [espeak.speak(text, s.espeak_voice, s.speed, s.pitch)[0] for text, s in jobs]
    seconds["reloaded"] = time.perf_counter() - started
    rows = []
    for name in ("cli", "library", "reloaded"):
        same = sum(np.array_equal(a, b) for a, b in zip(outputs[name], outputs["cli"]))
        rows.append([name, f"{1000 * seconds[name] / len(jobs):.1f}", f"{seconds['cli'] / seconds[name]:.2f}x",
                     f"{same} / {len(jobs)}"])
    print(table(rows, ("way", "ms per clip (one thread)", "speed-up", "clips identical to the command line's")))


if __name__ == "__main__":
    main()
