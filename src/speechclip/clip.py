"""Frozen CLIP (Hugging Face `CLIPModel`): image and text embeddings, the subword table, and the text
tower fed with embeddings instead of token ids (what the cascaded branch needs)."""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image
from torch import nn
from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel
from transformers.masking_utils import create_causal_mask

from .upstream import EncoderError, encoder_config, load_encoder


class FrozenCLIP(nn.Module):
    """CLIP with its tokenizer and image processor, loaded by hub id or local folder; never trained."""

    def __init__(self, name_or_path: str):
        super().__init__()
        config = encoder_config(name_or_path, "model.clip")
        if config.model_type != "clip":
            raise EncoderError(f"model.clip={name_or_path}: a {config.model_type} model, not a CLIP model")
        self.model = load_encoder(CLIPModel.from_pretrained, name_or_path, "model.clip")
        self.tokenizer = load_encoder(AutoTokenizer.from_pretrained, name_or_path, "model.clip")
        self.image_processor = load_encoder(CLIPImageProcessorPil.from_pretrained, name_or_path, "model.clip")  # Pillow
        self.name_or_path = name_or_path
        self.model.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True) -> "FrozenCLIP":
        super().train(mode)
        self.model.eval()
        return self

    @property
    def embed_dim(self) -> int:
        """Dimension of the joint image/text space (D_clip)."""
        return int(self.model.config.projection_dim)

    @property
    def token_embedding(self) -> torch.Tensor:
        """(V, D_tok) subword embedding table of the text tower."""
        return self.model.text_model.embeddings.token_embedding.weight

    @property
    def special_token_ids(self) -> set[int]:
        tok = self.tokenizer
        return {i for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if i is not None}

    @property
    def max_text_tokens(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    def preprocess_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> (B, 3, H, W) pixel values, resized and normalised as CLIP expects."""
        rgb = [image.convert("RGB") for image in images]
        return self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_text_tokens, return_tensors="pt"
        )

    @torch.no_grad()
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D_clip), unnormalised (as `get_image_features`)."""
        pixel_values = pixel_values.to(self.token_embedding.device, self.token_embedding.dtype)
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output

    @torch.no_grad()
    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) token ids -> (B, D_clip), unnormalised."""
        device = self.token_embedding.device
        mask = attention_mask.to(device) if attention_mask is not None else None
        return self.model.get_text_features(input_ids=input_ids.to(device), attention_mask=mask).pooler_output

    def text_features_from_embeddings(self, embeddings: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K, D_tok) subword embeddings -> (B, D_clip): wraps them as BOS k_1..k_n EOS, adds CLIP's
        positional embeddings, runs the causal text transformer and projects the EOS state. `lengths` (B,)
        gives n per row for a variable keyword count (default: all K); the causal mask keeps whatever follows
        a row's EOS out of its result. Gradients flow to `embeddings` (the frozen weights get none). Equals
        `get_text_features` on real tokens."""
        text = self.model.text_model
        batch, count = embeddings.shape[:2]
        table = self.token_embedding
        bos = table[self.tokenizer.bos_token_id].expand(batch, 1, -1)
        eos = table[self.tokenizer.eos_token_id].expand(batch, 1, -1)
        sequence = torch.cat([bos, embeddings.to(table.dtype), eos], dim=1)
        at = torch.full((batch,), count + 1, device=table.device) if lengths is None else lengths.to(table.device) + 1
        if lengths is not None:
            is_eos = torch.arange(count + 2, device=table.device)[None, :] == at[:, None]
            sequence = torch.where(is_eos[..., None], eos, sequence)
        hidden = text.embeddings(inputs_embeds=sequence)
        mask = create_causal_mask(config=text.config, inputs_embeds=hidden, attention_mask=None, cache=None)
        hidden = text.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True).last_hidden_state
        eos_state = text.final_layer_norm(hidden[torch.arange(batch, device=hidden.device), at])
        return self.model.text_projection(eos_state)
