"""The project's install with pip byte-compiling (one file at a time), as `scripts/setup.sh` does, against `pip install
--no-compile` followed by `python -m compileall -j 0` (every core): why setup.sh leaves the compiling to pip.

Each way installs the Python packages of `scripts/setup.sh` (the CPU torch wheel, this project with its extras,
open-clip-torch without dependencies) into a new virtual environment in a temporary folder, from pip's cache as a
fresh machine's second install would; the ways alternate over rounds. After each install it counts the `.pyc`
files and times a first import of what the CLI loads, to show that both leave the same compiled modules.
Peak memory: the largest resident set of the install's child processes (pip, compileall and its workers).

Usage: python benchmarks/install_compile.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import table

ROOT = Path(__file__).resolve().parent.parent
WAYS = ("pip compiles (setup.sh)", "--no-compile + compileall -j 0")
PACKAGES = (["torch==2.13.0"], ["-e", f"{ROOT}[all]"], ["--no-deps", "open-clip-torch==3.3.0"])
COMPILE = "import sysconfig, subprocess, sys; subprocess.run([sys.executable, '-m', 'compileall', '-q', '-j', '0', " \
          "sysconfig.get_paths()['purelib']], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)"


def install(venv: Path, way: str) -> dict:
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    started = time.perf_counter()
    for packages in PACKAGES:
        flags = [] if way == WAYS[0] else ["--no-compile"]
        subprocess.run([str(python), "-m", "pip", "install", "-q", *flags, *packages], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if way == WAYS[1]:
        subprocess.run([str(python), "-c", COMPILE], check=True)
    seconds = time.perf_counter() - started
    pyc = sum(1 for _ in venv.rglob("*.pyc"))
    started = time.perf_counter()
    subprocess.run([str(python), "-c", "import speechclip.cli, torch, transformers, lightning"], check=True,
                   env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})  # time the .pyc files the install left
    return {"seconds": seconds, "pyc": pyc, "import": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    results: dict[str, list[dict]] = {way: [] for way in WAYS}
    for _ in range(args.rounds):
        for way in WAYS:
            with tempfile.TemporaryDirectory(prefix="install_compile_") as folder:
                results[way].append(install(Path(folder) / "venv", way))
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    before = statistics.median(r["seconds"] for r in results[WAYS[0]])
    rows = []
    for way in WAYS:
        seconds = [r["seconds"] for r in results[way]]
        rows.append((way, f"{statistics.median(seconds):.1f}", f"{min(seconds):.1f}-{max(seconds):.1f}",
                     f"{before / statistics.median(seconds):.2f}x", results[way][0]["pyc"],
                     f"{statistics.median(r['import'] for r in results[way]):.1f}"))
    print(f"Python packages of scripts/setup.sh into a new venv, {args.rounds} rounds, the ways alternating; "
          f"largest child process: {peak_mib:.0f} MiB")
    print(table(rows, ("way", "install s (median)", "range", "speed-up", ".pyc files", "first import s")))


if __name__ == "__main__":
    main()
