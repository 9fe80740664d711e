"""Speech embedding throughput (utterances/s) of `encode_speech` against the bare upstream forward.

Both run on the same clips in the same length-sorted batches: the bare forward is the HF model called
directly (no layer sum, no head); `encode_speech` adds loading-free batching, the weighted layer sum and
the head. Usage: python benchmarks/embed_throughput.py [--clips 64] [--batch 16]

With --stream N: `speechclip embed`'s streaming export (shards on disk, embed.embed_collection) over N
synthetic clips, against what `embed` did before (encode_speech over every clip at once), each in its own
process for its own peak RSS; the stream also at N / 10 clips, to show its memory does not grow with N.
Model: the demo's mini HuBERT architecture (4 x 128, 320x conv stack; random weights) + a parallel head to a
128-d mini CLIP; clips: 0.5-1.5 s of noise and tones, 16 kHz WAV, read from disk.
Usage: python benchmarks/embed_throughput.py --stream 20000 [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import soundfile
import torch

from common import CACHE, base_encoders, corpus_dir, table
from speechclip import SpeechCLIP, SpeechCLIPConfig
from speechclip.audio import load_audio, pad_batch
from speechclip.data import read_dataset
from speechclip.data.items import SpokenCaption


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--stream", type=int, help="clips for the streaming export comparison")
    parser.add_argument("--worker", choices=["stream", "all-at-once"])
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(stream_worker(args.worker, args.stream, args.batch)))
        return
    if args.stream:
        stream_report(args.stream, args.batch)
        return
    upstream, clip = base_encoders()
    items = read_dataset("manifest", corpus_dir(), "test")[: args.clips]
    waves = [torch.from_numpy(load_audio(i.audio)) for i in items]
    model = SpeechCLIP(SpeechCLIPConfig(upstream=upstream, clip=clip, variant="parallel")).eval()
    order = sorted(range(len(waves)), key=lambda i: waves[i].numel())
    batches = [order[s : s + args.batch] for s in range(0, len(order), args.batch)]

    @torch.no_grad()
    def bare():
        for rows in batches:
            batch, lengths = pad_batch([waves[r] for r in rows])
            mask = torch.arange(batch.shape[1])[None, :] < lengths[:, None]
            model.upstream.model(batch, attention_mask=mask.long(), output_hidden_states=True)

    def ours():
        model.encode_speech(waves, batch_size=args.batch)

    functions = {"bare HF upstream forward": bare, "encode_speech": ours}
    for function in functions.values():  # warm-up: first calls allocate and pick kernels
        function()
    best = {name: float("inf") for name in functions}
    for _ in range(2):  # alternate, keep each one's best pass
        for name, function in functions.items():
            started = time.perf_counter()
            function()
            best[name] = min(best[name], time.perf_counter() - started)
    results = {name: len(waves) / seconds for name, seconds in best.items()}
    ratio = results["encode_speech"] / results["bare HF upstream forward"]
    print(f"speech embedding throughput, HuBERT Base architecture, {len(waves)} clips, batch {args.batch}, "
          f"{torch.get_num_threads()} threads")
    print(table([(k, f"{v:.2f}") for k, v in results.items()], ("what", "utterances/s")))
    print(f"encode_speech / bare forward = {ratio:.2f}x (goal >= 0.9)")


def tiny_model_and_clips(count: int) -> tuple[Path, list[SpokenCaption]]:
    """A saved parallel SpeechCLIP on the demo's mini HuBERT architecture, and `count` clips on disk (cached)."""
    from speechclip.mini_encoders import save_mini_clip, save_mini_speech, train_clip_tokenizer
    from speechclip.pretrain.mini_clip import MiniCLIPSpec, clip_config
    from speechclip.pretrain.mini_hubert import MiniHubertSpec, hubert_config

    folder = CACHE / "stream-embed"
    if not (folder / "model" / "config.json").is_file():
        torch.manual_seed(0)
        hubert = save_mini_speech(folder / "hubert", hubert_config(MiniHubertSpec()))
        tokenizer = train_clip_tokenizer(["a red circle", "two blue squares", "a green star"] * 4, vocab_size=300)
        clip = save_mini_clip(folder / "clip", tokenizer, clip_config(MiniCLIPSpec(), len(tokenizer)))
        SpeechCLIP(SpeechCLIPConfig(upstream=str(hubert), clip=str(clip), variant="parallel")).save_pretrained(folder / "model")
    clips = folder / "clips"
    clips.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    items = []
    for i in range(count):
        path = clips / f"{i:06d}.wav"
        seconds, pitch = rng.uniform(0.5, 1.5), rng.uniform(100, 400)
        if not path.is_file():
            t = np.arange(int(16000 * seconds)) / 16000
            wave = 0.3 * np.sin(2 * np.pi * pitch * t) + 0.05 * rng.standard_normal(len(t))
            soundfile.write(str(path), wave.astype(np.float32), 16000, subtype="PCM_16")
        items.append(SpokenCaption(audio=path, image=path, image_id=str(i)))
    return folder / "model", items


def stream_worker(which: str, count: int, batch: int) -> dict:
    """Run in its own process: its ru_maxrss is this export's peak."""
    from speechclip.embed import embed_collection

    model_dir, items = tiny_model_and_clips(count)
    model = SpeechCLIP.from_pretrained(model_dir)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = CACHE / "stream-embed" / f"out-{count}"
    for old in out.glob("*"):
        old.unlink()
    started, cpu = time.perf_counter(), time.process_time()
    if which == "stream":
        embed_collection(model, items, out, what=["speech"], batch_size=batch)
    else:
        model.encode_speech([i.audio for i in items], batch_size=batch)
    seconds = time.perf_counter() - started
    audio = sum(soundfile.info(str(i.audio)).duration for i in items)
    return {"seconds": seconds, "cpu": time.process_time() - cpu, "audio": audio, "before_mb": before,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def stream_report(count: int, batch: int) -> None:
    tiny_model_and_clips(count)  # clips written once, before any timing
    rows = []
    for which, n in (("stream", count // 10), ("stream", count), ("all-at-once", count)):
        done = subprocess.run([sys.executable, __file__, "--worker", which, "--stream", str(n), "--batch", str(batch)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{which} over {n} clips failed:\n{done.stderr[-2000:]}")
        r = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append((which, f"{n:,}", f"{r['audio'] / 3600:.1f}", f"{r['seconds']:.0f}", f"{r['cpu']:.0f}",
                     f"{n / r['seconds']:.0f}", f"{r['peak_mb']:,.0f}", f"{r['before_mb']:,.0f}"))
    print(f"speech embedding export, demo mini HuBERT architecture (random weights), parallel head, batch {batch}, "
          f"{torch.get_num_threads()} threads; stream = shards of 10,000 on disk; all-at-once = encode_speech over every clip (before)")
    print(table(rows, ("export", "clips", "audio h", "wall s", "CPU s", "clips/s", "peak RSS MB", "RSS with model MB")))


if __name__ == "__main__":
    main()
