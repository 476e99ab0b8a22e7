"""RMSNorm for the local (non-Transformer-Engine) layer spec, sequence parallelism included.

megatron-core's local spec builds its norms with `WrappedTorchNorm`, i.e. `torch.nn.RMSNorm`,
when apex is absent, and that wrapper refuses sequence parallelism (transformer/torch_norm.py
0.16.1, line 32). The maths needs nothing new: under sequence parallelism each TP rank
normalises its own slice of the sequence, so the norm's weight gradient is partial per rank and
must be summed over TP. megatron's `finalize_model_grads` does that sum for every parameter
marked `sequence_parallel` (distributed/finalize_model_grads.py 0.16.1, line 354), which is how
apex's FusedLayerNorm and TE's norms take part. `LocalRMSNorm` is the same `torch.nn.RMSNorm`
module with that mark, so the local spec can run the shipped TP + sequence-parallel layouts on
a CPU (and on a GPU without TE or apex). Without sequence parallelism it is exactly the module
megatron's wrapper builds (same parameter, same checkpoint key).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class LocalRMSNorm(torch.nn.RMSNorm):
    """`torch.nn.RMSNorm` with megatron's norm-submodule constructor
    (`build_module(spec, config=, hidden_size=, eps=)`)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5,
                 persist_layer_norm: bool = False, zero_centered_gamma: bool = False,
                 normalization: str = "RMSNorm"):
        if config.normalization != "RMSNorm" or config.layernorm_zero_centered_gamma:
            raise ValueError("LocalRMSNorm is RMSNorm with a plain gain: got normalization="
                             f"{config.normalization!r}, zero-centred gamma "
                             f"{config.layernorm_zero_centered_gamma}")
        super().__init__(hidden_size, eps=eps)
        if config.sequence_parallel:
            self.weight.sequence_parallel = True
