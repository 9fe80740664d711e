"""Peak memory of a whole `speechclip demo` process tree, sampled from outside (the demo's own per-stage
figures come from the same /proc sampler, inside the parent).

Runs the command, samples the tree (the demo, its spawned training processes, espeak-ng) every 0.5 s,
splits the samples by the stage lines the demo prints, and reports per stage and overall: the highest sum
of RSS (shared library pages counted once per process: an over-estimate), the highest sum of PSS (shared
pages split between their users: what the tree holds), and the page cache (`Cached`), which holds the
corpus and the on-disk upstream-state caches, is shared and is given back by the kernel under pressure.
Usage: python benchmarks/demo_memory.py [--json out.json] -- .venv/bin/speechclip demo --out runs/demo
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from speechclip.demo.memory import MiB, page_cache_bytes, tree_memory  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = [c for c in args.command if c != "--"] or [".venv/bin/speechclip", "demo"]
    cache_before = page_cache_bytes()
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    stages: dict[str, dict] = {}
    current = {"name": "start-up"}
    lock = threading.Lock()

    def sample() -> None:
        while child.poll() is None:
            rss, pss, processes = tree_memory(child.pid)
            cached = page_cache_bytes()
            with lock:
                row = stages.setdefault(current["name"], {"rss": 0, "pss": 0, "processes": 0, "page_cache": 0})
                row["rss"], row["pss"] = max(row["rss"], rss), max(row["pss"], pss)
                row["processes"], row["page_cache"] = max(row["processes"], processes), max(row["page_cache"], cached)
            time.sleep(args.interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for line in child.stdout:
        sys.stdout.write(line)
        text = line.strip()
        if text.startswith("[demo] ") and text.endswith(" ..."):
            with lock:
                current["name"] = text[len("[demo] "):-4]
    child.wait()
    sampler.join()
    seconds = time.perf_counter() - started
    peak = {k: max((s[k] for s in stages.values()), default=0) for k in ("rss", "pss", "processes", "page_cache")}
    print(f"\nprocess-tree memory of: {' '.join(command)}  (exit {child.returncode}, {seconds:.0f} s wall)")
    print("| stage | peak sum RSS MiB | peak sum PSS MiB | processes | page cache MiB (machine) |")
    print("|---|---|---|---|---|")
    for name, row in stages.items():
        print(f"| {name[:70]} | {row['rss'] / MiB:.0f} | {row['pss'] / MiB:.0f} | {row['processes']} | {row['page_cache'] / MiB:.0f} |")
    print(f"| **whole run** | **{peak['rss'] / MiB:.0f}** | **{peak['pss'] / MiB:.0f}** | {peak['processes']} | "
          f"{peak['page_cache'] / MiB:.0f} (was {cache_before / MiB:.0f} at start) |")
    if args.json:
        args.json.write_text(json.dumps({"command": command, "exit": child.returncode, "seconds": round(seconds, 1),
                                         "stages": stages, "peak": peak, "page_cache_before": cache_before}, indent=1) + "\n")
    sys.exit(child.returncode)


if __name__ == "__main__":
    main()
