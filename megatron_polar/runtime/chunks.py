"""This rank's model chunks: the reward model for its pipeline stage(s), wrapped as megatron
trains and serves it (Float16Module for bf16, megatron DDP)."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.enums import ModelType
from megatron.core.transformer.module import Float16Module

from megatron_polar.model.config import ModelRunConfig, build_transformer_config
from megatron_polar.model.presets import ModelPreset
from megatron_polar.model.reward_model import PolarRewardModel
from megatron_polar.model.spec import build_layer_spec, resolve_use_te
from megatron_polar.runtime.device import compute_device
from megatron_polar.runtime.parallel import ParallelContext


def build_model_chunks(
    preset: ModelPreset,
    run: ModelRunConfig,
    ctx: ParallelContext,
    ddp_config: Optional[DistributedDataParallelConfig] = None,
    zero_init_head: bool = False,
) -> list[torch.nn.Module]:
    """This rank's model chunks (one per virtual pipeline stage), wrapped in megatron DDP.

    Pass `ddp_config=None` for a DDP with defaults; training configs set overlap and the
    distributed optimizer there.
    """
    config, chunks = _build_modules(preset, run, ctx, zero_init_head)
    ddp_config = ddp_config or DistributedDataParallelConfig(grad_reduce_in_fp32=True)
    return [
        DistributedDataParallel(config, ddp_config, module=chunk,
                                # Megatron-LM: only the first chunk's buckets overlap with compute.
                                disable_bucketing=i > 0, pg_collection=ctx.pg)
        for i, chunk in enumerate(chunks)
    ]


def build_inference_chunks(preset: ModelPreset, run: ModelRunConfig,
                           ctx: ParallelContext) -> list[torch.nn.Module]:
    """This rank's model chunks for scoring only: the weights and nothing else. No DDP (whose
    fp32 gradient buffer costs 4 bytes per parameter), no gradients (`requires_grad` off), in
    eval mode. megatron's forward-only schedules take them as they are."""
    _, chunks = _build_modules(preset, run, ctx, zero_init_head=False)
    for chunk in chunks:
        chunk.requires_grad_(False)
        chunk.eval()
    return chunks


def _build_modules(preset: ModelPreset, run: ModelRunConfig, ctx: ParallelContext,
                   zero_init_head: bool):
    """(TransformerConfig, this rank's PolarRewardModel chunks, Float16Module-wrapped in bf16)."""
    use_te = resolve_use_te(run)
    config = build_transformer_config(preset, run, use_te)
    spec = build_layer_spec(use_te)
    chunks = []
    for vp_stage in range(run.virtual_pipeline_model_parallel_size or 1):
        stage = vp_stage if run.virtual_pipeline_model_parallel_size else None
        model = PolarRewardModel(
            config, spec, preset,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            vp_stage=stage, pg_collection=ctx.pg, zero_init_head=zero_init_head)
        model.model_type = ModelType.encoder_or_decoder
        for param in model.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
        model.to(compute_device())
        if run.bf16:
            model = Float16Module(config, model)
        chunks.append(model)
    return config, chunks


def unwrap(chunk: torch.nn.Module) -> PolarRewardModel:
    """The PolarRewardModel inside DDP / Float16Module wrappers."""
    while not isinstance(chunk, PolarRewardModel):
        chunk = chunk.module
    return chunk
