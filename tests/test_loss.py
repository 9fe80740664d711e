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


def _two_process_gather(rank: int, port: int, rows: torch.Tensor, images: torch.Tensor, ids: torch.Tensor, out: str) -> None:
    """One of two gloo processes: its own rows through a shared linear layer, the loss over the gathered
    batch, and the parameter gradient averaged over processes as DDP does."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        layer = torch.nn.Linear(rows.shape[1], images.shape[1])  # the same weights in both processes
        mine = slice(rank * 3, rank * 3 + 3)
        speech = gather_batch(layer(rows[mine]), rank, 2)
        gathered_images, gathered_ids = gather_batch(images[mine], rank, 2), gather_batch(ids[mine], rank, 2)
        loss = contrastive_loss(speech, gathered_images, torch.tensor(10.0), gathered_ids)
        loss.backward()
        grad = layer.weight.grad.clone()
        dist.all_reduce(grad)
        torch.save({"loss": loss.detach(), "grad": grad / 2, "images": gathered_images}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_gather_negatives_with_the_single_process_loss_and_gradient(tmp_path):
    import socket

    import torch.multiprocessing as mp

    generator = torch.Generator().manual_seed(1)
    rows, images = torch.randn(6, 5, generator=generator), torch.randn(6, 4, generator=generator)
    ids = torch.tensor([0, 1, 2, 2, 3, 0])  # captions of one image on both processes: masked across them
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_two_process_gather, args=(port, rows, images, ids, str(tmp_path)), nprocs=2)
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 4)
    expected = contrastive_loss(layer(rows), images, torch.tensor(10.0), ids)
    expected.backward()
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(result["images"], images)  # rank order: each process sees every row once
        assert torch.allclose(result["loss"], expected, atol=1e-6)
        assert torch.allclose(result["grad"], layer.weight.grad, atol=1e-6)  # not 1/2 of it
    assert layer.weight.grad.abs().max() > 1e-3  # a gradient that could be wrong
