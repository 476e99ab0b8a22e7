"""Item e, `checkpoint_after_overlap`: the distributed optimizer with overlapped grad reduce and
param gather; after `sync_params` every weight is its owner's fp32 main param cast to bf16,
identical on all DP ranks, and saved as it is live."""

from __future__ import annotations

import shutil

import torch

from megatron_polar.training.gpu_check import models
from megatron_polar.training.gpu_check.common import Findings
from megatron_polar.training.gpu_check.env import CheckEnv
from megatron_polar.training.gpu_check.models import keyed_tensors


# -- e. checkpoint after overlapped steps ------------------------------------------------------

def _cross_rank_mismatches(tensors: dict, group) -> int:
    """Elements that differ between the data-parallel ranks (max != min over the group)."""
    if torch.distributed.get_world_size(group) == 1:
        return 0
    bad = 0
    for key in sorted(tensors):
        t = tensors[key].detach().float()  # exact for bf16; all backends reduce fp32
        hi, lo = t.clone(), t.clone()
        torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX, group=group)
        torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN, group=group)
        bad += int((hi != lo).sum())
    return bad


def _main_param_mismatches(optimizer) -> tuple[int, int]:
    """(elements checked, elements that differ): each model parameter's slice owned by this
    DP rank against the distributed optimizer's fp32 main copy cast to the model dtype.
    megatron stores that copy on the parameter (`model_param.main_param`,
    optimizer/distrib_optimizer.py:410-412) for the param range of
    `_get_model_param_range_map(param)["param"]` (:610-619), and copies it into the param
    buffer after each step (`_copy_main_params_to_model_params`, :2429-2479)."""
    checked = bad = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in getattr(opt, "model_float16_groups", []):
            for param in group:
                main = getattr(param, "main_param", None)
                if main is None:
                    continue
                span = opt._get_model_param_range_map(param)["param"]
                live = param.detach().view(-1)[span.start:span.end]
                checked += live.numel()
                bad += int((live != main.to(live.dtype)).sum())
    return checked, bad


def check_checkpoint_after_overlap(env: CheckEnv, f: Findings) -> None:
    chunks, optimizer = _overlapped_model(env)
    initial = {k: t.detach().clone() for k, t in keyed_tensors(chunks).items()}
    _train(env, f, chunks, optimizer)
    live = keyed_tensors(chunks)
    checked = _check_synced(env, f, chunks, optimizer, live, initial)
    root = env.workdir / "checkpoint_after_overlap"
    differ = _check_saved(env, f, chunks, live, root)
    f.headline_parts.append(f"DP={env.ctx.dp_size}, {checked} main-param elements, "
                            f"{len(live)} tensors saved == live: {'no' if differ else 'yes'}")
    del chunks, optimizer
    if env.world > 1:
        torch.distributed.barrier()  # every rank has read the checkpoint
    if env.rank == 0:
        shutil.rmtree(root, ignore_errors=True)


def _overlapped_model(env: CheckEnv) -> tuple:
    """(chunks, optimizer): the check preset in bf16 under the distributed optimizer, with
    overlapped grad reduce and param gather."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from megatron_polar.training.optimizer import build_optimizer

    ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True,
                                        overlap_grad_reduce=True, overlap_param_gather=True)
    chunks = models.build(env, env.check_preset, bf16=True, use_te=None, ddp=ddp)
    optimizer = build_optimizer(chunks, OptimizerConfig(
        optimizer="adam", lr=1e-3, bf16=True, params_dtype=torch.bfloat16, clip_grad=1.0,
        use_distributed_optimizer=True), env.ctx)
    return chunks, optimizer


def _train(env: CheckEnv, f: Findings, chunks, optimizer) -> None:
    from megatron_polar.training.step import train_step

    ctx = env.ctx
    steps = []
    for step in range(env.args.checkpoint_steps):
        # Each DP rank trains on its own pairs, as in training: the ranks' updates must meet.
        pack = env.pack(env.pairs(100 + 10 * step + ctx.dp_rank))
        steps.append(train_step(chunks, optimizer, [pack], ctx))
    f.figures.update(dp_size=ctx.dp_size, steps=len(steps),
                     losses=[s.metrics.loss for s in steps])
    if not all(s.update_successful for s in steps):
        f.fail("a training step was skipped (non-finite loss or gradient norm)")


def _check_synced(env: CheckEnv, f: Findings, chunks, optimizer, live: dict,
                  initial: dict) -> int:
    """After `sync_params`: the weights against the optimizer's main params and across the DP
    ranks, and that training moved them. Returns the main-param elements checked."""
    from megatron_polar.runtime.schedules import sync_params

    group = env.ctx.pg.dp
    # With overlap_param_gather the last step leaves other ranks' shards of the weights
    # un-gathered until the next forward (distrib_optimizer.py:2598-2623); at DP > 1 this
    # count shows the check sees that (at DP = 1 there is nothing to gather).
    f.figures["elements_differing_across_dp_before_sync"] = _cross_rank_mismatches(live, group)
    sync_params(chunks)
    checked, bad = _main_param_mismatches(optimizer)
    f.figures["main_param_elements_checked"] = checked
    f.figures["main_param_mismatches"] = bad
    if checked == 0:
        f.fail("found no distributed-optimizer main params to compare with")
    if bad:
        f.fail(f"{bad} weight elements differ from the optimizer's fp32 main params cast to "
               "bf16 after sync_params")
    across = _cross_rank_mismatches(live, group)
    f.figures["elements_differing_across_dp_after_sync"] = across
    if across:
        f.fail(f"{across} weight elements differ between data-parallel ranks after sync_params")
    changed = sum(not torch.equal(live[k], initial[k]) for k in initial)
    f.figures["tensors_changed_by_training"] = f"{changed}/{len(initial)}"
    if changed < 0.9 * len(initial):
        f.fail(f"only {changed} of {len(initial)} weight tensors changed in training; the "
               "check needs weights that moved")
    return checked


def _check_saved(env: CheckEnv, f: Findings, chunks, live: dict, root) -> list:
    """Save under `root`, run a forward, reload into a fresh model: the saved weights must be
    the live ones. Returns the keys of the tensors that differ from the checkpoint."""
    from megatron_polar.runtime.checkpoints import load_model_weights, save_model_weights
    from megatron_polar.runtime.schedules import score_packed

    ctx = env.ctx
    snapshot = {k: t.detach().clone() for k, t in live.items()}
    # Save, then run a forward: its pre-hooks would complete any all-gather still pending
    # (distributed_data_parallel.py:384-415), so a save that raced the gather would differ.
    save_model_weights(chunks, root / "weights")
    if env.injected("checkpoint_after_overlap"):
        with torch.no_grad():
            next(iter(live.values())).view(-1)[0] += 1.0
    probe = env.pack(env.pairs(7))
    r_live = score_packed(chunks, [probe], ctx)
    moved = [k for k in snapshot if not torch.equal(live[k], snapshot[k])]
    f.figures["tensors_changed_by_forward_after_save"] = len(moved)
    if moved:
        f.fail(f"the forward after the save changed {len(moved)} weight tensor(s) (e.g. "
               f"{moved[0]}): the saved weights were not the gathered ones")

    fresh = models.build(env, env.check_preset, bf16=True, use_te=None)
    load_model_weights(fresh, root / "weights")
    loaded = keyed_tensors(fresh)
    differ = [k for k in live if k not in loaded or not torch.equal(loaded[k], live[k])]
    f.figures["tensors_compared_with_checkpoint"] = len(live)
    f.figures["tensors_differing_from_checkpoint"] = len(differ)
    if differ:
        f.fail(f"{len(differ)} saved tensor(s) differ from the live weights (e.g. {differ[0]})")
    f.compare("rewards_reloaded_vs_live", score_packed(fresh, [probe], ctx), r_live, 1e-6)
    return differ
