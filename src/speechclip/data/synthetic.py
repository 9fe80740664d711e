"""The offline spoken-caption corpus: rendered scenes + real clip-art, captions, espeak-ng speech.

Splits are by image; validation and test speakers never speak in training. Deterministic for a seed,
parallel across cores, and re-running reuses every file already there (and returns at once when the
whole corpus is complete). Files are named by what they hold (a hash of the caption and speaker, or of the
picture and its size): an interrupted build resumes, and a changed spec never reuses a stale file.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path

import soundfile
from tqdm import tqdm

from . import espeak
from .clipart import clipart_captions, find_drawings, render_svg
from .items import DataError, SpokenCaption
from .manifest import write_manifest
from .scenes import captions as scene_captions
from .scenes import random_scene, render
from .tts import Speaker, all_speakers, synthesize

SPLITS = ("train", "val", "test")


@dataclass
class CorpusSpec:
    num_scenes: int = 1500  # rendered compositional scenes
    num_clipart: int = 400  # openclipart drawings (0 = none)
    captions_per_image: int = 3
    # Each training caption is spoken by this many training speakers (val/test: one). What a head trained
    # on a few thousand clips lacks most is the same words in many voices: speech->image R@1 on unseen
    # speakers (benchmarks/head_probe.py) 28.3 -> 33.0 from 1 to 2 voices, 40.2 -> 43.0 from 2 to 3 (on
    # later encoders); each voice adds 20-35 s of synthesis on 2 cores.
    train_voices: int = 3
    val_images: int = 100
    test_images: int = 200
    # More test sets of `test_images` unseen images each (splits test_fold1, ...), drawn from a stream of their
    # own so the other splits stay as they are: one split of 200 images measures the demo's quality ratio only to
    # a standard error of about 0.04 (benchmarks/demo_test_noise.py); the mean over folds to 0.04 / sqrt(folds)
    test_folds: int = 1
    held_out_speaker_fraction: float = 0.2  # speakers reserved for val/test, never heard in training
    image_size: int = 64
    seed: int = 0

    def __post_init__(self):
        if self.train_voices < 1:
            raise ValueError(f"train_voices: at least 1 speaker per training caption, got {self.train_voices}")
        if self.test_folds < 1:
            raise ValueError(f"test_folds: at least 1 (the test split itself), got {self.test_folds}")

    @property
    def splits(self) -> tuple[str, ...]:
        return SPLITS + tuple(test_fold_split(k) for k in range(1, self.test_folds))


def test_fold_split(fold: int) -> str:
    """The manifest split of extra test fold `fold` (fold 0 is `test`)."""
    return "test" if fold == 0 else f"test_fold{fold}"


@dataclass
class _Job:
    image_id: str
    image: Path
    source: object  # a scene tuple or a clip-art Drawing
    captions: list[tuple[str, Speaker, Path]]
    split: str


def synthesis_workers(in_process: bool) -> int:
    """Corpus workers: for speech in process, one process per usable core (libespeak-ng's state is global);
    for a program per job (espeak-ng, or rsvg-convert for an image), two threads more than cores, since a job
    also waits on the program's start-up and a file write (1.06x the clips per second of two threads on
    2 cores: benchmarks/synthesis_workers.py)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores if in_process else cores + 2


def _speech_pool(in_process: bool, workers: int) -> Executor:
    """Forked processes for the in-process engine (Linux only, where `espeak.available()`: nothing to import
    again, this process's modules come along; a spawned worker would first import torch, about 4 s and
    370 MB), else threads running the program."""
    if not in_process:
        return ThreadPoolExecutor(max_workers=workers)
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork"))


def build_corpus(out: str | Path, spec: CorpusSpec = CorpusSpec(), workers: int | None = None, progress: bool = True,
                 in_process: bool | None = None) -> dict:
    """Build (or finish, or reuse) the corpus in `out`; returns its summary (also in out/corpus.json).
    workers: image threads and speech workers (default: synthesis_workers(...)); in_process: speak through
    libespeak-ng in worker processes (default: where it loads) or False for the espeak-ng program in threads
    (the same samples: data/espeak.py)."""
    out = Path(out)
    summary_path = out / "corpus.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if summary.get("spec") == asdict(spec) and all((out / f"{split}.jsonl").is_file() for split in spec.splits):
            return summary
    started = time.perf_counter()
    jobs = _plan(out, spec)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    if in_process is None:
        in_process = espeak.available()
    elif in_process and not espeak.available():
        raise DataError("libespeak-ng cannot be loaded and reset here; in_process=False speaks with the espeak-ng program")
    image_threads = workers if workers is not None else synthesis_workers(in_process=False)  # rsvg-convert is a program
    with ThreadPoolExecutor(max_workers=image_threads) as pool:
        failed = list(tqdm(pool.map(lambda job: _make_image(job, spec.image_size), jobs), total=len(jobs),
                           desc="corpus images", disable=not progress, unit="image"))
    skipped = [problem for problem in failed if problem]
    jobs = [job for job, problem in zip(jobs, failed) if not problem]
    speech = [(*caption, in_process) for job in jobs for caption in job.captions if not caption[2].is_file()]
    speech_workers = workers if workers is not None else synthesis_workers(in_process)
    try:
        with _speech_pool(in_process, speech_workers) as pool:
            list(tqdm(pool.map(_make_speech, speech, chunksize=16), total=len(speech), desc="corpus speech",
                      disable=not progress, unit="clip"))
    except BrokenProcessPool:  # a worker died inside libespeak-ng: what is written is kept, the rest is not
        raise DataError(f"{out}: a speech worker process died in libespeak-ng; run again to finish the corpus, "
                        "or build it with in_process=False (the espeak-ng program)") from None
    planned = {job.image for job in jobs} | {path for job in jobs for _, _, path in job.captions}
    for stale in [*(out / "images").glob("*.png"), *(out / "audio").glob("*.wav")]:
        if stale not in planned:  # made for another spec
            stale.unlink()
    summary = _write(out, jobs, spec, time.perf_counter() - started)
    summary["skipped_drawings"] = skipped
    # a new file, not the old one rewritten: a corpus copied with hard links (cp -al) keeps its own summary
    tmp = summary_path.with_name(".corpus.json.tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, summary_path)
    return summary


def _plan(out: Path, spec: CorpusSpec) -> list[_Job]:
    rng = random.Random(spec.seed)
    sources: list[tuple[str, object]] = [(f"scene_{i:05d}", random_scene(rng)) for i in range(spec.num_scenes)]
    drawings = find_drawings() if spec.num_clipart else []
    chosen = rng.sample(drawings, min(spec.num_clipart, len(drawings))) if drawings else []
    sources += [(f"clipart_{i:05d}", d) for i, d in enumerate(chosen)]
    rng.shuffle(sources)
    speakers = all_speakers()
    rng.shuffle(speakers)
    held = max(1, int(len(speakers) * spec.held_out_speaker_fraction))
    pools = {"train": speakers[held:], "val": speakers[:held], "test": speakers[:held]}
    voice_rng = random.Random(spec.seed + 1)
    jobs = []
    for index, (image_id, source) in enumerate(sources):
        split = "test" if index < spec.test_images else "val" if index < spec.test_images + spec.val_images else "train"
        texts = (scene_captions(source, rng, spec.captions_per_image) if image_id.startswith("scene")
                 else clipart_captions(source, rng, spec.captions_per_image))
        caps = [(n, t, rng.choice(pools[split])) for n, t in enumerate(texts)]
        if split == "train":  # extra voices from their own stream: the rest of the plan is as with one voice
            for n, text, first in caps[: len(texts)]:
                caps += [(n, text, s) for s in _other_speakers(voice_rng, pools["train"], first, spec.train_voices - 1)]
        jobs.append(_job(out, image_id, source, caps, split, spec.image_size))
    used = {d.svg for d in chosen}
    spare = [d for d in drawings if d.svg not in used]
    return jobs + _fold_jobs(out, spec, spare, pools["test"])


def _fold_jobs(out: Path, spec: CorpusSpec, spare_drawings: list, speakers: list[Speaker]) -> list[_Job]:
    """The extra test folds, from their own random stream: as many images as the test split each, scenes and
    clip-art (drawings no other split uses) in the corpus's proportion, captions by the test speakers."""
    rng = random.Random(spec.seed + 2)
    clipart_share = spec.num_clipart / max(1, spec.num_scenes + spec.num_clipart) if spare_drawings else 0.0
    spare = rng.sample(spare_drawings, len(spare_drawings))
    jobs = []
    for fold in range(1, spec.test_folds):
        for index in range(spec.test_images):
            if spare and rng.random() < clipart_share:
                image_id, source = f"clipart_f{fold}_{index:05d}", spare.pop()
                texts = clipart_captions(source, rng, spec.captions_per_image)
            else:
                image_id, source = f"scene_f{fold}_{index:05d}", random_scene(rng)
                texts = scene_captions(source, rng, spec.captions_per_image)
            caps = [(n, t, rng.choice(speakers)) for n, t in enumerate(texts)]
            jobs.append(_job(out, image_id, source, caps, test_fold_split(fold), spec.image_size))
    return jobs


def _job(out: Path, image_id: str, source: object, captions: list[tuple[int, str, Speaker]], split: str,
         image_size: int) -> _Job:
    """An image and its spoken captions, every file named by a digest of what it holds, so a changed spec
    makes again only the files it changes."""
    clips = [(t, s, _named(out / "audio", f"{image_id}_{n}", ".wav", t, s.name)) for n, t, s in captions]
    return _Job(image_id, _named(out / "images", image_id, ".png", source, image_size), source, clips, split)


def _named(folder: Path, stem: str, suffix: str, *content: object) -> Path:
    digest = hashlib.sha1("|".join(map(str, content)).encode()).hexdigest()[:10]
    return folder / f"{stem}_{digest}{suffix}"


def _other_speakers(rng: random.Random, pool: list[Speaker], taken: Speaker, count: int) -> list[Speaker]:
    """`count` distinct speakers from `pool`, none of them `taken`."""
    picked = rng.sample(pool, min(len(pool), count + 1))
    return [s for s in picked if s != taken][:count]


def _make_image(job: _Job, image_size: int) -> str | None:
    """Render one image unless present; a drawing that librsvg cannot read is dropped (and reported)."""
    if job.image.is_file():
        return None
    if job.image_id.startswith("scene"):
        render(job.source, image_size).save(job.image)
        return None
    try:
        render_svg(job.source.svg, job.image, image_size)
    except DataError as error:
        return str(error)[:300]
    return None


def _make_speech(clip: tuple[str, Speaker, Path, bool]) -> None:
    synthesize(*clip)


def _write(out: Path, jobs: list[_Job], spec: CorpusSpec, seconds: float) -> dict:
    counts, hours, speakers = {}, 0.0, {s: set() for s in spec.splits}
    for split in spec.splits:
        items = [SpokenCaption(audio=p, image=j.image, image_id=j.image_id, text=t, speaker=s.name)
                 for j in jobs if j.split == split for t, s, p in j.captions]
        write_manifest(items, out / f"{split}.jsonl")
        counts[split] = {"images": sum(j.split == split for j in jobs), "captions": len(items)}
        for item in items:
            hours += soundfile.info(str(item.audio)).duration / 3600
            speakers[split].add(item.speaker)
    return {
        "spec": asdict(spec), "splits": counts, "hours_of_speech": round(hours, 3),
        "speakers": {s: len(v) for s, v in speakers.items()},
        "test_speakers_in_train": len(speakers["test"] & speakers["train"]),
        "build_seconds": round(seconds, 1),
    }
