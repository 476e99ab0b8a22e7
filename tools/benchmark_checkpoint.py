#!/usr/bin/env python3
"""Training-checkpoint save and load: wall time, peak RSS increase and size, per rank.

    torchrun --standalone --nproc-per-node 2 tools/benchmark_checkpoint.py \
        --model-preset small --use-distributed-optimizer --format both --dir /tmp/ckpt_bench

For each optimizer format (dp_reshardable, fully_reshardable) this builds the model chunks and
megatron optimizer as the trainer does (DDP with the distributed optimizer and overlapped grad
reduce / param gather, Adam), runs one training step on random packed pairs so that the Adam
state exists, then on every rank measures:
- save: `training_state_dict` + a synchronous `CheckpointWriter.save` (fully parallel over the
  DP group), barriers before and after; after --warmup-saves unmeasured saves (the first save
  of a process pays one-time setup: thread pools, the fully parallel save's planning);
- load: `load_checkpoint` (fully parallel) into a freshly built model and optimizer;
- the peak RSS increase during each (VmRSS from /proc/self/status sampled every 10 ms in a
  thread, max minus the value just before; `ru_maxrss` cannot be used: it is the process's
  lifetime high-water mark);
- the bytes this rank wrote (its `__<rank>_*.distcp` files) and the checkpoint's size on disk.
The load is verified: every tensor of the model state (and the Adam moments and main params of
the distributed optimizer) equals the saved one; otherwise the tool exits 1. Rank 0 prints a
table of every rank's figures (and writes them with --json PATH).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FORMATS = ("dp_reshardable", "fully_reshardable")


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class PeakRSS:
    """Peak VmRSS above the value at entry, sampled every `interval` seconds in a thread."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.peak = 0.0

    def __enter__(self):
        self.base = rss_mib()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mib())
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib())

    @property
    def increase(self) -> float:
        return self.peak - self.base


def random_pairs(preset, n_pairs: int, max_len: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n_pairs):
        pair = []
        for _ in range(2):
            n = int(rng.integers(8, max_len + 1))
            ids = rng.integers(3, preset.vocab_size - 1, n).tolist()
            ids[-1] = preset.reward_token_id
            pair.append(ids)
        pairs.append(tuple(pair))
    return pairs


def build(preset, run, ctx, bf16: bool, distributed_optimizer: bool):
    import torch
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from megatron_polar.runtime.chunks import build_model_chunks
    from megatron_polar.training.optimizer import build_optimizer

    ddp = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=True, overlap_param_gather=True,
        use_distributed_optimizer=distributed_optimizer)
    chunks = build_model_chunks(preset, run, ctx, ddp)
    optimizer = build_optimizer(chunks, OptimizerConfig(
        optimizer="adam", lr=1e-3, min_lr=1e-4, weight_decay=0.01, adam_beta1=0.9,
        adam_beta2=0.95, adam_eps=1e-8, clip_grad=1.0, bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=distributed_optimizer,
        overlap_param_gather_with_optimizer_step=False), ctx)
    return chunks, optimizer


def model_snapshot(chunks) -> dict:
    from megatron_polar.runtime.chunks import unwrap

    return {f"{i}.{k}": v.detach().clone() for i, c in enumerate(chunks)
            for k, v in unwrap(c).state_dict().items() if hasattr(v, "detach")}


def optimizer_snapshot(optimizer) -> list:
    """The inner optimizers' main params and Adam moments, in parameter order."""
    out = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state.get(p, {})
                out.append([p.detach().clone()] + [st[k].detach().clone()
                                                   for k in ("exp_avg", "exp_avg_sq") if k in st])
    return out


def mismatches(a: dict, b: dict) -> list[str]:
    import torch

    bad = sorted(set(a) ^ set(b))
    bad += [k for k in sorted(set(a) & set(b)) if not torch.equal(a[k], b[k])]
    return bad


def tree_bytes(path: Path, pattern: str = "*") -> int:
    return sum(f.stat().st_size for f in path.rglob(pattern) if f.is_file())


def trained_model(preset, run, ctx, args):
    """A model and optimizer after one real training step (Adam state that is not zero)."""
    from megatron_polar.data.packing import pack_pairs
    from megatron_polar.runtime.schedules import sync_params
    from megatron_polar.training.step import train_step

    chunks, optimizer = build(preset, run, ctx, args.bf16, args.use_distributed_optimizer)
    # Same pairs on every TP/PP rank of a DP replica, different ones per replica.
    pairs = random_pairs(preset, args.pairs, args.micro_batch_tokens // 4, 1000 + ctx.dp_rank)
    packs = pack_pairs(pairs, args.micro_batch_tokens, preset.pad_token_id, pad_multiple=64)
    result = train_step(chunks, optimizer, packs, ctx)
    if not result.update_successful:
        raise RuntimeError("the training step was skipped; no Adam state to save")
    sync_params(chunks)
    return chunks, optimizer


def optimizer_states_equal(saved, loaded) -> bool:
    import torch

    return len(loaded) == len(saved) and all(
        len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
        for a, b in zip(saved, loaded))


def bench_format(fmt, args, preset, run, ctx) -> dict:
    import torch

    from megatron_polar.training.checkpointing import (CheckpointWriter, load_checkpoint,
                                                       training_state_dict)

    rank = torch.distributed.get_rank()
    save_dir = Path(args.dir) / f"{fmt}{'-bf16' if args.bf16 else ''}"
    if rank == 0 and save_dir.exists():
        shutil.rmtree(save_dir)
    torch.distributed.barrier()

    chunks, optimizer = trained_model(preset, run, ctx, args)
    saved_model = model_snapshot(chunks)
    saved_optim = optimizer_snapshot(optimizer)
    n_params = sum(v.numel() for v in saved_model.values())
    common = {"benchmark": True, "layout": {"tp": ctx.tp_size, "pp": ctx.pp_size,
                                            "dp": ctx.dp_size, "vpp": ctx.vp_size}}
    writer = CheckpointWriter(save_dir, parallelization_group=ctx.pg.dp)
    for it in range(args.warmup_saves):  # the first save in a process pays one-time setup
        writer.save(it + 1, training_state_dict(chunks, optimizer, ctx, common,
                                                optimizer_format=fmt))
    iteration = args.warmup_saves + 1
    gc.collect()

    torch.distributed.barrier()
    with PeakRSS() as save_mem:
        t0 = time.perf_counter()
        state = training_state_dict(chunks, optimizer, ctx, common, optimizer_format=fmt)
        writer.save(iteration, state)
        torch.distributed.barrier()
        save_s = time.perf_counter() - t0
    del state, writer, chunks, optimizer
    gc.collect()

    directory = save_dir / f"iter_{iteration:07d}"
    written = tree_bytes(directory, f"__{rank}_*.distcp")

    chunks, optimizer = build(preset, run, ctx, args.bf16, args.use_distributed_optimizer)
    fresh_differs = bool(mismatches(saved_model, model_snapshot(chunks)))
    gc.collect()
    torch.distributed.barrier()
    with PeakRSS() as load_mem:
        t0 = time.perf_counter()
        load_checkpoint(directory, chunks, optimizer, ctx)
        torch.distributed.barrier()
        load_s = time.perf_counter() - t0

    bad = mismatches(saved_model, model_snapshot(chunks))
    loaded_optim = optimizer_snapshot(optimizer)
    optim_ok = optimizer_states_equal(saved_optim, loaded_optim)
    out = {"format": fmt, "rank": rank, "tp_rank": ctx.tp_rank, "pp_rank": ctx.pp_rank,
           "dp_rank": ctx.dp_rank, "local_params": n_params, "save_s": save_s, "load_s": load_s,
           "save_rss_increase_mib": save_mem.increase, "load_rss_increase_mib": load_mem.increase,
           "rss_before_save_mib": save_mem.base, "written_mib": written / 2**20,
           "checkpoint_mib": tree_bytes(directory) / 2**20 if rank == 0 else None,
           "weights_equal": not bad, "fresh_model_differed": fresh_differs,
           "optimizer_equal": optim_ok, "mismatched": bad[:5]}
    del chunks, optimizer
    gc.collect()
    return out


def report(rows: list[dict], args, preset, ctx, world: int) -> None:
    """Every rank's figures as a table (problems to stderr), and as JSON with --json."""
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"CPU, {torch.get_num_threads()} thread(s) per rank, gloo"
    print(f"{preset.name}, {'bf16' if args.bf16 else 'fp32'}, world {world} "
          f"(TP={ctx.tp_size} PP={ctx.pp_size} DP={ctx.dp_size}), "
          f"distributed optimizer: {args.use_distributed_optimizer}, {device}")
    print(f"{'format':<18} {'rank':>4} {'params':>10} {'save s':>7} {'load s':>7} "
          f"{'save +RSS MiB':>13} {'load +RSS MiB':>13} {'written MiB':>11} "
          f"{'ckpt MiB':>8} {'verified':>8}")
    for r in rows:
        ckpt = f"{r['checkpoint_mib']:.1f}" if r["checkpoint_mib"] is not None else ""
        verified = "yes" if r["weights_equal"] and r["optimizer_equal"] else "NO"
        print(f"{r['format']:<18} {r['rank']:>4} {r['local_params']:>10,} {r['save_s']:>7.2f} "
              f"{r['load_s']:>7.2f} {r['save_rss_increase_mib']:>13.1f} "
              f"{r['load_rss_increase_mib']:>13.1f} {r['written_mib']:>11.1f} {ckpt:>8} "
              f"{verified:>8}")
    for r in rows:
        if not r["weights_equal"]:
            print(f"rank {r['rank']} {r['format']}: weights differ after load: "
                  f"{r['mismatched']}", file=sys.stderr)
        if not r["optimizer_equal"]:
            print(f"rank {r['rank']} {r['format']}: optimizer state differs after load",
                  file=sys.stderr)
        if not r["fresh_model_differed"]:
            print(f"rank {r['rank']} {r['format']}: note: the fresh model already equalled "
                  "the saved one (the check proves less)", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"preset": preset.name, "bf16": args.bf16, "world_size": world,
             "tp": ctx.tp_size, "pp": ctx.pp_size, "dp": ctx.dp_size,
             "distributed_optimizer": args.use_distributed_optimizer, "ranks": rows},
            indent=2) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-preset", default="small")
    p.add_argument("--format", choices=FORMATS + ("both",), default="both")
    p.add_argument("--dir", required=True, help="checkpoints go to DIR/<format>[-bf16]/")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--use-distributed-optimizer", action="store_true")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--micro-batch-tokens", type=int, default=512)
    p.add_argument("--pairs", type=int, default=4, help="random pairs per DP rank for the step")
    p.add_argument("--warmup-saves", type=int, default=1,
                   help="unmeasured saves before the measured one (default 1)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints (default: remove)")
    p.add_argument("--json", default=None, metavar="PATH", help="write every rank's figures")
    args = p.parse_args(argv)

    import torch

    from megatron_polar.model.config import ModelRunConfig
    from megatron_polar.model.presets import get_preset
    from megatron_polar.runtime.parallel import destroy_parallel, initialize_parallel

    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    preset = get_preset(args.model_preset)
    run = ModelRunConfig(tensor_model_parallel_size=args.tensor_model_parallel_size,
                         pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                         bf16=args.bf16)
    ctx = initialize_parallel(run)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    formats = FORMATS if args.format == "both" else (args.format,)
    rows = []
    try:
        for fmt in formats:
            mine = bench_format(fmt, args, preset, run, ctx)
            gathered = [None] * world
            torch.distributed.all_gather_object(gathered, mine)
            rows += gathered
            if rank == 0 and not args.keep:
                shutil.rmtree(Path(args.dir) / f"{fmt}{'-bf16' if args.bf16 else ''}",
                              ignore_errors=True)
            torch.distributed.barrier()
    finally:
        destroy_parallel()

    ok = all(r["weights_equal"] and r["optimizer_equal"] for r in rows)
    if rank == 0:
        report(rows, args, preset, ctx, world)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
