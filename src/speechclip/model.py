"""SpeechCLIP: a frozen speech upstream and a frozen CLIP, bridged by small trained heads.

The model returns embeddings and the logit scale, never the loss (that lives in `loss.py`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from .audio import AudioError, AudioInput, pad_batch, to_waveform
from .branches import BRANCHES
from .checkpoint import check_fingerprints, encoder_location, read_config, read_weights, write_checkpoint
from .clip import FrozenCLIP
from .config import ConfigError, SpeechCLIPConfig
from .fingerprint import weights_fingerprint
from .images import load_image
from .outputs import KeywordOutput, SpeechOutput
from .upstream import SpeechUpstream, WeightedLayerSum

FROZEN_PREFIXES = ("upstream.model.", "clip.model.")
__all__ = ["SpeechCLIP", "SpeechOutput", "KeywordOutput"]


class SpeechCLIP(nn.Module):
    def __init__(self, config: SpeechCLIPConfig, upstream: SpeechUpstream | None = None, clip: FrozenCLIP | None = None):
        super().__init__()
        self.config = config
        self.upstream = upstream or SpeechUpstream(config.upstream)
        self.clip = clip or FrozenCLIP(config.clip)
        self._configure_upstream()
        width = self.upstream.hidden_size
        self.featurizer = WeightedLayerSum(self.upstream.num_hidden_states, width, config.normalize_hidden_states)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(config.logit_scale_init)))
        self.logit_scale.requires_grad_(config.learn_logit_scale)
        self.training_step = 0  # set by the trainer each step (set_training_step)
        self._check_keyword_room()
        vocab = self._keyword_vocab() if config.uses_cascaded else None
        self.head = BRANCHES[config.variant](width, self.clip, config, vocab)

    def _configure_upstream(self) -> None:
        """Settings left None follow the upstream (a pre-norm Large model: normalised waveform and states);
        the resolved values are written back, so config.json records what the model computes."""
        config, upstream = self.config, self.upstream
        if config.normalize_waveform is not None:
            upstream.normalize_waveform = config.normalize_waveform
        config.normalize_waveform = upstream.normalize_waveform
        if config.normalize_hidden_states is None:
            config.normalize_hidden_states = upstream.prenorm
        try:
            upstream.final_norm = config.upstream_final_norm
        except ValueError as error:
            raise ConfigError(str(error)) from error

    def _check_keyword_room(self) -> None:
        """BOS + keywords + EOS must fit CLIP's text positions."""
        room = self.clip.max_text_tokens - 2
        if self.config.uses_cif and self.config.cif.max_keywords > room:
            raise ConfigError(f"cif.max_keywords={self.config.cif.max_keywords}: this CLIP reads at most {room} keywords")
        if self.config.variant in ("cascaded", "hybrid") and self.config.cascaded.num_keywords > room:
            raise ConfigError(f"cascaded.num_keywords={self.config.cascaded.num_keywords}: this CLIP reads at most {room} keywords")

    def _keyword_vocab(self) -> torch.Tensor:
        """Token ids the quantizer may pick; BOS, EOS and padding are never allowed."""
        size = self.clip.token_embedding.shape[0]
        chosen = self.config.cascaded.keyword_vocab
        ids = range(size) if chosen is None else chosen
        bad = [i for i in ids if not 0 <= int(i) < size]
        if bad:
            raise ConfigError(f"cascaded.keyword_vocab: ids {bad[:5]} outside CLIP's table of {size}")
        special = self.clip.special_token_ids
        return torch.tensor(sorted({int(i) for i in ids} - special), dtype=torch.long)

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, waves: torch.Tensor, lengths: torch.Tensor) -> SpeechOutput:
        """(B, S) zero-padded 16 kHz waveforms and (B,) lengths -> speech embeddings (and keywords)."""
        states, frame_mask = self.upstream(waves, lengths)
        return self.forward_states(states, frame_mask)

    def forward_states(self, states: torch.Tensor, frame_mask: torch.Tensor) -> SpeechOutput:
        """From the frozen upstream's (L+1, B, T, D) hidden states and (B, T) valid mask: the trainable part
        alone (training reuses cached states when the upstream's input never changes)."""
        return self.head(self.featurizer(states), frame_mask, self.clip, self.training_step)

    def set_training_step(self, step: int) -> None:
        """The optimiser step about to run: schedules inside the model (CIF's length scaling) follow it."""
        self.training_step = int(step)

    def scale(self) -> torch.Tensor:
        """exp(logit scale), clamped as in CLIP."""
        return self.logit_scale.exp().clamp(max=self.config.logit_scale_max)

    # ---- inference API ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @torch.no_grad()
    def speech_outputs(self, audio: AudioInput | Sequence[AudioInput], batch_size: int = 16) -> list[SpeechOutput]:
        """Run the model over clips in batches of similar length (less padding), in input order. A single
        path, string or 1-D array is one clip."""
        waves = [self.waveform(item, i) for i, item in enumerate(_clips(audio))]
        order = sorted(range(len(waves)), key=lambda i: waves[i].numel())
        was_training = self.training
        self.eval()
        results: dict[int, SpeechOutput] = {}
        try:
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                batch, lengths = pad_batch([waves[i] for i in rows])
                output = self(batch.to(self.device), lengths.to(self.device))
                for position, row in enumerate(rows):
                    results[row] = output.row(position)
        finally:
            self.train(was_training)
        return [results[i] for i in range(len(waves))]

    def waveform(self, item: AudioInput, index: int = 0) -> torch.Tensor:
        """One clip as a 16 kHz waveform this model can take: refused, naming the file (or `audio[index]`),
        when shorter than the upstream's receptive field."""
        name = str(item) if isinstance(item, (str, Path)) else f"audio[{index}]"
        wave = to_waveform(item, name=name)
        if wave.numel() < self.upstream.min_samples:
            raise AudioError(f"{name}: too short ({wave.numel()} samples); the upstream needs at least "
                             f"{self.upstream.min_samples} ({self.upstream.min_samples / 16:.0f} ms at 16 kHz)")
        return wave

    def encode_speech(self, audio: AudioInput | Sequence[AudioInput], batch_size: int = 16, normalize: bool = True,
                      branch: str | None = None) -> torch.Tensor:
        """Clips (paths, numpy arrays or tensors at 16 kHz) -> (N, D_clip). `branch` picks "parallel" or
        "cascaded" embeddings of a hybrid model; by default the parallel one."""
        if branch not in (None, "parallel", "cascaded"):
            raise ValueError(f"branch: expected 'parallel' or 'cascaded', got {branch!r}")
        if branch == "cascaded" and not self.config.uses_cascaded:
            raise ValueError(f"branch='cascaded' needs a model with keywords; this one is {self.config.variant}")
        if branch == "parallel" and not self.config.uses_parallel:
            raise ValueError(f"branch='parallel' needs a parallel or hybrid model; this one is {self.config.variant}")
        outputs = self.speech_outputs(audio, batch_size)
        if not outputs:
            return torch.zeros(0, self.clip.embed_dim)
        pick = (lambda o: o.cascaded.embeds) if branch == "cascaded" else (lambda o: o.embeds)
        embeds = torch.cat([pick(o) for o in outputs])
        return nn.functional.normalize(embeds, dim=-1) if normalize else embeds

    @torch.no_grad()
    def encode_image(self, images: Image.Image | str | Path | Sequence[Image.Image | str | Path], normalize: bool = True) -> torch.Tensor:
        """PIL images or image paths -> (N, D_clip). A single image or path is one item."""
        items = [images] if isinstance(images, (str, Path, Image.Image)) else list(images)
        if not items:
            return torch.zeros(0, self.clip.embed_dim)
        pil = [load_image(i) if isinstance(i, (str, Path)) else i for i in items]
        embeds = self.clip.image_features(self.clip.preprocess_images(pil))
        return nn.functional.normalize(embeds, dim=-1) if normalize else embeds

    @torch.no_grad()
    def encode_text(self, texts: str | Sequence[str], normalize: bool = True) -> torch.Tensor:
        """Strings -> (N, D_clip) CLIP text embeddings (for zero-shot speech<->text retrieval). A single
        string is one text (not a sequence of characters)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise ValueError(f"texts[{bad[0]}]: expected a string, got {type(texts[bad[0]]).__name__}")
        if not texts:
            return torch.zeros(0, self.clip.embed_dim)
        tokens = self.clip.tokenize(texts)
        embeds = self.clip.text_features(tokens["input_ids"], tokens["attention_mask"])
        return nn.functional.normalize(embeds, dim=-1) if normalize else embeds

    def keywords(self, audio: AudioInput | Sequence[AudioInput], top_k: int | None = None) -> list[list[list[tuple[str, float]]]]:
        """For each clip, each keyword slot (K fixed, or as many as CIF fired): its `top_k` nearest CLIP
        subwords with cosine scores."""
        if not self.config.uses_cascaded:
            raise ValueError("keywords need a model with a keyword branch (cascaded, hybrid or a *_plus variant); this one is parallel")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k={top_k!r}: must be an integer >= 1")
        result = []
        for output in self.speech_outputs(audio):
            ids, scores = self.nearest_subwords(output, top_k)
            result.append([[(self.subword(t), s) for t, s in zip(i, c)] for i, c in zip(ids[0], scores[0])])
        return result

    def nearest_subwords(self, output: SpeechOutput, top_k: int | None = None) -> tuple[list, list]:
        """Per utterance, per keyword slot, the `top_k` nearest CLIP token ids and their cosine scores:
        nested lists [B][K_b][top_k]. K_b is the same for every utterance with K fixed keywords, and varies
        with the speech for the CIF variants (output.cascaded.lengths)."""
        top_k = top_k or self.config.cascaded.keywords_shown
        vocab_ids = self.head.keywords.quantizer.vocab_ids
        scores, positions = output.cascaded.similarity.topk(min(top_k, len(vocab_ids)), dim=-1)
        ids, scores = vocab_ids[positions].tolist(), scores.tolist()
        lengths = output.cascaded.lengths
        if lengths is not None:
            ids = [row[:n] for row, n in zip(ids, lengths.tolist())]
            scores = [row[:n] for row, n in zip(scores, lengths.tolist())]
        return ids, scores

    def subword(self, token_id: int) -> str:
        """A CLIP token id as readable text (byte-level symbols decoded, the end-of-word marker dropped)."""
        return self.clip.tokenizer.decode([token_id]).strip()

    # ---- persistence -----------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the frozen encoders: layer weights, heads, BatchNorm statistics, temperature."""
        return {k: v.detach().contiguous() for k, v in self.state_dict().items() if not k.startswith(FROZEN_PREFIXES)}

    def encoder_fingerprints(self) -> dict[str, str]:
        return {"upstream": weights_fingerprint(self.upstream.model), "clip": weights_fingerprint(self.clip.model)}

    def save_pretrained(self, folder: str | Path) -> Path:
        """config.json + model.safetensors; local encoder folders are recorded relative to `folder`."""
        return write_checkpoint(Path(folder), self.config, self.trainable_state_dict(), self.encoder_fingerprints())

    @classmethod
    def from_pretrained(cls, folder: str | Path, upstream: str | None = None, clip: str | None = None,
                        check_encoders: bool = True) -> "SpeechCLIP":
        """Load a `save_pretrained` folder. `upstream`/`clip` override where the frozen encoders are read;
        encoders other than the ones the heads were trained on are refused unless `check_encoders=False`."""
        folder = Path(folder)
        config, fingerprints = read_config(folder)
        config.upstream = upstream or encoder_location(config.upstream, folder, "upstream")
        config.clip = clip or encoder_location(config.clip, folder, "clip")
        model = cls(config)
        if check_encoders:
            check_fingerprints(folder, fingerprints, model.encoder_fingerprints())
        model.load_trainable(read_weights(folder, model.trainable_state_dict()))
        return model.eval()

    def load_trainable(self, weights: dict[str, torch.Tensor], source: str = "weights") -> None:
        expected = set(self.trainable_state_dict())
        missing, unexpected = expected - set(weights), set(weights) - expected
        if missing or unexpected:
            raise ValueError(f"{source}: does not match the config (missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
        self.load_state_dict(weights, strict=False)

    def parameter_counts(self) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad)
        return {"trainable": trainable, "frozen": frozen}


def _clips(audio: AudioInput | Sequence[AudioInput]) -> list[AudioInput]:
    """A single clip (path, string, 1-D array or tensor) as a list of one; a sequence as a list."""
    if isinstance(audio, (str, Path)):
        return [audio]
    if isinstance(audio, (np.ndarray, torch.Tensor)) and audio.ndim == 1:
        return [audio]
    return list(audio)
