"""Pre-train a finished demo build's mini HuBERT again with changed settings, into a new build folder for
`demo_variant.py`: how much the SpeechCLIP result owes to the upstream's training.

The new folder links the build's corpus, mini CLIP, results (for the ceiling) and image-embedding caches;
only `encoders/hubert` is new (the same draw's seed, the changed settings), with the demo's own marker
(`pretrain.json`), so `speechclip demo --out` on it would reuse it. A research tool, not part of the product.

    OMP_NUM_THREADS=1 python benchmarks/demo_hubert_variant.py --run runs/demo --out runs/h4k-demo steps=4000
    OMP_NUM_THREADS=1 python benchmarks/demo_variant.py --run runs/h4k-demo --name b128 train.batch_size=128 ...
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

from common import demo_build_spec  # (and the CLI's logging set-up)
from speechclip.data import read_dataset
from speechclip.demo.run import pretrain_once
from speechclip.pretrain.mini_hubert import pretrain_mini_hubert
from speechclip.train.state_cache import state_caches_folder


def _link(source: Path, target: Path) -> None:
    if not target.exists():
        os.symlink(source.resolve(), target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished `speechclip demo` output folder")
    parser.add_argument("--out", type=Path, required=True, help="the new build folder")
    parser.add_argument("settings", nargs="*", help="MiniHubertSpec fields, e.g. steps=4000")
    args = parser.parse_args()
    spec = demo_build_spec(args.run).hubert
    fields = {f.name: f for f in dataclasses.fields(spec)}
    changes = {}
    for setting in args.settings:
        name, _, value = setting.partition("=")
        if name not in fields:
            parser.error(f"{setting}: no MiniHubertSpec field {name!r}")
        changes[name] = type(getattr(spec, name))(json.loads(value))
    spec = dataclasses.replace(spec, **changes)
    (args.out / "encoders").mkdir(parents=True, exist_ok=True)
    (args.out / "cache").mkdir(exist_ok=True)
    for name in ("corpus", "encoders/clip", "results.json"):
        _link(args.run / name, args.out / name)
    for cache in (args.run / "cache").iterdir():
        if cache != state_caches_folder(args.run / "cache"):  # image-embedding caches only: the upstream is new
            _link(cache, args.out / "cache" / cache.name)
    items = read_dataset("manifest", str(args.out / "corpus"), "train")
    started = time.perf_counter()
    hubert = args.out / "encoders" / "hubert"  # with the demo's own marker, written by the demo's own code
    log = pretrain_once(hubert, spec, lambda: pretrain_mini_hubert([i.audio for i in items], hubert, spec, progress=False))
    print(f"{args.out} {' '.join(args.settings)}: masked accuracy {100 * log['masked_accuracy_last']:.1f} %, "
          f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
