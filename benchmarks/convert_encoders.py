"""Time and peak memory to convert the frozen encoders of a Base-sized released checkpoint.

Builds HuBERT Base (fairseq names: 7 conv layers of 512, 12 layers x 768, FFN 3072, pos conv 128/16) and
CLIP ViT-B/32 (OpenAI names, token table reduced to 8,112 rows + the full 49,408-row table beside it) with
random weights in the real shapes, saves them as one flat tensor file, then converts them in a fresh child
process that memory-maps the file (as the checkpoint reader does) and writes both HF folders.
The child's peak RSS is what the conversion costs; the file size is given beside it.
Usage: python benchmarks/convert_encoders.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.official_layout: the builders the tests use

HUBERT, CLIP = "audio_encoder.encoder.", "clip.model."


def build(path: Path) -> None:
    from tests.official_layout import fairseq_hubert_state, openai_clip_state, reduce_vocabulary

    hubert = fairseq_hubert_state(False, hidden=768, layers=12, ffn=3072, conv_dims=(512,) * 7, pos_kernel=128,
                                  pos_groups=16, final_dim=256, num_labels=504)
    clip = openai_clip_state(vocab=49408, width=512, layers=12, context=77, vision_width=768, vision_layers=12,
                             patch=32, grid=7, embed_dim=512)
    state = {HUBERT + k: v for k, v in hubert.items()}
    state.update({CLIP + k: v for k, v in reduce_vocabulary(clip, range(8112)).items()})
    state["clip.original_text_emb_weight"] = clip["token_embedding.weight"]
    torch.save(state, path)


def rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB. VmHWM belongs to this process's own memory map;
    getrusage's ru_maxrss would carry the parent's peak (building the state) across fork and exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(path: str, out: str) -> None:
    """Runs in a fresh process: load (mmap), convert, save; prints one JSON line of timings and memory."""
    from speechclip.convert.hubert import convert_fairseq_hubert, save_hubert_folder
    from speechclip.convert.openai_clip import convert_openai_clip, openai_clip_tokenizer, save_clip_folder

    torch.set_num_threads(1)
    figures = {"rss_after_imports_mib": rss_mib()}
    started = time.perf_counter()
    state = torch.load(path, mmap=True, weights_only=True)
    t0 = time.perf_counter()
    config, converted, _ = convert_fairseq_hubert(state, HUBERT, False, path)
    save_hubert_folder(config, converted, Path(out) / "hubert", normalize_waveform=False)
    t1 = time.perf_counter()
    del converted
    figures["rss_after_hubert_mib"] = rss_mib()
    config, converted, _ = convert_openai_clip(state, CLIP, state["clip.original_text_emb_weight"], path)
    save_clip_folder(config, converted, openai_clip_tokenizer(), Path(out) / "clip")
    t2 = time.perf_counter()
    figures.update(load_s=t0 - started, hubert_s=t1 - t0, clip_s=t2 - t1, total_s=t2 - started, peak_rss_mib=rss_mib())
    print(json.dumps(figures))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keep", help="write the folders here instead of a temporary directory")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path, out = Path(tmp) / "base_layout.pt", Path(args.keep or tmp) / "converted"
        build(path)
        result = subprocess.run([sys.executable, __file__, "--child", str(path), str(out)], check=True,
                                capture_output=True, text=True)
        figures = json.loads(result.stdout.strip().splitlines()[-1])
        size = path.stat().st_size / 2**20
        folders = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    print(f"Base-sized layout (HuBERT Base + CLIP ViT-B/32, fp32): tensor file {size:.0f} MiB, folders written {folders:.0f} MiB")
    print(f"  load (mmap) {figures['load_s']:.2f} s, HuBERT {figures['hubert_s']:.2f} s, CLIP {figures['clip_s']:.2f} s, "
          f"total {figures['total_s']:.2f} s")
    print(f"  peak RSS {figures['peak_rss_mib']:.0f} MiB (after imports {figures['rss_after_imports_mib']:.0f} MiB, "
          f"after HuBERT {figures['rss_after_hubert_mib']:.0f} MiB) = {figures['peak_rss_mib'] / size:.2f}x the file")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
    else:
        main()
