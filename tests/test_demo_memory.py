"""The demo's memory figures count the whole process tree, and a build that would not fit is refused in one
line before anything is written."""

import subprocess
import sys
import time

import pytest

from speechclip.demo.memory import MiB, TreeSampler, check_resources, size, tree_memory


def test_tree_memory_counts_a_child_process():
    own_rss, own_pss, processes = tree_memory()
    assert processes >= 1 and own_pss > 10 * MiB
    code = "import sys, time; b = bytearray(300 << 20); b[::4096] = b'x' * len(b[::4096]); print('ok', flush=True); time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ok"  # its 300 MiB are touched, so resident
        with_child = tree_memory()
        alone = tree_memory(child.pid)
    finally:
        child.kill()
        child.wait()
    assert alone[0] > 290 * MiB and alone[2] == 1
    assert with_child[2] == processes + 1
    assert with_child[1] > own_pss + 250 * MiB  # the child's pages are in this tree's sum


def test_sampler_keeps_the_peak_of_each_stage():
    with TreeSampler(interval=0.05) as sampler:
        first = sampler.mark()
        block = bytearray(200 << 20)
        block[::4096] = b"x" * len(block[::4096])
        time.sleep(0.3)
        during = sampler.mark()
        del block
        time.sleep(0.2)
        sampler.mark()  # the stage in which the block was freed (a sample may have seen it still held)
        time.sleep(0.2)
        after = sampler.mark()
    assert during.pss > first.pss + 150 * MiB
    assert after.pss < during.pss - 150 * MiB  # a new stage starts from what is held now
    assert sampler.whole.pss >= during.pss


def test_check_resources_names_what_is_missing(tmp_path):
    assert check_resources(tmp_path, memory=0, disk=0) is None
    assert "free memory" in check_resources(tmp_path, memory=1 << 60, disk=0)
    message = check_resources(tmp_path, memory=0, disk=1 << 60)
    assert "disk" in message and str(tmp_path) in message


def test_sizes_under_a_gib_read_in_mib():
    # CI once printed "needs 0.2 GiB of free disk (free now: 0.2 GiB)": 256 MiB needed, about 200 free
    assert size(256 << 20) == "256 MiB" and size(200 << 20) == "200 MiB"
    assert size(6 << 30) == "6.0 GiB"


def test_demo_refuses_to_start_without_room(tmp_path, monkeypatch):
    from speechclip.demo import run

    monkeypatch.setattr(run, "QUICK_BUILD_MEMORY", 1 << 60)
    with pytest.raises(SystemExit, match="needs .* GiB of free memory"):
        run.run_demo(tmp_path / "demo", quick=True)
    assert not (tmp_path / "demo" / "corpus").exists()  # refused before anything was built


_HEAP_PROBE = """
import ctypes, sys
from speechclip.demo.memory import release_free_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.free(libc.malloc(16 << 20))  # glibc raises its mmap threshold to 16 MiB after this free: 4 MiB blocks stay in the heap
def rss_kib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS:")).split()[1])
before = rss_kib()
big, keep = [], []
for _ in range(50):  # 4 MiB blocks, each followed by a 256 KiB block that stays: the heap top cannot shrink
    block = libc.malloc(4 << 20)
    ctypes.memset(block, 1, 4 << 20)
    big.append(block)
    keep.append(libc.malloc(256 << 10))
for block in big:
    libc.free(block)
if sys.argv[1] == "released":
    assert release_free_memory()
print(rss_kib() - before)
"""


def test_free_heap_pages_go_back_to_the_system():
    """The demo trims the heap after each stage and each validation: freed 4 MiB blocks between blocks still
    in use (a fragmented heap, as a training step leaves it) leave the process, where glibc alone keeps them."""
    import subprocess
    import sys

    held = {mode: int(subprocess.run([sys.executable, "-c", _HEAP_PROBE, mode], capture_output=True, text=True,
                                     check=True).stdout) for mode in ("default", "released")}
    assert held["default"] > 150 * 1024  # KiB: glibc kept the 200 MiB
    assert held["released"] < 20 * 1024


def test_the_full_demo_asks_for_less_memory_from_the_released_encoders(tmp_path, monkeypatch):
    """From the released encoders nothing trains side by side (2.1 GiB peak): a 4 GiB laptop may run it; pre-training
    (--pretrain, another seed) asks for the side-by-side peak's room."""
    from speechclip.demo import memory, run

    asked = []
    monkeypatch.setattr(run, "check_resources", lambda out, need, disk: asked.append(need) or "stop here")
    for options in ({}, {"pretrain": True}, {"seed": 1}):
        with pytest.raises(SystemExit):
            run.run_demo(tmp_path / "demo", **options)
    assert asked == [run.RELEASED_BUILD_MEMORY, run.FULL_BUILD_MEMORY, run.FULL_BUILD_MEMORY]
    assert memory.size(run.RELEASED_BUILD_MEMORY) == "3.0 GiB"
