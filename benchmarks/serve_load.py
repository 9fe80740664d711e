"""Load on `speechclip serve`: latency of a 5 s spoken query at 1, 4 and 16 concurrent clients.

Starts the server (the CLI, in its own process, on 127.0.0.1), sends a bounded number of
`POST /search` requests (multipart audio, k=12) per concurrency level from client threads, and reports
p50/p95/max latency, throughput, errors (any answer but 200, 503 included) and the server's RSS.
Client and server share the machine's cores, as they would on a laptop demo.

  python benchmarks/serve_load.py --checkpoint runs/demo/runs/pretrained/final --images runs/demo/corpus/images \
      --clips runs/demo/corpus/test.jsonl
  python benchmarks/serve_load.py --mini     # the demo's architectures with random weights, 2,000 rendered scenes

Goal (issue 15, on the 2-core machine): p95 < 300 ms at 1 client, no errors at 16 clients.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import soundfile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, table  # noqa: E402

QUERY_TEXT = "a big red circle on the left and two small blue squares on the right"
QUERY_SECONDS = 5.0


def five_second_query(out: Path) -> Path:
    """An espeak-ng sentence, repeated and cut to exactly 5.0 s at 16 kHz."""
    from speechclip.data.tts import all_speakers, synthesize

    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        raw = out.with_name("sentence.wav")
        synthesize(QUERY_TEXT, all_speakers()[0], raw)
        speech, rate = soundfile.read(raw, dtype="float32")
        need = int(QUERY_SECONDS * rate)
        soundfile.write(out, np.tile(speech, need // len(speech) + 1)[:need], rate)
    return out


def mini_setup(folder: Path, images: int = 2000) -> tuple[Path, Path]:
    """The demo's model architectures (mini HuBERT 4x128, mini CLIP 3+3x128, hybrid head, 6 keywords) with
    random weights over `images` rendered scenes. Encoders and pictures are cached; the SpeechCLIP itself is
    saved again each run (seeded), so it always matches the encoders as the current code fingerprints them."""
    import torch

    from speechclip import SpeechCLIP, SpeechCLIPConfig
    from speechclip.data.scenes import captions, random_scene, render
    from speechclip.mini_encoders import save_mini_clip, save_mini_speech, train_clip_tokenizer
    from speechclip.pretrain.mini_clip import MiniCLIPSpec, clip_config
    from speechclip.pretrain.mini_hubert import MiniHubertSpec, hubert_config

    clip, hubert, pictures = folder / "clip", folder / "hubert", folder / "images"
    if not (hubert / "config.json").is_file():
        rng, texts = random.Random(0), []
        pictures.mkdir(parents=True, exist_ok=True)
        for i in range(images):
            scene = random_scene(rng)
            render(scene).save(pictures / f"scene_{i:05d}.png")
            texts += captions(scene, rng, 2)
        torch.manual_seed(0)
        tokenizer = train_clip_tokenizer(texts, vocab_size=MiniCLIPSpec().vocab_size)
        save_mini_clip(clip, tokenizer, clip_config(MiniCLIPSpec(), len(tokenizer)))
        save_mini_speech(hubert, hubert_config(MiniHubertSpec()))
    torch.manual_seed(0)
    config = SpeechCLIPConfig(upstream=str(hubert), clip=str(clip), variant="hybrid", cascaded={"num_keywords": 6})
    return SpeechCLIP(config).save_pretrained(folder / "model"), pictures


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(args, port: int, log) -> tuple[subprocess.Popen, float]:
    command = [sys.executable, "-m", "speechclip.cli", "serve", "--checkpoint", str(args.checkpoint),
               "--images", str(args.images), "--port", str(port), "--workers", str(args.workers),
               "--queue", str(args.queue)]
    command += ["--clips", str(args.clips)] if args.clips else []
    command += ["--cache", str(args.cache)] if args.cache else []
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    while True:
        if process.poll() is not None:
            log.seek(0)
            raise SystemExit(f"the server exited with {process.returncode}:\n{log.read().decode()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process, time.perf_counter() - started
        except httpx.TransportError:
            time.sleep(0.2)


def load(url: str, audio: bytes, clients: int, requests: int, pid: int) -> dict:
    """`requests` queries from `clients` threads, each with its own connection; latencies in ms."""
    latencies, errors, lock, counter = [], [], threading.Lock(), iter(range(requests))
    peak, stop = [_rss_mb(pid)], threading.Event()

    def client() -> None:
        with httpx.Client(timeout=60) as http:
            while True:
                with lock:
                    if next(counter, None) is None:
                        return
                started = time.perf_counter()
                try:
                    answer = http.post(url, files={"audio": ("query.wav", audio, "audio/wav")}, data={"k": "12"})
                    ok = answer.status_code == 200
                    failure = None if ok else f"{answer.status_code}: {answer.text[:80]}"
                except httpx.HTTPError as error:
                    failure = f"{type(error).__name__}: {error}"
                elapsed = (time.perf_counter() - started) * 1000
                with lock:
                    (errors.append(failure) if failure else latencies.append(elapsed))

    def watch() -> None:
        while not stop.wait(0.05):
            peak[0] = max(peak[0], _rss_mb(pid))

    watcher = threading.Thread(target=watch)
    watcher.start()
    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    stop.set()
    watcher.join()
    ms = np.array(latencies) if latencies else np.array([float("nan")])
    return {"clients": clients, "requests": requests, "p50": np.percentile(ms, 50), "p95": np.percentile(ms, 95),
            "max": ms.max(), "rate": len(latencies) / wall, "errors": len(errors), "rss": peak[0],
            "first_error": errors[0] if errors else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--images", type=Path)
    parser.add_argument("--clips", type=Path, help="spoken clips to index too (as the demo serves them)")
    parser.add_argument("--mini", action="store_true", help="build and use the demo's architectures, random weights")
    parser.add_argument("--query", type=Path, help="the spoken query (default: a 5 s espeak-ng sentence)")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--requests", type=int, default=64, help="per concurrency level")
    parser.add_argument("--workers", type=int, default=1)  # more overlap decoding with a forward (forwards take turns)
    parser.add_argument("--queue", type=int, default=32)
    parser.add_argument("--cache", type=Path, help="the server's cache (default: beside the images)")
    args = parser.parse_args()
    if args.mini:
        args.checkpoint, args.images = mini_setup(CACHE / "serve-mini")
    if not (args.checkpoint and args.images):
        parser.error("give --checkpoint and --images, or --mini")
    query = args.query or five_second_query(CACHE / "serve-query" / "query-5s.wav")
    audio = query.read_bytes()
    seconds = soundfile.info(query).duration
    port = _free_port()
    with tempfile.TemporaryFile() as log:
        process, startup = start_server(args, port, log)
        try:
            info = httpx.get(f"http://127.0.0.1:{port}/info").json()
            idle = _rss_mb(process.pid)
            url = f"http://127.0.0.1:{port}/search"
            for _ in range(3):  # warm-up: first-call allocations, thread pools
                httpx.post(url, files={"audio": ("query.wav", audio, "audio/wav")}, data={"k": "12"}, timeout=60)
            rows = [load(url, audio, int(c), args.requests, process.pid) for c in args.clients.split(",")]
        finally:
            process.terminate()
            process.wait(10)
    label = "mini (demo architectures, random weights)" if args.mini else str(args.checkpoint)
    print(f"speechclip serve under load: a {seconds:.1f} s spoken query (POST /search, multipart WAV, k=12), "
          f"{args.requests} requests per level")
    print(f"model {label} ({info['variant']}), {info['images']} images, {info['clips']} clips; workers {args.workers}, "
          f"queue {args.queue}; {os.cpu_count()} cores shared by server and clients")
    print(table([(r["clients"], r["requests"], f"{r['p50']:.0f}", f"{r['p95']:.0f}", f"{r['max']:.0f}",
                  f"{r['rate']:.1f}", r["errors"], f"{r['rss']:.0f}") for r in rows],
                ("clients", "requests", "p50 ms", "p95 ms", "max ms", "queries/s", "errors", "server RSS MB (peak)")))
    print(f"server start to /healthz: {startup:.1f} s; idle RSS after start: {idle:.0f} MB")
    for r in rows:
        if r["errors"]:
            print(f"  first error at {r['clients']} clients: {r['first_error']}")
    one = next((r for r in rows if r["clients"] == 1), None)
    many = next((r for r in rows if r["clients"] == 16), None)
    if one:
        print(f"check: p95 at 1 client = {one['p95']:.0f} ms (goal < 300: {'met' if one['p95'] < 300 else 'NOT met'})")
    if many:
        print(f"check: errors at 16 clients = {many['errors']} (goal 0: {'met' if many['errors'] == 0 else 'NOT met'})")


if __name__ == "__main__":
    main()
