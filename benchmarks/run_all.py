"""Run every benchmark and write their printed tables into benchmarks/RESULTS.md (with the commands).

Usage: python benchmarks/run_all.py [--skip search] [--demo-results runs/demo/results.json]
Each script can also be run alone; the figures are from one run on one machine, never from CI.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = {
    "model_size": ["model_size.py"],
    "train_step": ["train_step.py"],
    "pretrain_step": ["pretrain_step.py"],
    "demo_threads": ["demo_threads.py"],  # needs a finished `speechclip demo` in runs/demo
    "demo_trim": ["demo_trim.py"],  # the same
    "head_dropout": ["head_dropout.py"],  # the same
    "synthesis_workers": ["synthesis_workers.py"],
    "espeak_startup": ["espeak_startup.py"],
    "embed_throughput": ["embed_throughput.py"],
    "padding": ["padding.py"],
    "state_cache": ["state_cache.py"],
    "conv_batching": ["conv_batching.py"],
    "search": ["search.py"],
    "eval_scale": ["eval_scale.py"],
    "embed_streaming": ["embed_throughput.py", "--stream", "20000", "--batch", "32"],
    "install_compile": ["install_compile.py"],
    "ivfpq": ["ivfpq.py"],  # 10M x 512: about an hour on 2 busy cores; --skip ivfpq to leave it out
}


def demo_stages(path: Path) -> str:
    if not path.is_file():
        return f"(no demo results at {path}: run `speechclip demo` first)"
    results = json.loads(path.read_text())
    peaks = results.get("stage_peak_memory_mib", {})  # the process tree's peak PSS (speechclip.demo.memory)
    rows = "\n".join(f"| {stage} | {seconds:.1f} | {peaks.get(stage, '-')} |" for stage, seconds in results["stage_seconds"].items())
    corpus = results["corpus"]["build_seconds"]
    return (f"| stage | seconds | peak memory of the process tree (MiB, PSS) |\n|---|---|---|\n{rows}\n"
            f"| total (this run) | {results['total_seconds']:.1f} | {results.get('peak_memory_mib', '-')} |\n\n"
            f"Corpus build time when it was made: {corpus:.1f} s (a re-run reuses it).")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip", action="append", default=[])
    parser.add_argument("--demo-results", default="runs/demo/results.json")
    args = parser.parse_args()
    sections = [f"# Benchmark results\n\nWritten by `python benchmarks/run_all.py` on "
                f"{datetime.date.today()}, {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}. "
                "Ratios are measured side by side in the same run.\n"]
    for name, script in SCRIPTS.items():
        if name in args.skip:
            continue
        command = [sys.executable, str(HERE / script[0]), *script[1:]]
        print(f"running {name} ...", flush=True)
        done = subprocess.run(command, capture_output=True, text=True, cwd=HERE.parent)
        body = done.stdout.strip() if done.returncode == 0 else f"FAILED ({done.returncode}):\n{done.stderr[-2000:]}"
        sections.append(f"## {name}\n\n`python benchmarks/{' '.join(script)}`\n\n```\n{body}\n```\n")
        print(body, flush=True)
    sections.append(f"## demo stages\n\n`speechclip demo` (figures from {args.demo_results})\n\n{demo_stages(Path(args.demo_results))}\n")
    (HERE / "RESULTS.md").write_text("\n".join(sections))
    print(f"written: {HERE / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
