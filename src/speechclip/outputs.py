"""What the speech side of the model returns: embeddings, the chosen keywords, and training-only losses."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class KeywordOutput:
    embeds: torch.Tensor  # (B, D_clip) CLIP text-tower output for the quantized keywords
    token_ids: torch.Tensor  # (B, K) CLIP token id chosen for each keyword
    similarity: torch.Tensor  # (B, K, V') cosine similarity of each keyword to the VQ vocabulary
    lengths: torch.Tensor | None = None  # (B,) keywords per utterance (CIF variants); None = all K


@dataclass
class SpeechOutput:
    parallel: torch.Tensor | None  # (B, D_clip) parallel-branch embedding, unnormalised
    cascaded: KeywordOutput | None  # cascaded-branch embedding and chosen keywords
    # training-only auxiliary losses, already weighted (CIF's quantity loss); the trainer adds them
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def embeds(self) -> torch.Tensor:
        """The embedding used for retrieval: parallel when present (hybrid), else cascaded."""
        return self.parallel if self.parallel is not None else self.cascaded.embeds

    def row(self, index: int) -> "SpeechOutput":
        """One utterance of a batched output, kept as a batch of one (its own keywords only)."""
        cascaded = None
        if self.cascaded is not None:
            c = self.cascaded
            n = None if c.lengths is None else int(c.lengths[index])
            cascaded = KeywordOutput(c.embeds[index : index + 1], c.token_ids[index : index + 1, :n],
                                     c.similarity[index : index + 1, :n],
                                     None if c.lengths is None else c.lengths[index : index + 1])
        parallel = self.parallel[index : index + 1] if self.parallel is not None else None
        return SpeechOutput(parallel, cascaded)
