"""The demo's released mini encoders: the mini CLIP and the mini HuBERT that `speechclip demo --pretrain` builds
at seed 0, shipped with the package as ordinary Hugging Face folders.

Why: SpeechCLIP itself starts from released encoders (HuBERT and CLIP from their hubs), and so does the demo by
default: pre-training both took 321 of the demo's 745 s here (RESULTS.md "demo stages", stop 32), so a
newcomer's first run trains and evaluates SpeechCLIP without them. `--pretrain` builds them from nothing
instead, with the recipe their pretrain.json records (on the machine kind they were released from, the same
bytes: stop 32 built them twice on fresh clones and `cmp` found no difference).

A release is taken only for the spec it was built with, the precision of its own pre-training aside: a CPU
without bf16 units (or `--fp32`) uses the same released encoders and computes the SpeechCLIP runs in fp32.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..folders import swap_in

RELEASED = Path(__file__).parent / "encoders"  # clip/ and hubert/, each with its pretrain.json
MARKER = "pretrain.json"


def same_recipe(recorded: dict, wanted: dict) -> bool:
    """Whether a released encoder's recorded spec is the one wanted, whatever precision either pre-trains in."""
    strip = lambda spec: {k: v for k, v in spec.items() if k != "bf16"}  # noqa: E731
    return strip(recorded) == strip(wanted)


def released_log(name: str, wanted: dict, root: Path | None = None) -> dict | None:
    """The pretrain.json of the released encoder `name` ("clip" or "hubert") when it was built to `wanted`."""
    root = RELEASED if root is None else root
    try:
        log = json.loads((root / name / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return log if log.get("released") and same_recipe(log.get("spec", {}), wanted) else None


def install_released(name: str, wanted: dict, target: Path, root: Path | None = None) -> dict | None:
    """Copy the released encoder `name` to `target` (whole, never half-written) when it was built to `wanted`;
    returns its log, or None where there is no such release (another seed or spec: pre-train instead)."""
    log = released_log(name, wanted, root)
    if log is None:
        return None
    root = RELEASED if root is None else root
    staging = target.parent / f".{target.name}.installing"
    shutil.rmtree(staging, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(root / name, staging)  # copy2: the files keep their times, part of the state caches' key
    swap_in(staging, target)
    return log


def release(encoders: Path, note: dict, root: Path | None = None) -> None:
    """Make `encoders` (a demo build's clip/ and hubert/) the released ones: copied whole, each pretrain.json
    marked `released` with `note` (how and where they were built) and every file's SHA-256, which a test checks."""
    import hashlib

    root = RELEASED if root is None else root
    for name in ("clip", "hubert"):
        staging = root / f".{name}.releasing"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(encoders / name, staging)
        log = json.loads((staging / MARKER).read_text())
        files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(staging.iterdir()) if p.name != MARKER}
        (staging / MARKER).write_text(json.dumps({**log, "released": {**note, "sha256": files}}) + "\n")
        swap_in(staging, root / name)
