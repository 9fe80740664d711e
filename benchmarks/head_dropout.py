"""The speech head's dropout on CPU: torch's (ATen's bernoulli_ mask) against `speechclip.dropout.Dropout` (a mask from
16-bit shares of 64-bit random words). Three set-ups, each the head's code of its time:
  torch      nn.Dropout everywhere, torch's attention path (scaled_dot_product_attention's math kernel) -- until stop 31
  heads      dropout.Dropout on activations, torch's attention path for the attention weights -- stops 31-35
  all        also the attention weights, through `attention.MultiheadAttention`'s own computation, and the keyword
             quantizer's products as 2-D ones (the others: batched over the clips, as until stop 35) -- since stop 36

In the demo's run (paired): one `fit` of the demo's pretrained SpeechCLIP run (from a finished demo folder, its
state cache reused, validation off), the head switched among the three set-ups every 10 steps;
median seconds per step of each over the same minutes of the machine. One process per thread count.
A step alone: one forward + backward + Adam step of the demo's hybrid head on random upstream states of the
demo's batch shape (128 clips x 96 frames), bf16 autocast where the CPU has bf16 units, as the demo trains;
each (set-up, threads) pair in its own process (so its peak RSS is its own), interleaved in rounds.
Mask: one dropout call (forward only) on the feed-forward activation's shape (128 x 96 x 512).
Usage: python benchmarks/head_dropout.py [--run runs/demo] [--rounds 3] [--steps 12] [--fit-steps 190]
(after `speechclip demo`)
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import table, timed
from speechclip.pretrain.precision import cpu_has_fast_bf16

HERE = Path(__file__).resolve().parent
BATCH, FRAMES = 128, 96


SETUPS = ("torch", "heads", "all")


def batched_quantizer(self, keywords: torch.Tensor, table: torch.Tensor):
    """KeywordQuantizer.forward until stop 35: (B, K, D) @ (D, V) products, which autograd ran batched over B."""
    import torch.nn.functional as F

    vocab = table[self.vocab_ids]
    cosine = F.normalize(keywords, dim=-1) @ F.normalize(vocab, dim=-1).T.to(keywords.dtype)
    choice = cosine.argmax(-1)
    chosen = vocab[choice]
    if not (self.training and torch.is_grad_enabled()):
        return chosen, self.vocab_ids[choice], cosine
    mixture = (cosine / self.temperature).softmax(-1).to(vocab.dtype) @ vocab
    quantized = chosen + (mixture - mixture.detach()) if self.hard else mixture
    return quantized, self.vocab_ids[choice], cosine


def use_setup(model: torch.nn.Module, setup: str) -> None:
    """Switch `model`'s dropout, attention and quantizer modules to one of SETUPS, in place."""
    from speechclip.attention import MultiheadAttention
    from speechclip.dropout import Dropout
    from speechclip.keywords import KeywordQuantizer

    for module in model.modules():
        if isinstance(module, Dropout):
            module.forward = (torch.nn.Dropout.forward if setup == "torch" else Dropout.forward).__get__(module)
        elif isinstance(module, MultiheadAttention):
            module.forward = (MultiheadAttention.forward if setup == "all" else torch.nn.MultiheadAttention.forward).__get__(module)
        elif isinstance(module, KeywordQuantizer):
            module.forward = (KeywordQuantizer.forward if setup == "all" else batched_quantizer).__get__(module)


def head_step(run: Path, setup: str):
    from demo_threads import head_training_step
    from speechclip.model import SpeechCLIP

    model = SpeechCLIP.from_pretrained(run / "runs" / "pretrained" / "final").train()
    use_setup(model, setup)
    return head_training_step(model, BATCH, FRAMES)


def mask_call(dropout: str):
    from speechclip.dropout import Dropout

    layer = (torch.nn.Dropout(0.1) if dropout == "torch" else Dropout(0.1)).train()  # "heads" and "all": ours
    x = torch.randn(BATCH, FRAMES, 512)
    return lambda: layer(x)


def paired_fit(run: Path, steps: int) -> dict[str, float]:
    """Median s/step of each set-up in one fit of the demo's pretrained run, switched every 10 steps."""
    from lightning.pytorch.callbacks import Callback

    from speechclip.demo.spec import speechclip_config
    from speechclip.demo.train import ReleaseFreeMemory
    from speechclip.train.config import run_config_from_dict
    from speechclip.train.run import fit

    from common import demo_build_spec

    values = speechclip_config(demo_build_spec(run), run / "encoders" / "hubert", run / "encoders" / "clip", run / "corpus", run / "cache")
    values["train"].update(max_steps=steps, val_every_steps=10**6, checkpoint_every_steps=10**6)

    class Switch(Callback):
        def __init__(self):
            self.seconds: dict[str, list[float]] = {setup: [] for setup in SETUPS}

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.kind = SETUPS[(trainer.global_step // 10) % len(SETUPS)]
            use_setup(module, self.kind)
            self.started = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step > 10:  # the first steps warm the allocator and the page cache
                self.seconds[self.kind].append(time.perf_counter() - self.started)

    switch = Switch()
    out = Path(tempfile.mkdtemp(prefix="head_dropout_"))
    try:
        fit(run_config_from_dict(values), out / "run", progress=False, callbacks=[ReleaseFreeMemory(), switch], overwrite=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {kind: statistics.median(seconds) for kind, seconds in switch.seconds.items()}


def worker(threads: int, setup: str, run: Path, steps: int) -> None:
    torch.set_num_threads(threads)
    if setup == "paired":
        print(json.dumps(paired_fit(run, steps)), flush=True)
        return
    step_seconds = timed(head_step(run, setup), steps, warmup=3)
    mask_seconds = timed(mask_call(setup), 20, warmup=2)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"step": step_seconds, "mask": mask_seconds, "peak_mib": peak_mib}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--fit-steps", type=int, default=190)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(int(args.worker[0]), args.worker[1], args.run, args.fit_steps if args.worker[1] == "paired" else args.steps)
    paired = []
    for threads in (2, 1):
        command = [sys.executable, str(HERE / "head_dropout.py"), "--worker", str(threads), "paired", "--run", str(args.run),
                   "--fit-steps", str(args.fit_steps)]
        seconds = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        paired.append((threads, *(f"{1000 * seconds[setup]:.0f}" for setup in SETUPS),
                       f"{seconds['torch'] / seconds['all']:.2f}x", f"{seconds['heads'] / seconds['all']:.2f}x"))
    print(f"in the demo's pretrained run ({args.run}), {args.fit_steps} steps, the set-up switched every 10 steps; median ms/step")
    print(table(paired, ("threads", *SETUPS, "all vs torch", "all vs heads")))
    print()
    setups = [(threads, setup) for threads in (2, 1) for setup in SETUPS]
    results: dict[tuple[int, str], list[dict]] = {setup: [] for setup in setups}
    for _ in range(args.rounds):
        for threads, setup in setups:
            command = [sys.executable, str(HERE / "head_dropout.py"), "--worker", str(threads), setup,
                       "--run", str(args.run), "--steps", str(args.steps)]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[(threads, setup)].append(json.loads(out.strip().splitlines()[-1]))
    median = {setup: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for setup, runs in results.items()}
    rows = []
    for threads, setup in setups:
        m, torch_m = median[(threads, setup)], median[(threads, "torch")]
        spread = [r["step"] * 1000 for r in results[(threads, setup)]]
        rows.append((threads, setup, f"{1000 * m['step']:.0f}",
                     f"{min(spread):.0f}-{max(spread):.0f}", f"{torch_m['step'] / m['step']:.2f}x", f"{1000 * m['mask']:.1f}",
                     f"{m['peak_mib']:.0f}"))
    print(f"demo head training step, batch {BATCH} x {FRAMES} frames, bf16 autocast: {cpu_has_fast_bf16()}; "
          f"median of {args.rounds} processes per set-up (each: median of {args.steps} steps)")
    print(table(rows, ("threads", "set-up", "ms/step", "range over processes", "speed-up", "ms per mask call (128x96x512)",
                       "peak RSS MiB")))


if __name__ == "__main__":
    main()
