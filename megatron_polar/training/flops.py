"""Model FLOPs of a training step, for TFLOP/s and MFU figures.

Counted as the model needs them (what MFU means), not as a kernel happens to compute them:
matmuls of every layer and of the reward head, and causal attention inside each packed
sequence (sum of L^2 / 2 per sequence, not T^2 per pack). The embedding lookup costs no FLOPs.
Backward = 2 x forward, so a training step is 3 x forward. Recomputation is not counted.
"""

from __future__ import annotations

from typing import Iterable

import torch

from megatron_polar.model.presets import ModelPreset

# Dense bf16 peak TFLOP/s per GPU (vendor figures, no sparsity).
PEAK_BF16_TFLOPS = {"H100": 989.0, "H800": 989.0, "H200": 989.0, "A100": 312.0, "A800": 312.0}


def matmul_params_per_token(preset: ModelPreset) -> int:
    """Weights every token is multiplied with: all layer projections plus the head."""
    h, kv = preset.hidden_size, preset.num_query_groups * preset.head_dim
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * preset.ffn_hidden_size
    return preset.num_layers * per_layer + h


def training_flops(preset: ModelPreset, sequence_lengths: Iterable[int]) -> float:
    """FLOPs of forward + backward over sequences of these lengths (packed or not)."""
    lengths = list(sequence_lengths)
    tokens = sum(lengths)
    dense = 2.0 * matmul_params_per_token(preset) * tokens
    # QK^T and AV: 2 matmuls x 2 FLOPs x L^2 x (heads x head_dim), halved by the causal mask.
    attention = 2.0 * preset.num_layers * preset.hidden_size * sum(L * L for L in lengths)
    return 3.0 * (dense + attention)


def peak_tflops_of_this_gpu() -> float | None:
    """Dense bf16 peak of the local GPU if it is one we know, else None."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None
