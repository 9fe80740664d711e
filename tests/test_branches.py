import pytest
import torch
from torch import nn

from speechclip import SpeechCLIP
from speechclip.attention import AttentionLayer, encode_queries, projection
from speechclip.keywords import KeywordNorm, KeywordQuantizer
from tests.conftest import tiny_model_config


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("norm_first", [False, True])
def test_query_only_last_layer_matches_the_full_encoder(layers, norm_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, activation="gelu", batch_first=True, norm_first=norm_first)
    encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).eval()
    sequence = torch.randn(3, 12, 16)
    padding = torch.zeros(3, 12, dtype=torch.bool)
    padding[1, 9:] = True
    padding[2, 5:] = True
    full = encoder(sequence, src_key_padding_mask=padding)[:, :3]
    assert torch.allclose(encode_queries(encoder, sequence, padding, 3), full, atol=1e-5)


def test_attention_layer_is_the_reference_attention_and_norm():
    """LN(MHA(x, x, x) + x) over the whole sequence (reference MultiheadAttentionAndNorm), queries-only equal."""
    torch.manual_seed(0)
    layer = AttentionLayer(16, 2, dropout=0.1).eval()
    sequence, padding = torch.randn(2, 9, 16), torch.zeros(2, 9, dtype=torch.bool)
    padding[1, 6:] = True
    reference = layer.norm(layer.attention(sequence, sequence, sequence, key_padding_mask=padding)[0] + sequence)
    torch.testing.assert_close(layer(sequence, padding), reference)
    torch.testing.assert_close(layer(sequence, padding, queries=3), reference[:, :3])


def _trainable(model: SpeechCLIP) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("hybrid, cascaded", [("hybrid", "cascaded"), ("hybrid_plus", "cascaded_plus")])
def test_hybrid_adds_only_a_parallel_cls_and_projection_to_its_cascaded_twin(encoders, hybrid, cascaded):
    """SpeechCLIP+: the hybrids share ONE attention layer built from the cascaded settings."""
    with_parallel, keywords_only = SpeechCLIP(tiny_model_config(encoders, hybrid)), SpeechCLIP(tiny_model_config(encoders, cascaded))
    width, clip_dim = with_parallel.upstream.hidden_size, with_parallel.clip.embed_dim
    assert _trainable(with_parallel) - _trainable(keywords_only) == width + (width * clip_dim + clip_dim)
    layer = with_parallel.head.attention
    assert isinstance(layer, AttentionLayer) and layer.attention.num_heads == 1  # cascaded settings: 1 head, no FFN
    assert not any("linear1" in name for name, _ in with_parallel.head.named_parameters())


def test_keyword_batchnorm_starts_at_the_vocabulary_statistics(encoders):
    model = SpeechCLIP(tiny_model_config(encoders, "cascaded", cascaded=dict(num_keywords=4, keyword_vocab=list(range(200, 300)))))
    table = model.clip.token_embedding[model.head.keywords.quantizer.vocab_ids]
    norm = model.head.keywords.norm.norm
    assert norm.weight.shape == (4 * table.shape[1],)  # one BatchNorm over K*D channels, channel d*K + k
    for k in range(4):
        torch.testing.assert_close(norm.weight[k::4], table.std(0))
        torch.testing.assert_close(norm.bias[k::4], table.mean(0))


def test_keyword_batchnorm_channel_order_is_d_times_k_plus_k():
    """Feed the reference's computation: permute to (B, D, K), flatten, BatchNorm1d(K*D), back."""
    torch.manual_seed(0)
    norm = KeywordNorm(torch.randn(50, 6), keywords=3).train()
    with torch.no_grad():
        norm.norm.weight.copy_(torch.randn(18))
        norm.norm.bias.copy_(torch.randn(18))
    keywords = torch.randn(5, 3, 6)
    flat = keywords.permute(0, 2, 1).reshape(5, 18)
    mean, var = flat.mean(0), flat.var(0, unbiased=False)
    expected = ((flat - mean) / torch.sqrt(var + 1e-5) * norm.norm.weight + norm.norm.bias).reshape(5, 6, 3).permute(0, 2, 1)
    torch.testing.assert_close(norm(keywords), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("training", [True, False])
def test_quantized_keyword_is_exactly_the_chosen_subword_embedding(training):
    torch.manual_seed(0)
    table = torch.randn(40, 8)
    quantizer = KeywordQuantizer(torch.arange(3, 40), temperature=0.1, hard=True).train(training)
    keywords = torch.randn(2, 5, 8, requires_grad=True)
    quantized, ids, cosine = quantizer(keywords, table)
    assert torch.equal(quantized, table[ids])
    assert ids.min() >= 3  # only the vocabulary's ids
    expected = torch.nn.functional.cosine_similarity(keywords[:, :, None], table[3:][None, None], dim=-1)
    torch.testing.assert_close(cosine, expected)
    if training:  # straight-through: the gradient is the softmax mixture's, written out here
        weights = torch.randn(2, 5, 8)
        (quantized * weights).sum().backward()
        again = keywords.detach().clone().requires_grad_(True)
        mixture = (torch.nn.functional.cosine_similarity(again[:, :, None], table[3:][None, None], dim=-1) / 0.1).softmax(-1) @ table[3:]
        (mixture * weights).sum().backward()
        torch.testing.assert_close(keywords.grad, again.grad)


def test_mlp_projection_has_the_reference_layout():
    mlp = projection(16, 8, [12], dropout=0.1)
    assert [name for name, _ in mlp.named_parameters()] == ["0.weight", "0.bias", "3.weight", "3.bias"]
    assert isinstance(projection(16, 8, [], 0.1), nn.Linear)


def test_a_setting_the_variant_ignores_is_refused(encoders):
    from speechclip import ConfigError

    with pytest.raises(ConfigError, match="parallel.num_heads: not used by the hybrid variant"):
        tiny_model_config(encoders, "hybrid", parallel=dict(num_heads=4))
    with pytest.raises(ConfigError, match="cascaded.num_keywords: not used by the cascaded_plus"):
        tiny_model_config(encoders, "cascaded_plus", cascaded=dict(num_keywords=4))
    with pytest.raises(ConfigError, match="cif.threshold: not used by the cascaded variant"):
        tiny_model_config(encoders, "cascaded", cif=dict(threshold=2.0))
    with pytest.raises(ConfigError, match="cif.max_keywords=75: this CLIP reads at most 30"):
        SpeechCLIP(tiny_model_config(encoders, "cascaded_plus", cif={}))


def test_hybrid_with_two_shared_layers_reads_out_what_the_full_encoder_computes(encoders):
    """cascaded.num_layers=2 (the reference's transformer_args.n_layers): the first layer runs over every frame,
    so frames see each other before the [CLS] and keyword tokens read them; the queries-only last layer must
    give what PyTorch's whole encoder (with its final norm) gives at those positions."""
    torch.manual_seed(0)
    config = tiny_model_config(encoders, "hybrid", cascaded=dict(num_keywords=4, attention="transformer", num_layers=2,
                                                                 num_heads=2, ffn_dim=64))
    model = SpeechCLIP(config).eval()
    head = model.head
    assert len(head.attention.encoder.layers) == 2
    width = model.upstream.hidden_size
    frames, frame_mask = torch.randn(3, 11, width), torch.ones(3, 11, dtype=torch.bool)
    frame_mask[1, 7:] = False
    with torch.no_grad():
        output = head(frames, frame_mask, model.clip)
        tokens = torch.cat([head.parallel_cls, head.cascaded_cls]).expand(3, -1, -1)
        padding = torch.cat([torch.zeros(3, 5, dtype=torch.bool), ~frame_mask], dim=1)
        full = head.attention.encoder(torch.cat([tokens, frames], dim=1), src_key_padding_mask=padding)
        torch.testing.assert_close(output.parallel, head.projection(full[:, 0]), atol=1e-5, rtol=1e-5)
