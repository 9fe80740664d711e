"""The paper's tables for one split: image<->speech, zero-shot speech<->text, keyword hit rate."""

from __future__ import annotations

from typing import Sequence

import torch

from .data.items import SpokenCaption, image_table
from .image_cache import ImageEmbeddingCache
from .metrics import keyword_hit_rate, speech_image_retrieval, speech_text_retrieval
from .model import SpeechCLIP, SpeechOutput


def evaluate(model: SpeechCLIP, items: Sequence[SpokenCaption], cache: ImageEmbeddingCache, batch_size: int = 32) -> dict:
    """Metrics for every branch the model has (`parallel`, `cascaded`), each with chance levels."""
    outputs = model.speech_outputs([item.audio for item in items], batch_size=batch_size)
    table = image_table(items)
    images = cache.embeddings(table.paths)
    caption_image = torch.tensor(table.caption_rows)
    transcripts = [item.text for item in items]
    texts = model.encode_text(transcripts) if all(transcripts) else None
    result = {"captions": len(items), "images": len(table.ids)}
    for branch in ("parallel", "cascaded"):
        embeds = _branch_embeds(outputs, branch)
        if embeds is None:
            continue
        metrics = speech_image_retrieval(embeds, images, caption_image)
        if texts is not None:
            metrics.update(speech_text_retrieval(embeds, texts, transcripts))
        result[branch] = metrics
    if model.config.uses_cascaded and all(transcripts):
        result["keywords"] = _keywords(model, outputs, transcripts)
    return result


def _branch_embeds(outputs: list[SpeechOutput], branch: str) -> torch.Tensor | None:
    if branch == "parallel" and outputs[0].parallel is not None:
        return torch.cat([o.parallel for o in outputs])
    if branch == "cascaded" and outputs[0].cascaded is not None:
        return torch.cat([o.cascaded.embeds for o in outputs])
    return None


def _keywords(model: SpeechCLIP, outputs: list[SpeechOutput], transcripts: list[str]) -> dict:
    vocab = set(model.head.keywords.quantizer.vocab_ids.tolist())
    top = [model.nearest_subwords(o)[0][0] for o in outputs]
    tokens = [set(ids) & vocab for ids in model.clip.tokenize(transcripts)["input_ids"].tolist()]
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
            lines.append(f"  {task:<16} " + " ".join(f"{100 * r.get(k, float('nan')):6.1f}" for k in (1, 5, 10))
                         + "   (" + " / ".join(f"{100 * c.get(k, float('nan')):.1f}" for k in (1, 5, 10)) + ")")
    if "keywords" in result:
        kw = result["keywords"]
        lines.append(f"[keywords] hit rate {100 * kw['hit_rate']:.1f}%  (chance {100 * kw['chance']:.1f}%), "
                     f"per keyword: " + " ".join(f"{100 * h:.0f}" for h in kw["per_keyword"]))
        for example in kw["examples"][:3]:
            lines.append(f"  {example['text']!r}: " + " | ".join(",".join(s[:3]) for s in example["keywords"]))
    return "\n".join(lines)
