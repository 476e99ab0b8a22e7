"""Training-step throughput: tokens/s, and on a GPU model TFLOP/s and MFU.

Random pairs with a POLAR-like length mix (prompt shared by both sequences, reference and
candidates of independent lengths) are packed into micro-batches of a token budget and run
through `train_step` (megatron schedules, DDP, optimizer) exactly as training does.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig

from megatron_polar.data.packing import pack_pairs
from megatron_polar.model.config import ModelRunConfig
from megatron_polar.model.presets import ModelPreset
from megatron_polar.training.flops import peak_tflops_of_this_gpu, training_flops
from megatron_polar.training.parallel import ParallelContext
from megatron_polar.training.step import build_model_chunks, build_optimizer, train_step


@dataclass
class BenchmarkConfig:
    micro_batch_tokens: int = 4096  # token budget of one packed micro-batch
    micro_batches: int = 4  # per data-parallel rank and step
    prompt_max: int = 1024  # prompt lengths are uniform in 1..prompt_max
    response_max: int = 4096  # reference / candidate lengths uniform in 1..response_max
    steps: int = 10
    warmup_steps: int = 2
    use_distributed_optimizer: bool = False
    seed: int = 0


@dataclass
class BenchmarkResult:
    preset: str
    world_size: int
    tp: int
    pp: int
    dp: int
    bf16: bool
    step_seconds: float
    tokens_per_step: int  # real tokens, whole data-parallel group
    tokens_per_s: float
    tokens_per_s_per_gpu: float
    packing_efficiency: float  # real / computed tokens
    tflops_per_gpu: float
    mfu: float | None
    peak_memory_gib: float | None

    def as_dict(self) -> dict:
        return asdict(self)


def polar_like_pairs(rng: np.random.Generator, vocab: int, reward_id: int, budget: int,
                     prompt_max: int, response_max: int, target_tokens: int):
    """Random (s+, s-) pairs until `target_tokens` is reached; each pair fits `budget`."""
    pairs, total = [], 0
    while total < target_tokens:
        p = int(rng.integers(1, prompt_max + 1))
        ref, pos, neg = (int(rng.integers(1, response_max + 1)) for _ in range(3))
        n_pos, n_neg = 2 * p + ref + pos + 3, 2 * p + ref + neg + 3
        if n_pos + n_neg > budget:
            continue
        pairs.append((rng.integers(3, vocab - 1, n_pos - 1).tolist() + [reward_id],
                      rng.integers(3, vocab - 1, n_neg - 1).tolist() + [reward_id]))
        total += n_pos + n_neg
    return pairs


def benchmark_step(preset: ModelPreset, run: ModelRunConfig, cfg: BenchmarkConfig,
                   ctx: ParallelContext) -> BenchmarkResult:
    ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                        use_distributed_optimizer=cfg.use_distributed_optimizer)
    chunks = build_model_chunks(preset, run, ctx, ddp)
    optimizer = build_optimizer(chunks, OptimizerConfig(
        optimizer="adam", lr=1e-5, bf16=run.bf16, params_dtype=torch.bfloat16 if run.bf16
        else torch.float32, use_distributed_optimizer=cfg.use_distributed_optimizer), ctx)
    rng = np.random.default_rng(cfg.seed * 1000 + ctx.dp_rank)

    def step_batches():
        pairs = polar_like_pairs(rng, preset.vocab_size, preset.reward_token_id,
                                 cfg.micro_batch_tokens, cfg.prompt_max, cfg.response_max,
                                 int(0.97 * cfg.micro_batch_tokens * cfg.micro_batches))
        return pack_pairs(pairs, cfg.micro_batch_tokens, preset.pad_token_id)

    batches = [step_batches() for _ in range(cfg.warmup_steps + cfg.steps)]
    for packs in batches[: cfg.warmup_steps]:
        train_step(chunks, optimizer, packs, ctx)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    _barrier()
    start = time.perf_counter()
    for packs in batches[cfg.warmup_steps:]:
        train_step(chunks, optimizer, packs, ctx)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    _barrier()
    seconds = (time.perf_counter() - start) / cfg.steps

    timed = [p for packs in batches[cfg.warmup_steps:] for p in packs]
    lengths = [int(n) for p in timed for n in (p.cu_seqlens[1:] - p.cu_seqlens[:-1]).tolist()]
    stats = torch.tensor([sum(lengths), sum(p.tokens.shape[1] for p in timed),
                          training_flops(preset, lengths)], dtype=torch.float64)
    if torch.distributed.is_initialized() and ctx.dp_size > 1:
        stats = stats.to("cuda" if torch.cuda.is_available() else "cpu")
        torch.distributed.all_reduce(stats, group=ctx.pg.dp)
    real, computed, flops = stats.tolist()
    world = ctx.tp_size * ctx.pp_size * ctx.dp_size
    tflops = flops / cfg.steps / seconds / world / 1e12
    peak = peak_tflops_of_this_gpu()
    return BenchmarkResult(
        preset=preset.name, world_size=world, tp=ctx.tp_size, pp=ctx.pp_size, dp=ctx.dp_size,
        bf16=run.bf16, step_seconds=seconds, tokens_per_step=int(real / cfg.steps),
        tokens_per_s=real / cfg.steps / seconds, tokens_per_s_per_gpu=real / cfg.steps / seconds / world,
        packing_efficiency=real / computed, tflops_per_gpu=tflops,
        mfu=None if peak is None or not run.bf16 else tflops / peak,
        peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
    )


def _barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
