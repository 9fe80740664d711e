"""Train a finished demo build's pre-trained SpeechCLIP run again with changed settings, and print its test
speech->image R@1 beside the build's ceiling: how the demo's SpeechCLIP settings were chosen.

Only the pre-trained-upstream run trains (with all threads), on the build's corpus, encoders and caches,
into `.cache/demo_variant/<build>-<name>`; the build itself is not touched. A research tool, not part of
the product. Thread counts change the float rounding: with all threads compare variants with each other,
not with the build's own table; with `OMP_NUM_THREADS=1` a run rounds as the demo's own runs do (one thread
each), so its settings' result is the one `speechclip demo` would print, and two such runs fit 2 cores.

    python benchmarks/demo_variant.py --run runs/demo-seed2 --name base
    python benchmarks/demo_variant.py --run runs/demo-seed2 --name b128 train.batch_size=128 train.max_steps=2200
    python benchmarks/demo_variant.py --run runs/demo-seed2 --name drop2 model.parallel.dropout=0.2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common import demo_build_spec  # (and the CLI's logging set-up)
from speechclip.data import read_dataset
from speechclip.demo.run import extra_fold_items, extra_fold_speech_r1, pooled_folds
from speechclip.demo.spec import speechclip_config
from speechclip.evaluate import evaluate
from speechclip.image_cache import ImageEmbeddingCache
from speechclip.model import SpeechCLIP
from speechclip.train.config import apply_overrides, run_config_from_dict
from speechclip.train.run import fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished `speechclip demo` output folder")
    parser.add_argument("--name", required=True)
    parser.add_argument("overrides", nargs="*", help="run settings as in `speechclip train --set`, e.g. train.batch_size=128")
    args = parser.parse_args()
    spec = demo_build_spec(args.run)
    values = speechclip_config(spec, args.run / "encoders" / "hubert", args.run / "encoders" / "clip",
                                args.run / "corpus", args.run / "cache")
    out = Path(".cache/demo_variant") / f"{args.run.name}-{args.name}"
    started = time.perf_counter()
    fit(run_config_from_dict(apply_overrides(values, args.overrides)), out, progress=False)
    seconds = time.perf_counter() - started
    model = SpeechCLIP.from_pretrained(out / "final")
    test = read_dataset("manifest", str(args.run / "corpus"), "test")
    cache = ImageEmbeddingCache(args.run / "cache", model.clip)
    results = evaluate(model, test, cache)
    built = json.loads((args.run / "results.json").read_text())
    ceiling = built["clip_text_to_image"]["recall"]["1"]
    r1 = results["parallel"]["speech_to_image"]["recall"][1]
    print(f"{args.run.name} {args.name} {' '.join(args.overrides)}: speech->image R@1 {100 * r1:.1f}, "
          f"ceiling {100 * ceiling:.1f}, ratio {r1 / ceiling:.3f}; cascaded {100 * results['cascaded']['speech_to_image']['recall'][1]:.1f}; "
          f"{seconds:.0f} s with {torch.get_num_threads()} threads")
    if built.get("test_folds", {}).get("folds", 1) > 1:  # the check's own figure: pooled over the test folds
        folds = built["test_folds"]
        extra = extra_fold_speech_r1(model, extra_fold_items(args.run / "corpus", folds["folds"]), cache)
        pooled = pooled_folds([r1, *extra], folds["ceiling_r1"])
        print(f"  over {pooled['folds']} test folds: {' '.join(f'{r:.3f}' for r in pooled['ratios'])}, pooled "
              f"{pooled['ratio']:.3f} (the build's own run: {folds['ratio']:.3f})")


if __name__ == "__main__":
    main()
