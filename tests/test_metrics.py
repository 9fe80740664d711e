import math

import pytest
import torch

from speechclip.metrics import keyword_hit_rate, recall_at_k, speech_image_retrieval, speech_text_retrieval


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
    # image->speech: image 0 still has 4 right captions; ties with caption 0 broken arbitrarily, so
    # image 1 may rank caption 0 first (a wrong one) -> 2/3 or 1; images 0 and 2 are surely right.
    assert result["image_to_speech"]["recall"][1] >= 2 / 3
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


def test_keyword_hit_rate_and_chance():
    keywords = [[[1, 2], [7, 8]], [[3, 9], [5, 6]]]  # 2 utterances x 2 slots x 2 subwords
    tokens = [{2, 4}, {5}]
    result = keyword_hit_rate(keywords, tokens, vocab_size=10)
    assert result["per_keyword"] == [0.5, 0.5] and result["hit_rate"] == 0.5
    expected = ((1 - math.comb(8, 2) / math.comb(10, 2)) + (1 - math.comb(9, 2) / math.comb(10, 2))) / 2
    assert result["chance"] == pytest.approx(expected)
