"""`speechclip.dropout.Dropout` against F.dropout's contract, and where the heads use it."""

import pytest
import torch
from torch import nn

from speechclip.attention import EncoderStack, projection
from speechclip.dropout import Dropout


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_drops_at_rate_p_in_every_lane_and_scales_as_f_dropout(p):
    """Each element zeroed with probability p (checked in each of the four 16-bit shares a 64-bit word gives,
    to 6 standard errors), the rest scaled so the expected value is kept, the gradient the same mask; eval
    mode and p = 0 leave the input alone."""
    torch.manual_seed(0)
    x = torch.rand(256, 1024) + 1.0  # no zeros of its own
    x.requires_grad_(True)
    dropout = Dropout(p).train()
    y = dropout(x)
    kept = y != 0
    n = x.numel() // 4
    for lane in range(4):
        rate = 1 - kept.flatten()[lane::4].float().mean().item()
        assert abs(rate - p) < 6 * (p * (1 - p) / n) ** 0.5, (lane, rate)
    scale = 1 / (1 - p)
    torch.testing.assert_close(y[kept], x[kept] * scale)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() * scale)
    assert abs(y.mean() - torch.nn.functional.dropout(x.detach(), p, True).mean()) < 0.01
    assert not torch.equal(dropout(x), dropout(x))  # a new mask per call
    torch.manual_seed(1)
    first = dropout(x)
    torch.manual_seed(1)
    assert torch.equal(dropout(x), first)  # the default generator: seeds and resumes as torch's own
    assert torch.equal(dropout.eval()(x), x) and torch.equal(Dropout(0.0).train()(x), x)


@pytest.mark.parametrize("shape", [(0, 5), (7,), (3, 5, 7)])
def test_any_size_and_a_non_contiguous_input(shape):
    torch.manual_seed(0)
    x = torch.rand(*shape) + 1.0
    y = Dropout(0.3).train()(x)
    assert y.shape == x.shape and bool(((y == 0) | torch.isclose(y, x / 0.7, rtol=1e-3)).all())
    t = (torch.rand(64, 32) + 1.0).T  # non-contiguous
    z = Dropout(0.3).train()(t)
    assert bool(((z == 0) | torch.isclose(z, t / 0.7, rtol=1e-3)).all()) and 0.2 < (z == 0).float().mean() < 0.4


def test_bf16_input_keeps_its_dtype():
    x = torch.ones(64, 64, dtype=torch.bfloat16)
    y = Dropout(0.1).train()(x)
    assert y.dtype == torch.bfloat16 and set(y.unique().tolist()) <= {0.0, float(torch.tensor(1 / 0.9, dtype=torch.bfloat16))}


@pytest.mark.parametrize("p", [1.0, 1 - 2**-17])
def test_p_at_or_just_below_one_drops_everything(p):
    """round(p * 2^15) = 2^15 does not fit an int16 comparison: nothing is kept, as F.dropout(p=1) does."""
    y = Dropout(p).train()(torch.ones(1000))
    assert torch.equal(y, torch.zeros(1000))


def test_the_encoder_stack_trains_through_it_and_keeps_torchs_parameter_names():
    """The Transformer layer's three dropouts are swapped (no parameters: checkpoints are unchanged); in training
    each is called once per layer and step, and in eval mode the stack computes what torch's own encoder of the
    same weights computes."""
    torch.manual_seed(0)
    stack = EncoderStack(16, 2, 4, 32, dropout=0.1)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, activation="gelu", batch_first=True)
    reference = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16), enable_nested_tensor=False).eval()
    assert list(stack.encoder.state_dict()) == list(reference.state_dict())
    reference.load_state_dict(stack.encoder.state_dict())
    sequence, padding = torch.randn(3, 10, 16), torch.zeros(3, 10, dtype=torch.bool)
    padding[2, 6:] = True
    calls = []
    for module in stack.modules():
        if isinstance(module, Dropout):
            module.register_forward_hook(lambda *_: calls.append(1))
    stack.train()(sequence, padding).sum().backward()
    assert len(calls) == 6  # 3 per layer, 2 layers
    torch.testing.assert_close(stack.eval()(sequence, padding), reference(sequence, src_key_padding_mask=padding))
    assert isinstance(projection(16, 8, [12], dropout=0.1)[2], Dropout)
