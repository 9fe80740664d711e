"""`speechclip demo`: the whole paper offline, from nothing, on a laptop.

0. check free memory and disk (one line saying what is missing, instead of being killed part way);
1. build the offline spoken-caption corpus (or reuse it);
2. take the released mini CLIP and mini HuBERT (`released.py`), or with --pretrain (or another seed) pre-train
   them: the mini CLIP on image-caption pairs, the mini HuBERT on speech only (MFCC k-means targets), saved as
   ordinary Hugging Face folders (reused on the next run); train SpeechCLIP hybrid (parallel +
   cascaded) with both frozen, on image-speech pairs only, and, as a control, the same for a quarter of the
   steps on a randomly initialised frozen upstream (with --plus, also SpeechCLIP+'s hybrid_plus on the
   pre-trained upstream): jobs in worker processes, side by side where they use a second thread poorly
   (`schedule.py`, `_jobs`);
3. evaluate on the test split (unseen images, unseen speakers) and print one table;
4. write results.json and pictures (curves, a retrieval grid, a keyword table) under the run folder.
Each stage prints its wall time and the peak memory of the whole process tree (`memory.py`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

from ..clip import FrozenCLIP
from ..data import SpokenCaption, image_table, read_dataset
from ..data.synthetic import build_corpus, test_fold_split
from ..evaluate import encode_speech_streamed, evaluate
from ..image_cache import ImageEmbeddingCache
from ..metrics import recall_at_k, speech_image_retrieval
from ..mini_encoders import save_mini_speech
from ..model import SpeechCLIP
from ..pretrain.mini_clip import MiniCLIPSpec, pretrain_mini_clip
from ..pretrain.mini_hubert import MiniHubertSpec, hubert_config, pretrain_mini_hubert
from ..train.resume import metrics_history
from ..train.state_cache import state_caches_folder
from .memory import MiB, TreeSampler, check_resources, folder_bytes, release_free_memory
from .report import format_demo_table, write_pictures
from .released import install_released, released_log, same_recipe
from .schedule import Job, run_jobs, runs_in_workers
from .spec import DemoSpec, speechclip_config
from .train import finished_run, train_one

GiB = 1 << 30
# What a full build needs: the process tree's peak PSS with room to spare (4.3-4.4 GiB on stop 32's draws 0-3, in
# stage 2, where two jobs run side by side; 3.5-3.7 at stop 30, before stage 2's jobs; RESULTS.md "demo stages",
# benchmarks/demo_memory.py), and the folder's size when finished (corpus, encoders, state caches, runs).
FULL_BUILD_MEMORY, FULL_BUILD_DISK = 6 * GiB, 5 * GiB
# From the released encoders nothing trains side by side: 2.1 GiB peak on stop 34's fresh clone, a 3.4 GiB folder
RELEASED_BUILD_MEMORY = 3 * GiB
# The quick build (what the tests run): 1.3 GiB peak and a 16 MiB folder at stop 33
QUICK_BUILD_MEMORY, QUICK_BUILD_DISK = 2 * GiB, 64 * MiB


class Stages:
    """Prints a line as each stage starts and ends, with its wall time and the peak memory of the process
    tree (this process and the training processes it spawns) during it."""

    def __init__(self, memory: TreeSampler):
        self.memory = memory
        self.seconds: dict[str, float] = {}
        self.peak_mib: dict[str, int] = {}

    @contextmanager
    def __call__(self, name: str):
        print(f"[demo] {name} ...", flush=True)
        self.memory.mark()
        started = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - started, 1)
        peak = self.memory.mark()
        release_free_memory()  # what the stage freed, for the next (a pre-training leaves a fragmented heap)
        self.peak_mib[name] = round(peak.pss / MiB)
        memory = f", peak memory {peak.pss / GiB:.1f} GiB ({peak.processes} processes)" if self.memory.available else ""
        print(f"[demo] {name}: {self.seconds[name]:.1f} s{memory}", flush=True)


def wanted_spec(spec: object) -> dict:
    """A pre-training spec as its marker holds it (tuples become lists, as they read back)."""
    return json.loads(json.dumps(asdict(spec)))


def finished_pretraining(folder: Path, spec: object, released: bool = True) -> dict | None:
    """The log of a finished pre-training in `folder` for the same spec (its pretrain.json), if there is one.
    A released encoder installed there (`released.py`) counts unless `released` is False (`--pretrain`)."""
    try:
        log = json.loads((folder / "pretrain.json").read_text())
    except (OSError, ValueError):  # absent, or an older build's marker cut short: build again
        return None
    if log.get("released"):
        return log if released and same_recipe(log.get("spec", {}), wanted_spec(spec)) else None
    return log if log.get("spec") == wanted_spec(spec) else None


def pretrain_once(folder: Path, spec: object, build) -> dict:
    """Run `build()` unless `folder` holds a finished result for the same spec (pretrain.json), not a released
    one (a job pre-trains only where the released encoders were not wanted)."""
    log = finished_pretraining(folder, spec, released=False)
    if log is not None:
        log["reused"] = True
        return log
    log = build()
    log["spec"] = wanted_spec(spec)
    marker = folder / "pretrain.json"
    tmp = marker.with_name(".pretrain.json.tmp")
    tmp.write_text(json.dumps(log) + "\n")
    os.replace(tmp, marker)  # the marker says "finished": never half-written
    log["reused"] = False
    return log


def preflight(out: Path, quick: bool, pretraining: bool = True) -> None:
    """Refuse to start, in one line, where the build would run out of memory or disk part way; pretraining:
    whether the mini encoders will be pre-trained (side by side with the control: the higher peak)."""
    memory, disk = (QUICK_BUILD_MEMORY, QUICK_BUILD_DISK) if quick else (FULL_BUILD_MEMORY, FULL_BUILD_DISK)
    if not quick and not pretraining:
        memory = RELEASED_BUILD_MEMORY
    problem = check_resources(out, memory, max(0, disk - folder_bytes(out)))
    if problem:
        raise SystemExit(f"speechclip demo: {problem}; free some, or pass --no-check to try anyway")


def run_demo(out: Path, quick: bool = False, fresh: bool = False, retrain: bool = False, seed: int = 0,
             plus: bool = False, check: bool = True, fp32: bool = False, pretrain: bool = False) -> dict:
    """fresh: rebuild everything; retrain: reuse corpus and encoders, train SpeechCLIP again; seed: another
    draw of the training runs (0: the default build); plus: also train and report SpeechCLIP+'s hybrid_plus;
    fp32: no bf16 autocast even where the CPU has bf16 units (what a CPU without them computes); pretrain:
    pre-train the mini encoders from nothing even where the released ones fit (`released.py`)."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    spec = (DemoSpec.quick() if quick else DemoSpec()).seeded(seed)
    spec = spec.in_fp32() if fp32 else spec
    out.mkdir(parents=True, exist_ok=True)
    if check:
        released = not pretrain and all(released_log(name, wanted_spec(getattr(spec, name))) for name in ("clip", "hubert"))
        preflight(out, quick, pretraining=not released)
    if fresh:
        retrain = True
        for marker in out.glob("**/pretrain.json"):
            marker.unlink()
        (out / "corpus" / "corpus.json").unlink(missing_ok=True)
    with TreeSampler() as memory:
        results = _build(out, spec, Stages(memory), retrain, plus, pretrain)
        results["peak_memory_mib"] = round(memory.whole.pss / MiB)
        results["peak_memory_rss_mib"] = round(memory.whole.rss / MiB)
    results["quick"] = quick
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(format_demo_table(results))
    print(f"[demo] results: {out / 'results.json'}, pictures: {out / 'pictures'}")
    return results


def _build(out: Path, spec: DemoSpec, stage: Stages, retrain: bool, plus: bool, pretrain: bool) -> dict:
    started = time.perf_counter()
    with stage("1. offline corpus"):
        corpus_dir = out / "corpus"
        corpus = build_corpus(corpus_dir, spec.corpus)
        train_items = read_dataset("manifest", str(corpus_dir), "train")
    with stage("2. pre-train mini CLIP and mini HuBERT (or take the released ones), train SpeechCLIP and the control"):
        jobs, done = _jobs(out, spec, corpus_dir, train_items, retrain, plus, pretrain)
        del train_items
        schedule = run_jobs(jobs, torch.get_num_threads())
        schedule.raise_first_failure()
        done.update(schedule.results)
        runs = {name: done[name] for name in RUN_NAMES if name in done}
    with stage("3. evaluate on the test split"):
        results = _evaluate(out, corpus_dir, out / "encoders" / "clip", list(runs), spec.corpus.test_folds)
        results["control_step"] = same_step_validation(out / "runs", spec.control_steps)
    with stage("4. pictures"):
        write_pictures(out, results, done[CLIP_JOB], done[HUBERT_JOB])
    results.update(corpus=corpus, stage_seconds=stage.seconds, stage_peak_memory_mib=stage.peak_mib,
                   jobs={name: {"start": s, "end": e, "threads": schedule.threads[name]} for name, (s, e) in sorted(schedule.spans.items(), key=lambda span: span[1])},
                   arithmetic="bf16 autocast" if spec.computes_bf16 else "fp32",
                   total_seconds=round(time.perf_counter() - started, 1),
                   pretraining={"clip": _short(done[CLIP_JOB]), "hubert": _short(done[HUBERT_JOB])}, training=runs)
    return results


CLIP_JOB, HUBERT_JOB = "mini CLIP", "mini HuBERT"
RUN_NAMES = ("pretrained", "random", "plus")  # the SpeechCLIP runs, by their folders under runs/


def _jobs(out: Path, spec: DemoSpec, corpus_dir: Path, train_items: list[SpokenCaption], retrain: bool,
          plus: bool, pretrain: bool = False) -> tuple[list[Job], dict]:
    """Stage 2 as jobs (`schedule.py`). The encoders: the released ones where they fit the spec (`released.py`),
    else pre-trained: the mini CLIP and the mini HuBERT side by side on one thread each, the control once the mini
    CLIP is done, beside the mini HuBERT, then the pretrained run on every thread (it builds its upstream-state
    cache first: as a one-thread job of its own, alone once the control had ended, that cache left the other core
    idle for 69 s of stage 2's 636, RESULTS.md "demo stages", stop 32). With no pre-training to run beside it
    (released or reused encoders), the control has nothing to share a core with: it trains on every thread after
    the pretrained run, since one thread would leave the other core idle for its whole length.
    What is already finished gets no job: pre-trainings of the same spec, and SpeechCLIP runs of the same
    configuration (not with `retrain`); their logs come back as the dict, by job name."""
    encoders = out / "encoders"
    done: dict[str, dict] = {}
    for name, folder, pretraining in ((CLIP_JOB, encoders / "clip", spec.clip), (HUBERT_JOB, encoders / "hubert", spec.hubert)):
        log = finished_pretraining(folder, pretraining, released=not pretrain)
        if log is None and not pretrain:
            log = install_released(folder.name, wanted_spec(pretraining), folder)
            if log is not None and name == HUBERT_JOB:
                _drop_state_caches(out / "cache")  # of the upstream the released one replaces, if any
        if log is not None:
            done[name] = {**log, "reused": True}
    if HUBERT_JOB not in done:
        _drop_state_caches(out / "cache")  # before any job builds a state cache of this build's upstreams
    _random_upstream(encoders / "hubert-random", spec)
    bars = not runs_in_workers(torch.get_num_threads())
    jobs: list[Job] = []
    if CLIP_JOB not in done:
        pairs = list(dict.fromkeys((i.image, i.text) for i in train_items))  # a caption in two voices is one pair
        jobs.append(Job(CLIP_JOB, pretrain_clip_job, (encoders / "clip", spec.clip, pairs, bars)))
    if HUBERT_JOB not in done:
        jobs.append(Job(HUBERT_JOB, pretrain_hubert_job, (encoders / "hubert", spec.hubert, [i.audio for i in train_items], bars)))
    pretraining = bool(jobs)
    specs = {"clip": wanted_spec(spec.clip), "hubert": wanted_spec(spec.hubert)}
    releases = {key: done.get(name, {}).get("released") for key, name in (("clip", CLIP_JOB), ("hubert", HUBERT_JOB))}
    if any(releases.values()):  # released encoders of the same spec are not the ones pre-trained here (other bits)
        specs["released"] = releases
    config = lambda folder, variant="hybrid", steps=None: speechclip_config(  # noqa: E731
        spec, encoders / folder, encoders / "clip", corpus_dir, out / "cache", variant, steps)
    runs = {"pretrained": (config("hubert"), specs, out / "runs" / "pretrained"),
            "random": (config("hubert-random", steps=spec.control_steps), specs, out / "runs" / "random")}
    if plus:
        runs["plus"] = (config("hubert", "hybrid_plus"), specs, out / "runs" / "plus")
    for name, run in runs.items():
        summary = None if retrain else finished_run(*run)
        if summary is not None:
            done[name] = summary
    waiting = lambda *names: tuple(name for name in names if name not in done)  # noqa: E731 - only jobs that run
    control = Job("random", train_one, (*runs["random"], "random", bars), after=waiting(CLIP_JOB), whole_machine=not pretraining)
    if "random" not in done and pretraining:
        jobs.append(control)
    if "pretrained" not in done:
        jobs.append(Job("pretrained", train_one, (*runs["pretrained"], "pretrained", bars),
                        after=waiting(CLIP_JOB, HUBERT_JOB), whole_machine=True))
    if "random" not in done and not pretraining:
        jobs.append(control)
    if plus and "plus" not in done:  # after the pretrained run, whose upstream-state cache it reads
        jobs.append(Job("plus", train_one, (*runs["plus"], "plus", bars), after=waiting(CLIP_JOB, HUBERT_JOB, "pretrained"),
                        whole_machine=True))
    return jobs, done


def pretrain_clip_job(folder: Path, spec: MiniCLIPSpec, pairs: list, bars: bool) -> dict:
    return pretrain_once(folder, spec, lambda: pretrain_mini_clip(pairs, folder, spec, progress=bars))


def pretrain_hubert_job(folder: Path, spec: MiniHubertSpec, clips: list, bars: bool) -> dict:
    return pretrain_once(folder, spec, lambda: pretrain_mini_hubert(clips, folder, spec, progress=bars))


def same_step_validation(runs: Path, step: int) -> dict:
    """Validation speech->image R@1 of the pretrained run and the control at the control's last step: the
    control trained a quarter as long, so the test table alone would compare unequal trainings. The control
    has annealed its learning rate by then and the pretrained run has not: the comparison favours the control."""
    recall = {}
    for name in ("pretrained", "random"):
        # Lightning logs global step N as step N-1
        rows = [row for row in metrics_history(runs / name / "logs" / "metrics.csv", step) if row["step"] == step - 1]
        values = [row["val/speech_to_image_r1"] for row in rows if "val/speech_to_image_r1" in row]
        if values:
            recall[name] = values[-1]
    return {"step": step, "speech_to_image_r1": recall}


def _random_upstream(folder: Path, spec: DemoSpec) -> dict:
    """The control's frozen random upstream (the mini HuBERT's architecture, seed + 1), written only when its
    marker names another spec: its files' times are part of the state cache's key, so writing the same
    weights again on every build left a new 1.1 GiB state cache behind at each `--retrain`."""
    def build() -> dict:
        torch.manual_seed(spec.hubert.seed + 1)
        save_mini_speech(folder, hubert_config(spec.hubert))
        return {}
    return pretrain_once(folder, spec.hubert, build)


def _drop_state_caches(cache: Path) -> None:
    """The mini HuBERT was pre-trained again (a new folder, --fresh, another --seed): every upstream-state cache
    here is of upstreams that no longer exist, 1.1 GiB each at the demo's size, and would only pile up."""
    shutil.rmtree(state_caches_folder(cache), ignore_errors=True)


def _short(log: dict) -> dict:
    """A pre-training log without its per-step losses: results.json keeps the summary, the log keeps the curve."""
    return {k: v for k, v in log.items() if k != "losses"}


def _evaluate(out: Path, corpus_dir: Path, clip_dir: Path, runs: list[str], folds: int) -> dict:
    test = read_dataset("manifest", str(corpus_dir), "test")
    results = {}
    for name in runs:
        model = SpeechCLIP.from_pretrained(out / "runs" / name / "final")
        results[name] = evaluate(model, test, ImageEmbeddingCache(out / "cache", model.clip))
        del model
    clip = FrozenCLIP(str(clip_dir))
    cache = ImageEmbeddingCache(out / "cache", clip)
    results["clip_text_to_image"] = _ceiling(clip, test, cache)
    results["test"] = {"captions": len(test), "images": len(image_table(test).ids),
                       "speakers": len({i.speaker for i in test})}
    results["test_folds"] = _fold_recalls(out, corpus_dir, clip, cache, results, folds)
    return results


def _ceiling(clip: FrozenCLIP, items: list[SpokenCaption], cache: ImageEmbeddingCache) -> dict:
    """What the speech side is measured against: the mini CLIP's own text->image recall, with each clip's
    transcript as the query in place of the speech."""
    table = image_table(items)
    tokens = clip.tokenize([i.text for i in items])
    texts = clip.text_features(tokens["input_ids"], tokens["attention_mask"])
    relevant = torch.tensor(table.caption_rows)[:, None] == torch.arange(len(table.ids))[None, :]
    return recall_at_k(texts, cache.embeddings(table.paths), relevant)


def _fold_recalls(out: Path, corpus_dir: Path, clip: FrozenCLIP, cache: ImageEmbeddingCache, results: dict,
                  folds: int) -> dict:
    """Speech->image R@1 of the pre-trained run and the ceiling on every test fold (fold 0: the table's split),
    each fold its own 1-in-N retrieval: the quality ratio over all of them is what the check judges, since one
    split of 200 images measures it only to about +-0.08 (95 %; benchmarks/demo_test_noise.py)."""
    speech_r1 = [results["pretrained"]["parallel"]["speech_to_image"]["recall"][1]]
    ceiling_r1 = [results["clip_text_to_image"]["recall"][1]]
    if folds > 1:
        model = SpeechCLIP.from_pretrained(out / "runs" / "pretrained" / "final")
        extra = extra_fold_items(corpus_dir, folds)
        speech_r1 += extra_fold_speech_r1(model, extra, cache)
        ceiling_r1 += [_ceiling(clip, items, cache)["recall"][1] for items in extra]
    return pooled_folds(speech_r1, ceiling_r1)


def extra_fold_items(corpus_dir: Path, folds: int) -> list[list[SpokenCaption]]:
    """The captions of test folds 1..folds-1 (fold 0 is the table's test split)."""
    return [read_dataset("manifest", str(corpus_dir), test_fold_split(fold)) for fold in range(1, folds)]


def extra_fold_speech_r1(model: SpeechCLIP, folds: list[list[SpokenCaption]], cache: ImageEmbeddingCache) -> list[float]:
    """The parallel branch's speech->image R@1 on each fold of `folds` (benchmarks judge variants this way too)."""
    recalls = []
    for items in folds:
        table = image_table(items)
        speech = encode_speech_streamed(model, items).branches["parallel"]
        retrieval = speech_image_retrieval(speech, cache.embeddings(table.paths), torch.tensor(table.caption_rows))
        recalls.append(retrieval["speech_to_image"]["recall"][1])
    return recalls


def pooled_folds(speech_r1: list[float], ceiling_r1: list[float]) -> dict:
    """Per-fold ratios and the pooled one (sum of R@1 over sum of ceilings: every fold weighs the same)."""
    ratios = [s / max(c, 1e-9) for s, c in zip(speech_r1, ceiling_r1)]
    return {"folds": len(speech_r1), "speech_to_image_r1": speech_r1, "ceiling_r1": ceiling_r1, "ratios": ratios,
            "ratio": sum(speech_r1) / max(sum(ceiling_r1), 1e-9)}
