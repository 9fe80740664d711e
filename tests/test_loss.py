import math

import torch

from speechclip.loss import contrastive_loss, gather_batch


def test_perfect_pairs_give_low_loss_and_swaps_high():
    emb = torch.eye(4)
    good = contrastive_loss(emb, emb, torch.tensor(100.0))
    bad = contrastive_loss(emb, emb[[1, 0, 3, 2]], torch.tensor(100.0))
    assert good < 1e-6 < 10 < bad


def test_uniform_similarity_gives_log_batch():
    speech = torch.ones(4, 3)
    loss = contrastive_loss(speech, torch.ones(4, 3), torch.tensor(1.0))
    assert math.isclose(float(loss), math.log(4), rel_tol=1e-5)


def test_captions_of_one_image_are_not_negatives():
    # rows 0 and 1 are two captions of image 7: identical image embeddings
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    speech = image.clone()
    unmasked = contrastive_loss(speech, image, torch.tensor(50.0))
    masked = contrastive_loss(speech, image, torch.tensor(50.0), image_ids=torch.tensor([7, 7, 3]))
    assert unmasked > 0.3  # each of the two captions is confused with its twin
    assert masked < 1e-6


def test_gather_is_identity_on_one_process():
    x = torch.randn(3, 2)
    assert gather_batch(x, rank=0, world_size=1) is x
