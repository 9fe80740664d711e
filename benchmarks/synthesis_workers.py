"""Offline-corpus speech synthesis by the espeak-ng program: clips per second against worker threads.

Where libespeak-ng cannot be loaded, the corpus speaks this way (data/tts.py). Each clip is an espeak-ng
process (about 6 ms of start-up), a resample and a file write, so a thread or two
more than cores keeps the cores busy while a clip waits. The same 600 clips (3 captions, 600 speakers)
per setting, the settings interleaved over rounds (median).
Usage: python benchmarks/synthesis_workers.py [--clips 600] [--rounds 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import table
from speechclip.data.tts import all_speakers, synthesize

CAPTIONS = ("three big purple rings in the middle", "a small red square next to a blue circle",
            "two green triangles on a white background")


def seconds(workers: int, clips: int) -> float:
    speakers = all_speakers()
    with tempfile.TemporaryDirectory() as folder:
        jobs = [(CAPTIONS[i % 3], speakers[i % len(speakers)], Path(folder) / f"{i}.wav") for i in range(clips)]
        started = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda job: synthesize(*job, in_process=False), jobs))
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    settings = (1, 2, 3, 4)
    times: dict[int, list[float]] = {w: [] for w in settings}
    for _ in range(args.rounds):
        for workers in settings:
            times[workers].append(seconds(workers, args.clips))
    medians = {w: sorted(t)[len(t) // 2] for w, t in times.items()}
    rows = [(w, f"{s:.2f}", f"{args.clips / s:.0f}", f"{medians[2] / s:.2f}x") for w, s in medians.items()]
    print(table(rows, ("workers", "seconds", "clips/s", "speed vs 2 workers")))


if __name__ == "__main__":
    main()
