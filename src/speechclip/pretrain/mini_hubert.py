"""Pre-train a mini HuBERT (HF `HubertModel`) on speech alone, with HuBERT's first-iteration recipe:
k-means cluster ids of MFCC frames are the targets of masked prediction. No transcripts, no images.

The demo's mini HuBERT has HuBERT Base's design (GroupNorm in the first conv layer only, post-norm
Transformer) at 640x downsampling (25 Hz frames): its conv stack was 70% of a training step at 320x with a
LayerNorm in every conv layer, and every later stage (the upstream-state caches, the head's steps, their
disk and page cache) scales with the frame rate (`benchmarks/pretrain_step.py`, RESULTS.md). The targets
are MFCC frames at HuBERT's 50 Hz (400-sample window, 320-sample hop), the `stride // 320` of them that
cover each model frame's receptive field stacked into one vector, then k-means.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
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

from ..audio import SAMPLE_RATE, load_audio
from ..mini_encoders import mini_speech_config, save_mini_speech
from .precision import attention_kernel, cpu_autocast, cpu_has_fast_bf16

WINDOW, HOP = 400, 320  # the MFCC frames: HuBERT's own 25 ms window and 20 ms hop


@dataclass
class MiniHubertSpec:
    width: int = 128
    layers: int = 4
    heads: int = 4
    # conv stack: 640x downsampling; a 20-sample first kernel at stride 10 (1.6 kHz) instead of HuBERT's 10 at
    # stride 5 (3.2 kHz): the first layer's activations were most of the step's memory traffic
    conv_dims: tuple[int, ...] = (32, 64, 128, 128, 128)
    conv_kernels: tuple[int, ...] = (20, 8, 4, 4, 4)
    conv_strides: tuple[int, ...] = (10, 4, 4, 2, 2)
    conv_norm: str = "group"  # HuBERT Base: GroupNorm (per channel, over time) in the first conv layer only
    # (measured on the demo, fp32: the 320x LayerNorm stack it replaced took 2.8x as long to pre-train, and its
    # SpeechCLIP reached 0.629x the ceiling against this one's 0.599x; RESULTS.md "demo stages")
    # GELU's sigmoid approximation x*sigmoid(1.702x) (OpenAI CLIP's activation) in the conv stack: the exact
    # GELU's backward on the conv stack's strided activations made a bf16 CPU step 1.25x slower (130 vs 106 ms)
    conv_activation: str = "quick_gelu"
    clusters: int = 100  # k-means targets (HuBERT iteration 1 uses 100 on MFCC)
    steps: int = 2950
    batch_size: int = 16
    crop_samples: int = 32000  # at most 2 s windows (a batch takes the length of its shortest clip)
    mask_prob: float = 0.65  # HuBERT: p=0.08 span starts x span 10 ~ half the frames masked
    mask_length: int = 5  # frames: 200 ms at 25 Hz, HuBERT's 10 frames at 50 Hz
    lr: float = 3e-3  # a 4-layer model learns faster at 3e-3 than at 1e-3 (masked accuracy 23.6% vs 20.9% after 1,100 steps)
    dropout: float = 0.0  # a few minutes of training under-fit: dropout only slows it (and bernoulli costs 13% of a CPU step)
    bf16: bool = True  # bf16 autocast where the CPU computes bf16 natively (precision.py)
    seed: int = 0

    @property
    def stride(self) -> int:
        return math.prod(self.conv_strides)

    @property
    def receptive_field(self) -> int:
        samples = 1
        for kernel, stride in zip(reversed(self.conv_kernels), reversed(self.conv_strides)):
            samples = (samples - 1) * stride + kernel
        return samples

    def frames(self, samples: int) -> int:
        """Model frames of a clip of `samples` (HF's per-layer conv arithmetic)."""
        for kernel, stride in zip(self.conv_kernels, self.conv_strides):
            samples = (samples - kernel) // stride + 1
        return max(0, samples)


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


def frame_features(mfcc: torch.Tensor, samples: int, spec: MiniHubertSpec) -> torch.Tensor:
    """(T50, 39) MFCC frames of a clip -> (T, 39 * stride // 320): per model frame, the MFCC frames around the
    centre of its receptive field, stacked (at 320x: exactly frame t, as HuBERT's labels)."""
    group = spec.stride // HOP
    frames = spec.frames(samples)
    centres = torch.arange(frames) * spec.stride + spec.receptive_field / 2  # in samples
    first = torch.round((centres - WINDOW / 2) / HOP - (group - 1) / 2).long()
    index = (first[:, None] + torch.arange(group)[None, :]).clamp(0, len(mfcc) - 1)
    return mfcc[index].reshape(frames, -1)


@contextmanager
def one_thread():
    """torch on one thread for the block (then as before)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class ClipBank:
    """Every training clip as 16-bit samples in one array (half the memory of float32 tensors, no per-clip
    Python objects): 10 h of speech is 1.1 GiB."""

    def __init__(self, clips: Sequence[str | Path | torch.Tensor]):
        pieces = [self._int16(c) for c in clips]
        self.lengths = np.array([len(p) for p in pieces], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        self.samples = np.concatenate(pieces) if pieces else np.zeros(0, np.int16)

    @staticmethod
    def _int16(clip: str | Path | torch.Tensor) -> np.ndarray:
        wave = load_audio(clip) if isinstance(clip, (str, Path)) else np.asarray(clip, dtype=np.float32)
        return np.clip(np.round(wave * 32768), -32768, 32767).astype(np.int16)

    def __len__(self) -> int:
        return len(self.lengths)

    def wave(self, row: int, start: int = 0, length: int | None = None) -> torch.Tensor:
        begin = int(self.offsets[row]) + start
        end = int(self.offsets[row] + self.lengths[row]) if length is None else begin + length
        return torch.from_numpy(self.samples[begin:end].astype(np.float32) / 32768)


def cluster_labels(bank: ClipBank, spec: MiniHubertSpec) -> list[torch.Tensor]:
    """k-means (faiss) on standardised stacked MFCC frames -> a cluster id per model frame of every clip."""
    import faiss

    mfcc = MFCC()
    with one_thread():  # tiny per-clip ops: a second OpenMP thread made each clip 100x slower on a busy 2-core CPU
        features = [frame_features(mfcc(bank.wave(row)), int(bank.lengths[row]), spec) for row in range(len(bank))]
    counts = [len(f) for f in features]
    data = torch.cat(features).numpy()
    del features
    data -= data.mean(0)
    data /= data.std(0) + 1e-5
    rng = np.random.default_rng(spec.seed)
    sample = data[rng.choice(len(data), min(len(data), 150_000), replace=False)]
    kmeans = faiss.Kmeans(data.shape[1], spec.clusters, niter=20, seed=spec.seed, verbose=False)
    kmeans.train(sample)
    _, assignment = kmeans.index.search(data, 1)
    labels, start = [], 0
    for count in counts:
        labels.append(torch.from_numpy(assignment[start : start + count, 0].astype(np.int64)))
        start += count
    return labels


def hubert_config(spec: MiniHubertSpec) -> HubertConfig:
    """The mini HuBERT's architecture (also the demo's random-upstream control)."""
    return mini_speech_config("hubert", width=spec.width, layers=spec.layers, heads=spec.heads,
                              group_norm=spec.conv_norm == "group", conv_dim=tuple(spec.conv_dims),
                              conv_kernel=tuple(spec.conv_kernels), conv_stride=tuple(spec.conv_strides),
                              feat_extract_activation=spec.conv_activation,
                              mask_time_prob=0.05,  # > 0 creates the mask embedding
                              hidden_dropout=spec.dropout, activation_dropout=spec.dropout, attention_dropout=spec.dropout)


def without_waveform_gradient(model: HubertModel) -> HubertModel:
    """Stop backward at the conv stack's first layer. HF's feature encoder marks the input waveform as
    requiring grad in training (for gradient checkpointing, which pre-training does not use), so every step
    also computed the gradient of the loss with respect to the 16 kHz samples, which nothing reads: 3-13 %
    of a demo pre-training step in bf16, 8 % in fp32 (RESULTS.md, stop 31). The parameters' gradients are the same bit for
    bit (tests/test_pretrain.py)."""
    if hasattr(model.feature_extractor, "_requires_grad"):  # a transformers without it: tests/test_pretrain.py fails
        model.feature_extractor._requires_grad = False
    return model


def pretrain_mini_hubert(clips: Sequence[str | Path | torch.Tensor], out: str | Path, spec: MiniHubertSpec = MiniHubertSpec(),
                         progress: bool = True) -> dict:
    """clips: training clips (paths or 16 kHz waveforms). Writes a HuBERT folder to `out`; returns a log."""
    if spec.stride % HOP:
        raise ValueError(f"conv_strides: the total stride {spec.stride} must be a multiple of the MFCC hop {HOP}")
    set_seed(spec.seed)  # torch and numpy: HF's span masking (_compute_mask_indices) draws from numpy's global RNG
    started = time.perf_counter()
    bank = ClipBank(clips)
    labels = cluster_labels(bank, spec)
    config = hubert_config(spec)
    bf16 = spec.bf16 and cpu_has_fast_bf16()
    model = without_waveform_gradient(AutoModel.from_config(config, attn_implementation=attention_kernel(bf16)).train())
    head = torch.nn.Linear(spec.width, spec.clusters)
    params = list(model.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.01)
    warmup = max(1, spec.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / spec.steps))))
    batches = _Batches(bank, labels, spec)
    losses, accuracies = [], []
    for _ in tqdm(range(spec.steps), desc="mini HuBERT", disable=not progress, unit="step"):
        waves, targets = batches.next()
        with cpu_autocast(bf16):
            loss, accuracy = _step(model, head, waves, targets, spec)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        accuracies.append(accuracy)
    save_mini_speech(out, config, model.eval())
    tail = min(50, len(losses))
    return {"steps": spec.steps, "clips": len(bank), "loss_first": losses[0], "loss_last": sum(losses[-tail:]) / tail,
            "masked_accuracy_last": sum(accuracies[-tail:]) / tail, "chance_accuracy": 1 / spec.clusters,
            "bf16": bf16, "losses": losses, "seconds": round(time.perf_counter() - started, 1)}


class _Batches:
    """Random batches of clips of similar length, every clip cut to one length (at most `crop_samples`) at a
    random frame-aligned start, so the batch has no padding: GroupNorm over time then sees only speech."""

    def __init__(self, bank: ClipBank, labels: list[torch.Tensor], spec: MiniHubertSpec):
        self.bank, self.labels, self.spec = bank, labels, spec
        self.by_length = np.argsort(bank.lengths, kind="stable")
        self.generator = torch.Generator().manual_seed(spec.seed)

    def _randint(self, high: int) -> int:
        return int(torch.randint(0, max(1, high), (1,), generator=self.generator))

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        spec, size = self.spec, self.spec.batch_size
        centre = self._randint(len(self.by_length))
        low = min(max(0, centre - 2 * size), max(0, len(self.by_length) - 4 * size))
        near = self.by_length[low : low + 4 * size]
        rows = [int(near[i]) for i in torch.randperm(len(near), generator=self.generator)[:size]]
        length = int(min(spec.crop_samples, min(self.bank.lengths[r] for r in rows)))
        frames = spec.frames(length)
        waves, targets = [], []
        for row in rows:
            first = self._randint((int(self.bank.lengths[row]) - length) // spec.stride + 1)
            waves.append(self.bank.wave(row, first * spec.stride, length))
            targets.append(self.labels[row][first : first + frames])
        return torch.stack(waves), torch.stack(targets)


def _step(model: HubertModel, head: torch.nn.Linear, waves: torch.Tensor, targets: torch.Tensor,
          spec: MiniHubertSpec) -> tuple[torch.Tensor, float]:
    """One masked-prediction step: (B, S) equal-length windows and their (B, T) frame targets."""
    batch, width = targets.shape
    mask = torch.from_numpy(_compute_mask_indices((batch, width), spec.mask_prob, spec.mask_length, min_masks=2))
    hidden = model(waves, mask_time_indices=mask).last_hidden_state
    target = targets.masked_fill(~mask, -100)
    logits = head(hidden)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
    picked = target != -100
    accuracy = float((logits.argmax(-1)[picked] == target[picked]).float().mean()) if picked.any() else 0.0
    return loss, accuracy
