"""`speechclip.dropout.Dropout` against F.dropout's contract, and where the heads use it."""

import pytest
import torch
from torch import nn

from speechclip import attention
from speechclip.attention import AttentionLayer, EncoderStack, MultiheadAttention, encode_queries, projection
from speechclip.dropout import Dropout, fast_dropout


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
    assert len(calls) == 6  # 3 per layer, 2 layers (the attention weights': MultiheadAttention below)
    torch.testing.assert_close(stack.eval()(sequence, padding), reference(sequence, src_key_padding_mask=padding))
    assert isinstance(projection(16, 8, [12], dropout=0.1)[2], Dropout)


def reference_attention(module: nn.MultiheadAttention, query, memory, padding, dropped=None):
    """Multi-head attention written out from the raw weights (the formula, not torch's kernels): softmax of the
    scaled query-key products, padded keys excluded, optionally times a given (B, heads, Tq, S) dropout factor."""
    width, heads = module.embed_dim, module.num_heads
    w, b = module.in_proj_weight, module.in_proj_bias
    q, k, v = query @ w[:width].T + b[:width], memory @ w[width:2 * width].T + b[width:2 * width], memory @ w[2 * width:].T + b[2 * width:]
    split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, width // heads).permute(0, 2, 1, 3)
    q, k, v = split(q), split(k), split(v)
    scores = q @ k.transpose(-1, -2) / (width // heads) ** 0.5
    weights = scores.masked_fill(padding[:, None, None, :], float("-inf")).softmax(-1)
    if dropped is not None:
        weights = weights * dropped
    out = (weights @ v).permute(0, 2, 1, 3).reshape(query.shape[0], query.shape[1], width)
    return out @ module.out_proj.weight.T + module.out_proj.bias


def _attention_and_inputs(p: float):
    torch.manual_seed(0)
    module = MultiheadAttention(16, 4, dropout=p)
    sequence, padding = torch.randn(3, 10, 16), torch.zeros(3, 10, dtype=torch.bool)
    padding[1, 7:] = True
    padding[2, 4:] = True
    return module, sequence, padding


def _record_weights_dropout(monkeypatch, apply=fast_dropout) -> list:
    """Replace the attention module's dropout call: each call's (input, p, output) is recorded."""
    calls = []

    def recorded(x, p, training=True):
        out = apply(x, p, training)
        calls.append((x, p, out))
        return out

    monkeypatch.setattr(attention, "fast_dropout", recorded)
    return calls


@pytest.mark.parametrize("queries", [None, 3])
def test_training_attention_is_the_formula_with_the_cheaper_mask_on_its_weights(queries, monkeypatch):
    """In training on CPU the attention is computed here: the output is the formula's with the weights' dropout
    factor (recorded from the module's own call: its rate p, 1/(1-p) scale), for a bool or float padding mask
    and for the first positions alone (encode_queries); gradients reach every projection."""
    module, sequence, padding = _attention_and_inputs(0.3)
    query = sequence if queries is None else sequence[:, :queries]
    calls = _record_weights_dropout(monkeypatch)
    out, weights = module.train()(query, sequence, sequence, key_padding_mask=padding, need_weights=False)
    assert weights is None and len(calls) == 1 and calls[0][1] == 0.3
    x, _, dropped_out = calls[0]
    dropped = torch.where(x > 0, dropped_out / x, 0.0).detach()
    valid = dropped[~padding[:, None, None, :].expand_as(dropped)]
    assert bool(((valid == 0) | torch.isclose(valid, torch.tensor(1 / 0.7))).all())
    assert 0.15 < (valid == 0).float().mean() < 0.45
    torch.testing.assert_close(out, reference_attention(module, query, sequence, padding, dropped))
    float_mask = torch.zeros(padding.shape).masked_fill(padding, float("-inf"))  # what nn.TransformerEncoderLayer passes
    torch.manual_seed(5)
    first = module(query, sequence, sequence, key_padding_mask=float_mask, need_weights=False)[0]
    torch.manual_seed(5)
    torch.testing.assert_close(first, module(query, sequence, sequence, key_padding_mask=padding, need_weights=False)[0])
    first.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_eval_and_other_calls_take_torchs_attention(monkeypatch):
    """Evaluation, returned weights and attention masks go through nn.MultiheadAttention's own forward."""
    module, sequence, padding = _attention_and_inputs(0.3)
    calls = _record_weights_dropout(monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(module.eval()(sequence, sequence, sequence, key_padding_mask=padding, need_weights=False)[0],
                                   reference_attention(module, sequence, sequence, padding))
        assert module.train()(sequence, sequence, sequence, key_padding_mask=padding)[1] is not None  # need_weights
        module(sequence, sequence, sequence, attn_mask=torch.zeros(10, 10, dtype=torch.bool), need_weights=False)
    assert calls == []


def test_autocast_training_attention_stays_near_the_fp32_formula(monkeypatch):
    """bf16 autocast (the demo's training precision here): products in bf16, softmax and dropout in fp32."""
    module, sequence, padding = _attention_and_inputs(0.1)
    calls = _record_weights_dropout(monkeypatch, apply=lambda x, p, training: x)  # the explicit path without a mask
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module.train()(sequence, sequence, sequence, key_padding_mask=padding, need_weights=False)[0]
    assert len(calls) == 1 and calls[0][0].dtype == torch.float32
    torch.testing.assert_close(out.float(), reference_attention(module, sequence, sequence, padding), atol=0.05, rtol=0.05)


def test_the_heads_use_it_with_torchs_parameter_names(monkeypatch):
    """The same state-dict keys as torch's module (checkpoints and converted weights load as before); the query-only
    last layer of encode_queries trains through it and reads out what the full layer computes for those positions."""
    layer = AttentionLayer(16, 2, dropout=0.1)
    assert isinstance(layer.attention, MultiheadAttention)
    assert list(layer.attention.state_dict()) == list(nn.MultiheadAttention(16, 2, batch_first=True).state_dict())
    stack = EncoderStack(16, 2, 4, 32, dropout=0.1)
    assert all(isinstance(each.self_attn, MultiheadAttention) for each in stack.encoder.layers)
    sequence, padding = torch.randn(3, 10, 16), torch.zeros(3, 10, dtype=torch.bool)
    padding[1, 6:] = True
    for module in stack.modules():  # no dropout anywhere, the explicit attention path kept (module.dropout > 0)
        if isinstance(module, Dropout):
            module.p = 0.0
    calls = _record_weights_dropout(monkeypatch, apply=lambda x, p, training: x)
    queried = encode_queries(stack.encoder.train(), sequence, padding, 2)
    full = stack.encoder.layers[1](stack.encoder.layers[0](sequence, src_key_padding_mask=padding), src_key_padding_mask=padding)
    assert len(calls) == 4  # the explicit path: two layers, twice
    torch.testing.assert_close(queried, full[:, :2])
    queried.sum().backward()
