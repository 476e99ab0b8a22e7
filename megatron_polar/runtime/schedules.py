"""Running the model chunks through megatron's forward-backward schedules (any PP / VPP), and
forward-only scoring on top of them.

A caller passes megatron's `forward_step_func`: training's computes the pairwise loss
(training/step.py), the critic's its value loss (serving/critic.py); scoring here only
collects the rewards at the reward-token positions.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Callable, Optional, Sequence

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_polar.data.packing import PackedMicroBatch, PaddedBatch
from megatron_polar.model.reward_model import rewards_at
from megatron_polar.runtime.chunks import unwrap
from megatron_polar.runtime.device import compute_device


def forward_scores(model, batch: PackedMicroBatch) -> torch.Tensor:
    """Per-token scores of one packed micro-batch: one copy of each tensor to the device and
    no device-to-host sync (`PackedMicroBatch.model_inputs`)."""
    tokens, position_ids, packed_seq_params = batch.model_inputs(compute_device())
    return model(tokens, position_ids, None, packed_seq_params=packed_seq_params)


def run_schedule(chunks, micro_batches: Sequence[PackedMicroBatch], forward_only: bool, ctx,
                 forward_step: Callable):
    """megatron's forward-backward function for this layout over `micro_batches` (every
    PP/TP rank of a DP replica passes the same ones); returns the last stage's outputs."""
    if not micro_batches:
        raise ValueError("a step needs at least one micro-batch on every data-parallel rank")
    lengths = {mb.tokens.shape[1] for mb in micro_batches}
    if len(lengths) > 1 and ctx.pp_size > 1 and not unwrap(chunks[0]).config.variable_seq_lengths:
        raise ValueError("micro-batches of different lengths need variable_seq_lengths "
                         "in the model config for pipeline transfers")
    seq_length = max(lengths)
    iterators = [iter(micro_batches) for _ in chunks] if len(chunks) > 1 else iter(micro_batches)
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators,
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=1,
        forward_only=forward_only,
    )


def sync_params(chunks) -> None:
    """Make every parameter hold the weights of the last optimizer step.

    With `--use-distributed-optimizer --overlap-param-gather` megatron leaves the updated
    weights sharded after `step_with_ready_grads` (megatron/core/optimizer/distrib_optimizer.py
    0.16.1 `step_with_ready_grads`, ~line 2613: no all-gather when overlapping) and gathers them
    in the next forward's pre-hooks (distributed/distributed_data_parallel.py
    `_make_forward_pre_hook`). Anything that reads weights between a step and the next forward
    (a checkpoint, an export, validation, scoring) would mix steps N and N-1. This forces the
    all-gather now, as Megatron-LM does around its saves (`disable_forward_pre_hook(param_sync=
    True)` -> `start_param_sync(force_sync=True)`, distributed_data_parallel.py:367-382).
    The bucket groups are then marked dispatched, so the next forward's hooks neither gather
    again nor wait (param_and_grad_buffer.py `finish_param_sync`). A no-op otherwise.
    """
    for chunk in chunks:
        ddp = getattr(chunk, "ddp_config", None)
        if ddp is not None and ddp.use_distributed_optimizer and ddp.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)


@contextlib.contextmanager
def evaluating(chunks):
    """The chunks with the last step's weights (`sync_params`), in eval mode, back in the
    mode each was in afterwards (a scorer's chunks stay in eval mode)."""
    sync_params(chunks)
    modes = [chunk.training for chunk in chunks]
    for chunk in chunks:
        chunk.eval()
    try:
        yield
    finally:
        for chunk, mode in zip(chunks, modes):
            chunk.train(mode)


@torch.no_grad()
def score_packed(chunks, micro_batches: Sequence[PackedMicroBatch], ctx) -> Optional[torch.Tensor]:
    """Rewards of every sequence in the packs (s+_0, s-_0, ...), concatenated; on the last
    pipeline stage, None elsewhere. Forward only, through megatron's schedules."""
    collected: list[torch.Tensor] = []

    def collect(positions, token_scores):
        collected.append(rewards_at(token_scores, positions.to(token_scores.device)).cpu())
        zero = token_scores.sum() * 0
        return zero, torch.tensor(1, dtype=torch.int), {}

    def step(data_iterator, model):
        batch = next(data_iterator)
        return forward_scores(model, batch), partial(collect, batch.reward_positions)

    with evaluating(chunks):
        run_schedule(chunks, micro_batches, forward_only=True, ctx=ctx, forward_step=step)
    return torch.cat(collected) if ctx.is_last_stage else None


@torch.no_grad()
def score_padded(model: torch.nn.Module, batch: PaddedBatch) -> torch.Tensor:
    """Rewards of right-padded sequences, one per row, with a single-stage model (no PP)."""
    core = unwrap(model)
    if not (core.pre_process and core.post_process):
        raise ValueError("score_padded needs the whole model on one stage; use score_packed with PP")
    device = compute_device()
    was_training = model.training
    model.eval()
    try:
        scores = model(batch.tokens.to(device), batch.position_ids.to(device), None)
    finally:
        model.train(was_training)
    return rewards_at(scores, batch.reward_positions.to(scores.device)).cpu()
