"""Evaluation metrics at SpokenCOCO-test size from precomputed embeddings: time and peak memory of the
bounded-memory metrics (speechclip.metrics) beside the previous code (kept in tests/test_metrics.py).

Data: 5,000 "image" vectors (512-d, Gaussian), 5 spoken captions per image drawn around their image, CLIP
text vectors around their caption, 25,000 transcripts of which 10 % repeat another caption's (the zero-shot
protocol's repeated transcripts), and 8 keywords x 5 subwords per utterance on an 8,000-subword vocabulary.
Timed: speech<->image, speech<->text zero-shot (both directions each) for one branch, and the keyword hit
rate; not timed: the model (encoding is measured by embed_throughput.py). Each size runs in its own process,
so its peak RSS (ru_maxrss, the generated data included) is its own.
Usage: python benchmarks/eval_scale.py [--images 5000] [--old-images 2000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def make_data(images: int, captions_per_image: int = 5, dim: int = 512, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(images, dim, generator=generator)
    caption_image = torch.arange(images).repeat_interleave(captions_per_image)
    count = len(caption_image)
    speech = image[caption_image] + 6.0 * torch.randn(count, dim, generator=generator)  # R@1 well below 100 %
    text = speech + 33.0 * torch.randn(count, dim, generator=generator)
    names = [f"caption {i}" for i in range(count)]
    repeats = torch.randint(0, count, (count // 10, 2), generator=generator).tolist()
    for target, source in repeats:
        names[target] = names[source].upper()  # the same transcript after normalisation
    keywords = torch.randint(0, 8000, (count, 8, 5), generator=generator).tolist()
    tokens = [set(row) for row in torch.randint(0, 8000, (count, 10), generator=generator).tolist()]
    return {"speech": speech, "images": image, "caption_image": caption_image, "texts": text, "transcripts": names,
            "keywords": keywords, "tokens": tokens}


def worker(which: str, images: int) -> dict:
    data = make_data(images)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if which == "new":
        from speechclip.metrics import keyword_hit_rate, speech_image_retrieval, speech_text_retrieval
    else:
        sys.path.insert(0, str(ROOT))
        from tests.test_evaluate import _reference_keyword_hit_rate as keyword_hit_rate
        from tests.test_metrics import _reference_speech_image as speech_image_retrieval
        from tests.test_metrics import _reference_speech_text as speech_text_retrieval
    started, cpu = time.perf_counter(), time.process_time()
    result = speech_image_retrieval(data["speech"], data["images"], data["caption_image"])
    result.update(speech_text_retrieval(data["speech"], data["texts"], data["transcripts"]))
    result["keywords"] = keyword_hit_rate(data["keywords"], data["tokens"], 8000)["hit_rate"]
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    r1 = {task: round(100 * result[task]["recall"][1], 2) for task in ("speech_to_image", "image_to_speech", "speech_to_text", "text_to_speech")}
    return {"seconds": seconds, "cpu": cpu, "peak_mb": peak, "data_mb": before, "r1": r1}


def run(which: str, images: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--worker", which, "--images", str(images)],
                          capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{which} at {images} images failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=5000, help="5 captions each: 5,000 = SpokenCOCO test")
    parser.add_argument("--old-images", type=int, default=2000,
                        help="the previous code's size (at 5,000 it needs about 11 GB: too much beside other work)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", choices=["new", "old"])
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.images)))
        return
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import table

    rows, load = [], os.getloadavg()[0]  # other work on the machine stretches wall time, not CPU time
    for which, images, repeats in (("old", args.old_images, 1), ("new", args.old_images, args.repeats), ("new", args.images, args.repeats)):
        runs = [run(which, images) for _ in range(repeats)]
        times = sorted(r["seconds"] for r in runs)
        spread = f"{times[len(times) // 2]:.1f}" + (f" ({times[0]:.1f}-{times[-1]:.1f})" if repeats > 1 else "")
        cpu = sorted(r["cpu"] for r in runs)[len(runs) // 2]
        rows.append((which, f"{5 * images:,} x {images:,}", spread, f"{cpu:.1f}", f"{max(r['peak_mb'] for r in runs):,.0f}",
                     f"{runs[0]['data_mb']:,.0f}", json.dumps(runs[0]["r1"])))
    print(f"evaluation metrics from embeddings (512-d; one branch: speech<->image, zero-shot speech<->text, keyword "
          f"hit rate), {torch.get_num_threads()} threads; wall seconds: median (min-max) of {args.repeats} processes; "
          f"CPU seconds (user + system, all threads): median; 1-min load average at the start: {load:.1f}")
    print(table(rows, ("code", "captions x images", "wall s", "CPU s", "peak RSS MB", "RSS after data MB", "R@1 % (same inputs: same figures)")))


if __name__ == "__main__":
    main()
