"""Time and peak memory of `speechclip convert` on a Base-sized released checkpoint.

Builds a SpeechCLIP Base cascaded checkpoint in the official layout and real shapes (HuBERT Base in fairseq
names: 7 conv layers of 512, 12 layers x 768; CLIP ViT-B/32 in OpenAI names with its token table reduced
to 8,112 rows and the full table beside it; the duplicate CLIP under cascaded_branch.clip, stored once as
in the real files; the K = 8 head; the loss buffers), random weights, saved as a Lightning 1.5 `.ckpt`
(tests/official_checkpoints.py). Then converts it in a fresh child process, as `speechclip convert` does
(memory-mapped read, both HF folders, our model assembled and saved, the source hashed), and loads the result.
The child's peak RSS (VmHWM: its own, not the builder's) is the cost of a conversion.
Usage: python benchmarks/convert_checkpoint.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.official_*: the builders the converter's tests use


def build(path: Path) -> None:
    from tests.official_checkpoints import Case, Sizes, _config, official_heads, save_official_checkpoint
    from tests.official_layout import fairseq_hubert_state, openai_clip_state, reduce_vocabulary

    case = Case("base-cascaded", "cascaded")
    hubert = fairseq_hubert_state(False, hidden=768, layers=12, ffn=3072, conv_dims=(512,) * 7, pos_kernel=128,
                                  pos_groups=16, final_dim=256, num_labels=504)
    clip = openai_clip_state(vocab=49408, width=512, layers=12, context=77, vision_width=768, vision_layers=12,
                             patch=32, grid=7, embed_dim=512)
    state = {"audio_encoder.encoder." + k: v for k, v in hubert.items()}
    state.update({"clip.model." + k: v for k, v in reduce_vocabulary(clip, range(8112)).items()})
    state["clip.original_text_emb_weight"] = clip["token_embedding.weight"]
    state.update({"cascaded_branch." + k: v for k, v in state.items() if k.startswith("clip.")})  # same tensors
    eye = torch.eye(256, dtype=torch.bool)
    state.update({"criterion.eye_mat": eye, "criterion.neg_eye_mat": ~eye, "criterion.eye_mat_fl": eye.float()})
    state.update(official_heads(case, Sizes(width=768, clip_width=512, keywords=8, ffn=3072, layers=12)))
    config = _config(case, trainable_temperature=False)
    config["model_settings"]["cascaded_branch"]["transformer_args"].update(d_model=768, dim_feedforward=3072)
    save_official_checkpoint(path, state, config)


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no /proc/self/status")


def child(path: str, out: str) -> None:
    from speechclip import SpeechCLIP
    from speechclip.convert import convert_checkpoint
    from speechclip.quiet import quiet_libraries

    quiet_libraries()
    imports = peak_rss_mib()
    started = time.perf_counter()
    folder = convert_checkpoint(path, out)
    converted, convert_peak = time.perf_counter() - started, peak_rss_mib()
    started = time.perf_counter()
    SpeechCLIP.from_pretrained(folder)
    print(json.dumps({"convert_s": converted, "load_s": time.perf_counter() - started, "imports_mib": imports,
                      "convert_peak_mib": convert_peak, "peak_mib": peak_rss_mib()}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "epoch_58-step_6902.ckpt"
        build(path)
        size = path.stat().st_size / 2**20
        runs = []
        for repeat in range(args.repeats):
            out = Path(tmp) / f"converted-{repeat}"
            done = subprocess.run([sys.executable, __file__, "--child", str(path), str(out)], capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"conversion failed:\n{done.stderr[-3000:]}")
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        written = sum(f.stat().st_size for f in (Path(tmp) / "converted-0").rglob("*") if f.is_file()) / 2**20
    spread = lambda key: f"{min(r[key] for r in runs):.1f}-{max(r[key] for r in runs):.1f}"  # noqa: E731
    print(f"Base-sized SpeechCLIP cascaded checkpoint (HuBERT Base + CLIP ViT-B/32 + head, fp32): {size:.0f} MiB; "
          f"folder written {written:.0f} MiB; {args.repeats} conversions, each in a fresh process:")
    print(f"  convert {spread('convert_s')} s, then load the folder {spread('load_s')} s")
    print(f"  peak RSS while converting {spread('convert_peak_mib')} MiB = "
          f"{max(r['convert_peak_mib'] for r in runs) / size:.2f}x the checkpoint (after imports {runs[0]['imports_mib']:.0f} MiB)")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
    else:
        main()
