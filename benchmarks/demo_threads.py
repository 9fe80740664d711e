"""Why the demo trains its two SpeechCLIP runs side by side: how its three kinds of step scale with threads.

One training step (forward + backward) of the SpeechCLIP head (the demo's hybrid model from a finished
demo run, on random upstream states of the demo's batch shape, with its Adam step), of the mini HuBERT
and of the mini CLIP (their pre-training steps, as in pretrain_step.py), timed in three set-ups:
  2 threads         one process with every thread (how the demo pre-trains);
  1 thread          one process, one thread;
  1 thread x 2      two such processes at the same time (how the demo trains its two SpeechCLIP runs).
The "pair gain" is the throughput of two 1-thread processes over one 2-thread process: 2 * t(2 threads) /
t(1 thread x 2); above 1, running two jobs side by side beats running them one after the other.
Usage: python benchmarks/demo_threads.py [--run runs/demo] [--steps 15]   (after `speechclip demo`)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from common import table, timed
from speechclip.pretrain.precision import attention_kernel, cpu_autocast, cpu_has_fast_bf16

HERE = Path(__file__).resolve().parent
STEPS = ("SpeechCLIP head (batch 64 x 60 frames)", "mini HuBERT", "mini CLIP")


def head_step(run: Path):
    from speechclip.model import SpeechCLIP

    # a 2.4 s clip (the corpus's median) at the mini HuBERT's 25 Hz
    return head_training_step(SpeechCLIP.from_pretrained(run / "runs" / "pretrained" / "final").train(), batch=64, frames=60)


def head_training_step(model, batch: int, frames: int):
    """One training step of `model`'s head (forward, both branches' contrastive losses, backward, Adam) on random
    upstream states of `batch` clips x `frames` frames, in bf16 autocast where the CPU has bf16 units, as the
    demo trains."""
    from speechclip.loss import contrastive_loss

    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], 1e-3)
    states = torch.randn(model.upstream.num_hidden_states, batch, frames, model.upstream.hidden_size)
    mask = torch.ones(batch, frames, dtype=torch.bool)
    images, ids = torch.randn(batch, model.clip.embed_dim), torch.arange(batch)

    def step():
        with cpu_autocast(cpu_has_fast_bf16()):
            out = model.forward_states(states, mask)
            loss = (contrastive_loss(out.parallel.float(), images, model.scale(), ids)
                    + contrastive_loss(out.cascaded.embeds.float(), images, model.scale(), ids))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def worker(threads: int, run: Path, steps: int) -> None:
    torch.set_num_threads(threads)
    from pretrain_step import clip_step, hubert_step

    bf16 = cpu_has_fast_bf16()  # the demo's own choice of precision and attention kernel on this CPU
    builds = (lambda: head_step(run), lambda: hubert_step(attention_kernel(bf16), bf16), lambda: clip_step(attention_kernel(bf16), bf16))
    print(json.dumps({name: timed(build(), steps, warmup=3) for name, build in zip(STEPS, builds)}), flush=True)


def measure(threads: int, processes: int, args: argparse.Namespace) -> dict[str, float]:
    """Mean seconds per step over `processes` processes started together."""
    command = [sys.executable, str(HERE / "demo_threads.py"), "--worker", str(threads), "--run", str(args.run),
               "--steps", str(args.steps)]
    running = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in running]
    return {name: sum(r[name] for r in results) / len(results) for name in STEPS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo"))
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.run, args.steps)
    two, one, pair = measure(2, 1, args), measure(1, 1, args), measure(1, 2, args)
    rows = [(name, f"{1000 * two[name]:.1f}", f"{1000 * one[name]:.1f}", f"{1000 * pair[name]:.1f}",
             f"{2 * two[name] / pair[name]:.2f}x") for name in STEPS]
    print("ms per step (median), each set-up in its own processes, one after the other")
    print(table(rows, ("step", "2 threads", "1 thread", "1 thread x 2 at once", "pair gain")))


if __name__ == "__main__":
    main()
