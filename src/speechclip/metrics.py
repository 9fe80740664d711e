"""Retrieval recall@K (the paper's protocols) and keyword hit rate, each with its chance level."""

from __future__ import annotations

from math import comb
from typing import Sequence

import torch
import torch.nn.functional as F

KS = (1, 5, 10)


def _hits(similarity: torch.Tensor, relevant: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """similarity (Q, N), relevant (Q, N) bool -> fraction of queries with a relevant item in the top K."""
    order = similarity.argsort(dim=1, descending=True)
    ranked = relevant.gather(1, order)
    first = torch.where(ranked.any(1), ranked.float().argmax(1), torch.full((len(ranked),), ranked.shape[1]))
    return {k: float((first < k).float().mean()) for k in ks}


def _chance(relevant: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Expected recall@K of a random ranking: 1 - C(N - r, K) / C(N, K) per query, averaged."""
    n = relevant.shape[1]
    counts = relevant.sum(1).tolist()
    return {k: sum(1 - comb(n - r, k) / comb(n, k) for r in counts) / len(counts) for k in ks}


def recall_at_k(queries: torch.Tensor, keys: torch.Tensor, relevant: torch.Tensor, ks: Sequence[int] = KS) -> dict[str, dict[int, float]]:
    """Cosine-similarity retrieval of `keys` by `queries`; returns {"recall": {K: r}, "chance": {K: r}}."""
    similarity = F.normalize(queries.float(), dim=-1) @ F.normalize(keys.float(), dim=-1).T
    ks = [k for k in ks if k <= keys.shape[0]]
    return {"recall": _hits(similarity, relevant, ks), "chance": _chance(relevant, ks)}


def speech_image_retrieval(speech: torch.Tensor, images: torch.Tensor, caption_image: torch.Tensor, ks: Sequence[int] = KS) -> dict:
    """speech (M, D) captions, images (N, D) unique images, caption_image (M,) index of each caption's image.

    speech->image: each caption ranks the N images. image->speech: each image ranks the M captions and
    scores a hit when any of its own captions (5 on Flickr8k) is in the top K.
    """
    relevant = caption_image[:, None] == torch.arange(len(images))[None, :]
    return {"speech_to_image": recall_at_k(speech, images, relevant, ks),
            "image_to_speech": recall_at_k(images, speech, relevant.T, ks)}


def speech_text_retrieval(speech: torch.Tensor, texts: torch.Tensor, transcripts: Sequence[str], ks: Sequence[int] = KS) -> dict:
    """Zero-shot: speech (M, D) against CLIP text embeddings (M, D) of the M transcripts. A transcript that
    occurs several times counts as right for each of its utterances (synthetic captions repeat)."""
    normalized = [" ".join(t.lower().split()) for t in transcripts]
    relevant = torch.tensor([[a == b for b in normalized] for a in normalized])
    return {"speech_to_text": recall_at_k(speech, texts, relevant, ks),
            "text_to_speech": recall_at_k(texts, speech, relevant.T, ks)}


def keyword_hit_rate(keywords: Sequence[Sequence[Sequence[int]]], caption_tokens: Sequence[set[int]], vocab_size: int) -> dict:
    """keywords[i][k] = the top subword ids of keyword slot k for utterance i; caption_tokens[i] = the
    CLIP-BPE token ids of its caption. A slot hits when any of its subwords is in the caption.
    Chance: the same number of subwords drawn at random from the VQ vocabulary."""
    slots = len(keywords[0])
    hits = torch.tensor([[bool(set(slot) & tokens) for slot in row] for row, tokens in zip(keywords, caption_tokens)], dtype=torch.float)
    shown = len(keywords[0][0])
    chance = sum(1 - comb(vocab_size - len(t), shown) / comb(vocab_size, shown) for t in caption_tokens) / len(caption_tokens)
    return {"hit_rate": float(hits.mean()), "per_keyword": [float(h) for h in hits.mean(0)], "chance": chance,
            "keywords": slots}
