"""Continuous integrate-and-fire against hand computations and an independent scatter-based reference."""

import math

import pytest
import torch

from speechclip.cif import ContinuousIntegrateAndFire, integrate_and_fire
from speechclip.config import CIFConfig


def reference_fire(frames: torch.Tensor, weights: torch.Tensor, threshold: float, max_keywords: int, tail: float | None):
    """SpeechCLIP+'s algorithm written plainly, frame by frame: a frame's weight goes to the keyword being
    filled; when the running sum crosses a multiple of the threshold, the part past it starts the next one."""
    batch, _, dim = frames.shape
    lengths = [min(max(int(math.floor(float(w.sum()) / threshold)), 1), max_keywords) for w in weights]
    slots = max(lengths)
    out = torch.zeros(batch, slots + 1, dim, dtype=torch.float64)
    tail_weight = [0.0] * batch
    for b in range(batch):
        total = 0.0
        for t in range(frames.shape[1]):
            remaining, position = float(weights[b, t]), total
            while remaining > 1e-12:
                slot = min(int(math.floor(position / threshold)), slots)
                room = remaining if slot == slots else min(remaining, (slot + 1) * threshold - position)
                out[b, slot] += room * frames[b, t].double()
                if slot == lengths[b]:
                    tail_weight[b] += room
                position += room
                remaining -= room
            total += float(weights[b, t])
    if tail is None:
        return out[:, :slots].float(), torch.tensor(lengths)
    for b in range(batch):
        if tail_weight[b] >= tail:
            out[b, lengths[b]] *= threshold / tail_weight[b]
            lengths[b] = min(lengths[b] + 1, max_keywords)
    out = out[:, : max(lengths)]
    for b in range(batch):
        out[b, lengths[b]:] = 0
    return out.float(), torch.tensor(lengths)


def test_half_weights_over_six_frames_fire_three_keywords():
    frames = torch.arange(6 * 2, dtype=torch.float32).reshape(1, 6, 2)
    keywords, lengths = integrate_and_fire(frames, torch.full((1, 6), 0.5), 1.0, 75, tail_threshold=0.5)
    assert lengths.tolist() == [3]
    expected = torch.stack([0.5 * (frames[0, 0] + frames[0, 1]), 0.5 * (frames[0, 2] + frames[0, 3]),
                            0.5 * (frames[0, 4] + frames[0, 5])])
    torch.testing.assert_close(keywords[0], expected)


def test_a_frame_splits_its_weight_at_the_threshold_and_a_small_tail_is_dropped():
    h = torch.eye(4)[None]  # frame t is the unit vector e_t: each keyword shows its weights directly
    keywords, lengths = integrate_and_fire(h, torch.tensor([[0.3, 0.9, 0.4, 0.6]]), 1.0, 75, tail_threshold=0.5)
    assert lengths.tolist() == [2]  # sum 2.2: two keywords, tail 0.2 < 0.5
    torch.testing.assert_close(keywords[0], torch.tensor([[0.3, 0.7, 0.0, 0.0], [0.0, 0.2, 0.4, 0.4]]))


def test_a_large_tail_fires_one_more_keyword_scaled_to_full_weight():
    h = torch.eye(5)[None]
    keywords, lengths = integrate_and_fire(h, torch.tensor([[0.5, 0.5, 0.5, 0.5, 0.6]]), 1.0, 75, tail_threshold=0.5)
    assert lengths.tolist() == [3]  # sum 2.6: two full keywords and a tail of 0.6 >= 0.5
    torch.testing.assert_close(keywords[0, 2], torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0]))  # 0.6 * e5 scaled by 1/0.6
    training, train_lengths = integrate_and_fire(h, torch.tensor([[0.5, 0.5, 0.5, 0.5, 0.6]]), 1.0, 75, tail_threshold=None)
    assert train_lengths.tolist() == [2] and training.shape[1] == 2  # training drops the tail


@pytest.mark.parametrize("tail", [None, 0.5])
def test_matches_the_frame_by_frame_reference_on_random_batches(tail):
    torch.manual_seed(0)
    frames = torch.randn(4, 40, 3)
    weights = torch.rand(4, 40) * torch.tensor([[0.2], [0.5], [0.9], [0.05]])
    weights[1, 30:] = 0  # a padded row
    keywords, lengths = integrate_and_fire(frames, weights, 1.0, 75, tail)
    expected, expected_lengths = reference_fire(frames, weights, 1.0, 75, tail)
    assert lengths.tolist() == expected_lengths.tolist()
    torch.testing.assert_close(keywords, expected, atol=1e-5, rtol=1e-5)


def test_keyword_count_is_capped_and_at_least_one():
    frames = torch.randn(2, 100, 3)
    weights = torch.stack([torch.full((100,), 0.99), torch.full((100,), 0.001)])
    keywords, lengths = integrate_and_fire(frames, weights, 1.0, 10, tail_threshold=0.5)
    assert lengths.tolist() == [10, 1] and keywords.shape[1] == 10


def test_quantity_loss_and_training_scaling():
    torch.manual_seed(0)
    cif = ContinuousIntegrateAndFire(4, CIFConfig(frames_per_keyword=20.0)).train()
    frames, mask = torch.randn(2, 60, 4), torch.ones(2, 60, dtype=torch.bool)
    mask[1, 30:] = False  # targets: round(60 / 20) = 3 and round(30 / 20) = 2 (round half to even: 1.5 -> 2)
    with torch.no_grad():
        cif.weight_proj[1].weight.zero_()
        cif.weight_proj[1].bias.fill_(math.log(0.1 / 0.9))  # every valid frame weighs sigmoid(.) = 0.1
    fired = cif(frames, mask, step=0)
    torch.testing.assert_close(fired.weight_sum, torch.tensor([6.0, 3.0]))
    assert fired.lengths.tolist() == [3, 2]  # scaled to the targets in the first scaling_steps steps
    torch.testing.assert_close(cif.quantity_loss(fired, mask), torch.tensor((abs(6 - 3) + abs(3 - 2)) / 2))
    late = cif(frames, mask, step=cif.config.scaling_steps)
    assert late.lengths.tolist() == [6, 3]  # no scaling afterwards: floor(6.0), floor(3.0)


def test_a_clip_fires_the_same_keywords_alone_and_in_a_padded_batch():
    torch.manual_seed(0)
    cif = ContinuousIntegrateAndFire(4, CIFConfig()).eval()
    long, short = torch.randn(1, 50, 4), torch.randn(1, 30, 4)
    batch = torch.zeros(2, 50, 4)
    batch[0], batch[1, :30] = long[0], short[0]
    batch[1, 30:] = 100.0  # whatever sits in padded positions must not leak into valid frames
    mask = torch.ones(2, 50, dtype=torch.bool)
    mask[1, 30:] = False
    together = cif(batch, mask)
    alone = cif(short, torch.ones(1, 30, dtype=torch.bool))
    n = int(alone.lengths[0])
    assert int(together.lengths[1]) == n
    torch.testing.assert_close(together.keywords[1, :n], alone.keywords[0, :n], atol=1e-5, rtol=1e-5)
