"""Mini-encoder pre-training: both precisions train and save ordinary folders that load with the default
attention kernel (the eager kernel and bf16 are training-time choices only)."""

import json

import pytest
import torch

from speechclip.pretrain.mini_hubert import MiniHubertSpec, pretrain_mini_hubert
from speechclip.pretrain.precision import cpu_has_fast_bf16
from speechclip.upstream import SpeechUpstream

TINY = dict(width=32, layers=1, heads=2, clusters=4, steps=2, batch_size=2, conv_dims=(8,) * 5, crop_samples=8000)


@pytest.mark.parametrize("bf16", [False, True])
def test_mini_hubert_pretrains_in_either_precision_and_loads_back(tmp_path, bf16):
    torch.manual_seed(0)
    waves = [torch.randn(12000) * 0.1 for _ in range(3)]
    log = pretrain_mini_hubert(waves, tmp_path, MiniHubertSpec(**TINY, bf16=bf16), progress=False)
    assert log["bf16"] == (bf16 and cpu_has_fast_bf16())
    assert all(torch.isfinite(torch.tensor(log["losses"])))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["hidden_dropout"] == 0.0 and "eager" not in json.dumps(saved)
    upstream = SpeechUpstream(str(tmp_path)).eval()
    states, mask = upstream(waves[0][None], torch.tensor([len(waves[0])]))
    assert states.shape[0] == 2 and torch.isfinite(states).all() and mask.all()


def test_mini_hubert_pretraining_is_reproducible(tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    waves = [torch.randn(12000) * 0.1 for _ in range(3)]
    spec = MiniHubertSpec(**{**TINY, "steps": 3})
    first = pretrain_mini_hubert(waves, tmp_path / "a", spec, progress=False)
    second = pretrain_mini_hubert(waves, tmp_path / "b", spec, progress=False)  # numpy's global RNG has moved on
    assert first["losses"] == second["losses"]
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pretraining_skips_the_waveform_gradient_and_keeps_every_parameter_gradient():
    """HF marks the waveform as requiring grad in training; `without_waveform_gradient` stops backward at the
    first conv layer. The reference: the same step on a copy of the model as transformers builds it."""
    import copy

    import numpy as np
    from transformers import AutoModel

    from speechclip.pretrain.mini_hubert import _step, hubert_config, without_waveform_gradient

    spec = MiniHubertSpec(**TINY)
    torch.manual_seed(0)
    as_built = AutoModel.from_config(hubert_config(spec), attn_implementation="eager").train()
    ours = without_waveform_gradient(copy.deepcopy(as_built))
    head = torch.nn.Linear(spec.width, spec.clusters)
    waves = torch.randn(2, 8000) * 0.1
    targets = torch.randint(0, spec.clusters, (2, spec.frames(8000)))
    first_input_needs_grad = []
    gradients = []
    for model in (as_built, ours):
        hook = model.feature_extractor.conv_layers[0].conv.register_forward_hook(
            lambda module, args, out: first_input_needs_grad.append(args[0].requires_grad))
        np.random.seed(0)  # HF's span masking draws from numpy's global RNG
        torch.manual_seed(0)  # and anything drawing from torch's (none at these settings) draws the same
        loss, _ = _step(model, head, waves, targets, spec)
        loss.backward()
        hook.remove()
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
        head.zero_grad()
    assert first_input_needs_grad == [True, False]  # transformers still marks it; ours does not
    assert gradients[0].keys() == gradients[1].keys() and len(gradients[0]) == len(list(as_built.parameters()))
    assert all(torch.equal(gradients[0][name], gradients[1][name]) for name in gradients[0])
