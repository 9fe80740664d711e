"""The demo's memory figures count the whole process tree, and a build that would not fit is refused in one
line before anything is written."""

import subprocess
import sys
import time

import pytest

from speechclip.demo.memory import MiB, TreeSampler, check_resources, tree_memory


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


def test_demo_refuses_to_start_without_room(tmp_path, monkeypatch):
    from speechclip.demo import run

    monkeypatch.setattr(run, "QUICK_BUILD_MEMORY", 1 << 60)
    with pytest.raises(SystemExit, match="needs .* GiB of free memory"):
        run.run_demo(tmp_path / "demo", quick=True)
    assert not (tmp_path / "demo" / "corpus").exists()  # refused before anything was built
