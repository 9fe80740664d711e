"""Upstream-state cache: the old in-memory list of fp16 tensors against the disk-backed file (one fp16
file + index, read per clip with os.preadv), side by side on a corpus-sized synthetic case.

Each variant runs in its own process (a clean peak RSS): it builds the cache of N clips x ~F frames x
S states x D dims (states copied from a random pool: the content does not matter, the bytes do), then
runs training-like steps: a batch of B random clips read (cropped at 320 frames, 6.4 s), padded, and
through a small head (a weighted layer sum + one Transformer layer + Linear, forward and backward, as
the demo's head). Peak RSS is the process's VmHWM; the file's page-cache residency is measured with
util-linux `fincore`. The upstream forward that fills the cache costs the same in both and is left out.
Usage: python benchmarks/state_cache.py [--clips 15000 --frames 150 --states 5 --dim 128 --batch 64 --steps 40]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, table  # noqa: E402
from speechclip.train.state_cache import StateCacheWriter, crop_states, pad_states  # noqa: E402


def status(*keys: str) -> dict[str, int]:
    """Fields of /proc/self/status in MiB (VmHWM = peak resident, RssAnon, RssFile)."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in keys:
            values[name] = int(rest.split()[0]) // 1024
    return values


def build(args, keep) -> None:
    """The old and new cache builders' allocation pattern: batches of 32 similar-length clips, each an
    (S, 32, T_max, D) fp32 `hidden` as the upstream returns it (copied from a random pool: the content does
    not matter, the bytes do), and every clip's valid frames handed to `keep(row, (S, T_i, D) view)`."""
    generator = torch.Generator().manual_seed(0)
    pool = torch.randn(args.states, 4 * args.frames, args.dim, generator=generator)
    lengths = torch.randint(args.frames // 2, 3 * args.frames // 2 + 1, (args.clips,), generator=generator).tolist()
    order = sorted(range(args.clips), key=lambda i: lengths[i])
    for start in range(0, args.clips, 32):
        rows = order[start : start + 32]
        longest = max(lengths[r] for r in rows)
        offset = int(torch.randint(0, 4 * args.frames - longest + 1, (1,), generator=generator))
        hidden = pool[:, None, offset : offset + longest].expand(-1, len(rows), -1, -1).clone()
        for position, row in enumerate(rows):
            keep(row, hidden[:, position, : lengths[row]])


def head(args) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    layer_weights = torch.nn.Parameter(torch.zeros(args.states))
    encoder = torch.nn.TransformerEncoderLayer(args.dim, 4, 4 * args.dim, batch_first=True)
    project = torch.nn.Linear(args.dim, 64)
    module = torch.nn.ModuleDict({"encoder": encoder, "project": project})
    module.register_parameter("layer_weights", layer_weights)
    return module, torch.optim.Adam(module.parameters(), lr=1e-4)


def step(module, optimizer, states: torch.Tensor, mask: torch.Tensor) -> None:
    mixed = torch.einsum("s,sbtd->btd", module.layer_weights.softmax(0), states)
    out = module["project"](module["encoder"](mixed, src_key_padding_mask=~mask)[:, 0])
    optimizer.zero_grad()
    out.pow(2).mean().backward()
    optimizer.step()


def train(args, read) -> dict[str, list[float]]:
    """Seconds per step: the batch (read + pad B random clips), and the whole step with the head's forward
    and backward."""
    module, optimizer = head(args)
    generator = torch.Generator().manual_seed(1)
    times: dict[str, list[float]] = {"data": [], "step": []}
    for _ in range(args.steps):
        started = time.perf_counter()
        rows = torch.randint(0, args.clips, (args.batch,), generator=generator).tolist()
        states, mask = pad_states([read(r, generator) for r in rows])
        loaded = time.perf_counter()
        step(module, optimizer, states, mask)
        times["data"].append(loaded - started)
        times["step"].append(time.perf_counter() - started)
    return times


def run_old(args) -> dict:
    started = time.perf_counter()
    cache: list = [None] * args.clips
    build(args, lambda row, states: cache.__setitem__(row, states.half().cpu().clone()))  # the old upstream_states
    built = time.perf_counter() - started
    times = train(args, lambda row, generator: crop_states(cache[row], 320, generator))
    return {"build_s": built, "times": times, **status("VmHWM", "RssAnon", "RssFile")}


def run_new(args) -> dict:
    folder = CACHE / "state_cache_bench" / "states"
    shutil.rmtree(folder.parent, ignore_errors=True)
    started = time.perf_counter()
    writer = StateCacheWriter(folder, args.clips)
    build(args, writer.add)  # build_state_cache's writes
    store = writer.commit({}, {})
    built = time.perf_counter() - started
    data = folder / "states.f16"
    fd = os.open(data, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # start cold: nothing of the file in the page cache
    os.close(fd)
    cold = train(args, lambda row, generator: store.read(row, 320, generator))
    resident = fincore(data)
    warm = train(args, lambda row, generator: store.read(row, 320, generator))
    result = {"build_s": built, "times": cold, "warm_times": warm, "file_mb": data.stat().st_size >> 20,
              "page_cache_mb": resident, **status("VmHWM", "RssAnon", "RssFile")}
    shutil.rmtree(folder.parent, ignore_errors=True)
    return result


def fincore(path: Path) -> int | None:
    try:
        done = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)], capture_output=True, text=True)
        return int(done.stdout.split()[0]) >> 20
    except (OSError, ValueError, IndexError):
        return None


def median_ms(times: list[float]) -> float:
    kept = times[3:]  # the first steps warm the allocator up
    return 1000 * sorted(kept)[len(kept) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clips", type=int, default=15000)
    parser.add_argument("--frames", type=int, default=150)
    parser.add_argument("--states", type=int, default=5)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--mode", choices=["old", "new"])
    args = parser.parse_args()
    if args.mode:
        torch.set_num_threads(1)
        print(json.dumps(run_old(args) if args.mode == "old" else run_new(args)))
        return
    results = {}
    for mode in ("old", "new"):
        done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--mode", mode], capture_output=True, text=True, check=True)
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    old, new = results["old"], results["new"]
    raw = args.clips * args.frames * args.states * args.dim * 2 >> 20
    print(f"upstream-state cache: {args.clips} clips x ~{args.frames} frames x {args.states} states x {args.dim} dims, "
          f"fp16 ({raw} MiB of states); {args.steps} steps of {args.batch} random clips, 1 thread")
    rows = [("in memory (list of fp16 tensors)", old["VmHWM"], f"{old['RssAnon']} / {old['RssFile']}", "-", "-",
             f"{old['build_s']:.1f}", f"{median_ms(old['times']['data']):.1f}", f"{median_ms(old['times']['step']):.0f}"),
            ("disk (fp16 file, os.preadv), cold", new["VmHWM"], f"{new['RssAnon']} / {new['RssFile']}", new["file_mb"],
             new["page_cache_mb"], f"{new['build_s']:.1f}", f"{median_ms(new['times']['data']):.1f}", f"{median_ms(new['times']['step']):.0f}"),
            ("disk, warm page cache", "", "", "", "", "", f"{median_ms(new['warm_times']['data']):.1f}",
             f"{median_ms(new['warm_times']['step']):.0f}")]
    print(table(rows, ("cache", "peak RSS MiB", "RSS anon / file MiB at end", "file MiB", "page cache MiB after cold pass",
                       "build s", "batch ms (median)", "step ms (median)")))
    print(f"peak RSS, disk / memory: {new['VmHWM'] / old['VmHWM']:.3f}; batch time, disk cold / memory: "
          f"{median_ms(new['times']['data']) / median_ms(old['times']['data']):.2f}x, warm: "
          f"{median_ms(new['warm_times']['data']) / median_ms(old['times']['data']):.2f}x; step time, disk cold / memory: "
          f"{median_ms(new['times']['step']) / median_ms(old['times']['step']):.2f}x")
    print("The page cache holds what the steps read; the kernel gives it back under memory pressure and it is "
          "shared by dataloader workers and processes reading the same file: it is not the process's memory.")


if __name__ == "__main__":
    main()
