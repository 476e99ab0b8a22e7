"""One optimizer and LR-schedule builder for every trainer of the package: the POLAR trainer,
the PPO critic (serving/critic.py) and the synthetic run (testing/synthetic_run.py).

`OptimizerSettings` holds what a run chooses (Adam's hyperparameters, clipping, the schedule);
`build_optimizer` wires megatron's optimizer into the model chunks the way Megatron-LM's
trainer does; `OptimizerSettings.scheduler` gives megatron's `OptimizerParamScheduler`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_polar.runtime.chunks import unwrap
from megatron_polar.runtime.parallel import ParallelContext

DECAY_STYLES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class OptimizerSettings:
    """Adam with decoupled weight decay and a warmup-then-decay LR schedule.

    Defaults are the released POLAR recipe's: betas (0.9, 0.95), gradient clipping at 1.0,
    no weight decay, cosine decay to `min_lr` (the trainer's default is 0.1 x lr).
    """

    lr: float
    min_lr: Optional[float] = None  # None: constant at `lr` after warmup ends ("constant" style)
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0
    decay_style: str = "cosine"
    use_distributed_optimizer: bool = False

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr must lie in [0, lr={self.lr}], got {self.min_lr}")
        if self.decay_style not in DECAY_STYLES:
            raise ValueError(f"decay_style must be one of {DECAY_STYLES}, got "
                             f"{self.decay_style!r}")
        if self.warmup_steps < 0 or self.clip_grad < 0 or self.weight_decay < 0:
            raise ValueError("warmup_steps, clip_grad and weight_decay must be >= 0")

    def megatron_config(self, bf16: bool) -> OptimizerConfig:
        return OptimizerConfig(
            optimizer="adam", lr=self.lr, min_lr=self.min_lr, weight_decay=self.weight_decay,
            adam_beta1=self.adam_beta1, adam_beta2=self.adam_beta2, adam_eps=self.adam_eps,
            clip_grad=self.clip_grad, bf16=bf16,
            params_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_distributed_optimizer=self.use_distributed_optimizer,
            overlap_param_gather_with_optimizer_step=False)

    def scheduler(self, optimizer, total_steps: int) -> OptimizerParamScheduler:
        """megatron's scheduler over `total_steps` optimizer steps (at least one)."""
        steps = max(total_steps, 1)
        return OptimizerParamScheduler(
            optimizer, init_lr=0.0, max_lr=self.lr,
            min_lr=self.lr if self.min_lr is None else self.min_lr,
            lr_warmup_steps=self.warmup_steps, lr_decay_steps=steps,
            lr_decay_style=self.decay_style, start_wd=self.weight_decay,
            end_wd=self.weight_decay, wd_incr_steps=steps, wd_incr_style="constant")


def build_optimizer(chunks: list[torch.nn.Module], config: OptimizerSettings | OptimizerConfig,
                    ctx: ParallelContext, *, bf16: Optional[bool] = None):
    """megatron's optimizer (distributed if asked for), wired into the model config the way
    Megatron-LM's trainer does (grad scaling, grad finalisation, no_sync, overlapped grad
    reduce and param gather). `config` is our settings (then `bf16` is the model's) or a
    megatron `OptimizerConfig` used as given."""
    if isinstance(config, OptimizerSettings):
        if bf16 is None:
            raise ValueError("build_optimizer: pass bf16= with OptimizerSettings")
        config = config.megatron_config(bf16)
    optimizer = get_megatron_optimizer(config, chunks, pg_collection=None)
    model_config = unwrap(chunks[0]).config
    model_config.grad_scale_func = optimizer.scale_loss
    model_config.finalize_model_grads_func = finalize_model_grads

    def per_chunk(attr: str):
        funcs = [getattr(c, attr) for c in chunks]
        return funcs[0] if len(funcs) == 1 else funcs

    model_config.no_sync_func = per_chunk("no_sync")
    ddp = chunks[0].ddp_config
    if ddp.overlap_grad_reduce:
        model_config.grad_sync_func = per_chunk("start_grad_sync")
    if ddp.overlap_param_gather and ddp.align_param_gather:
        model_config.param_sync_func = per_chunk("start_param_sync")
    return optimizer
