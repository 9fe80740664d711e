"""Retrieval recall@K (the paper's protocols) and keyword hit rate, each with its chance level.

Bounded memory at any size (SpokenCOCO test: 25,000 captions x 5,000 images, and 25,000 x 25,000 for
zero-shot text): relevance is "same label" (a caption's image row, a transcript's id), never a matrix of
pairs; similarities are computed for a chunk of queries at a time; and a query's rank is counted (how many
keys score above its best relevant key), never sorted.

Ties: an item tied with the best relevant key is ranked before or after it at random, and the recall we
report is the exact expectation over that draw. Without ties this is the plain recall; with a collapsed
model (every score equal) it is the chance level, not 100 % (which "count only strictly higher scores"
would give) nor an artefact of the sort's order (which argsort, not stable on CPU, gave before).
"""

from __future__ import annotations

from math import comb, nan
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

KS = (1, 5, 10)
CHUNK_ELEMENTS = 1 << 24  # similarity entries held at once (64 MB of float32), whatever the collection size

RelevantPairs = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]  # (start, stop) -> (query row - start, key row)


def recall_at_k(queries: torch.Tensor, keys: torch.Tensor, relevant: torch.Tensor, ks: Sequence[int] = KS) -> dict[str, dict[int, float]]:
    """Cosine retrieval of `keys` (N, D) by `queries` (Q, D) with a dense (Q, N) bool relevance matrix;
    returns {"recall": {K: r}, "chance": {K: r}}. For large collections use `recall_by_labels`."""
    if relevant.shape != (len(queries), len(keys)):
        raise ValueError(f"relevant: expected shape {(len(queries), len(keys))}, got {tuple(relevant.shape)}")
    relevant = relevant.bool()
    return _recall(queries, keys, lambda start, stop: relevant[start:stop].nonzero(as_tuple=True), relevant.sum(1), ks)


def recall_by_labels(queries: torch.Tensor, keys: torch.Tensor, query_labels: torch.Tensor, key_labels: torch.Tensor,
                     ks: Sequence[int] = KS) -> dict[str, dict[int, float]]:
    """As `recall_at_k`, with key j relevant to query i when key_labels[j] == query_labels[i] (integers)."""
    query_labels, key_labels = torch.as_tensor(query_labels).long(), torch.as_tensor(key_labels).long()
    if query_labels.shape != (len(queries),) or key_labels.shape != (len(keys),):
        raise ValueError(f"labels: expected ({len(queries)},) query and ({len(keys)},) key labels, "
                         f"got {tuple(query_labels.shape)} and {tuple(key_labels.shape)}")
    order = torch.argsort(key_labels, stable=True)
    sorted_labels = key_labels[order]
    first = torch.searchsorted(sorted_labels, query_labels, side="left")
    counts = torch.searchsorted(sorted_labels, query_labels, side="right") - first

    def pairs(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys sharing each query's label (a run of `order`), as (query, key) pairs."""
        n = counts[start:stop]
        rows = torch.repeat_interleave(torch.arange(stop - start), n)
        offsets = torch.arange(int(n.sum())) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
        return rows, order[torch.repeat_interleave(first[start:stop], n) + offsets]

    return _recall(queries, keys, pairs, counts, ks)


def _recall(queries: torch.Tensor, keys: torch.Tensor, relevant_pairs: RelevantPairs, counts: torch.Tensor,
            ks: Sequence[int]) -> dict[str, dict[int, float]]:
    keys_t = F.normalize(keys.float(), dim=-1).T
    ks = [k for k in ks if k <= len(keys)]
    totals = torch.zeros(len(ks), dtype=torch.float64)
    step = max(1, CHUNK_ELEMENTS // max(1, len(keys)))
    buffer = torch.empty(min(step, len(queries)), len(keys))  # reused: a fresh 64 MB block per chunk costs page faults
    for start in range(0, len(queries) if ks else 0, step):
        stop = min(start + step, len(queries))
        scores = torch.mm(F.normalize(queries[start:stop].float(), dim=-1), keys_t, out=buffer[: stop - start])
        totals += _hit_probability(scores, *relevant_pairs(start, stop), counts[start:stop], ks).sum(0)
    recall = {k: float(t) / max(1, len(queries)) for k, t in zip(ks, totals)}
    return {"recall": recall, "chance": _chance(counts, len(keys), ks)}


def _hit_probability(scores: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, counts: torch.Tensor,
                     ks: Sequence[int]) -> torch.Tensor:
    """(B, N) scores and the relevant (row, col) pairs -> (B, len(ks)) probability that a relevant key is in
    the top K, ties broken at random: `above` keys score higher than the best relevant key, and the `tied`
    keys sharing its score (`tied_relevant` of them relevant) fill the K - above places left in random order.
    Only a row's top max(K) + 1 scores are looked at, unless a tie runs on past them."""
    pair_scores = scores[rows, cols]
    best = torch.full((len(scores),), float("-inf")).scatter_reduce(0, rows, pair_scores, "amax")
    tied_relevant = torch.zeros(len(scores), dtype=torch.float64).scatter_add(0, rows, (pair_scores == best[rows]).double())
    kmax = max(ks)
    top = scores.topk(min(kmax + 1, scores.shape[1]), dim=1).values
    above = (top > best[:, None]).sum(1)
    tied = (top >= best[:, None]).sum(1) - above
    spill = (counts > 0) & (above + tied == top.shape[1]) & (above < kmax)
    if spill.any():
        tied[spill] = (scores[spill] == best[spill, None]).sum(1)
    above, tied, found = above.double(), tied.double(), counts > 0
    columns = []
    for k in ks:
        places = k - above  # places in the top K left for the tied group
        miss = torch.ones_like(places)  # P(no relevant key among the first `places` tied ones)
        for i in range(k):
            factor = torch.where(tied - tied_relevant - i > 0, (tied - tied_relevant - i) / (tied - i).clamp(min=1), 0.0)
            miss = torch.where(places > i, miss * factor, miss)
        columns.append(torch.where(found & (places > 0), 1 - miss, 0.0))
    return torch.stack(columns, 1)


def _chance(counts: torch.Tensor, n: int, ks: Sequence[int]) -> dict[int, float]:
    """Expected recall@K of a random ranking: 1 - C(N - r, K) / C(N, K) per query, averaged (in query
    order, as before; each distinct r is computed once)."""
    values = [int(r) for r in counts.tolist()]
    result = {}
    for k in ks:
        table = {r: 1 - comb(n - r, k) / comb(n, k) for r in set(values)}
        result[k] = sum(table[r] for r in values) / len(values) if values else nan
    return result


def speech_image_retrieval(speech: torch.Tensor, images: torch.Tensor, caption_image: torch.Tensor, ks: Sequence[int] = KS) -> dict:
    """speech (M, D) captions, images (N, D) unique images, caption_image (M,) index of each caption's image.

    speech->image: each caption ranks the N images. image->speech: each image ranks the M captions and
    scores a hit when any of its own captions (5 on Flickr8k and SpokenCOCO) is in the top K.
    """
    caption_image = torch.as_tensor(caption_image).long()
    rows = torch.arange(len(images))
    return {"speech_to_image": recall_by_labels(speech, images, caption_image, rows, ks),
            "image_to_speech": recall_by_labels(images, speech, rows, caption_image, ks)}


def transcript_ids(transcripts: Sequence[str]) -> torch.Tensor:
    """One integer per distinct transcript, after lowercasing and collapsing whitespace: (M,) long."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(" ".join(t.lower().split()), len(ids)) for t in transcripts], dtype=torch.long)


def speech_text_retrieval(speech: torch.Tensor, texts: torch.Tensor, transcripts: Sequence[str], ks: Sequence[int] = KS) -> dict:
    """Zero-shot: speech (M, D) against CLIP text embeddings (M, D) of the M transcripts. A transcript that
    occurs several times counts as right for each of its utterances (synthetic captions repeat)."""
    labels = transcript_ids(transcripts)
    return {"speech_to_text": recall_by_labels(speech, texts, labels, labels, ks),
            "text_to_speech": recall_by_labels(texts, speech, labels, labels, ks)}


def keyword_hit_rate(keywords: Sequence[Sequence[Sequence[int]]], caption_tokens: Sequence[set[int]], vocab_size: int) -> dict:
    """keywords[i][k] = the top subword ids of keyword k of utterance i (nested lists [B][K_i][top_k]: K_i is
    fixed for the cascaded model and varies per utterance for the CIF variants); caption_tokens[i] = the
    CLIP-BPE token ids of its caption. A keyword hits when any of its subwords is in the caption.

    hit_rate: over all keywords; per_keyword[p]: over the utterances with a p-th keyword (how many:
    per_keyword_count); mean_keywords: keywords per utterance. Chance: per keyword, the same number of
    subwords drawn at random from the VQ vocabulary, averaged like hit_rate.
    """
    if len(keywords) != len(caption_tokens):
        raise ValueError(f"keywords: {len(keywords)} utterances, caption_tokens: {len(caption_tokens)}")
    slots = max((len(row) for row in keywords), default=0)
    hits, counts, chance_sum, chances = [0] * slots, [0] * slots, 0.0, {}
    for row, tokens in zip(keywords, caption_tokens):
        tokens = set(tokens)
        for position, slot in enumerate(row):
            counts[position] += 1
            hits[position] += bool(tokens.intersection(slot))
            key = (len(tokens), len(slot))
            if key not in chances:
                chances[key] = 1 - comb(vocab_size - key[0], key[1]) / comb(vocab_size, key[1])
            chance_sum += chances[key]
    total = sum(counts)
    return {"hit_rate": sum(hits) / total if total else nan, "chance": chance_sum / total if total else nan,
            "per_keyword": [h / c for h, c in zip(hits, counts)], "per_keyword_count": counts,
            "keywords": slots, "mean_keywords": total / len(keywords) if keywords else nan,
            "total_keywords": total, "utterances": len(keywords)}
