"""Train a reward model on the synthetic policy-discrimination task and report held-out accuracy.

The smallest end-to-end POLAR run: megatron model, packing, pairwise objective, megatron
optimizer and LR schedule, on any machine (CPU included) in about a minute. It backs
`make demo` until the full demo pipeline exists, and the learning test.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import numpy as np

from megatron_polar.data.packing import pack_pairs
from megatron_polar.model.config import ModelRunConfig
from megatron_polar.model.presets import get_preset
from megatron_polar.runtime.chunks import build_model_chunks
from megatron_polar.runtime.parallel import (ParallelContext, any_rank, initialize_parallel,
                                             seed_everything)
from megatron_polar.testing.synthetic_task import SyntheticTask
from megatron_polar.training.objective import PairMetrics
from megatron_polar.training.optimizer import OptimizerSettings, build_optimizer
from megatron_polar.training.step import evaluate_pairs, train_step


@dataclass
class SyntheticRunConfig:
    """Settings of a synthetic run; defaults reach >= 0.95 held-out accuracy on 2 CPU cores."""

    model_preset: str = "tiny"
    run: ModelRunConfig = field(default_factory=lambda: ModelRunConfig(seed=1))
    pairs_per_step: int = 16  # global batch, in pairs (triplets)
    token_budget: int = 1024  # tokens per packed micro-batch
    lr: float = 4e-3
    min_lr: float = 2e-3
    warmup_steps: int = 20
    max_steps: int = 900
    time_budget_s: Optional[float] = 55.0  # stop early when the wall clock says so
    held_out_policies: int = 8
    held_out_pairs: int = 256
    eval_interval: int = 100
    favourites: int = 8
    response_len: tuple[int, int] = (8, 9)  # all 8 favourites, in a random order
    # A one-token prompt: the prompt is shared by s+ and s-, and a long random one only adds
    # noise that a 4-layer, 64-wide model needs minutes, not one, to learn to ignore.
    prompt_len: tuple[int, int] = (1, 2)

    def __post_init__(self):
        if self.pairs_per_step < 1 or self.max_steps < 1:
            raise ValueError("pairs_per_step and max_steps must be >= 1")


@dataclass
class SyntheticRunReport:
    accuracy_before: float
    accuracy_after: float
    loss_after: float
    steps: int
    seconds: float
    tokens_per_s: float
    history: list[dict]

    def as_dict(self) -> dict:
        return asdict(self)


def run_synthetic(cfg: SyntheticRunConfig, log: Callable[[str], None] = print,
                  ctx: Optional[ParallelContext] = None,
                  keep: Optional[dict] = None) -> SyntheticRunReport:
    """Train on fresh policies every step; evaluate on policies never seen in training.
    Pass a dict as `keep` to get the trained model chunks back under "chunks"."""
    preset = get_preset(cfg.model_preset)
    if ctx is None:
        ctx = initialize_parallel(cfg.run)
    else:
        seed_everything(cfg.run.seed, ctx)
    task = SyntheticTask.for_preset(preset, favourites=cfg.favourites,
                                    response_len=cfg.response_len, prompt_len=cfg.prompt_len)
    chunks = build_model_chunks(preset, cfg.run, ctx)
    settings = OptimizerSettings(lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps)
    optimizer = build_optimizer(chunks, settings, ctx, bf16=cfg.run.bf16)
    scheduler = settings.scheduler(optimizer, cfg.max_steps)

    held_out = task.make_policies(cfg.held_out_policies, np.random.default_rng(10_000 + cfg.run.seed))
    eval_packs = _my_packs(task.pairs(held_out, cfg.held_out_pairs, seed=-1 % 2**32), cfg, ctx,
                           preset.pad_token_id)
    before = evaluate_pairs(chunks, eval_packs, ctx)
    log(f"held-out accuracy before training: {before.accuracy:.3f} (chance is 0.5)")

    history, tokens, start, step = [], 0, time.perf_counter(), 0
    while step < cfg.max_steps:
        if cfg.time_budget_s is not None and any_rank(time.perf_counter() - start > cfg.time_budget_s):
            break
        # Fresh policies every step: nothing to memorise, only the comparison to learn.
        pairs = task.pairs(None, cfg.pairs_per_step, seed=cfg.run.seed * 1_000_003 + step)
        result = train_step(chunks, optimizer, _my_packs(pairs, cfg, ctx, preset.pad_token_id),
                            ctx, scheduler)
        tokens += result.num_tokens
        step += 1
        if step % cfg.eval_interval == 0 or step == cfg.max_steps:
            held = evaluate_pairs(chunks, eval_packs, ctx)
            history.append(dict(step=step, seconds=time.perf_counter() - start,
                                train_loss=result.metrics.loss, held_out_accuracy=held.accuracy))
            log(f"step {step:4d}  loss {result.metrics.loss:.4f}  "
                f"train acc {result.metrics.accuracy:.3f}  held-out acc {held.accuracy:.3f}")
    seconds = time.perf_counter() - start
    if keep is not None:
        keep["chunks"] = chunks
    after: PairMetrics = evaluate_pairs(chunks, eval_packs, ctx)
    log(f"held-out accuracy after {step} steps ({seconds:.1f}s): {after.accuracy:.3f}")
    return SyntheticRunReport(before.accuracy, after.accuracy, after.loss, step, seconds,
                              tokens * ctx.dp_size / max(seconds, 1e-9), history)


def _my_packs(pairs, cfg: SyntheticRunConfig, ctx: ParallelContext, pad_id: int):
    """This data-parallel rank's share of the pairs, packed."""
    return pack_pairs(pairs[ctx.dp_rank::ctx.dp_size], cfg.token_budget, pad_id)

