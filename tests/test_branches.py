import pytest
import torch
from torch import nn

from speechclip.branches import _encode_queries


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
    assert torch.allclose(_encode_queries(encoder, sequence, padding, 3), full, atol=1e-5)
