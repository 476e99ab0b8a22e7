"""Model FLOPs of a training step, for TFLOP/s and MFU figures.

Counted as the model needs them (what MFU means), not as a kernel happens to compute them:
matmuls of every layer and of the reward head, and causal attention inside each packed
sequence (sum of L^2 / 2 per sequence, not T^2 per pack). Shared-prefix packs count what they
compute: each prefix once, each candidate's attention over its prefix and itself. The embedding lookup costs no FLOPs.
Backward = 2 x forward, so a training step is 3 x forward. Recomputation is not counted.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

import torch

from megatron_polar.model.presets import ModelPreset
from megatron_polar.runtime.device import on_gpu

# Dense bf16 tensor-core peak TFLOP/s per GPU (vendor datasheet figures without sparsity,
# i.e. half the "with sparsity" number). A key matches a device name when each of its words
# appears in the name as a whole word, case-insensitively ("H20" does not match "H200",
# "L40S" is not "L40"), and a form-factor word of the name (PCIe, NVL) is one of the key's:
# "NVIDIA H100 NVL" (a lower-clocked card) matches no key rather than the SXM figure. The most
# specific matching key wins ("H100 PCIe" over "H100"). torch.cuda.get_device_name() spells
# them e.g. "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB",
# "NVIDIA A100-PCIE-40GB", "NVIDIA H20". A GPU not in the table has no MFU unless
# --peak-tflops gives its peak.
PEAK_BF16_TFLOPS = {
    "H100": 989.0,  # SXM5
    "H100 PCIe": 756.0,
    "H800": 989.0,  # SXM5: H100 compute, narrower NVLink
    "H800 PCIe": 756.0,
    "H200": 989.0,  # SXM: H100 compute, HBM3e
    "H20": 148.0,
    "A100": 312.0,  # SXM4
    "A100 PCIe": 312.0,  # same tensor-core peak as SXM4
    "A800": 312.0,
    "A800 PCIe": 312.0,
    "L40S": 362.0,
    "B200": 2250.0,
}
_FORM_FACTORS = ("PCIe", "NVL")


def matmul_params_per_token(preset: ModelPreset) -> int:
    """Weights every token is multiplied with: all layer projections plus the head."""
    h, kv = preset.hidden_size, preset.num_query_groups * preset.head_dim
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * preset.ffn_hidden_size
    return preset.num_layers * per_layer + h


def training_flops(preset: ModelPreset, sequence_lengths: Iterable[int],
                   prefix_lengths: Optional[Iterable[int]] = None) -> float:
    """FLOPs of forward + backward over sequences (segments) of these lengths, packed or not.

    `prefix_lengths` (shared-prefix packs): keys each segment attends to before its own, its
    item's prefix for a candidate (0 for a prefix or a plain sequence). The FLOPs are those
    computed: a shared prefix's tokens once, each candidate's attention over the prefix and,
    causally, itself; a plain pack of the same pairs counts each prefix per sequence."""
    lengths = list(sequence_lengths)
    prefixes = [0] * len(lengths) if prefix_lengths is None else list(prefix_lengths)
    if len(prefixes) != len(lengths):
        raise ValueError("one prefix length per sequence length")
    tokens = sum(lengths)
    dense = 2.0 * matmul_params_per_token(preset) * tokens
    # QK^T and AV: 2 matmuls x 2 FLOPs x (heads x head_dim) per (query, key) pair attended;
    # a causal segment of L queries after P prefix keys attends to L * P + L^2 / 2 pairs.
    pairs = sum(L * L + 2 * L * P for L, P in zip(lengths, prefixes)) / 2
    attention = 4.0 * preset.num_layers * preset.hidden_size * pairs
    return 3.0 * (dense + attention)


def _has_word(word: str, name: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(word)}(?![A-Za-z0-9])", name, re.I) is not None


def _name_matches(key: str, name: str) -> bool:
    words = key.split()
    return (all(_has_word(w, name) for w in words)
            and all(f in words for f in _FORM_FACTORS if _has_word(f, name)))


def peak_tflops_for_device_name(name: str) -> float | None:
    """Dense bf16 peak of a GPU from its device name, or None for a GPU not in the table."""
    matches = [key for key in PEAK_BF16_TFLOPS if _name_matches(key, name)]
    if not matches:
        return None
    # Most specific first: more words, then a longer key.
    best = max(matches, key=lambda key: (len(key.split()), len(key)))
    return PEAK_BF16_TFLOPS[best]


def peak_tflops_of_this_gpu() -> float | None:
    """Dense bf16 peak of the local GPU if it is one we know, else None."""
    if not on_gpu():
        return None
    return peak_tflops_for_device_name(torch.cuda.get_device_name())
