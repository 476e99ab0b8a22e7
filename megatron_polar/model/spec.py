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


def device_capability() -> Optional[tuple[int, int]]:
    """(major, minor) compute capability of the current CUDA device; None without one."""
    return tuple(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None


def hopper_or_newer() -> bool:
    capability = device_capability()
    return capability is not None and capability >= (9, 0)


def transformer_engine_version() -> Optional[str]:
    try:
        import transformer_engine

        return str(transformer_engine.__version__)
    except Exception:
        return None


# What each --fp8-recipe needs beyond FP8 itself: (compute capability, Transformer Engine
# version), as megatron-core 0.16.1 and TE 2.x state them.
# - tensorwise (Float8CurrentScaling): TE >= 2.2.0.dev0 (megatron/core/fp8_utils.py:561).
# - blockwise (Float8BlockScaling): TE >= 2.3.0.dev0 (fp8_utils.py:565); TE's own
#   check_fp8_block_scaling_support also wants sm90+ and CUDA >= 12.9 (checked by TE).
# - mxfp8 (MXFP8BlockScaling): "Blackwell architecture only" (megatron/core/transformer/
#   transformer_config.py:441); TE's check_mxfp8_support requires compute capability >= 10.0,
#   so Hopper (9.0) cannot run it. Megatron builds it from TE 2.1.0 on (fp8_utils.py:554-569);
#   below 2.1.0 only delayed scaling exists (fp8_utils.py:579-584).
# Any other recipe with an unknown TE version is left to megatron/TE to refuse.
FP8_RECIPE_NEEDS: dict[str, tuple[tuple[int, int], Optional[str]]] = {
    "delayed": ((9, 0), None),
    "tensorwise": ((9, 0), "2.2.0.dev0"),
    "blockwise": ((9, 0), "2.3.0.dev0"),
    "mxfp8": ((10, 0), "2.1.0"),
}


def _check_fp8_recipe(recipe: str, capability: Optional[tuple[int, int]],
                      te_version: Optional[str]) -> None:
    need_capability, need_te = FP8_RECIPE_NEEDS[recipe]
    if capability is None or tuple(capability) < need_capability:
        have = ("an unknown compute capability" if capability is None
                else f"compute capability {capability[0]}.{capability[1]}")
        if recipe == "mxfp8":
            raise FP8UnavailableError(
                f"--fp8-recipe mxfp8 (MXFP8 block scaling) needs a Blackwell GPU (compute "
                f"capability 10.x); this GPU has {have} (Hopper is 9.0). On Hopper use "
                "--fp8-recipe delayed, tensorwise or blockwise.")
        raise FP8UnavailableError(
            f"--fp8-recipe {recipe} needs compute capability "
            f"{need_capability[0]}.{need_capability[1]} or newer; this GPU has {have}")
    if need_te and te_version:
        from packaging.version import Version

        if Version(te_version) < Version(need_te):
            raise FP8UnavailableError(
                f"--fp8-recipe {recipe} needs Transformer Engine >= {need_te} "
                f"(megatron-core builds it only from there); this one is {te_version}")


def resolve_use_te(run: ModelRunConfig, *, te_available: Optional[bool] = None,
                   cuda_available: Optional[bool] = None, hopper: Optional[bool] = None,
                   capability: Optional[tuple[int, int]] = None,
                   te_version: Optional[str] = None) -> bool:
    """Decide whether this run uses the TE spec, and reject what cannot run here: context
    parallelism (not implemented for packed pairs), FP8 without TE on a Hopper or newer GPU,
    FP8 recipes this GPU or TE cannot run, TP overlap without TE on a GPU.

    The keyword overrides exist so the decision table can be tested without a GPU:
    `capability` is the device's (major, minor) compute capability (`hopper` defaults to
    capability >= 9.0), `te_version` the Transformer Engine version.
    """
    if run.context_parallel_size > 1:
        # NotImplementedError is a RuntimeError: the trainer reports it as a refusal.
        raise NotImplementedError(
            f"context parallelism (--context-parallel-size {run.context_parallel_size}) is not "
            "implemented for POLAR's packed pairs: the packs would not be partitioned per "
            "sequence across context-parallel ranks (THD cu_seqlens split into 2 x CP "
            "load-balanced chunks), so every CP rank would compute the whole pack, and the "
            "reward tokens at the sequence ends are not gathered from the CP rank that holds "
            "them. Use --context-parallel-size 1; for long sequences split activations with "
            "tensor parallelism and --sequence-parallel (and pipeline parallelism) instead.")
    te = transformer_engine_available() if te_available is None else te_available
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if capability is None and cuda_available is None:
        capability = device_capability()
    sm90 = (capability is not None and tuple(capability) >= (9, 0)) if hopper is None else hopper
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
        if capability is None and hopper:  # told "Hopper or newer", nothing more precise
            capability = (9, 0)
        _check_fp8_recipe(run.fp8.recipe, capability,
                          transformer_engine_version() if te_version is None else te_version)
        if run.tp_comm_overlap and run.fp8.recipe == "blockwise":
            # TE's userbuffers take Float8 (delayed/current scaling) and MXFP8 quantizers only
            # (TE 2.x pytorch/module/base.py `fill_userbuffers_buffer_for_all_gather`: "Unsupported
            # quantizer for Userbuffers"), and megatron-core does not check it.
            raise FP8UnavailableError("--fp8-recipe blockwise cannot be combined with "
                                      "--tp-comm-overlap (Transformer Engine's userbuffers do not "
                                      "take blockwise-scaled FP8); use --fp8-recipe delayed or "
                                      "tensorwise, or drop --tp-comm-overlap")
    if run.tp_comm_overlap and not (te and cuda and run.use_transformer_engine is not False):
        raise RuntimeError("--tp-comm-overlap needs Transformer Engine on a CUDA GPU; "
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
        from megatron_polar.model.te_attention import shared_prefix_te_attention_class

        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
        # megatron's TEDotProductAttention, plus shared-prefix packs (model/te_attention.py);
        # every other call goes to megatron's forward unchanged.
        spec.submodules.self_attention.submodules.core_attention = (
            shared_prefix_te_attention_class())
        return spec
    from megatron_polar.model.attention import PackedCoreAttention

    from megatron_polar.model.norm import LocalRMSNorm

    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    # Swap only the attention kernel (megatron's local DotProductAttention rejects packed
    # sequences) and the norms (megatron's torch norm refuses sequence parallelism; LocalRMSNorm
    # is the same torch.nn.RMSNorm, marked for the TP gradient sum). Projections, MLP and RoPE
    # stay megatron's. `PolarRewardModel` uses LocalRMSNorm for the final norm too.
    spec.submodules.self_attention.submodules.core_attention = PackedCoreAttention
    spec.submodules.input_layernorm = LocalRMSNorm
    spec.submodules.pre_mlp_layernorm = LocalRMSNorm
    return spec
