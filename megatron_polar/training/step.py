"""The step API the trainer builds on: one training step through megatron's forward-backward
schedules (runtime/schedules.py) with the pairwise loss and a guarded optimizer step
(optimizer.py builds the optimizer), validation, and TE's userbuffers for TP overlap."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional, Sequence

import torch

from megatron_polar.data.packing import PackedMicroBatch
from megatron_polar.runtime.device import compute_device
from megatron_polar.runtime.parallel import ParallelContext
from megatron_polar.runtime.schedules import evaluating, forward_scores, run_schedule
from megatron_polar.training.objective import PairMetrics, pairwise_loss, reduce_pair_stats


def initialize_userbuffers(tokens: int, hidden_size: int, tp_size: int, *, fp8: bool,
                           bf16: bool) -> None:
    """TE userbuffers for TP communication overlap, registered for one activation shape
    [tokens, hidden] (GPU only: `resolve_use_te` refuses --tp-comm-overlap without TE on a
    GPU). Every pack must then be exactly `tokens` long."""
    from transformer_engine.pytorch import module as te_module

    # TE 2.x transformer_engine/pytorch/module/base.py `initialize_ub(shape, tp_size,
    # use_fp8=False, quantization_modes=None, dtype=torch.bfloat16, ub_cfgs=None,
    # bootstrap_backend=None)`; nccl bootstrap as Megatron-LM's default
    # --tp-comm-bootstrap-backend (model_parallel_config.py 0.16.1, line 261).
    te_module.base.initialize_ub(
        shape=[tokens, hidden_size], tp_size=tp_size, use_fp8=fp8,
        dtype=torch.bfloat16 if bf16 else torch.float32, bootstrap_backend="nccl")


def destroy_userbuffers() -> None:
    """Free TE's userbuffers (`destroy_ub` in transformer_engine/pytorch/module/base.py), so a
    later `initialize_ub` in this process does not find them taken."""
    from transformer_engine.pytorch import module as te_module

    destroy = getattr(te_module.base, "destroy_ub", None)
    if destroy is not None:
        destroy()


@dataclass
class StepResult:
    metrics: PairMetrics
    grad_norm: Optional[float]
    update_successful: bool  # False: the step was skipped (non-finite loss or gradients)
    num_tokens: int  # real tokens this DP rank consumed (all micro-batches)


def pair_forward_step(data_iterator, model):
    """megatron forward step of the pairwise objective: token scores, and the loss function
    that reads the rewards at the micro-batch's reward positions."""
    batch: PackedMicroBatch = next(data_iterator)
    scores = forward_scores(model, batch)
    pair_index = (None if batch.pair_index is None
                  else batch.pair_index.to(compute_device(), non_blocking=True))
    return scores, partial(pairwise_loss,
                           batch.reward_positions.to(compute_device(), non_blocking=True),
                           pair_index=pair_index)


def guarded_optimizer_step(optimizer, loss_is_finite: bool) -> tuple[bool, Optional[float]]:
    """megatron's `optimizer.step()` in its own three parts (prepare grads, global grad norm
    and clipping, update), with one addition: a non-finite loss or gradient norm skips the
    update. megatron itself only skips on fp16 loss-scale overflow; in bf16/fp32 a NaN would
    reach the weights. The decision is global: the loss is broadcast to every rank and the
    grad norm is all-reduced over the model- (and, with the distributed optimizer, data-)
    parallel ranks."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    if optimizer.prepare_grads():  # fp16 loss-scale overflow, megatron's own skip
        return False, None
    grad_norm = float(optimizer.get_grad_norm())
    if not (loss_is_finite and math.isfinite(grad_norm)):
        return False, grad_norm
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = opt.get_parameters()
        if params and opt.config.clip_grad > 0.0:
            clip_grad_by_total_norm_fp32(
                params, max_norm=opt.config.clip_grad, total_norm=grad_norm,
                use_decoupled_grad=getattr(
                    opt.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False))
    return bool(optimizer.step_with_ready_grads()), grad_norm


def _broadcast_metrics(metrics_sums: Optional[PairMetrics], ctx: ParallelContext) -> PairMetrics:
    """Metrics live on the last pipeline stage; give every rank the same values."""
    vals = torch.zeros(6, dtype=torch.float64, device=compute_device())
    if metrics_sums is not None:
        m = metrics_sums
        vals = torch.tensor([m.loss, m.accuracy, m.reward_chosen, m.reward_rejected, m.margin,
                             m.num_pairs], dtype=torch.float64, device=compute_device())
    if ctx.pp_size > 1:
        torch.distributed.broadcast(vals, src=ctx.pp_last_global_rank, group=ctx.pg.pp)
    v = vals.tolist()
    return PairMetrics(v[0], v[1], v[2], v[3], v[4], int(v[5]))


def train_step(chunks, optimizer, micro_batches: Sequence[PackedMicroBatch],
               ctx: ParallelContext, scheduler=None,
               forward_step: Callable = pair_forward_step) -> StepResult:
    """One optimizer step over this DP rank's packed micro-batches (the global batch is the union
    over DP ranks). Every PP/TP rank of a DP replica passes the same micro-batches. A step whose
    loss or gradient norm is not finite changes nothing (see `guarded_optimizer_step`).
    `forward_step` is megatron's (data_iterator, model) -> (output, loss_func); its loss_func
    must return the "pair_stats" of `pairwise_loss` (training/faults.py wraps it)."""
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    outputs = run_schedule(chunks, micro_batches, forward_only=False, ctx=ctx,
                           forward_step=forward_step)
    local = reduce_pair_stats(outputs, ctx.pg.dp) if ctx.is_last_stage else None
    metrics = _broadcast_metrics(local, ctx)
    update_successful, grad_norm = guarded_optimizer_step(optimizer, math.isfinite(metrics.loss))
    if update_successful and scheduler is not None:
        scheduler.step(increment=1)
    return StepResult(metrics=metrics, grad_norm=grad_norm,
                      update_successful=update_successful,
                      num_tokens=sum(mb.num_tokens for mb in micro_batches))


@torch.no_grad()
def evaluate_pairs(chunks, micro_batches: Sequence[PackedMicroBatch], ctx) -> PairMetrics:
    """Loss and accuracy over packed pairs, forward only (validation)."""
    with evaluating(chunks):
        outputs = run_schedule(chunks, micro_batches, forward_only=True, ctx=ctx,
                               forward_step=pair_forward_step)
    local = reduce_pair_stats(outputs, ctx.pg.dp) if ctx.is_last_stage else None
    return _broadcast_metrics(local, ctx)
