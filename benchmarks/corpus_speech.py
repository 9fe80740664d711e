"""The offline corpus built both ways, side by side: espeak-ng's program per clip in threads, and libespeak-ng
in worker processes (data/espeak.py). Wall time, CPU time (user and system, this process and its children)
and the peak memory of each build, and whether every wav of one build is byte for byte the other's.

The demo's corpus spec by default (17,682 clips; about two minutes a build on 2 cores); the two builds
alternate over rounds, each into a new folder.
Usage: python benchmarks/corpus_speech.py [--rounds 1] [--scenes N]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from common import table
from speechclip.data.synthetic import build_corpus
from speechclip.demo.memory import MiB, TreeSampler
from speechclip.demo.spec import DemoSpec

WAYS = {"program in threads": False, "library in processes": True}


def cpu_seconds() -> tuple[float, float]:
    """User and system CPU seconds of this process and its finished children so far."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + children.ru_utime, own.ru_stime + children.ru_stime


def build(folder: Path, spec, in_process: bool) -> dict:
    user, system = cpu_seconds()
    started = time.perf_counter()
    with TreeSampler() as memory:
        summary = build_corpus(folder, spec, progress=False, in_process=in_process)
    seconds = time.perf_counter() - started
    user_after, system_after = cpu_seconds()
    return {"seconds": seconds, "user": user_after - user, "system": system_after - system,
            "peak_mib": memory.whole.pss / MiB, "clips": sum(s["captions"] for s in summary["splits"].values())}


def same_wavs(a: Path, b: Path) -> tuple[int, int]:
    """(wavs whose bytes match, wavs in `a`): the file names are digests of caption and speaker."""
    names = sorted(p.name for p in (a / "audio").glob("*.wav"))
    same = sum((a / "audio" / n).read_bytes() == (b / "audio" / n).read_bytes() for n in names
               if (b / "audio" / n).is_file())
    return same, len(names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--scenes", type=int, help="fewer scenes than the demo's 1,500 (a quicker check)")
    args = parser.parse_args()
    spec = DemoSpec().corpus
    spec = replace(spec, num_scenes=args.scenes) if args.scenes else spec
    runs: dict[str, list[dict]] = {name: [] for name in WAYS}
    with tempfile.TemporaryDirectory() as root:
        for round_ in range(args.rounds):
            for name, in_process in WAYS.items():
                runs[name].append(build(Path(root) / f"{round_}-{in_process}", spec, in_process))
        same, wavs = same_wavs(Path(root) / "0-False", Path(root) / "0-True")
    base = min(r["seconds"] for r in runs["program in threads"])
    rows = [[name, f"{r['clips']:,}", f"{r['seconds']:.1f}", f"{r['user']:.0f}", f"{r['system']:.0f}", f"{r['peak_mib']:.0f}",
             f"{base / r['seconds']:.2f}x"] for name, rs in runs.items() for r in rs]
    print(table(rows, ("way", "clips", "wall s", "user CPU s", "system CPU s", "peak PSS MiB", "speed vs the fastest program build")))
    print(f"wavs byte for byte the same in round 0: {same:,} of {wavs:,}")


if __name__ == "__main__":
    main()
