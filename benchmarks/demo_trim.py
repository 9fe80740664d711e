"""What trimming the heap costs the demo's SpeechCLIP runs, and what padding batches to a multiple of 8 frames
saves: seconds per step and peak memory.

Trains the demo's hybrid run (its own settings, on a finished build's encoders, corpus and state caches) for
--steps steps in fresh processes, once per setting MULTIPLE:EVERY: batches padded to a multiple of MULTIPLE
frames (`train.state_cache.FRAME_MULTIPLE`; 1: to the longest clip, as before stop 29) and the heap trimmed
every EVERY steps (`demo.train.ReleaseFreeMemory(every)`; 0: never). Each in the two set-ups of the demo's
stage 3: two 1-thread runs side by side (the pretrained and the control upstream, as before step 302) and
one run with every thread (the pretrained run after it). Reports seconds per step over steps 20..N (loading
and the first batches left out), the process's user and system CPU time (pages handed back come back as page
faults: system time) and its largest RSS.
Usage: python benchmarks/demo_trim.py --run runs/demo [--steps 220] [--settings 1:3 1:0 8:0]   (after `speechclip demo`)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import demo_build_spec, table


def worker(run: Path, upstream: str, steps: int, threads: int, multiple: int, every: int, out: Path) -> None:
    from lightning.pytorch.callbacks import Callback

    from speechclip.demo.spec import speechclip_config
    from speechclip.demo.train import ReleaseFreeMemory
    from speechclip.train import state_cache
    from speechclip.train.config import run_config_from_dict
    from speechclip.train.run import fit

    class Clock(Callback):
        def __init__(self):
            self.at: dict[int, float] = {}

        def on_train_batch_end(self, trainer, *args) -> None:
            self.at[trainer.global_step] = time.perf_counter()

    torch.set_num_threads(threads)
    state_cache.FRAME_MULTIPLE = multiple
    spec = demo_build_spec(run)
    spec.speechclip_steps = steps
    values = speechclip_config(spec, run / "encoders" / upstream, run / "encoders" / "clip", run / "corpus", run / "cache")
    values["train"].update(val_every_steps=10**6, checkpoint_every_steps=10**6)  # steps only
    clock, before = Clock(), resource.getrusage(resource.RUSAGE_SELF)
    fit(run_config_from_dict(values), out, progress=False, callbacks=[clock, ReleaseFreeMemory(every)], overwrite=True)
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"s_per_step": (clock.at[steps] - clock.at[20]) / (steps - 20), "user_s": after.ru_utime - before.ru_utime,
                      "system_s": after.ru_stime - before.ru_stime, "max_rss_mib": after.ru_maxrss / 1024}), flush=True)


def measure(args: argparse.Namespace, setting: str, runs: list[tuple[str, int]], work: Path) -> list[dict]:
    """Start one process per (upstream, threads) at once; their figures when all have finished."""
    processes = [subprocess.Popen([sys.executable, __file__, "--run", str(args.run), "--steps", str(args.steps),
                                   "--worker", f"{upstream}:{threads}:{setting}:{work / f'{setting}-{index}'.replace(':', '-')}"],
                                  stdout=subprocess.PIPE, text=True) for index, (upstream, threads) in enumerate(runs)]
    return [json.loads(process.communicate()[0].strip().splitlines()[-1]) for process in processes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo"))
    parser.add_argument("--steps", type=int, default=220)
    parser.add_argument("--settings", nargs="+", default=["1:3", "1:0", "8:0"], help="MULTIPLE:EVERY, e.g. 8:0")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        upstream, threads, multiple, every, out = args.worker.split(":", 4)
        worker(args.run, upstream, args.steps, int(threads), int(multiple), int(every), Path(out))
        return
    threads = torch.get_num_threads()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for setting in args.settings:
            multiple, every = (int(part) for part in setting.split(":"))
            label = f"{multiple}, " + (f"every {every} steps" if every else "never")
            pair = measure(args, setting, [("hubert", 1), ("hubert-random", 1)], Path(folder))
            alone = measure(args, setting, [("hubert", threads)], Path(folder))
            rows.append([label, *(f"{r['s_per_step']:.3f}" for r in pair), f"{alone[0]['s_per_step']:.3f}",
                         " / ".join(f"{r['user_s']:.0f}, {r['system_s']:.0f}" for r in pair + alone),
                         " / ".join(f"{r['max_rss_mib']:.0f}" for r in pair + alone)])
    print(f"demo SpeechCLIP run, {args.steps} steps, s/step over steps 20-{args.steps}; pair: pretrained and control "
          f"upstream side by side, 1 thread each; alone: the pretrained upstream, {threads} threads")
    print(table(rows, ("frames padded to a multiple of, trim", "pair: pretrained", "pair: control", f"alone, {threads} threads",
                       "CPU s (user, system): pair / alone", "largest RSS MiB: pair / alone")))


if __name__ == "__main__":
    main()
