"""The demo's checks over draws: one row per finished `speechclip demo [--seed N] --out DIR` folder, then the
spread (lowest, mean, highest) of the ratio the demo's first check reads (pooled over the test folds where
the build has them; `fold 0` is the table's split alone, the only one before stop 22).

Each folder's results.json is read as the demo wrote it; nothing is trained or evaluated here.

    python benchmarks/demo_seeds.py runs/demo runs/demo-seed1 runs/demo-seed2 runs/demo-seed3
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def draw(folder: Path) -> dict:
    """The figures of one finished demo folder."""
    results = json.loads((folder / "results.json").read_text())
    pre, rnd = results["pretrained"], results["random"]
    s2i = pre["parallel"]["speech_to_image"]["recall"]["1"]
    ceiling = results["clip_text_to_image"]["recall"]["1"]
    s2t = pre["parallel"]["speech_to_text"]
    folds = results.get("test_folds") or {"folds": 1, "ratio": s2i / ceiling}
    return {"folder": str(folder), "seed": results["pretraining"]["hubert"]["spec"]["seed"],
            "speech_to_image_r1": s2i, "ceiling_r1": ceiling, "fold0_ratio": s2i / ceiling, "ratio": folds["ratio"],
            "folds": folds["folds"],
            "zero_shot_times_chance": s2t["recall"]["1"] / s2t["chance"]["1"],
            "random_speech_to_image_r1": rnd["parallel"]["speech_to_image"]["recall"]["1"],
            "keyword_hit_rate": pre["keywords"]["hit_rate"], "cascaded_speech_to_image_r1": pre["cascaded"]["speech_to_image"]["recall"]["1"],
            "total_seconds": results["total_seconds"], "stage_seconds": results["stage_seconds"],
            "peak_memory_mib": results.get("peak_memory_mib")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    args = parser.parse_args()
    rows = [draw(folder) for folder in args.folders]
    width = max(len(row["folder"]) for row in rows) + 2
    print(f"{'folder':<{width}}{'seed':>5}{'s->i R@1':>10}{'ceiling':>9}{'fold 0':>8}{'folds':>6}{'ratio':>8}{'s->t x chance':>15}"
          f"{'random':>8}{'kw hit':>8}{'casc.':>7}{'seconds':>9}{'peak GiB':>10}")
    for row in rows:
        peak = f"{row['peak_memory_mib'] / 1024:.1f}" if row["peak_memory_mib"] else "-"
        print(f"{row['folder']:<{width}}{row['seed']:>5}{100 * row['speech_to_image_r1']:>10.1f}{100 * row['ceiling_r1']:>9.1f}"
              f"{row['fold0_ratio']:>8.3f}{row['folds']:>6}{row['ratio']:>8.3f}{row['zero_shot_times_chance']:>15.1f}{100 * row['random_speech_to_image_r1']:>8.1f}"
              f"{100 * row['keyword_hit_rate']:>8.1f}{100 * row['cascaded_speech_to_image_r1']:>7.1f}"
              f"{row['total_seconds']:>9.0f}{peak:>10}")
    ratios = [row["ratio"] for row in rows]
    print(f"ratio over {len(ratios)} draws: lowest {min(ratios):.3f}, mean {statistics.fmean(ratios):.3f}, "
          f"highest {max(ratios):.3f}; draws >= 0.8: {sum(r >= 0.8 for r in ratios)} of {len(ratios)}")


if __name__ == "__main__":
    main()
