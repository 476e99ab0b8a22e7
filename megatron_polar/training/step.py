"""The step API the trainer builds on: megatron's optimizer wired to the model chunks
(runtime/chunks.py), one training step through megatron's forward-backward schedules
(runtime/schedules.py) with the pairwise loss, and validation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Optional, Sequence

import torch
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from megatron_polar.data.packing import PackedMicroBatch
from megatron_polar.runtime.chunks import unwrap
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


def build_optimizer(chunks: list[torch.nn.Module], config: OptimizerConfig, ctx: ParallelContext):
    """megatron's optimizer (distributed if `config.use_distributed_optimizer`), wired into the
    model config the way Megatron-LM's trainer does (grad scaling, grad finalisation, no_sync)."""
    optimizer = get_megatron_optimizer(config, chunks, pg_collection=None)
    model_config = unwrap(chunks[0]).config
    model_config.grad_scale_func = optimizer.scale_loss
    model_config.finalize_model_grads_func = finalize_model_grads
    if len(chunks) == 1:
        model_config.no_sync_func = chunks[0].no_sync
    else:
        model_config.no_sync_func = [c.no_sync for c in chunks]
    if chunks[0].ddp_config.overlap_grad_reduce:
        model_config.grad_sync_func = [c.start_grad_sync for c in chunks]
        if len(chunks) == 1:
            model_config.grad_sync_func = model_config.grad_sync_func[0]
    if chunks[0].ddp_config.overlap_param_gather and chunks[0].ddp_config.align_param_gather:
        model_config.param_sync_func = [c.start_param_sync for c in chunks]
        if len(chunks) == 1:
            model_config.param_sync_func = model_config.param_sync_func[0]
    return optimizer


@dataclass
class StepResult:
    metrics: PairMetrics
    grad_norm: Optional[float]
    update_successful: bool  # False: the step was skipped (non-finite loss or gradients)
    num_tokens: int  # real tokens this DP rank consumed (all micro-batches)


def _pair_forward_step(data_iterator, model, poison_loss: bool = False,
                       poison_grad: bool = False):
    batch: PackedMicroBatch = next(data_iterator)
    scores = forward_scores(model, batch)
    loss_func = partial(pairwise_loss,
                        batch.reward_positions.to(compute_device(), non_blocking=True))
    if poison_grad and scores.requires_grad:
        # fault injection (tests): the loss stays finite, the gradient flowing back from this
        # stage's output is NaN (and so every gradient before it)
        scores.register_hook(lambda grad: grad * float("nan"))
    if poison_loss:  # fault injection (tests): a NaN loss, and so NaN gradients
        return scores, partial(_poisoned, loss_func)
    return scores, loss_func


def _poisoned(loss_func, token_scores):
    from megatron_polar.training.objective import _STATS

    loss, count, stats = loss_func(token_scores)
    # The reported loss too (the step's metrics are summed from these stats), not only the one
    # that is back-propagated: a NaN loss, as a real one would show.
    pair_stats = stats["pair_stats"].clone()
    pair_stats[_STATS.index("loss")] = float("nan")
    return loss * float("nan"), count, {**stats, "pair_stats": pair_stats}


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
               ctx: ParallelContext, scheduler=None, poison_loss: bool = False,
               poison_grad: bool = False) -> StepResult:
    """One optimizer step over this DP rank's packed micro-batches (the global batch is the union
    over DP ranks). Every PP/TP rank of a DP replica passes the same micro-batches. A step whose
    loss or gradient norm is not finite changes nothing (see `guarded_optimizer_step`)."""
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    outputs = run_schedule(chunks, micro_batches, forward_only=False, ctx=ctx,
                           forward_step=partial(_pair_forward_step, poison_loss=poison_loss,
                                                poison_grad=poison_grad))
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
                               forward_step=_pair_forward_step)
    local = reduce_pair_stats(outputs, ctx.pg.dp) if ctx.is_last_stage else None
    return _broadcast_metrics(local, ctx)
