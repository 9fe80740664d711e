"""What limits the demo's speech->image recall: the head, or what the frozen upstream gives it?

Trains a parallel head (the library's WeightedLayerSum + ParallelBranch + contrastive loss) on frames
from one of three sources, on a finished demo run's corpus and mini CLIP, and prints test R@1/5/10:
  - `upstream`: the demo's frozen mini HuBERT hidden states (what `speechclip demo` trains on);
  - `mfcc`: the 39-dim MFCC frames the mini HuBERT learned to predict (no pre-training at all);
  - `tokens`: CLIP token embeddings of the transcript (perfect word identity: the head's own ceiling).
A research probe, not part of the product: the demo's head never sees MFCCs or transcripts.

    python benchmarks/head_probe.py --run runs/demo --source upstream --steps 4000
    python benchmarks/head_probe.py --run runs/demo --source tokens --steps 4000
    python benchmarks/head_probe.py --run runs/demo --source mfcc --steps 2000 --layers 2 --pool 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from speechclip.audio import load_audio
from speechclip.branches import ParallelBranch
from speechclip.clip import FrozenCLIP
from speechclip.config import ParallelConfig, SpeechCLIPConfig
from speechclip.data import image_table, read_dataset
from speechclip.image_cache import ImageEmbeddingCache
from speechclip.loss import contrastive_loss
from speechclip.metrics import speech_image_retrieval
from speechclip.pretrain.mini_hubert import MFCC
from speechclip.train.state_cache import pad_states, upstream_states
from speechclip.train.system import warmup_then_linear_decay
from speechclip.upstream import SpeechUpstream, WeightedLayerSum


def frames_of(source: str, items, run: Path, clip: FrozenCLIP) -> list[torch.Tensor]:
    """Per caption: (states, T, D) float16 frames from the chosen source."""
    if source == "upstream":
        lengths = [len(load_audio(i.audio)) for i in items]
        return upstream_states(SpeechUpstream(str(run / "encoders" / "hubert")).eval(), items, lengths, progress=False)
    if source == "mfcc":
        mfcc = MFCC()
        return [mfcc(torch.from_numpy(load_audio(i.audio)))[None].half() for i in items]
    table = clip.token_embedding.detach()
    return [table[torch.tensor(clip.tokenizer(i.text)["input_ids"])][None].half() for i in items]


def pool_frames(frames: torch.Tensor, mask: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Average `size` neighbouring valid frames: (B, T, D) -> (B, ceil(T / size), D)."""
    batch, length, width = frames.shape
    pooled = -(-length // size)
    frames = F.pad(frames * mask[..., None], (0, 0, 0, pooled * size - length)).view(batch, pooled, size, width)
    mask = F.pad(mask, (0, pooled * size - length)).view(batch, pooled, size)
    return frames.sum(2) / mask.sum(2, keepdim=True).clamp(min=1), mask.any(2)


class Probe(nn.Module):
    def __init__(self, states: int, width: int, clip_dim: int, args: argparse.Namespace):
        super().__init__()
        self.featurizer = WeightedLayerSum(states, width)
        self.width_in = nn.Linear(width, args.width) if width != args.width else nn.Identity()
        config = SpeechCLIPConfig(parallel=ParallelConfig(num_layers=args.layers, num_heads=4, ffn_dim=4 * args.width))
        self.head = ParallelBranch(args.width, SimpleNamespace(embed_dim=clip_dim), config)
        self.pool = args.pool

    def forward(self, clips: list[torch.Tensor]) -> torch.Tensor:
        states, mask = pad_states(clips)
        frames = self.width_in(self.featurizer(states))
        if self.pool > 1:
            frames, mask = pool_frames(frames, mask, self.pool)
        return self.head(frames, mask, None).parallel


@torch.no_grad()
def test_recall(probe: Probe, clips, images: torch.Tensor, image_index: torch.Tensor) -> dict:
    probe.eval()
    order = sorted(range(len(clips)), key=lambda i: clips[i].shape[1])
    speech = torch.cat([probe([clips[i] for i in order[k : k + 128]]) for k in range(0, len(order), 128)])
    probe.train()
    result = speech_image_retrieval(speech, images, image_index[order])["speech_to_image"]["recall"]
    return {k: round(100 * v, 1) for k, v in result.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo"))
    parser.add_argument("--source", choices=("upstream", "mfcc", "tokens"), default="upstream")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--pool", type=int, default=1, help="average this many neighbouring frames before the head")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    torch.manual_seed(0)
    clip = FrozenCLIP(str(args.run / "encoders" / "clip"))
    cache = ImageEmbeddingCache(args.run / "cache", clip)
    splits = {}
    for split in ("train", "test"):
        items = read_dataset("manifest", str(args.run / "corpus"), split)
        table = image_table(items)
        splits[split] = (frames_of(args.source, items, args.run, clip), cache.embeddings(table.paths), torch.tensor(table.caption_rows))
    clips, images, index = splits["train"]
    probe = Probe(clips[0].shape[0], clips[0].shape[2], clip.embed_dim, args)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_then_linear_decay(s, warmup, args.steps, 1e-3))
    lengths = torch.tensor([c.shape[1] for c in clips])
    generator = torch.Generator().manual_seed(0)
    scale = torch.tensor(1 / 0.07)
    started = time.perf_counter()
    for step in range(args.steps):  # batches of similar length, as the demo's sampler makes them
        centre = int(torch.randint(0, len(clips), (1,), generator=generator))
        near = (lengths - lengths[centre]).abs().argsort()[: 4 * args.batch_size]
        rows = near[torch.randperm(len(near), generator=generator)[: args.batch_size]]
        loss = contrastive_loss(probe([clips[r] for r in rows]), images[index[rows]], scale, index[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    seconds = time.perf_counter() - started
    print(f"source={args.source} layers={args.layers} pool={args.pool} steps={args.steps}: "
          f"test speech->image R@1/5/10 {test_recall(probe, *splits['test'])} "
          f"(train {len(clips)} captions; {seconds:.0f} s, {1000 * seconds / args.steps:.0f} ms/step)")


if __name__ == "__main__":
    main()
