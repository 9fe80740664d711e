import math
from itertools import permutations

import pytest
import torch
import torch.nn.functional as F

from speechclip import metrics
from speechclip.metrics import keyword_hit_rate, recall_at_k, recall_by_labels, speech_image_retrieval, speech_text_retrieval


# ---- the implementation before the bounded-memory rewrite, kept as the reference ----------------------
def _reference_hits(similarity, relevant, ks):
    order = similarity.argsort(dim=1, descending=True)
    ranked = relevant.gather(1, order)
    first = torch.where(ranked.any(1), ranked.float().argmax(1), torch.full((len(ranked),), ranked.shape[1]))
    return {k: float((first < k).float().mean()) for k in ks}


def _reference_chance(relevant, ks):
    n = relevant.shape[1]
    counts = relevant.sum(1).tolist()
    return {k: sum(1 - math.comb(n - r, k) / math.comb(n, k) for r in counts) / len(counts) for k in ks}


def _reference_recall(queries, keys, relevant, ks=(1, 5, 10)):
    similarity = F.normalize(queries.float(), dim=-1) @ F.normalize(keys.float(), dim=-1).T
    ks = [k for k in ks if k <= keys.shape[0]]
    return {"recall": _reference_hits(similarity, relevant, ks), "chance": _reference_chance(relevant, ks)}


def _reference_speech_image(speech, images, caption_image, ks=(1, 5, 10)):
    relevant = caption_image[:, None] == torch.arange(len(images))[None, :]
    return {"speech_to_image": _reference_recall(speech, images, relevant, ks),
            "image_to_speech": _reference_recall(images, speech, relevant.T, ks)}


def _reference_speech_text(speech, texts, transcripts, ks=(1, 5, 10)):
    normalized = [" ".join(t.lower().split()) for t in transcripts]
    relevant = torch.tensor([[a == b for b in normalized] for a in normalized])
    return {"speech_to_text": _reference_recall(speech, texts, relevant, ks),
            "text_to_speech": _reference_recall(texts, speech, relevant.T, ks)}


def _same(new: dict, old: dict, queries: int) -> None:
    """Same keys; recalls equal up to the old code's float32 mean (i.e. the same hit counts); chance equal."""
    assert new.keys() == old.keys()
    for task in old:
        assert new[task]["recall"].keys() == old[task]["recall"].keys()
        for k, value in old[task]["recall"].items():
            assert round(new[task]["recall"][k] * queries[task]) == round(value * queries[task]), (task, k)
            assert new[task]["recall"][k] == pytest.approx(value, abs=1e-6)
        assert new[task]["chance"] == old[task]["chance"]


# ---- the new code against the reference on tie-free random data -------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_dense_relevance_matches_reference(seed, monkeypatch):
    monkeypatch.setattr(metrics, "CHUNK_ELEMENTS", 1000)  # many chunks of queries
    generator = torch.Generator().manual_seed(seed)
    queries, keys = torch.randn(300, 16, generator=generator), torch.randn(120, 16, generator=generator)
    relevant = torch.rand(300, 120, generator=generator) < 0.03  # 0..several relevant keys, some queries none
    new, old = recall_at_k(queries, keys, relevant), _reference_recall(queries, keys, relevant)
    _same({"t": new}, {"t": old}, {"t": 300})
    assert 0 < new["recall"][1] < new["recall"][10] < 1  # the case is not trivial


@pytest.mark.parametrize("seed", range(3))
def test_five_captions_per_image_matches_reference(seed, monkeypatch):
    monkeypatch.setattr(metrics, "CHUNK_ELEMENTS", 777)
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(60, 32, generator=generator)
    caption_image = torch.randperm(300, generator=generator) % 60  # 5 captions per image, shuffled
    speech = images[caption_image] + 1.5 * torch.randn(300, 32, generator=generator)
    new, old = speech_image_retrieval(speech, images, caption_image), _reference_speech_image(speech, images, caption_image)
    _same(new, old, {"speech_to_image": 300, "image_to_speech": 60})
    assert 0.05 < new["speech_to_image"]["recall"][1] < 0.95 and new["image_to_speech"]["recall"][1] > 0.05


def test_zero_shot_with_repeated_transcripts_matches_reference(monkeypatch):
    monkeypatch.setattr(metrics, "CHUNK_ELEMENTS", 500)
    generator = torch.Generator().manual_seed(7)
    words = ["a red circle", "two blue squares", "a green star", "three black dots", "a big purple heart"]
    transcripts = [words[int(i)] if int(i) < 5 else f"caption {int(i)}" for i in torch.randint(0, 40, (200,), generator=generator)]
    transcripts[3] = "A  Red circle"  # normalised to "a red circle"
    texts = torch.randn(200, 24, generator=generator)
    speech = texts + 1.2 * torch.randn(200, 24, generator=generator)
    new, old = speech_text_retrieval(speech, texts, transcripts), _reference_speech_text(speech, texts, transcripts)
    _same(new, old, {"speech_to_text": 200, "text_to_speech": 200})


# ---- ties: the documented rule (expected recall under a random order of tied items) ---------------------
def test_collapsed_model_scores_chance_not_perfect():
    keys = torch.ones(50, 8)  # every score equal
    caption_image = torch.arange(10).repeat_interleave(5)
    result = speech_image_retrieval(keys, torch.ones(10, 8), caption_image)
    for task in result.values():
        for k, value in task["recall"].items():
            assert value == pytest.approx(task["chance"][k], abs=1e-12)


def test_ties_by_hand():
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    query = torch.tensor([[1.0, 0.0]])
    # three keys tie for the top, one of them relevant: R@1 = 1/3, R@2 = 2/3, R@3 = 1
    result = recall_at_k(query, keys, torch.tensor([[False, True, False, False]]), ks=(1, 2, 3))
    assert result["recall"] == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 1.0})
    # two of the three tied keys relevant: R@1 = 2/3, R@2 = 1
    result = recall_at_k(query, keys, torch.tensor([[True, False, True, False]]), ks=(1, 2))
    assert result["recall"] == pytest.approx({1: 2 / 3, 2: 1.0})
    # the relevant key is below the tied group: misses R@1..3, hits R@4
    result = recall_at_k(query, keys, torch.tensor([[False, False, False, True]]), ks=(1, 3, 4))
    assert result["recall"] == {1: 0.0, 3: 0.0, 4: 1.0}


def test_ties_equal_the_average_over_every_order():
    """The exact expectation equals the old argsort ranking averaged over all orders of the keys."""
    generator = torch.Generator().manual_seed(3)
    keys = torch.randint(0, 2, (6, 2), generator=generator).float() + 0.1  # few distinct keys: many ties
    queries = torch.randint(0, 2, (5, 2), generator=generator).float() + 0.1
    relevant = torch.rand(5, 6, generator=generator) < 0.35
    similarity = F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).T
    orders = list(permutations(range(6)))
    average = {k: 0.0 for k in (1, 2, 3)}
    for order in orders:  # a stable sort of permuted columns is one order of the tied keys
        order = torch.tensor(order)
        ranked = relevant[:, order].gather(1, torch.sort(similarity[:, order], dim=1, descending=True, stable=True).indices)
        first = torch.where(ranked.any(1), ranked.float().argmax(1), torch.full((5,), 6))
        for k in average:
            average[k] += float((first < k).double().mean()) / len(orders)
    assert recall_at_k(queries, keys, relevant, ks=(1, 2, 3))["recall"] == pytest.approx(average, abs=1e-9)


# ---- the paper's protocols by hand ----------------------------------------------------------------------
def test_perfect_and_reversed_rankings():
    keys = torch.eye(4)
    assert recall_at_k(keys, keys, torch.eye(4, dtype=torch.bool), ks=(1,))["recall"][1] == 1.0
    # each query is closest to the wrong key: R@1 = 0, R@4 = 1
    queries = keys[[1, 0, 3, 2]]
    result = recall_at_k(queries, keys, torch.eye(4, dtype=torch.bool), ks=(1, 4))
    assert result["recall"] == {1: 0.0, 4: 1.0}
    assert result["chance"][1] == pytest.approx(0.25) and result["chance"][4] == pytest.approx(1.0)


def test_five_captions_per_image_protocol():
    images = torch.eye(3)
    # 15 captions, 5 per image; caption 0 of image 0 points at image 1, the rest are right
    caption_image = torch.arange(3).repeat_interleave(5)
    speech = images[caption_image].clone()
    speech[0] = images[1]
    result = speech_image_retrieval(speech, images, caption_image, ks=(1,))
    assert result["speech_to_image"]["recall"][1] == pytest.approx(14 / 15)
    # image->speech: images 0 and 2 rank one of their own captions first; image 1 ties caption 0 (wrong)
    # with its 5 right captions: a hit with probability 5/6
    assert result["image_to_speech"]["recall"][1] == pytest.approx((1 + 5 / 6 + 1) / 3)
    # chance for image->speech R@1: 5 relevant of 15
    assert result["image_to_speech"]["chance"][1] == pytest.approx(5 / 15)
    assert result["speech_to_image"]["chance"][1] == pytest.approx(1 / 3)


def test_image_to_speech_counts_any_caption():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    speech = torch.tensor([[0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]])  # captions: img0, img1, img1, img0
    caption_image = torch.tensor([0, 1, 1, 0])
    result = speech_image_retrieval(speech, images, caption_image, ks=(1, 2))
    assert result["image_to_speech"]["recall"] == {1: 1.0, 2: 1.0}
    assert result["speech_to_image"]["recall"][1] == pytest.approx(3 / 4)  # caption 3 is nearer image 1


def test_speech_text_duplicate_transcripts_count_as_right():
    texts = torch.eye(3)
    speech = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    result = speech_text_retrieval(speech, texts, ["a cat", "A  cat", "a dog"], ks=(1,))
    assert result["speech_to_text"]["recall"][1] == 1.0  # utterance 0 retrieved "A  cat" == "a cat"


def test_labels_and_dense_agree_and_errors_name_the_field():
    generator = torch.Generator().manual_seed(0)
    queries, keys = torch.randn(40, 8, generator=generator), torch.randn(30, 8, generator=generator)
    q_labels, k_labels = torch.randint(0, 12, (40,), generator=generator), torch.randint(0, 12, (30,), generator=generator)
    dense = recall_at_k(queries, keys, q_labels[:, None] == k_labels[None, :])
    assert recall_by_labels(queries, keys, q_labels, k_labels) == dense
    with pytest.raises(ValueError, match="relevant: expected shape"):
        recall_at_k(queries, keys, torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="labels"):
        recall_by_labels(queries, keys, q_labels[:5], k_labels)


# ---- keyword hit rate --------------------------------------------------------------------------------
def test_keyword_hit_rate_and_chance():
    keywords = [[[1, 2], [7, 8]], [[3, 9], [5, 6]]]  # 2 utterances x 2 slots x 2 subwords
    tokens = [{2, 4}, {5}]
    result = keyword_hit_rate(keywords, tokens, vocab_size=10)
    assert result["per_keyword"] == [0.5, 0.5] and result["hit_rate"] == 0.5
    assert result["per_keyword_count"] == [2, 2] and result["mean_keywords"] == 2.0 and result["keywords"] == 2
    expected = ((1 - math.comb(8, 2) / math.comb(10, 2)) + (1 - math.comb(9, 2) / math.comb(10, 2))) / 2
    assert result["chance"] == pytest.approx(expected)


def test_keyword_hit_rate_with_a_variable_number_of_keywords():
    keywords = [
        [[1], [2], [3]],  # 3 keywords, caption {1, 3}: 2 hits
        [[4]],            # 1 keyword, caption {9}: 0 hits
        [],               # no keyword at all (CIF fired nothing)
        [[5], [9]],       # 2 keywords, caption {9}: 1 hit
    ]
    tokens = [{1, 3}, {9}, {7}, {9}]
    result = keyword_hit_rate(keywords, tokens, vocab_size=20)
    assert result["hit_rate"] == pytest.approx(3 / 6)  # over all 6 keywords, not per utterance
    assert result["per_keyword"] == pytest.approx([1 / 3, 1 / 2, 1.0]) and result["per_keyword_count"] == [3, 2, 1]
    assert result["mean_keywords"] == pytest.approx(6 / 4) and result["keywords"] == 3 and result["total_keywords"] == 6
    per_utterance = [2 / 20, 1 / 20, 1 / 20]  # one subword shown per keyword: |caption| / V
    assert result["chance"] == pytest.approx((3 * per_utterance[0] + per_utterance[1] + 2 * per_utterance[2]) / 6)
    with pytest.raises(ValueError, match="caption_tokens"):
        keyword_hit_rate(keywords, tokens[:2], vocab_size=20)
