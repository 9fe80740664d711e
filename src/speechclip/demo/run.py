"""`speechclip demo`: the whole paper offline, from nothing, on a laptop.

1. build the offline spoken-caption corpus (or reuse it);
2. pre-train a mini CLIP (image-caption pairs) and a mini HuBERT (speech only, MFCC k-means targets),
   saved as ordinary Hugging Face folders (reused on the next run);
3. train SpeechCLIP hybrid (parallel + cascaded) with both frozen, on image-speech pairs only, and, side
   by side in a second process, the same on a randomly initialised frozen upstream as a control;
4. evaluate on the test split (unseen images, unseen speakers) and print one table;
5. write results.json and pictures (curves, a retrieval grid, a keyword table) under the run folder.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from ..audio import load_audio
from ..clip import FrozenCLIP
from ..data import image_table, read_dataset
from ..data.synthetic import CorpusSpec, build_corpus
from ..evaluate import evaluate
from ..image_cache import ImageEmbeddingCache
from ..metrics import recall_at_k
from ..mini_encoders import save_mini_speech
from ..model import SpeechCLIP
from ..pretrain.mini_clip import MiniCLIPSpec, pretrain_mini_clip
from ..pretrain.mini_hubert import MiniHubertSpec, hubert_config, pretrain_mini_hubert
from ..pretrain.precision import cpu_has_fast_bf16
from ..quiet import quiet_libraries
from ..train.config import run_config_from_dict
from ..train.run import fit
from .report import format_demo_table, write_pictures


@dataclass
class DemoSpec:
    corpus: CorpusSpec = field(default_factory=CorpusSpec)
    clip: MiniCLIPSpec = field(default_factory=MiniCLIPSpec)
    hubert: MiniHubertSpec = field(default_factory=MiniHubertSpec)
    speechclip_steps: int = 4400
    batch_size: int = 64
    lr: float = 1e-3
    num_keywords: int = 6
    speechclip_seed: int = 7  # the training layer's default seed

    def seeded(self, seed: int) -> "DemoSpec":
        """Another draw of every training run (mini CLIP, mini HuBERT, both SpeechCLIP runs, the control's
        random upstream) on the same corpus, so the test set stays the same: seed 0 is the default build."""
        return replace(self, clip=replace(self.clip, seed=self.clip.seed + seed), hubert=replace(self.hubert, seed=self.hubert.seed + seed),
                       speechclip_seed=self.speechclip_seed + seed)

    @classmethod
    def quick(cls) -> "DemoSpec":
        """Seconds, not minutes: every stage runs, on a toy scale (what the tests use)."""
        return cls(corpus=CorpusSpec(num_scenes=24, num_clipart=4, captions_per_image=2, val_images=4, test_images=6),
                   clip=MiniCLIPSpec(width=32, layers=1, heads=2, vocab_size=300, steps=5, batch_size=16, projection_dim=32),
                   hubert=MiniHubertSpec(width=32, layers=1, heads=2, clusters=8, steps=3, batch_size=4,
                                         conv_dims=(16,) * 7),
                   speechclip_steps=4, batch_size=8, num_keywords=2)


class Stages:
    """Prints a line as each stage starts and ends, and keeps the wall time of each."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        print(f"[demo] {name} ...", flush=True)
        started = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - started, 1)
        print(f"[demo] {name}: {self.seconds[name]:.1f} s", flush=True)


def _cached(folder: Path, spec: object, build) -> dict:
    """Run `build()` unless `folder` holds a finished result for the same spec (pretrain.json)."""
    marker = folder / "pretrain.json"
    wanted = json.loads(json.dumps(asdict(spec)))  # tuples become lists, as they read back
    if marker.is_file():
        log = json.loads(marker.read_text())
        if log.get("spec") == wanted:
            log["reused"] = True
            return log
    log = build()
    log["spec"] = wanted
    marker.write_text(json.dumps(log) + "\n")
    log["reused"] = False
    return log


def _speechclip_config(spec: DemoSpec, upstream: Path, clip: Path, corpus: Path, cache: Path) -> dict:
    return {
        "model": {"upstream": str(upstream), "clip": str(clip), "variant": "hybrid",
                  # SpeechCLIP+ hybrid: one attention layer shared by the parallel CLS and the keywords
                  "cascaded": {"num_keywords": spec.num_keywords, "num_heads": 4}},
        "data": {"kind": "manifest", "root": str(corpus)},
        "train": {"batch_size": spec.batch_size, "lr": spec.lr, "warmup_steps": max(1, spec.speechclip_steps // 10),
                  "max_steps": spec.speechclip_steps, "final_lr": spec.lr * 1e-3, "val_every_steps": max(1, spec.speechclip_steps // 4),
                  "checkpoint_every_steps": max(1, spec.speechclip_steps // 4), "num_workers": 0, "cache_dir": str(cache),
                  "cache_upstream_states": True, "log_every_steps": 10, "seed": spec.speechclip_seed,
                  "precision": "bf16-mixed" if cpu_has_fast_bf16() else "32-true"},  # 1.4x faster head steps
    }


def _finished_run(values: dict, encoders: dict, run_dir: Path) -> dict | None:
    """The summary of a finished run in run_dir of the same configuration on encoders of the same
    pre-training spec, if there is one."""
    marker = run_dir / "demo_run.json"
    if marker.is_file() and (run_dir / "final" / "model.safetensors").is_file():
        saved = json.loads(marker.read_text())
        if saved["config"] == values and saved.get("encoders") == encoders:
            print(f"[demo] reusing {run_dir} (same configuration; --retrain to train again)", flush=True)
            return {**saved["summary"], "reused": True}
    return None


def _train(values: dict, encoders: dict, run_dir: Path, name: str, bars: bool = True) -> dict:
    """bars=False: step lines instead of progress bars."""
    print(f"[demo] {name}: training ({torch.get_num_threads()} threads)", flush=True)
    # the demo owns its run folders: a run it decided to train again replaces the old one
    summary = fit(run_config_from_dict(values), run_dir, progress=bars, callbacks=() if bars else [StepLines(name)],
                  overwrite=True)
    (run_dir / "demo_run.json").write_text(json.dumps({"config": values, "encoders": encoders, "summary": summary}) + "\n")
    return {**summary, "reused": False}


class StepLines(Callback):
    """A line every tenth of training: two runs sharing a terminal cannot share progress bars."""

    def __init__(self, name: str):
        self.name = name
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step, total = trainer.global_step, trainer.max_steps
        if step % max(1, total // 10) == 0 or step == total:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            print(f"[demo] {self.name}: step {step}/{total}, loss {float(loss):.3f}, "
                  f"{time.perf_counter() - self.started:.0f} s", flush=True)


def _train_in_process(threads: int, *job) -> dict:
    quiet_libraries()
    torch.set_num_threads(threads)
    return _train(*job, bars=False)


def _train_all(jobs: dict[str, tuple], retrain: bool) -> dict:
    """name -> (values, encoders, run_dir): finished runs are reused (unless `retrain`); the others train at
    once, one process each, the CPU threads shared out.
    Why: the head's small matmuls use extra threads poorly. On 2 cores a head step takes 31 ms with 2 threads
    and 49 ms with 1, also while a second 1-thread process runs (benchmarks/demo_threads.py); the two demo
    runs took 304 s side by side against 211 + 231 s one after the other (benchmarks/RESULTS.md).
    With fewer threads than runs, or on a GPU, they run one after the other in this process."""
    runs = {name: None if retrain else _finished_run(*job) for name, job in jobs.items()}
    todo = {name: job for name, job in jobs.items() if runs[name] is None}
    threads = torch.get_num_threads()
    if len(todo) < 2 or threads < len(todo) or torch.cuda.is_available():
        runs.update({name: _train(*job, name) for name, job in todo.items()})
        return runs
    failure = None
    with ProcessPoolExecutor(len(todo), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_train_in_process, threads // len(todo), *job, name): name for name, job in todo.items()}
        for future in as_completed(futures):
            try:
                runs[futures[future]] = future.result()
            except Exception as error:  # say so now; the other runs go on, and what they train is kept
                print(f"[demo] {futures[future]}: failed: {error!r}", flush=True)
                failure = failure or error
    if failure is not None:
        raise failure
    return runs


def run_demo(out: Path, quick: bool = False, fresh: bool = False, retrain: bool = False, seed: int = 0) -> dict:
    """fresh: rebuild everything; retrain: reuse corpus and encoders, train SpeechCLIP again;
    seed: another draw of the training runs (0: the default build)."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    spec = (DemoSpec.quick() if quick else DemoSpec()).seeded(seed)
    out.mkdir(parents=True, exist_ok=True)
    if fresh:
        retrain = True
        for marker in out.glob("**/pretrain.json"):
            marker.unlink()
        (out / "corpus" / "corpus.json").unlink(missing_ok=True)
    stage = Stages()
    started = time.perf_counter()
    with stage("1. offline corpus"):
        corpus_dir = out / "corpus"
        corpus = build_corpus(corpus_dir, spec.corpus)
        train_items = read_dataset("manifest", str(corpus_dir), "train")
    encoders = out / "encoders"
    with stage("2a. pre-train mini CLIP"):
        pairs = list(dict.fromkeys((i.image, i.text) for i in train_items))  # a caption in two voices is one pair
        clip_log = _cached(encoders / "clip", spec.clip, lambda: pretrain_mini_clip(pairs, encoders / "clip", spec.clip))
    with stage("2b. pre-train mini HuBERT"):
        hubert_log = _cached(encoders / "hubert", spec.hubert, lambda: pretrain_mini_hubert(
            [torch.from_numpy(load_audio(i.audio)) for i in train_items], encoders / "hubert", spec.hubert))
        torch.manual_seed(spec.hubert.seed + 1)
        save_mini_speech(encoders / "hubert-random", hubert_config(spec.hubert))
    with stage("3. train SpeechCLIP on the pretrained and, as a control, on the random upstream"):
        specs = {"clip": clip_log["spec"], "hubert": hubert_log["spec"]}
        runs = _train_all({name: (_speechclip_config(spec, encoders / folder, encoders / "clip", corpus_dir, out / "cache"),
                                  specs, out / "runs" / name)
                           for name, folder in (("pretrained", "hubert"), ("random", "hubert-random"))}, retrain)
    with stage("4. evaluate on the test split"):
        results = _evaluate(out, corpus_dir, encoders / "clip")
    with stage("5. pictures"):
        write_pictures(out, results, clip_log, hubert_log)
    results.update(corpus=corpus, stage_seconds=stage.seconds, total_seconds=round(time.perf_counter() - started, 1),
                   pretraining={"clip": _short(clip_log), "hubert": _short(hubert_log)}, training=runs, quick=quick)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    print(format_demo_table(results))
    print(f"[demo] results: {out / 'results.json'}, pictures: {out / 'pictures'}")
    return results


def _short(log: dict) -> dict:
    return {k: v for k, v in log.items() if k != "losses"}


def _evaluate(out: Path, corpus_dir: Path, clip_dir: Path) -> dict:
    test = read_dataset("manifest", str(corpus_dir), "test")
    results = {}
    for name in ("pretrained", "random"):
        model = SpeechCLIP.from_pretrained(out / "runs" / name / "final")
        cache = ImageEmbeddingCache(out / "cache", model.clip)
        results[name] = evaluate(model, test, cache)
    clip = FrozenCLIP(str(clip_dir))
    table = image_table(test)
    images = ImageEmbeddingCache(out / "cache", clip).embeddings(table.paths)
    tokens = clip.tokenize([i.text for i in test])
    texts = clip.text_features(tokens["input_ids"], tokens["attention_mask"])
    relevant = torch.tensor(table.caption_rows)[:, None] == torch.arange(len(table.ids))[None, :]
    results["clip_text_to_image"] = recall_at_k(texts, images, relevant)
    results["test"] = {"captions": len(test), "images": len(table.ids), "speakers": len({i.speaker for i in test})}
    return results
