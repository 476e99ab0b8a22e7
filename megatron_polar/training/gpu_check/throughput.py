"""Items f and g: training throughput of the full preset (`throughput`: tokens/s, TFLOP/s,
MFU), and the peak GPU memory of every item (`peak_memory`, from the others' figures)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from megatron_polar.training.gpu_check import models
from megatron_polar.training.gpu_check.common import Findings, SkipCheck
from megatron_polar.training.gpu_check.env import CheckEnv


# -- g. throughput -----------------------------------------------------------------------------

def synthetic_pack(g: torch.Generator, preset, budget: int):
    """One pack of whole random pairs filling `budget` tokens, padded to exactly `budget`.
    Length mix of tools/benchmark_step.py (megatron_polar/testing/step_benchmark.py): prompt
    uniform in 1..budget/16, reference and candidates uniform in 1..budget/8, each sequence
    [prompt, reference, prompt, response] plus 3 special tokens."""
    from megatron_polar.data.packing import build_packed_micro_batch

    def draw(hi):
        return int(torch.randint(1, max(1, hi) + 1, (1,), generator=g))

    def seq(n):
        ids = torch.randint(3, preset.vocab_size - 1, (n - 1,), generator=g).tolist()
        return ids + [preset.reward_token_id]

    pairs, used, misses = [], 0, 0
    while misses < 16:
        p = draw(budget // 16)
        ref, pos, neg = (draw(budget // 8) for _ in range(3))
        n_pos, n_neg = 2 * p + ref + pos + 3, 2 * p + ref + neg + 3
        if used + n_pos + n_neg > budget:
            misses += 1
            continue
        pairs.append((seq(n_pos), seq(n_neg)))
        used += n_pos + n_neg
    return build_packed_micro_batch(pairs, budget, preset.pad_token_id)


@dataclass
class _Timing:
    """Sums over the timed steps (over all ranks once `_timed_steps` returns them), and the
    slowest rank's seconds."""
    seconds: float = 0.0
    tokens: float = 0.0
    flops: float = 0.0
    computed: float = 0.0  # tokens computed, padding included
    losses: list = field(default_factory=list)
    skipped: int = 0


def check_throughput(env: CheckEnv, f: Findings) -> None:
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from megatron_polar.training.optimizer import build_optimizer

    args, ctx, preset = env.args, env.ctx, env.preset
    bf16 = env.on_gpu  # bf16 is the training precision; a CPU runs it slowly (no bf16 GEMMs)
    budget = args.throughput_tokens or (16384 if env.on_gpu else 512)
    n_micro, warmup, timed = args.throughput_micro_batches, args.warmup_steps, args.steps
    ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True,
                                        overlap_grad_reduce=True, overlap_param_gather=True)
    # use_te=None: Transformer Engine when it imports on CUDA
    chunks = models.build(env, preset, bf16=bf16, use_te=None, ddp=ddp)
    optimizer = build_optimizer(chunks, OptimizerConfig(
        optimizer="adam", lr=1e-5, bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32, clip_grad=1.0,
        use_distributed_optimizer=True), ctx)
    g = torch.Generator().manual_seed(args.seed + 1000 + ctx.dp_rank)
    batches = [[synthetic_pack(g, preset, budget) for _ in range(n_micro)]
               for _ in range(warmup + timed)]
    timing = _timed_steps(env, chunks, optimizer, batches, warmup)
    _record_throughput(env, f, timing, chunks, bf16=bf16, budget=budget)
    del chunks, optimizer


def _timed_steps(env: CheckEnv, chunks, optimizer, batches: list, warmup: int) -> _Timing:
    """Train on `batches`, one step each; the steps after `warmup` are timed and counted."""
    from megatron_polar.training.faults import poisoned_forward_step
    from megatron_polar.training.flops import training_flops
    from megatron_polar.training.step import train_step

    t = _Timing()
    for i, micro_batches in enumerate(batches):
        _synchronize(env)
        t0 = time.perf_counter()
        result = train_step(chunks, optimizer, micro_batches, env.ctx,
                            forward_step=poisoned_forward_step(env.injected("throughput")))
        _synchronize(env)
        if i < warmup:
            continue
        t.seconds += time.perf_counter() - t0
        t.losses.append(result.metrics.loss)
        t.skipped += not result.update_successful
        t.tokens += sum(mb.num_tokens for mb in micro_batches)
        t.computed += sum(mb.tokens.shape[1] for mb in micro_batches)
        for mb in micro_batches:
            lengths = (mb.cu_seqlens[1:] - mb.cu_seqlens[:-1]).tolist()
            t.flops += training_flops(env.preset, lengths)
    sums = torch.tensor([t.tokens, t.flops, t.computed], dtype=torch.float64, device=env.device)
    slowest = torch.tensor([t.seconds], dtype=torch.float64, device=env.device)
    if env.world > 1:
        torch.distributed.all_reduce(sums)
        torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX)
    t.tokens, t.flops, t.computed = sums.tolist()
    t.seconds = float(slowest)
    return t


def _record_throughput(env: CheckEnv, f: Findings, t: _Timing, chunks, *, bf16: bool,
                       budget: int) -> None:
    """The figures and headline of the item from the timed steps, and its failures."""
    from megatron_polar.runtime.chunks import unwrap
    from megatron_polar.training.flops import peak_tflops_of_this_gpu

    args, world, timed = env.args, env.world, env.args.steps
    tflops_per_gpu = t.flops / t.seconds / world / 1e12
    peak = args.peak_tflops or peak_tflops_of_this_gpu()
    mfu = tflops_per_gpu / peak if peak else None
    params = sum(p.numel() for p in unwrap(chunks[0]).parameters())
    f.figures.update(
        preset=env.preset.name, parameters=params, spec="te" if env.te else "local",
        precision="bf16" if bf16 else "fp32", tensor_parallel=1, data_parallel=env.ctx.dp_size,
        distributed_optimizer=True, micro_batch_tokens=budget,
        micro_batches_per_step=args.throughput_micro_batches,
        warmup_steps=args.warmup_steps, timed_steps=timed, step_seconds=t.seconds / timed,
        tokens_per_s=t.tokens / t.seconds, tokens_per_s_per_gpu=t.tokens / t.seconds / world,
        packing_real_per_computed=t.tokens / t.computed if t.computed else None,
        tflops_per_gpu=tflops_per_gpu, peak_tflops=peak, mfu=mfu, losses=t.losses)
    mfu_text = f"MFU {100 * mfu:.1f}%" if mfu is not None else "MFU n/a (unknown peak)"
    f.headline_parts.append(f"{t.tokens / t.seconds / world:,.0f} tokens/s/GPU, "
                            f"{tflops_per_gpu:.3g} TFLOP/s/GPU, {mfu_text}")
    if t.skipped or not all(math.isfinite(x) for x in t.losses):
        f.fail(f"{t.skipped} of {timed} timed steps skipped their update (non-finite loss or "
               "gradient norm)")
    if args.min_mfu is not None and (mfu is None or mfu < args.min_mfu):
        f.fail(f"MFU {mfu} below --min-mfu {args.min_mfu}")


def _synchronize(env: CheckEnv) -> None:
    if env.on_gpu:
        torch.cuda.synchronize()


# -- f. peak memory (from the others' figures) -------------------------------------------------

def check_peak_memory(env: CheckEnv, f: Findings, results: list) -> None:
    if not env.on_gpu:
        raise SkipCheck("torch.cuda memory statistics need a CUDA GPU")
    # torch.cuda.max_memory_allocated / max_memory_reserved since reset_peak_memory_stats at
    # the start of each item (run_item): tensors the caching allocator handed out, and what
    # it held from the driver (allocated plus its cache and fragmentation).
    per_item = {r.name: r.peak_memory_gib for r in results if r.peak_memory_gib is not None}
    reserved = {r.name: r.peak_reserved_gib for r in results if r.peak_reserved_gib is not None}
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
    overall = max(per_item.values(), default=0.0)
    f.figures.update(per_item_allocated_gib=per_item, per_item_reserved_gib=reserved,
                     overall_peak_gib=overall,
                     overall_reserved_gib=max(reserved.values(), default=0.0),
                     device_memory_gib=round(total, 2),
                     overall_fraction_of_device=overall / total)
    f.headline_parts.append(f"overall {overall:.1f} GiB of {total:.0f} GiB"
                            + (f" ({max(per_item, key=per_item.get)})" if per_item else ""))
