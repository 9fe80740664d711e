import json

import torch

from speechclip.clip import FrozenCLIP
from tests.conftest import CAPTIONS


def test_text_from_embeddings_equals_get_text_features(encoders):
    clip = FrozenCLIP(encoders["clip"])
    for caption in CAPTIONS[:3]:
        ids = clip.tokenize([caption])["input_ids"]
        expected = clip.text_features(ids)
        inner = clip.token_embedding[ids[0, 1:-1]][None]  # drop BOS/EOS: the path adds them
        torch.testing.assert_close(clip.text_features_from_embeddings(inner), expected, atol=1e-5, rtol=1e-5)


def test_frozen_and_image_features(encoders):
    from PIL import Image

    clip = FrozenCLIP(encoders["clip"])
    assert not any(p.requires_grad for p in clip.parameters())
    clip.train()
    assert not clip.model.training
    pixels = clip.preprocess_images([Image.new("RGB", (50, 40), "red"), Image.new("L", (20, 20))])
    assert pixels.shape == (2, 3, 32, 32)
    assert clip.image_features(pixels).shape == (2, clip.embed_dim)


def test_gradient_reaches_embeddings_through_text_tower(encoders):
    clip = FrozenCLIP(encoders["clip"])
    inner = torch.randn(2, 4, clip.token_embedding.shape[1], requires_grad=True)
    clip.text_features_from_embeddings(inner).sum().backward()
    assert inner.grad is not None and inner.grad.abs().sum() > 0
    assert all(p.grad is None for p in clip.parameters())


def test_the_clip_tokenizer_trains_the_same_every_time():
    import random

    from speechclip.data.scenes import captions, random_scene
    from speechclip.mini_encoders import train_clip_tokenizer

    rng = random.Random(0)
    texts = [t for _ in range(300) for t in captions(random_scene(rng), rng, 3)]
    first, second, third = (train_clip_tokenizer(texts, vocab_size=400) for _ in range(3))
    assert first.get_vocab() == second.get_vocab() == third.get_vocab()
    merges = [json.loads(t.backend_tokenizer.to_str())["model"]["merges"] for t in (first, second, third)]
    assert merges[0] == merges[1] == merges[2]
    assert first.tokenize("three big purple rings") == ["three</w>", "big</w>", "purple</w>", "rings</w>"]
