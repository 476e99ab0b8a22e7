"""Layer-spec choice: Transformer Engine on GPU when it imports, megatron-core's local spec otherwise."""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_polar.model.config import ModelRunConfig


class FP8UnavailableError(RuntimeError):
    """FP8 was asked for on a machine that cannot run it."""


def transformer_engine_available() -> bool:
    """True when `transformer_engine` can be imported (it is not installed on CPU machines)."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # a broken TE install (e.g. without its CUDA libraries) counts as absent
        return False
    return True


def hopper_or_newer() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def resolve_use_te(run: ModelRunConfig, *, te_available: Optional[bool] = None,
                   cuda_available: Optional[bool] = None, hopper: Optional[bool] = None) -> bool:
    """Decide whether this run uses the TE spec, and reject FP8 where it cannot run.

    The keyword overrides exist so the decision table can be tested without a GPU.
    """
    te = transformer_engine_available() if te_available is None else te_available
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    sm90 = hopper_or_newer() if hopper is None else hopper
    if run.fp8.enabled:
        missing = [what for what, ok in (("Transformer Engine", te), ("a CUDA GPU", cuda),
                                         ("a Hopper (sm90) or newer GPU", sm90)) if not ok]
        if missing:
            raise FP8UnavailableError(
                f"FP8 ({run.fp8.format}) needs {', '.join(missing)}; this machine lacks it. "
                "Drop --fp8-format to train in bf16/fp32 instead.")
        if run.use_transformer_engine is False:
            raise FP8UnavailableError("FP8 needs the Transformer Engine layer spec; "
                                      "do not disable Transformer Engine together with --fp8-format")
    for feature, asked in (("context parallelism (--context-parallel-size > 1)",
                            run.context_parallel_size > 1),
                           ("--tp-comm-overlap", run.tp_comm_overlap)):
        if asked and not (te and cuda and run.use_transformer_engine is not False):
            raise RuntimeError(f"{feature} needs Transformer Engine on a CUDA GPU; "
                               + ("it is disabled" if run.use_transformer_engine is False
                                  else "this machine lacks " + ("Transformer Engine" if not te
                                                                else "a CUDA GPU")))
    if run.use_transformer_engine is True and not (te and cuda):
        raise RuntimeError("Transformer Engine was requested but "
                           + ("is not installed" if not te else "no CUDA GPU is available"))
    if run.use_transformer_engine is None:
        return te and cuda
    return run.use_transformer_engine


def build_layer_spec(use_te: bool) -> ModuleSpec:
    """The per-layer ModuleSpec of an InternLM2 decoder layer (RMSNorm, SwiGLU, no biases)."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    from megatron_polar.model.attention import PackedCoreAttention

    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    # Swap only the attention kernel: megatron's local DotProductAttention rejects packed
    # sequences. Everything else (projections, norms, MLP, RoPE) stays megatron's.
    spec.submodules.self_attention.submodules.core_attention = PackedCoreAttention
    return spec
