"""Where a finished `speechclip demo` build loses against its ceiling: the pre-trained run's parallel
speech->image R@1 beside the mini CLIP's text->image R@1 on the same captions, split three ways.

1. By image kind: generated scenes (colours, shapes, sizes, places) and openclipart drawings (captions from
   the drawing's title, one drawing per title, so a test drawing's name is never heard or read in training).
2. By speaker: each test caption of folds 0-2 spoken again with espeak-ng by a training speaker (one drawn
   per caption, never the caption's own); if unseen voices were the limit, this would close the gap.
3. Seen data: 200 training images of each kind (3 distinct captions each, by their training speakers),
   and the same captions spoken by held-out speakers: how far the head fits what it was trained on.

Every figure is a 1-in-N retrieval over the images of its own set (N printed). A research tool, not part
of the product; the respoken clips go to `--work` (about 2,400 short wavs).

    python benchmarks/demo_gap.py --run runs/demo-seed0 --work .cache/demo_gap/seed0
"""

from __future__ import annotations

import argparse
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch

import common  # noqa: F401  (the CLI's logging set-up)
from speechclip.data import SpokenCaption, image_table, read_dataset
from speechclip.data.synthetic import test_fold_split
from speechclip.data.tts import Speaker, synthesize
from speechclip.evaluate import encode_speech_streamed, encode_texts
from speechclip.image_cache import ImageEmbeddingCache
from speechclip.metrics import speech_image_retrieval
from speechclip.model import SpeechCLIP

KINDS = ("scene", "clipart")


def speaker_from_name(name: str) -> Speaker:
    """The inverse of `Speaker.name` ("voice+variant-sSPEED-pPITCH"; voices contain hyphens)."""
    voice, rest = name.split("+", 1)
    variant, speed, pitch = rest.rsplit("-", 2)
    return Speaker(voice, variant, int(speed[1:]), int(pitch[1:]))


class Scorer:
    def __init__(self, run: Path):
        self.model = SpeechCLIP.from_pretrained(run / "runs" / "pretrained" / "final").eval()
        self.cache = ImageEmbeddingCache(run / "cache", self.model.clip)

    def r1(self, items: list[SpokenCaption], text: bool = False) -> float:
        table = image_table(items)
        with torch.no_grad():
            queries = encode_texts(self.model, [i.text for i in items]) if text else \
                encode_speech_streamed(self.model, items).branches["parallel"]
        retrieval = speech_image_retrieval(queries, self.cache.embeddings(table.paths), torch.tensor(table.caption_rows))
        return retrieval["speech_to_image"]["recall"][1]

    def line(self, label: str, items: list[SpokenCaption]) -> str:
        speech, text = self.r1(items), self.r1(items, text=True)
        images = len({i.image_id for i in items})
        return f"{label:<46} 1-in-{images:<4} speech {100 * speech:5.1f}  text {100 * text:5.1f}  ratio {speech / max(text, 1e-9):.3f}"


def respoken(items: list[SpokenCaption], pool: list[str], work: Path, tag: str, rng: random.Random) -> list[SpokenCaption]:
    """Each caption spoken again by a speaker of `pool` other than its own (synthesised once into `work`)."""
    jobs, out = [], []
    for n, item in enumerate(items):
        speaker = rng.choice([s for s in pool if s != item.speaker])
        path = work / f"{tag}_{n:05d}.wav"
        jobs.append((item.text, speaker_from_name(speaker), path))
        out.append(replace(item, audio=path, speaker=speaker))
    work.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(2) as executor:  # espeak-ng runs as a subprocess: threads are enough
        list(executor.map(lambda job: job[2].is_file() or synthesize(*job), jobs))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished `speechclip demo` output folder")
    parser.add_argument("--work", type=Path, required=True, help="where the respoken clips go")
    args = parser.parse_args()
    scorer, corpus, rng = Scorer(args.run), str(args.run / "corpus"), random.Random(0)
    train = read_dataset("manifest", corpus, "train")
    train_speakers = sorted({i.speaker for i in train})
    print(f"{args.run}: parallel speech->image R@1 against the mini CLIP's text->image R@1 on the same captions")
    folds = [read_dataset("manifest", corpus, s) for s in ["test"] + [test_fold_split(f) for f in (1, 2)]]
    for fold, items in enumerate(folds):
        for kind in KINDS:
            print(scorer.line(f"test fold {fold}, {kind}s", [i for i in items if i.image_id.startswith(kind)]))
        print(scorer.line(f"test fold {fold}, all (the check's fold)", items))
        print(scorer.line(f"test fold {fold}, all, respoken by training speakers",
                          respoken(items, train_speakers, args.work, f"fold{fold}_train", rng)))
    by_image: dict[str, list[SpokenCaption]] = {}
    for item in train:
        by_image.setdefault(item.image_id, []).append(item)
    held_out = sorted({i.speaker for items in folds for i in items})
    for kind in KINDS:
        ids = rng.sample(sorted(i for i in by_image if i.startswith(kind)), 200)
        seen = [c for i in ids for c in list({c.text: c for c in by_image[i]}.values())[:3]]
        print(scorer.line(f"training {kind}s, their training speakers", seen))
        print(scorer.line(f"training {kind}s, held-out speakers", respoken(seen, held_out, args.work, f"train_{kind}", rng)))


if __name__ == "__main__":
    main()
