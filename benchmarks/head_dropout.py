"""The speech head's dropout on CPU: torch's nn.Dropout (ATen's bernoulli_ mask) against `attention.Dropout`
(a mask from 16-bit shares of 64-bit random words), in the demo's training step and alone.

Step: one forward + backward + Adam step of the demo's hybrid head (from a finished demo run: two shared
Transformer layers, the MLP projection, the keyword path through the frozen mini CLIP text tower) on random
upstream states of the demo's batch shape (128 clips x 96 frames), bf16 autocast where the CPU has bf16 units,
as the demo trains. Each (dropout, threads) set-up runs in its own process (its peak RSS is its own), the
set-ups interleaved in rounds so that their ratio comes from the same minutes of the machine; the attention
weights' dropout inside nn.MultiheadAttention is torch's in both.
Mask: one dropout call (forward only) on the feed-forward activation's shape (128 x 96 x 512).
Usage: python benchmarks/head_dropout.py [--run runs/demo] [--rounds 3] [--steps 12]   (after `speechclip demo`)
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from common import table, timed
from speechclip.pretrain.precision import cpu_autocast, cpu_has_fast_bf16

HERE = Path(__file__).resolve().parent
BATCH, FRAMES = 128, 96


def head_step(run: Path, dropout: str):
    from speechclip.attention import Dropout
    from speechclip.loss import contrastive_loss
    from speechclip.model import SpeechCLIP

    model = SpeechCLIP.from_pretrained(run / "runs" / "pretrained" / "final").train()
    if dropout == "torch":
        for parent in list(model.modules()):
            for name, child in parent.named_children():
                if isinstance(child, Dropout):
                    setattr(parent, name, torch.nn.Dropout(child.p))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], 1e-3)
    states = torch.randn(model.upstream.num_hidden_states, BATCH, FRAMES, model.upstream.hidden_size)
    mask = torch.ones(BATCH, FRAMES, dtype=torch.bool)
    images, ids = torch.randn(BATCH, model.clip.embed_dim), torch.arange(BATCH)

    def step():
        with cpu_autocast(cpu_has_fast_bf16()):
            out = model.forward_states(states, mask)
            loss = (contrastive_loss(out.parallel.float(), images, model.scale(), ids)
                    + contrastive_loss(out.cascaded.embeds.float(), images, model.scale(), ids))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def mask_call(dropout: str):
    from speechclip.attention import Dropout

    layer = (torch.nn.Dropout(0.1) if dropout == "torch" else Dropout(0.1)).train()
    x = torch.randn(BATCH, FRAMES, 512)
    return lambda: layer(x)


def worker(threads: int, dropout: str, run: Path, steps: int) -> None:
    torch.set_num_threads(threads)
    step_seconds = timed(head_step(run, dropout), steps, warmup=3)
    mask_seconds = timed(mask_call(dropout), 20, warmup=2)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"step": step_seconds, "mask": mask_seconds, "peak_mib": peak_mib}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(int(args.worker[0]), args.worker[1], args.run, args.steps)
    setups = [(threads, dropout) for threads in (2, 1) for dropout in ("torch", "ours")]
    results: dict[tuple[int, str], list[dict]] = {setup: [] for setup in setups}
    for _ in range(args.rounds):
        for threads, dropout in setups:
            command = [sys.executable, str(HERE / "head_dropout.py"), "--worker", str(threads), dropout,
                       "--run", str(args.run), "--steps", str(args.steps)]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[(threads, dropout)].append(json.loads(out.strip().splitlines()[-1]))
    median = {setup: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for setup, runs in results.items()}
    rows = []
    for threads, dropout in setups:
        m, torch_m = median[(threads, dropout)], median[(threads, "torch")]
        spread = [r["step"] * 1000 for r in results[(threads, dropout)]]
        rows.append((threads, "torch nn.Dropout" if dropout == "torch" else "attention.Dropout", f"{1000 * m['step']:.0f}",
                     f"{min(spread):.0f}-{max(spread):.0f}", f"{torch_m['step'] / m['step']:.2f}x", f"{1000 * m['mask']:.1f}",
                     f"{m['peak_mib']:.0f}"))
    print(f"demo head training step, batch {BATCH} x {FRAMES} frames, bf16 autocast: {cpu_has_fast_bf16()}; "
          f"median of {args.rounds} processes per set-up (each: median of {args.steps} steps)")
    print(table(rows, ("threads", "dropout", "ms/step", "range over processes", "speed-up", "ms per mask call (128x96x512)",
                       "peak RSS MiB")))


if __name__ == "__main__":
    main()
