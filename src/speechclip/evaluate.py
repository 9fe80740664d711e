"""The paper's tables for one split: image<->speech, zero-shot speech<->text, keyword hit rate.

Streamed at any size: clips are read and encoded a chunk at a time (sorted by duration, so batches carry
little padding), only each clip's embeddings and keyword ids are kept, transcripts go through the CLIP text
tower in batches, and the metrics (`metrics.py`) rank in chunks of queries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .data.items import SpokenCaption, image_table
from .embed import bound_kernel_cache, clip_seconds
from .image_cache import ImageEmbeddingCache
from .metrics import keyword_hit_rate, speech_image_retrieval, speech_text_retrieval
from .model import SpeechCLIP, SpeechOutput

CHUNK_BATCHES = 8  # clips decoded at once = CHUNK_BATCHES x batch_size (a cascaded output is (K, V') floats)
TEXT_BATCH = 256


@dataclass
class SpeechResults:
    """What evaluation keeps of the speech side: per branch (M, D) embeddings, and per clip its keywords."""

    branches: dict[str, torch.Tensor] = field(default_factory=dict)
    keywords: list[list[list[int]]] | None = None  # [M][K_i][top_k] CLIP token ids


def evaluate(model: SpeechCLIP, items: Sequence[SpokenCaption], cache: ImageEmbeddingCache, batch_size: int = 32) -> dict:
    """Metrics for every branch the model has (`parallel`, `cascaded`), each with chance levels."""
    speech = encode_speech_streamed(model, items, batch_size)
    table = image_table(items)
    images = cache.embeddings(table.paths)
    caption_image = torch.tensor(table.caption_rows)
    transcripts = [item.text for item in items]
    texts = encode_texts(model, transcripts) if all(transcripts) else None
    result = {"captions": len(items), "images": len(table.ids)}
    for branch, embeds in speech.branches.items():
        metrics = speech_image_retrieval(embeds, images, caption_image)
        if texts is not None:
            metrics.update(speech_text_retrieval(embeds, texts, transcripts))
        result[branch] = metrics
    if speech.keywords is not None and all(transcripts):
        result["keywords"] = _keywords(model, speech.keywords, transcripts)
    return result


def duration_order(items: Sequence[SpokenCaption]) -> list[int]:
    """Item rows, shortest clip first (file headers only)."""
    return sorted(range(len(items)), key=lambda row: clip_seconds(items[row].audio))


def encode_speech_streamed(model: SpeechCLIP, items: Sequence[SpokenCaption], batch_size: int = 32) -> SpeechResults:
    """Every clip through the model, CHUNK_BATCHES batches at a time; keeps (M, D) embeddings per branch and
    the keyword token ids, never the (K, V') similarity of every clip."""
    bound_kernel_cache()
    order = duration_order(items)
    results = SpeechResults(keywords=[[] for _ in items] if model.config.uses_cascaded else None)
    chunk = CHUNK_BATCHES * batch_size
    for start in range(0, len(order), chunk):
        rows = order[start : start + chunk]
        outputs = model.speech_outputs([items[row].audio for row in rows], batch_size=batch_size)
        for branch in ("parallel", "cascaded"):
            embeds = _branch_embeds(outputs, branch)
            if embeds is None:
                continue
            if branch not in results.branches:
                results.branches[branch] = torch.empty(len(items), embeds.shape[1])
            results.branches[branch][rows] = embeds.float().cpu()
        if results.keywords is not None:
            for row, output in zip(rows, outputs):
                results.keywords[row] = model.nearest_subwords(output)[0][0]
    return results


def encode_texts(model: SpeechCLIP, texts: Sequence[str], batch_size: int = TEXT_BATCH) -> torch.Tensor:
    """(M, D) CLIP text embeddings, each distinct string encoded once, in batches."""
    rows: dict[str, int] = {}
    index = torch.tensor([rows.setdefault(text, len(rows)) for text in texts], dtype=torch.long)
    distinct = list(rows)
    chunks = [model.encode_text(distinct[s : s + batch_size], normalize=False).float().cpu()
              for s in range(0, len(distinct), batch_size)]
    return torch.cat(chunks)[index] if chunks else torch.empty(0, model.clip.embed_dim)


def _branch_embeds(outputs: list[SpeechOutput], branch: str) -> torch.Tensor | None:
    if branch == "parallel" and outputs[0].parallel is not None:
        return torch.cat([o.parallel for o in outputs])
    if branch == "cascaded" and outputs[0].cascaded is not None:
        return torch.cat([o.cascaded.embeds for o in outputs])
    return None


def _keywords(model: SpeechCLIP, top: list[list[list[int]]], transcripts: list[str]) -> dict:
    vocab = set(model.head.keywords.quantizer.vocab_ids.tolist())
    tokens = []
    for start in range(0, len(transcripts), TEXT_BATCH):
        ids = model.clip.tokenize(transcripts[start : start + TEXT_BATCH])["input_ids"].tolist()
        tokens += [set(row) & vocab for row in ids]
    metrics = keyword_hit_rate(top, tokens, len(vocab))
    metrics["examples"] = [
        {"text": transcripts[i], "keywords": [[model.subword(t) for t in slot] for slot in top[i]]}
        for i in range(min(5, len(transcripts)))
    ]
    return metrics


def format_table(result: dict) -> str:
    """A plain-text table of recall@1/5/10 with chance beside each figure (percent)."""
    lines = [f"{result['captions']} spoken captions, {result['images']} images"]
    for branch in ("parallel", "cascaded"):
        if branch not in result:
            continue
        lines.append(f"[{branch}]            R@1    R@5   R@10   (chance R@1 / R@5 / R@10)")
        for task, values in result[branch].items():
            r, c = values["recall"], values["chance"]
            lines.append(f"  {task:<16} " + " ".join(_percent(r.get(k)).rjust(6) for k in (1, 5, 10))
                         + "   (" + " / ".join(_percent(c.get(k)) for k in (1, 5, 10)) + ")")
            missing = [f"R@{k}" for k in (1, 5, 10) if k not in r]
            if missing:  # K beyond the keys: the recall is undefined (1.0 would be a free pass), not a number
                lines.append(f"  {'':<16} ({', '.join(missing)}: fewer keys than K)")
    if "keywords" in result:
        lines += _keyword_lines(result["keywords"])
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _keyword_lines(kw: dict) -> list[str]:
    counts = kw.get("per_keyword_count") or []
    ragged = len(set(counts)) > 1  # a variable number of keywords: say how many utterances reach each slot
    per = " ".join(f"{100 * h:.0f}" + (f" (n={n})" if ragged else "") for h, n in zip(kw["per_keyword"], counts or kw["per_keyword"]))
    lines = [f"[keywords] hit rate {100 * kw['hit_rate']:.1f}%  (chance {100 * kw['chance']:.1f}%), "
             f"{kw.get('mean_keywords', float('nan')):.2f} keywords per utterance; per keyword: {per}"]
    for example in kw["examples"][:3]:
        lines.append(f"  {example['text']!r}: " + " | ".join(",".join(s[:3]) for s in example["keywords"]))
    return lines
