"""Pre-train a mini HuBERT (HF `HubertModel`) on speech alone, with HuBERT's first-iteration recipe:
k-means cluster ids of MFCC frames (39-dim: 13 MFCC + deltas + delta-deltas) are the targets of masked
prediction. No transcripts and no images are used.

MFCC frames use a 400-sample window and a 320-sample hop with no centring, which is exactly the
receptive field and stride of HuBERT's conv stack, so frame t of the labels is frame t of the model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoModel, HubertConfig, HubertModel, set_seed
from transformers.audio_utils import mel_filter_bank
from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices

from ..audio import SAMPLE_RATE, pad_batch
from ..mini_encoders import mini_speech_config, save_mini_speech
from .precision import ATTENTION, cpu_autocast, cpu_has_fast_bf16

WINDOW, HOP = 400, 320


@dataclass
class MiniHubertSpec:
    width: int = 128
    layers: int = 4
    heads: int = 4
    conv_dims: tuple[int, ...] = (32, 32, 64, 64, 128, 128, 128)  # cheap early layers: they run at 1.6-3.2 kHz
    # GELU's sigmoid approximation x*sigmoid(1.702x) (OpenAI CLIP's activation) in the conv stack: the exact
    # GELU's backward on the conv stack's strided activations made a bf16 CPU step 1.25x slower (130 vs 106 ms)
    conv_activation: str = "quick_gelu"
    clusters: int = 100  # k-means targets (HuBERT iteration 1 uses 100 on MFCC)
    steps: int = 2950
    batch_size: int = 16
    crop_samples: int = 32000  # 2 s random windows
    mask_prob: float = 0.65  # HuBERT: p=0.08 span starts x span 10 ~ half the frames masked
    mask_length: int = 5
    lr: float = 3e-3  # a 4-layer model learns faster at 3e-3 than at 1e-3 (masked accuracy 23.6% vs 20.9% after 1,100 steps)
    dropout: float = 0.0  # a few minutes of training under-fit: dropout only slows it (and bernoulli costs 13% of a CPU step)
    bf16: bool = True  # bf16 autocast where the CPU computes bf16 natively (precision.py)
    seed: int = 0


class MFCC:
    """13 MFCCs + deltas + delta-deltas at HuBERT's frame rate (torch.stft, a mel bank, a DCT)."""

    def __init__(self, mels: int = 40, coefficients: int = 13):
        bank = mel_filter_bank(num_frequency_bins=WINDOW // 2 + 1, num_mel_filters=mels, min_frequency=20.0,
                               max_frequency=SAMPLE_RATE / 2, sampling_rate=SAMPLE_RATE, norm="slaney", mel_scale="slaney")
        self.bank = torch.from_numpy(np.asarray(bank, dtype=np.float32))  # (freq, mels)
        n = np.arange(mels)
        dct = np.cos(np.pi / mels * (n[:, None] + 0.5) * np.arange(coefficients)[None, :]) * math.sqrt(2 / mels)
        dct[:, 0] /= math.sqrt(2)
        self.dct = torch.from_numpy(dct.astype(np.float32))  # (mels, coefficients)
        self.window = torch.hann_window(WINDOW)

    def __call__(self, wave: torch.Tensor) -> torch.Tensor:
        """(S,) samples -> (T, 39) with T = (S - 400) // 320 + 1."""
        spec = torch.stft(wave, n_fft=WINDOW, hop_length=HOP, win_length=WINDOW, window=self.window, center=False,
                          return_complex=True).abs().pow(2).T
        mfcc = torch.log(spec @ self.bank + 1e-6) @ self.dct
        delta = _delta(mfcc)
        return torch.cat([mfcc, delta, _delta(delta)], dim=1)


def _delta(x: torch.Tensor) -> torch.Tensor:
    padded = F.pad(x.T[None], (2, 2), mode="replicate")[0].T
    return (padded[3:-1] - padded[1:-3] + 2 * (padded[4:] - padded[:-4])) / 10


def cluster_labels(waves: Sequence[torch.Tensor], clusters: int, seed: int = 0) -> list[torch.Tensor]:
    """k-means (faiss) on standardised MFCC frames -> a cluster id per frame of every clip."""
    import faiss

    mfcc = MFCC()
    features = [mfcc(w) for w in waves]
    stacked = torch.cat(features)
    mean, std = stacked.mean(0), stacked.std(0) + 1e-5
    data = ((stacked - mean) / std).numpy().astype(np.float32)
    rng = np.random.default_rng(seed)
    sample = data[rng.choice(len(data), min(len(data), 150_000), replace=False)]
    kmeans = faiss.Kmeans(data.shape[1], clusters, niter=20, seed=seed, verbose=False)
    kmeans.train(sample)
    _, assignment = kmeans.index.search(data, 1)
    labels, start = [], 0
    for f in features:
        labels.append(torch.from_numpy(assignment[start : start + len(f), 0].astype(np.int64)))
        start += len(f)
    return labels


def hubert_config(spec: MiniHubertSpec) -> HubertConfig:
    """The mini HuBERT's architecture (also the demo's random-upstream control): layer-norm conv stack, so
    padded batches give each clip the states it has alone."""
    return mini_speech_config("hubert", width=spec.width, layers=spec.layers, heads=spec.heads, group_norm=False,
                              conv_dim=tuple(spec.conv_dims), feat_extract_activation=spec.conv_activation,
                              mask_time_prob=0.05,  # > 0 creates the mask embedding
                              hidden_dropout=spec.dropout, activation_dropout=spec.dropout, attention_dropout=spec.dropout)


def pretrain_mini_hubert(waves: Sequence[torch.Tensor], out: str | Path, spec: MiniHubertSpec = MiniHubertSpec(),
                         progress: bool = True) -> dict:
    """waves: training clips (16 kHz). Writes a HuBERT folder to `out`; returns a log."""
    set_seed(spec.seed)  # torch and numpy: HF's span masking (_compute_mask_indices) draws from numpy's global RNG
    started = time.perf_counter()
    labels = cluster_labels(waves, spec.clusters, spec.seed)
    config = hubert_config(spec)
    model = AutoModel.from_config(config, attn_implementation=ATTENTION).train()
    head = torch.nn.Linear(spec.width, spec.clusters)
    params = list(model.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.01)
    warmup = max(1, spec.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / spec.steps))))
    generator = torch.Generator().manual_seed(spec.seed)
    bf16 = spec.bf16 and cpu_has_fast_bf16()
    losses, accuracies = [], []
    for _ in tqdm(range(spec.steps), desc="mini HuBERT", disable=not progress, unit="step"):
        with cpu_autocast(bf16):
            loss, accuracy = _step(model, head, waves, labels, spec, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        accuracies.append(accuracy)
    save_mini_speech(out, config, model.eval())
    tail = min(50, len(losses))
    return {"steps": spec.steps, "clips": len(waves), "loss_first": losses[0], "loss_last": sum(losses[-tail:]) / tail,
            "masked_accuracy_last": sum(accuracies[-tail:]) / tail, "chance_accuracy": 1 / spec.clusters,
            "bf16": bf16, "losses": losses, "seconds": round(time.perf_counter() - started, 1)}


def _step(model: HubertModel, head: torch.nn.Linear, waves, labels, spec: MiniHubertSpec, generator) -> tuple[torch.Tensor, float]:
    """One masked-prediction step on random 2 s windows; frame-aligned crops of waves and labels."""
    rows = torch.randint(0, len(waves), (spec.batch_size,), generator=generator).tolist()
    clips, targets = [], []
    for row in rows:
        frames = len(labels[row])
        window = max(1, (min(spec.crop_samples, len(waves[row])) - WINDOW) // HOP + 1)
        start = int(torch.randint(0, max(1, frames - window + 1), (1,), generator=generator))
        clips.append(waves[row][start * HOP : start * HOP + (window - 1) * HOP + WINDOW])
        targets.append(labels[row][start : start + window])
    batch, lengths = pad_batch(clips)
    frames = model._get_feat_extract_output_lengths(lengths)
    width = int(frames.max())
    valid = torch.arange(width)[None, :] < frames[:, None]
    mask = _compute_mask_indices((len(rows), width), spec.mask_prob, spec.mask_length, attention_mask=valid.long(), min_masks=2)
    mask = torch.from_numpy(mask) & valid
    sample_mask = torch.arange(batch.shape[1])[None, :] < lengths[:, None]
    hidden = model(batch, attention_mask=sample_mask.long(), mask_time_indices=mask).last_hidden_state
    target = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, t in enumerate(targets):
        target[i, : min(len(t), width)] = t[:width]
    target[~mask] = -100
    logits = head(hidden)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
    picked = target != -100
    accuracy = float((logits.argmax(-1)[picked] == target[picked]).float().mean()) if picked.any() else 0.0
    return loss, accuracy
