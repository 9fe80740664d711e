"""Memory of the demo's whole process tree (the parent and the training processes it spawns), read from
/proc, and the check of free memory and disk before a build starts.

Why a tree and not `ru_maxrss`: the demo trains its two SpeechCLIP runs in spawned processes, and what a
laptop must hold is their sum with the parent's at the same moment. Why RSS and PSS both: RSS counts the
pages of shared libraries (torch: ~150 MiB) once per process, so its sum over processes overstates what
is held; PSS splits shared pages between their users, so its sum is what the tree holds. The page cache
(the corpus, the on-disk upstream-state caches) is not in either: the kernel gives it back under pressure.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

MiB = 1 << 20


def release_free_memory() -> bool:
    """Hand the heap's free pages back to the system (glibc's `malloc_trim(0)`); False where the C library is
    not glibc.

    Why: glibc keeps freed blocks in its heap for reuse. The demo trims after each stage (a pre-training
    leaves a fragmented heap) and after each validation of its SpeechCLIP runs (`demo.train.ReleaseFreeMemory`).
    Until stop 28 those runs also trimmed every 3 steps, since their buffers took each batch's length and the
    heap grew with every step measured (the stage reached 7.5 GiB); trimming held it at 4.3 GiB for a fifth of a
    step's time in page faults. Batches padded to 8-frame multiples (`train.state_cache.FRAME_MULTIPLE`) stop
    the heap's growth untrimmed (benchmarks/demo_trim.py; RESULTS.md "demo stages", stops 26, 27 and 29)."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def _children(pid: int, parents: dict[int, int]) -> list[int]:
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process (one pass over /proc)."""
    out = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as stat:
                    fields = stat.read().rsplit(b")", 1)[1].split()
                out[int(entry.name)] = int(fields[1])
            except (OSError, IndexError, ValueError):  # the process ended while we looked
                pass
    return out


def _process_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in KiB, from /proc/<pid>/smaps_rollup (0, 0 if it is gone)."""
    values = {"Rss:": 0, "Pss:": 0}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                name, _, rest = line.partition(" ")
                if name in values:
                    values[name] = int(rest.split()[0])
    except (OSError, ValueError):
        pass
    return values["Rss:"], values["Pss:"]


def tree_memory(pid: int | None = None) -> tuple[int, int, int]:
    """(sum of RSS, sum of PSS, processes) in bytes over `pid` (default: this process) and its descendants."""
    pids = _children(pid or os.getpid(), _parents())
    rss = pss = 0
    for p in pids:
        r, s = _process_kib(p)
        rss, pss = rss + r, pss + s
    return rss * 1024, pss * 1024, len(pids)


def _meminfo_bytes(field: str) -> int | None:
    """One field of /proc/meminfo in bytes (None where there is no /proc or no such field)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def page_cache_bytes() -> int:
    """The kernel's page cache (`Cached` in /proc/meminfo): file pages, shared and reclaimable."""
    return _meminfo_bytes("Cached") or 0


@dataclass
class Peak:
    rss: int = 0  # bytes: the highest sum of RSS over the tree seen
    pss: int = 0  # bytes: the highest sum of PSS over the tree seen
    processes: int = 0

    def update(self, rss: int, pss: int, processes: int) -> None:
        self.rss, self.pss, self.processes = max(self.rss, rss), max(self.pss, pss), max(self.processes, processes)


@dataclass
class TreeSampler:
    """Samples the tree's memory every `interval` seconds in a background thread; `mark()` starts a new
    stage and returns the peak of the one before. Off where there is no /proc (then every peak is 0)."""

    # a sample reads every process's smaps_rollup: 44 ms for the demo's tree during pre-training here, so every
    # 0.5 s it took 9% of a core from the training beside it; the demo's peaks (caches, loaded models) last far longer
    interval: float = 2.0
    pid: int = field(default_factory=os.getpid)
    whole: Peak = field(default_factory=Peak)
    stage: Peak = field(default_factory=Peak)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="demo-memory", daemon=True)
        self.available = Path("/proc/self/smaps_rollup").is_file()

    def __enter__(self) -> "TreeSampler":
        if self.available:
            self._sample()
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _sample(self) -> None:
        sample = tree_memory(self.pid)
        with self._lock:
            self.whole.update(*sample)
            self.stage.update(*sample)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def mark(self) -> Peak:
        """The peak since the last mark (sampled once more now), and a new stage begins."""
        if self.available:
            self._sample()
        with self._lock:
            done, self.stage = self.stage, Peak()
        return done


# ---- before a build ----------------------------------------------------------------------------------
def available_memory() -> int | None:
    """MemAvailable (bytes): what can be allocated without swapping, page cache included."""
    return _meminfo_bytes("MemAvailable")


def check_resources(folder: Path, memory: int, disk: int) -> str | None:
    """One line saying what is missing (None: enough). `disk` counts what the folder does not hold yet."""
    folder.mkdir(parents=True, exist_ok=True)
    free_disk = shutil.disk_usage(folder).free
    free_memory = available_memory()
    problems = []
    if free_memory is not None and free_memory < memory:
        problems.append(f"{size(memory)} of free memory (available now: {size(free_memory)})")
    if free_disk < disk:
        problems.append(f"{size(disk)} of free disk under {folder} (free now: {size(free_disk)})")
    return ("needs " + " and ".join(problems)) if problems else None


def size(count: int) -> str:
    """Bytes as GiB, or as MiB below one GiB, where one decimal of a GiB would read "needs 0.2, free 0.2"."""
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.0f} MiB"


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0
