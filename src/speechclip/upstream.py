"""Frozen self-supervised speech model (HuBERT, WavLM, wav2vec 2.0, data2vec-audio) + layer weighting.

The upstream returns all L+1 hidden states with a frame padding mask (as s3prl's upstreams do); the
`WeightedLayerSum` featurizer learns a softmax weighting of them (HF's `use_weighted_layer_sum`).
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel
from transformers.utils import logging as hf_logging

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
SPEECH_MODELS = "HuBERT, WavLM, wav2vec 2.0, data2vec-audio"
CONV_CHUNK_BYTES = 2 << 20  # the first conv layer's fp32 output per call of a GroupNorm conv stack (_mask_conv_group_norm)


class EncoderError(ValueError):
    """A frozen encoder cannot be loaded from what the config names; the message names the field and why."""


def encoder_config(name: str, field: str) -> Any:
    """The encoder's Hugging Face config, read before its weights so that a missing folder, a folder without a
    model and a hub id that cannot be fetched each get one line naming `field` (transformers' own errors
    are a hub-id syntax complaint, a network traceback or a TypeError)."""
    folder = Path(name).expanduser().is_dir()
    if not folder and (not _HUB_ID.fullmatch(name) or name.startswith(".")):
        raise EncoderError(f"{field}={name}: no such folder")
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        if folder:
            raise EncoderError(f"{field}={name}: not a Hugging Face model folder ({_first_line(error)})") from None
        raise EncoderError(f"{field}={name!r}: no such folder, and the hub id cannot be fetched (offline, or no such "
                           "model on the Hub); give a model folder or a reachable hub id") from None


def load_encoder(load: Callable[[str], Any], name: str, field: str) -> Any:
    """`load(name)` (a `from_pretrained`) with a file it cannot read (weights, tokenizer) named in one line, and
    without transformers' weight-loading bars: every SpeechCLIP model loads two frozen encoders, so a notebook
    would get two bars per model. The caller's own setting is restored after (its other loads keep their bars)."""
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return load(name)
    except (OSError, ValueError, TypeError) as error:
        raise EncoderError(f"{field}={name}: cannot load it ({_first_line(error)})") from None
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class SpeechUpstream(nn.Module):
    """A frozen Hugging Face speech SSL model, loaded by hub id or local folder with `from_pretrained`.

    Batching must not change a clip's features, so: the transformer always gets an attention mask, and
    models whose first conv layer uses GroupNorm over time (HuBERT/wav2vec2 Base) take that layer's
    statistics over each clip's valid frames only (`_masked_group_norm_conv`), because zero padding would
    shift them; the later conv layers' valid frames read valid frames only, so the stack runs batched.
    data2vec-audio's stacked positional convolutions carry padding into valid frames, so it runs whole
    once per distinct length (length-grouped batches keep that cheap).
    """

    def __init__(self, name_or_path: str, normalize_waveform: bool | None = None, final_norm: bool = False):
        super().__init__()
        config = encoder_config(name_or_path, "model.upstream")
        if getattr(config, "conv_kernel", None) is None:  # the conv feature encoder every supported model has
            raise EncoderError(f"model.upstream={name_or_path}: a {config.model_type} model, not a speech model "
                               f"({SPEECH_MODELS})")
        self.model = load_encoder(AutoModel.from_pretrained, name_or_path, "model.upstream")
        self.name_or_path = name_or_path
        self.model.requires_grad_(False)
        self.model.eval()
        # None = as the model was pre-trained: pre-norm (Large) models on zero-mean unit-variance waveforms
        self.normalize_waveform = self.prenorm if normalize_waveform is None else bool(normalize_waveform)
        self.final_norm = final_norm
        # what one forward call hands to the hooks inside the HF model, per thread: a server runs calls at once
        self._calls: dict[int, dict[str, torch.Tensor]] = {}
        if self.prenorm:
            self.model.encoder.layers[-1].register_forward_hook(self._keep_last_layer_output)
        self._whole_model_per_length = self.model.config.model_type == "data2vec-audio"
        if getattr(self.model.config, "feat_extract_norm", "layer") == "group":
            if _per_channel_group_norm(self.model.feature_extractor.conv_layers[0]):
                self._mask_conv_group_norm()
            else:  # a GroupNorm conv layer of another shape: exact, one length at a time
                self._whole_model_per_length = True

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def prenorm(self) -> bool:
        """Pre-norm ("stable layer norm") Transformer, as HuBERT / WavLM / wav2vec 2.0 Large: its last hidden
        state passes through a final encoder LayerNorm that the official SpeechCLIP forward leaves out."""
        return bool(getattr(self.model.config, "do_stable_layer_norm", False))

    @property
    def final_norm(self) -> bool:
        return self._final_norm

    @final_norm.setter
    def final_norm(self, value: bool) -> None:
        if value and not self.prenorm:
            raise ValueError(f"upstream_final_norm: {self.name_or_path} is a post-norm model, it has no final LayerNorm")
        self._final_norm = bool(value)

    def _keep_last_layer_output(self, module: nn.Module, inputs: tuple, output) -> None:
        self._call()["last_layer"] = output[0] if isinstance(output, tuple) else output

    def _call(self) -> dict[str, torch.Tensor]:
        return self._calls.setdefault(threading.get_ident(), {})

    @property
    def num_hidden_states(self) -> int:
        """L transformer layers + the input to the first one."""
        return int(self.model.config.num_hidden_layers) + 1

    def train(self, mode: bool = True) -> "SpeechUpstream":
        """Stay in eval mode: dropout and LayerDrop of a frozen model must never act."""
        super().train(mode)
        self.model.eval()
        return self

    @property
    def min_samples(self) -> int:
        """The shortest clip that yields one frame: the conv stack's receptive field (400 samples, 25 ms, for
        HuBERT/WavLM/wav2vec 2.0). Shorter clips cannot be encoded; callers refuse them naming the clip."""
        samples = 1
        for kernel, stride in zip(reversed(self.model.config.conv_kernel), reversed(self.model.config.conv_stride)):
            samples = (samples - 1) * stride + kernel
        return samples

    def frame_lengths(self, sample_lengths: torch.Tensor) -> torch.Tensor:
        """Samples -> valid output frames (the conv stack's receptive-field arithmetic)."""
        return self.model._get_feat_extract_output_lengths(sample_lengths).long()

    @torch.no_grad()
    def forward(self, waves: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S) zero-padded 16 kHz samples, (B,) lengths -> (L+1, B, T, D) states, (B, T) bool valid mask."""
        sample_mask = torch.arange(waves.shape[1], device=waves.device)[None, :] < lengths[:, None].to(waves.device)
        if self.normalize_waveform:
            waves = _normalize(waves, sample_mask)
        if self._whole_model_per_length:
            states = self._states_per_length(waves, lengths)
        else:
            states = self._states(waves, lengths, sample_mask)
        frames = self.frame_lengths(lengths).to(states.device)
        frame_mask = torch.arange(states.shape[2], device=states.device)[None, :] < frames[:, None]
        return states, frame_mask

    def _states(self, waves: torch.Tensor, lengths: torch.Tensor, sample_mask: torch.Tensor) -> torch.Tensor:
        self._call()["lengths"] = lengths
        try:
            output = self.model(waves, attention_mask=sample_mask.long(), output_hidden_states=True)
            return self._stack(output)
        finally:
            self._calls.pop(threading.get_ident(), None)

    def _stack(self, output) -> torch.Tensor:
        """(L+1, B, T, D). A pre-norm model's last state is taken from its last layer (before the final
        LayerNorm) or, with `final_norm`, after it: transformers versions differ in which one
        `hidden_states[-1]` holds, so neither is left to it."""
        states = list(output.hidden_states)
        if self.prenorm:
            states[-1] = output.last_hidden_state if self.final_norm else self._call().pop("last_layer")
        return torch.stack(states)

    def _states_per_length(self, waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        frames = int(self.frame_lengths(lengths.max()))
        states = None
        for length, rows in _rows_by_length(lengths):
            output = self.model(waves[rows, :length], output_hidden_states=True)
            group = self._stack(output)
            if states is None:
                states = group.new_zeros(group.shape[0], len(lengths), frames, group.shape[-1])
            states[:, rows.to(group.device), : group.shape[2]] = group
        return states

    def _mask_conv_group_norm(self) -> None:
        """Run the conv stack on several clips a call, its first layer's GroupNorm over each clip's valid frames,
        instead of once per distinct clip length (nearly every clip, in real speech). Rows go in chunks whose
        first-layer output fits CONV_CHUNK_BYTES: a whole batch's, its size changing with every batch, made
        the C heap grow (2.5 GB peak against 1.0 in an fp32 cache build of 2,000 clips), and small chunks are
        faster too. The demo's mini HuBERT: 2-11 clips a call, a state-cache build 1.7-1.9x faster; HuBERT Base:
        one clip a call, through the model's own layers as before (benchmarks/conv_batching.py)."""
        encoder = self.model.feature_extractor
        batched_forward = encoder.forward

        def forward(input_values: torch.Tensor) -> torch.Tensor:
            lengths = self._call().get("lengths")
            if lengths is None or bool((lengths == input_values.shape[1]).all()):
                return batched_forward(input_values)
            first, *rest = encoder.conv_layers
            row_bytes = first.conv.out_channels * (input_values.shape[1] // first.conv.stride[0]) * 4
            rows = max(1, CONV_CHUNK_BYTES // row_bytes)
            frames = int(self.frame_lengths(torch.tensor(input_values.shape[1])))
            parts = []
            for start in range(0, len(lengths), rows):
                chunk = slice(start, start + rows)
                if rows == 1:  # one clip a call: the model's own layers on the clip cut to its length
                    hidden = batched_forward(input_values[chunk, : int(lengths[start])])
                    parts.append(F.pad(hidden, (0, frames - hidden.shape[-1])))
                    continue
                hidden = _masked_group_norm_conv(first, input_values[chunk, None], lengths[chunk].to(input_values.device))
                for layer in rest:
                    hidden = layer(hidden)
                parts.append(hidden)
            return torch.cat(parts)

        encoder.forward = forward


def _per_channel_group_norm(layer: nn.Module) -> bool:
    """Whether a conv layer is conv -> GroupNorm with a group per channel (over time) -> activation, as the
    first layer of HuBERT / wav2vec 2.0 / WavLM Base is in transformers."""
    norm, conv = getattr(layer, "layer_norm", None), getattr(layer, "conv", None)
    return (isinstance(norm, nn.GroupNorm) and isinstance(conv, nn.Conv1d) and hasattr(layer, "activation")
            and norm.num_groups == norm.num_channels == conv.out_channels)


def _masked_group_norm_conv(layer: nn.Module, waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """`layer` (conv, per-channel GroupNorm, activation) on zero-padded (B, 1, S) waves of `lengths` samples, the
    norm's mean and variance taken over each clip's valid frames: what the layer gives each clip alone, up to
    rounding. Frames past a clip's end hold values that later layers' valid frames never read."""
    hidden = layer.conv(waves).float()  # autocast runs GroupNorm in fp32 too
    kernel, stride = layer.conv.kernel_size[0], layer.conv.stride[0]
    frames = ((lengths - kernel) // stride + 1).tolist()
    stats = [torch.var_mean(hidden[row, :, :count], dim=-1, correction=0) for row, count in enumerate(frames)]
    variance, mean = (torch.stack(parts) for parts in zip(*stats))  # (B, C) each
    norm = layer.layer_norm
    scale = norm.weight * torch.rsqrt(variance + norm.eps)
    return layer.activation(hidden.sub_(mean[..., None]).mul_(scale[..., None]).add_(norm.bias[:, None]))


def _rows_by_length(lengths: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """Each distinct clip length with the batch rows that have it (the unit of exact batching)."""
    return [(length, (lengths == length).nonzero().flatten()) for length in lengths.unique().tolist()]


def _normalize(waves: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance over each clip's valid samples: `F.layer_norm(wave, wave.shape)` per clip (eps
    1e-5), as fairseq pre-trained HuBERT Large and as SpeechCLIP / SpeechCLIP+ feed their upstreams."""
    count = mask.sum(1, keepdim=True).clamp(min=1)
    mean = (waves * mask).sum(1, keepdim=True) / count
    var = (((waves - mean) * mask) ** 2).sum(1, keepdim=True) / count
    return ((waves - mean) / torch.sqrt(var + 1e-5)) * mask


class WeightedLayerSum(nn.Module):
    """Softmax-weighted sum over the upstream's hidden states; weights start equal (zeros before softmax)."""

    def __init__(self, num_states: int, hidden_size: int, normalize_states: bool = False):
        super().__init__()
        self.layer_weights = nn.Parameter(torch.zeros(num_states))
        self.normalize_states = normalize_states
        self.hidden_size = hidden_size

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """(L+1, B, T, D) -> (B, T, D)."""
        if states.shape[0] != self.layer_weights.numel():
            raise ValueError(f"expected {self.layer_weights.numel()} hidden states, got {states.shape[0]}")
        if self.normalize_states:
            states = F.layer_norm(states, (self.hidden_size,))
        weights = self.layer_weights.softmax(0).to(states.dtype)
        return torch.einsum("l,lbtd->btd", weights, states)
