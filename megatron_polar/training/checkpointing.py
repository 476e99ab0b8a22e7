"""Training checkpoints as megatron-core distributed checkpoints, loadable at any TP/PP.

Two kinds, one format:
- weights only (`save_model_weights` / `load_model_weights`, runtime/checkpoints.py): what HF
  import writes and what `--pretrained-checkpoint` (or `--load` of a directory without
  iterations) reads. HF import writes it in parts, a few layers per dist checkpoint listed in
  `polar_weights.json`, so that it never holds the whole model; loading reads the parts one
  after another;
- training checkpoints (`save_checkpoint` / `load_checkpoint`): model, optimizer, LR scheduler,
  data-sampler state, RNG, iteration and consumed counts, in Megatron-LM's layout:

      SAVE/latest_checkpointed_iteration.txt      "8"
      SAVE/iter_0000008/                           a dist checkpoint
      SAVE/iter_0000004/

Each virtual-stage chunk contributes its own sharded state dict; the tensors inside carry their
global names, one key per layer ("decoder.layers.7.mlp.linear_fc2.weight"), so the files are
the same whatever TP/PP/VPP layout wrote them, and the weights load at any other layout. The
distributed optimizer's state is "dp_reshardable" by default (scalable: every rank writes its
own shard; a resume may change DP, not TP/PP) or "fully_reshardable" (any layout); see
OPTIMIZER_FORMATS. Saves and loads are fully parallel over the data-parallel group.

Atomicity: a checkpoint is written to `iter_N.tmp`, renamed to `iter_N` once every rank has
finished, and only then does `latest_checkpointed_iteration.txt` move (itself replaced
atomically). A crash at any point leaves the previous checkpoint as the latest; leftover
`.tmp` directories are ignored and removed by the next save.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_polar.runtime.checkpoints import (ITER_DIR, LATEST, CheckpointError, barrier,
                                                fsync_dir, model_sharded_state_dict, rank,
                                                replace_dir)
from megatron_polar.runtime.device import on_gpu

log = logging.getLogger(__name__)

def _rng_state(ctx):
    """This rank's RNG streams, as a ShardedObject over the (PP, TP) grid (replicated over DP),
    the way Megatron-LM stores them. Only restored when the layout is unchanged."""
    state = {"random": random.getstate(), "np": np.random.get_state(),
             "torch": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state() if on_gpu() else None,
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    return ShardedObject("rng_state", state, (ctx.pp_size, ctx.tp_size),
                         (ctx.pp_rank, ctx.tp_rank), replica_id=ctx.dp_rank)


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["np"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and on_gpu():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


# How the distributed optimizer's state is laid out in a checkpoint (megatron-core's
# `distrib_optim_sharding_type`, optimizer/distrib_optimizer.py 0.16.1 `sharded_state_dict`):
# - "dp_reshardable" (default, as in Megatron-LM): each rank writes its own shard of the flat
#   optimizer buffers, with no communication and no extra memory (`sharded_param_state_
#   dp_reshardable`, line 1539). A resume may change DP; TP and PP must stay the same (the
#   buffers' bucket layout depends on them).
# - "fully_reshardable": state in model space (one tensor per parameter), loadable at any TP,
#   PP and DP. Saved in megatron's memory-efficient variant (`distrib_optim_fully_reshardable_
#   mem_efficient`, line 1443): gathered over gloo on DP rank 0 only, so that rank holds its
#   (TP, PP) slice of the whole optimizer state while saving; on load every rank reads that
#   slice and keeps its part. For a layout change, not for every save of a large run.
OPTIMIZER_FORMATS = ("dp_reshardable", "fully_reshardable")


def _optimizer_metadata(optimizer_format: str) -> dict:
    if optimizer_format not in OPTIMIZER_FORMATS:
        raise ValueError(f"optimizer checkpoint format must be one of {OPTIMIZER_FORMATS}, "
                         f"got {optimizer_format!r}")
    return {"distrib_optim_sharding_type": optimizer_format,
            "distrib_optim_fully_reshardable_mem_efficient": True}


def _distributed_optimizers(optimizer) -> list:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return [o for o in getattr(optimizer, "chained_optimizers", [optimizer])
            if isinstance(o, DistributedOptimizer)]


def _torch_adam_without_apex_or_te() -> bool:
    """megatron's distributed optimizer over torch.optim.Adam: the path taken where neither
    apex nor Transformer Engine is installed (CPU machines; never an NGC container)."""
    from megatron.core.optimizer import distrib_optimizer

    return not getattr(distrib_optimizer, "HAVE_APEX_OR_TE", True)


def _give_torch_adam_state_a_step(optimizer) -> None:
    """Before `sharded_state_dict` on the torch-Adam path: megatron's `state_dict()` reads one
    `step` from the inner optimizer's per-parameter state (distrib_optimizer.py 0.16.1,
    line 641-642: `assert len(steps) == 1`), which is empty before the first step and on a
    freshly built optimizer that is about to load. Empty state becomes Adam's initial state
    (step 0, zero moments): exactly what torch's Adam would create at its first step."""
    for opt in _distributed_optimizers(optimizer):
        inner = opt.optimizer
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if "step" not in state:
                    state["step"] = torch.tensor(0.0)
                    state.setdefault("exp_avg", torch.zeros_like(param))
                    state.setdefault("exp_avg_sq", torch.zeros_like(param))


def _load_torch_adam_state(optimizer, loaded: dict) -> None:
    """`optimizer.load_state_dict` on the torch-Adam path, where megatron's own breaks in two
    ways. It puts one shared `step` tensor into every parameter's state (distrib_optimizer.py
    0.16.1, lines 818-824), which torch's Adam would increment once per parameter per step;
    and the per-parameter loaders then copy every key of that state from the checkpoint's
    parameter state, which has no `step` (line 940: the dp_reshardable loader copies the
    placeholder's step over the real one, the fully_reshardable one raises KeyError). So the
    non-parameter part is loaded first, the parameter state with `step` set aside, and then
    every parameter gets its own `step`, the one the checkpoint recorded."""
    opts = _distributed_optimizers(optimizer)
    if len(opts) != 1 or "param_state" not in loaded:
        raise CheckpointError("expected one distributed optimizer's sharded state; found "
                              f"{len(opts)} optimizers and keys {sorted(loaded)}")
    opt = opts[0]
    param_state = loaded["param_state"]
    kind = loaded["param_state_sharding_type"]
    optimizer.load_state_dict({k: v for k, v in loaded.items()
                               if k not in ("param_state", "param_state_sharding_type")})
    steps = {g["step"] for g in loaded["optimizer"]["param_groups"] if "step" in g}
    if len(steps) != 1:
        raise CheckpointError(f"optimizer state records Adam steps {sorted(steps)}; expected one")
    step = float(steps.pop())
    for state in opt.optimizer.state.values():
        state.pop("step", None)
    loader = {"dp_reshardable": opt.load_parameter_state_from_dp_reshardable,
              "fully_reshardable": opt.load_parameter_state_from_fully_reshardable}[kind]
    loader(param_state)
    for state in opt.optimizer.state.values():
        state["step"] = torch.tensor(step)


def _bucket_layout(chunks) -> str:
    """What a dp_reshardable optimizer state's bucket keys depend on besides TP/PP/VPP:
    megatron buckets the gradient buffer only with overlapped grad reduction
    (distributed/distributed_data_parallel.py 0.16.1, lines 64-68)."""
    overlap = any(getattr(getattr(c, "ddp_config", None), "overlap_grad_reduce", False)
                  for c in chunks)
    return "bucketed (--overlap-grad-reduce)" if overlap else "one bucket (no --overlap-grad-reduce)"


def training_state_dict(chunks, optimizer, ctx, common: Optional[dict] = None,
                        is_loading: bool = False, with_optimizer: bool = True,
                        with_rng: bool = True,
                        optimizer_format: str = "dp_reshardable") -> dict:
    """The sharded state of a training checkpoint. When saving, the weights are those of the
    last optimizer step (`sync_params`: with an overlapped parameter all-gather they would
    otherwise be the step before's)."""
    from megatron_polar.runtime.schedules import sync_params

    if not is_loading:
        sync_params(chunks)
    state = model_sharded_state_dict(chunks)
    if with_optimizer:
        if _torch_adam_without_apex_or_te():
            _give_torch_adam_state_a_step(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(
            state, is_loading=is_loading, metadata=_optimizer_metadata(optimizer_format))
    if with_rng:
        state["rng_state"] = _rng_state(ctx)
    if common is not None:
        distributed = bool(_distributed_optimizers(optimizer))
        state["common"] = {**common, "optimizer": {
            "distributed": distributed, "format": optimizer_format if distributed else None,
            "buckets": _bucket_layout(chunks)}}
    return state


class CheckpointWriter:
    """Saves training checkpoints atomically, optionally asynchronously, keeping the last N.

    `fault_hook(stage, iteration)` is for fault-injection tests only (called between writing
    and publishing a checkpoint).
    """

    def __init__(self, save_dir: str | os.PathLike, keep_last: Optional[int] = None,
                 async_save: bool = False,
                 fault_hook: Optional[Callable[[str, int], None]] = None,
                 describe: Optional[Callable[[Path], None]] = None,
                 parallelization_group=None):
        self.save_dir = Path(save_dir)
        # Fully parallel save (as Megatron-LM's default --ckpt-fully-parallel-save): tensors
        # replicated over data-parallel ranks are written once, the writing spread over the
        # group (dist_checkpointing/strategies/fully_parallel.py 0.16.1, line 48).
        self.parallelization_group = parallelization_group
        # Rank 0 calls `describe(directory)` on each finished checkpoint before publishing it,
        # to add plain files beside the shards (the preset, the tokenizer) for export and scoring.
        self.describe = describe
        self.keep_last = keep_last
        self.async_queue = None
        if async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.async_queue = AsyncCallsQueue()
        self.fault_hook = fault_hook

    def save(self, iteration: int, state: dict) -> None:
        """All ranks call this with their sharded state (see `training_state_dict`)."""
        final = self.save_dir / f"iter_{iteration:07d}"
        tmp = final.with_name(final.name + ".tmp")
        self.wait()  # one checkpoint in flight at a time
        if rank() == 0:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            for stale in self.save_dir.glob("iter_*.tmp"):  # left by an earlier crash
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        barrier()
        strategy = _save_strategy(self.parallelization_group)
        if self.async_queue is None:
            dist_checkpointing.save(state, str(tmp), sharded_strategy=strategy)
            self._publish(iteration, tmp, final)
        else:
            request = dist_checkpointing.save(state, str(tmp), sharded_strategy=strategy,
                                              async_sharded_save=True)
            request.add_finalize_fn(lambda: self._publish(iteration, tmp, final))
            self.async_queue.schedule_async_request(request)

    def poll(self) -> None:
        """Publish finished asynchronous saves (call once per step on every rank)."""
        if self.async_queue is not None:
            self.async_queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        if self.async_queue is not None:
            self.async_queue.maybe_finalize_async_calls(blocking=True)

    def _publish(self, iteration: int, tmp: Path, final: Path) -> None:
        barrier()  # every rank's shards are on disk
        if self.fault_hook is not None:
            self.fault_hook("before_publish", iteration)
        if rank() == 0:
            if self.describe is not None:
                self.describe(tmp)
            replace_dir(tmp, final)
            fsync_dir(self.save_dir)
            marker_tmp = self.save_dir / (LATEST + ".tmp")
            marker_tmp.write_text(f"{iteration}\n")
            os.replace(marker_tmp, self.save_dir / LATEST)
            fsync_dir(self.save_dir)
            self._prune(iteration)
        barrier()
        log.info("saved checkpoint %s", final)

    def _prune(self, newest: int) -> None:
        if not self.keep_last:
            return
        done = sorted(int(m.group(1)) for p in self.save_dir.iterdir()
                      if (m := ITER_DIR.match(p.name)) and int(m.group(1)) <= newest)
        for old in done[:-self.keep_last]:
            shutil.rmtree(self.save_dir / f"iter_{old:07d}", ignore_errors=True)


def _save_strategy(group):
    if group is None or group.size() == 1:
        return None
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper)

    return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), group)


def _load_strategy(directory: Path, group):
    """Fully parallel load: each replicated tensor is read by one rank of the group and
    exchanged (fully_parallel.py 0.16.1, line 141), instead of every rank reading it."""
    if group is None or group.size() == 1:
        return None
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelLoadStrategyWrapper)

    return FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(str(directory)),
                                            group)


def load_checkpoint(directory: Path, chunks, optimizer, ctx, load_optimizer: bool = True,
                    load_rng: bool = True) -> dict:
    """Load a training checkpoint into the chunks (and optimizer); return its common state.

    RNG streams are restored only when the TP/PP layout is the one that saved them (Megatron-LM
    does the same); the optimizer is resharded to the current layout by megatron-core.
    """
    from megatron_polar.runtime.chunks import unwrap

    common = dist_checkpointing.load_common_state_dict(str(directory)).get("common")
    if common is None:
        raise CheckpointError(f"{directory} is a weights-only checkpoint; pass it as "
                              "--pretrained-checkpoint, not --load")
    saved = common["layout"]
    same_layout = (saved["tp"], saved["pp"]) == (ctx.tp_size, ctx.pp_size)
    if load_rng and not same_layout:
        log.info("checkpoint saved at TP=%d PP=%d, running at TP=%d PP=%d: RNG state not "
                 "restored", saved["tp"], saved["pp"], ctx.tp_size, ctx.pp_size)
    # Checkpoints from before the format was recorded: distributed, fully reshardable.
    saved_optim = common.get("optimizer", {"distributed": True, "format": "fully_reshardable"})
    optimizer_format = saved_optim["format"] or "dp_reshardable"
    if load_optimizer:
        distributed = bool(_distributed_optimizers(optimizer))
        if distributed != saved_optim["distributed"]:
            raise CheckpointError(
                f"{directory} was saved {'with' if saved_optim['distributed'] else 'without'} "
                "--use-distributed-optimizer and this run is the other way; its optimizer "
                "state cannot be loaded (use the same setting, or --no-load-optim)")
        buckets = _bucket_layout(chunks)
        saved_buckets = saved_optim.get("buckets", buckets)
        if distributed and optimizer_format == "dp_reshardable" and (
                not same_layout or saved.get("vpp") != ctx.vp_size or saved_buckets != buckets):
            raise CheckpointError(
                f"{directory}: its optimizer state is dp_reshardable (saved at TP={saved['tp']} "
                f"PP={saved['pp']} VPP={saved.get('vpp')}, {saved_buckets}) and loads only at "
                f"the same TP, PP, VPP and bucketing, not at TP={ctx.tp_size} PP={ctx.pp_size} "
                f"VPP={ctx.vp_size}, {buckets}. Resume at the saved layout, or pass "
                "--no-load-optim to take the weights (any layout) with fresh Adam moments, or "
                "save with --dist-ckpt-optim-fully-reshardable to change layouts")
    state = training_state_dict(chunks, optimizer, ctx, is_loading=True,
                                with_optimizer=load_optimizer,
                                with_rng=load_rng and same_layout,
                                optimizer_format=optimizer_format)
    loaded = dist_checkpointing.load(state, str(directory),
                                     sharded_strategy=_load_strategy(directory, ctx.pg.dp))
    for i, chunk in enumerate(chunks):
        unwrap(chunk).load_state_dict(loaded[f"model{i}"], strict=True)
    if load_optimizer:
        # no_grad: in an fp32 model the distributed optimizer's main params are views of the
        # parameters, and the dp_reshardable loader copies into them in place
        # (distrib_optimizer.py 0.16.1, line 940).
        with torch.no_grad():
            if _torch_adam_without_apex_or_te() and _distributed_optimizers(optimizer):
                _load_torch_adam_state(optimizer, loaded["optimizer"])
            else:
                optimizer.load_state_dict(loaded["optimizer"])
    if load_rng and same_layout:
        _set_rng_state(loaded["rng_state"])
    return common


def load_explained(directory, load, *args, **kwargs):
    """A load that fails inside megatron or torch (a truncated or corrupt shard, tensors of
    another shape) becomes one line naming the checkpoint, not a traceback."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        return load(*args, **kwargs)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # the latter is a BaseException
        cause, where = e, ""
        if isinstance(e, CheckpointException) and e.failures:
            # torch gathers every rank's failure: the same error on all of them
            rank, (cause, _) = next(iter(sorted(e.failures.items())))
            where = f" on rank {rank}"
        lines = str(cause).strip().splitlines()
        error = CheckpointError(f"{directory}: cannot be read ({type(cause).__name__}"
                                + (f": {lines[0]}" if lines else "") + f"{where})")
        # Otherwise possibly this rank's failure alone: it reports it itself (main).
        error.on_any_rank = not isinstance(e, CheckpointException)
        raise error from None
