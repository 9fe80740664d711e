"""Mixed precision for the demo's CPU pre-training: bf16 autocast where the CPU computes bf16 natively.

Measured on the project's 2-core AVX512-BF16 machine (`python benchmarks/pretrain_step.py`, one step,
fp32 -> bf16 autocast with eager attention): mini HuBERT 154 -> 96 ms, mini CLIP 373 -> 133 ms. Eager
attention matters under bf16: CPU SDPA's flash-attention backward is the slowest kernel of the step there.
In fp32 (CPUs without bf16 units, e.g. AVX2 only) SDPA is the faster kernel. Weights and optimiser state
stay fp32; the saved folders are ordinary fp32 checkpoints that load with the default attention kernel.
"""

from __future__ import annotations

import torch


def cpu_has_fast_bf16() -> bool:
    """bf16 matmuls run natively (AVX512-BF16 or AMX); elsewhere autocast would emulate them, slower than fp32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def cpu_autocast(enabled: bool) -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def attention_kernel(bf16: bool) -> str:
    """The attention kernel the pre-training models are built with (see the module note)."""
    return "eager" if bf16 else "sdpa"
