"""Streamed evaluation: the same tables as the code before it, and keyword hit rates known by construction."""

from math import comb

import pytest
import torch

from speechclip import evaluate as evaluate_module
from speechclip.data import read_dataset
from speechclip.data.items import image_table
from speechclip.evaluate import evaluate, format_table
from speechclip.image_cache import ImageEmbeddingCache
from speechclip.metrics import speech_image_retrieval, speech_text_retrieval
from speechclip.model import KeywordOutput, SpeechCLIP, SpeechOutput
from tests.conftest import tiny_model_config
from tests.test_metrics import _reference_speech_image, _reference_speech_text, _same


def _reference_keyword_hit_rate(keywords, caption_tokens, vocab_size):
    """keyword_hit_rate before variable keyword counts (fixed K)."""
    hits = torch.tensor([[bool(set(slot) & tokens) for slot in row] for row, tokens in zip(keywords, caption_tokens)], dtype=torch.float)
    shown = len(keywords[0][0])
    chance = sum(1 - comb(vocab_size - len(t), shown) / comb(vocab_size, shown) for t in caption_tokens) / len(caption_tokens)
    return {"hit_rate": float(hits.mean()), "per_keyword": [float(h) for h in hits.mean(0)], "chance": chance}


def _reference_evaluate(model, items, cache, batch_size):
    """evaluate() before streaming: every clip at once, every transcript in one batch."""
    outputs = model.speech_outputs([item.audio for item in items], batch_size=batch_size)
    table = image_table(items)
    images = cache.embeddings(table.paths)
    caption_image = torch.tensor(table.caption_rows)
    transcripts = [item.text for item in items]
    texts = model.encode_text(transcripts)
    result = {"embeddings": {}}
    for branch, embeds in (("parallel", torch.cat([o.parallel for o in outputs])),
                           ("cascaded", torch.cat([o.cascaded.embeds for o in outputs]))):
        result[branch] = {**_reference_speech_image(embeds, images, caption_image),
                          **_reference_speech_text(embeds, texts, transcripts)}
        result["embeddings"][branch] = (embeds, images, caption_image, texts, transcripts)
    vocab = set(model.head.keywords.quantizer.vocab_ids.tolist())
    top = [model.nearest_subwords(o)[0][0] for o in outputs]
    tokens = [set(ids) & vocab for ids in model.clip.tokenize(transcripts)["input_ids"].tolist()]
    result["keywords"] = _reference_keyword_hit_rate(top, tokens, len(vocab))
    return result


@pytest.fixture(scope="module")
def hybrid(encoders):
    torch.manual_seed(0)
    return SpeechCLIP(tiny_model_config(encoders, "hybrid")).eval()


def test_streamed_evaluation_equals_the_previous_code(hybrid, tiny_corpus, tmp_path, monkeypatch):
    items = read_dataset("manifest", tiny_corpus, "test")
    cache = ImageEmbeddingCache(tmp_path / "cache", hybrid.clip)
    old = _reference_evaluate(hybrid, items, cache, batch_size=3)
    monkeypatch.setattr(evaluate_module, "CHUNK_BATCHES", 2)  # 6 clips per chunk: several chunks
    monkeypatch.setattr(evaluate_module, "TEXT_BATCH", 5)
    seen = []  # what the streamed code hands to the zero-shot metric, per branch
    spy = lambda speech, texts, transcripts: seen.append((speech, texts)) or speech_text_retrieval(speech, texts, transcripts)  # noqa: E731
    monkeypatch.setattr(evaluate_module, "speech_text_retrieval", spy)
    new = evaluate(hybrid, items, cache, batch_size=3)
    assert new["captions"] == len(items) and new["images"] == len(image_table(items).ids)
    sizes = {"speech_to_image": len(items), "image_to_speech": new["images"], "speech_to_text": len(items), "text_to_speech": len(items)}
    _same(new["parallel"], old["parallel"], sizes)
    # The cascaded embeddings of this random model tie exactly (clips that pick the same keywords get the same
    # CLIP text embedding), where the old argsort ranked tied items in an arbitrary order: the streamed code
    # must compute the same embeddings and apply the metrics (tie rule: tests/test_metrics.py) to them.
    speech, images, caption_image, texts, transcripts = old["embeddings"]["cascaded"]
    assert torch.unique(speech, dim=0).shape[0] < len(speech)  # the ties are really there
    assert new["cascaded"]["speech_to_image"] == speech_image_retrieval(speech, images, caption_image)["speech_to_image"]
    streamed_speech, streamed_texts = seen[1]
    assert torch.equal(streamed_speech, speech)  # same batches as before: the same clips padded together
    assert torch.allclose(torch.nn.functional.normalize(streamed_texts, dim=-1), texts, atol=1e-5)  # other batches: rounding only
    assert new["keywords"]["hit_rate"] == pytest.approx(old["keywords"]["hit_rate"], abs=1e-6)
    assert new["keywords"]["per_keyword"] == pytest.approx(old["keywords"]["per_keyword"], abs=1e-6)
    assert new["keywords"]["chance"] == pytest.approx(old["keywords"]["chance"])
    assert new["keywords"]["mean_keywords"] == 4.0  # the tiny config's K
    assert "4.00 keywords per utterance" in format_table(new)


def test_keyword_hit_rate_known_by_construction(hybrid, tiny_corpus, tmp_path, monkeypatch):
    """Fake speech outputs whose nearest subwords are chosen per clip: even clips get 3 keywords (two of
    their caption's own subwords, then one absent from it), odd clips 1 keyword (absent): the hit rate is
    2 * even / (3 * even + odd), and a broken alignment of clips and captions would show."""
    items = read_dataset("manifest", tiny_corpus, "test")
    vocab_ids = hybrid.head.keywords.quantizer.vocab_ids
    vocab = set(vocab_ids.tolist())
    position = {int(t): p for p, t in enumerate(vocab_ids.tolist())}
    caption = {str(i.audio): [t for t in hybrid.clip.tokenize([i.text])["input_ids"][0].tolist() if t in vocab] for i in items}
    row_of = {str(i.audio): row for row, i in enumerate(items)}

    def fake_outputs(audio, batch_size=16):
        outputs = []
        for path in audio:
            own = caption[str(path)]
            absent = next(t for t in sorted(vocab) if t not in own)
            chosen = [own[0], own[-1], absent] if row_of[str(path)] % 2 == 0 else [absent]
            similarity = torch.zeros(1, 3, len(vocab_ids))
            for slot, token in enumerate(chosen):
                similarity[0, slot, position[token]] = 1.0
            keywords = KeywordOutput(torch.randn(1, hybrid.clip.embed_dim), torch.zeros(1, 3, dtype=torch.long),
                                     similarity, torch.tensor([len(chosen)]))
            outputs.append(SpeechOutput(torch.randn(1, hybrid.clip.embed_dim), keywords))
        return outputs

    monkeypatch.setattr(hybrid, "speech_outputs", fake_outputs)
    monkeypatch.setattr(hybrid.config.cascaded, "keywords_shown", 1)
    monkeypatch.setattr(evaluate_module, "CHUNK_BATCHES", 1)
    result = evaluate(hybrid, items, ImageEmbeddingCache(tmp_path / "cache", hybrid.clip), batch_size=4)["keywords"]
    even, odd = (len(items) + 1) // 2, len(items) // 2
    assert result["hit_rate"] == pytest.approx(2 * even / (3 * even + odd))
    assert result["per_keyword"] == pytest.approx([even / len(items), 1.0, 0.0])
    assert result["per_keyword_count"] == [len(items), even, even]
    assert result["mean_keywords"] == pytest.approx((3 * even + odd) / len(items))
    assert "(n=" in evaluate_module._keyword_lines(result)[0]  # ragged: counts printed per slot


def test_the_table_marks_a_recall_beyond_the_keys_instead_of_printing_nan():
    """Six images: R@10 over images is undefined (metrics leave it out), so the table shows '-' and says why."""
    result = {"captions": 12, "images": 6,
              "parallel": {"speech_to_image": {"recall": {1: 0.5, 5: 0.75}, "chance": {1: 1 / 6, 5: 5 / 6}},
                           "image_to_speech": {"recall": {1: 0.5, 5: 0.9, 10: 1.0}, "chance": {1: 0.3, 5: 0.8, 10: 1.0}}}}
    table = format_table(result)
    assert "nan" not in table
    speech_row = next(line for line in table.splitlines() if "speech_to_image" in line)
    assert speech_row.split()[1:4] == ["50.0", "75.0", "-"]
    assert "(R@10: fewer keys than K)" in table
    image_row = next(line for line in table.splitlines() if "image_to_speech" in line)
    assert image_row.split()[1:4] == ["50.0", "90.0", "100.0"]
