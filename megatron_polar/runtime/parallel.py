"""Process groups: torch.distributed + megatron-core model-parallel groups, NCCL or gloo.

`initialize_parallel` sets them up for a run (and chooses the device, device.py);
`parallel_context` joins a state that is already set up at the same layout (a trainer
evaluating in-process, a test session). Everything downstream receives the resulting
`ParallelContext` (with megatron's `ProcessGroupCollection`) explicitly; megatron's global
`parallel_state` is read here and, for what only it knows (the pipeline stage of a virtual
chunk, the TP group of a layer), in chunks.py and model/reward_model.py.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_polar.model.config import ModelRunConfig
from megatron_polar.runtime.device import compute_device, select_device


class ParallelLayoutError(ValueError):
    """The process's parallel state does not fit the run (world size, an existing layout)."""


@dataclass
class ParallelContext:
    """This rank's place in the TP x PP x DP layout, with its process groups."""

    pg: ProcessGroupCollection
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    vp_size: int | None

    @classmethod
    def from_mpu(cls, vp_size: int | None) -> "ParallelContext":
        """This rank's context from megatron's initialised parallel state."""
        pg = ProcessGroupCollection.use_mpu_process_groups()
        return cls(pg=pg, tp_rank=pg.tp.rank(), tp_size=pg.tp.size(), pp_rank=pg.pp.rank(),
                   pp_size=pg.pp.size(), dp_rank=pg.dp.rank(), dp_size=pg.dp.size(),
                   vp_size=vp_size)

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def pp_last_global_rank(self) -> int:
        return torch.distributed.get_process_group_ranks(self.pg.pp)[-1]


def initialize_parallel(run: ModelRunConfig, timeout_minutes: int = 30) -> ParallelContext:
    """Initialise torch.distributed (env:// rendezvous, as torchrun sets it) and megatron's
    model-parallel groups; seed the RNGs. On a machine without CUDA this uses gloo and
    switches on the CPU backend."""
    on_cpu = select_device().type == "cpu"
    if not torch.distributed.is_initialized():
        if "WORLD_SIZE" not in os.environ:  # a plain `python tool.py`: a group of one
            os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(free_port()))
        torch.distributed.init_process_group(
            backend="gloo" if on_cpu else "nccl",
            timeout=datetime.timedelta(minutes=timeout_minutes))
    world = torch.distributed.get_world_size()
    model_parallel = (run.tensor_model_parallel_size * run.pipeline_model_parallel_size
                      * run.context_parallel_size)
    if world % model_parallel:
        raise ParallelLayoutError(f"world size {world} is not divisible by TP x PP x CP = "
                                  f"{model_parallel}")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=run.tensor_model_parallel_size,
        pipeline_model_parallel_size=run.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=run.virtual_pipeline_model_parallel_size,
        context_parallel_size=run.context_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    ctx = ParallelContext.from_mpu(run.virtual_pipeline_model_parallel_size)
    seed_everything(run.seed, ctx)
    return ctx


def parallel_context(run: ModelRunConfig) -> ParallelContext:
    """megatron's parallel state for `run`: the process's own when it is already initialised
    at this layout (a test session, a trainer evaluating in-process), else initialised here
    (a group of one for a plain `python`, torchrun's group otherwise). An existing state at
    another layout is an error rather than torn down under its owner."""
    if not parallel_state.model_parallel_is_initialized():
        return initialize_parallel(run)
    ctx = ParallelContext.from_mpu(parallel_state.get_virtual_pipeline_model_parallel_world_size())
    have = (ctx.tp_size, ctx.pp_size, ctx.vp_size)
    want = (run.tensor_model_parallel_size, run.pipeline_model_parallel_size,
            run.virtual_pipeline_model_parallel_size)
    if have != want:
        raise ParallelLayoutError(
            f"megatron's parallel state is already initialised at TP={have[0]} PP={have[1]} "
            f"VPP={have[2]}; this run asks for TP={want[0]} PP={want[1]} VPP={want[2]}")
    return ctx


def any_rank(flag: bool) -> bool:
    """True if `flag` is true on any rank: clocks and signals differ, and every rank must act
    together."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=compute_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (rendezvous for a group of one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed_everything(seed: int, ctx: ParallelContext) -> None:
    """Same init on every data-parallel replica; per-stage and per-TP-rank streams as Megatron-LM."""
    import random

    import numpy as np

    stage_seed = seed + 100 * ctx.pp_rank
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


def destroy_parallel() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
