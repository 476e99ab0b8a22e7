"""Running the items: the flags (`build_parser`), one item with its status, time and peak
memory (`run_item`), and `main`, behind tools/gpu_check.py and `python -m
megatron_polar.training.gpu_check`."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

from megatron_polar.training.gpu_check.checkpoint import check_checkpoint_after_overlap
from megatron_polar.training.gpu_check.common import (ITEMS, ITEMS_AT_TP, NO_GPU_MESSAGE,
                                                      Findings, ItemResult, SkipCheck)
from megatron_polar.training.gpu_check.env import CheckEnv, free_memory, tf32_enabled
from megatron_polar.training.gpu_check.fp8_overlap import check_fp8_step, check_tp_comm_overlap
from megatron_polar.training.gpu_check.parity import (check_flex_attention,
                                                      check_packed_vs_unpacked,
                                                      check_shared_prefix, check_te_parity)
from megatron_polar.training.gpu_check.report import (build_report, format_table, jsonable,
                                                      merge_ranks, write_report)
from megatron_polar.training.gpu_check.throughput import check_peak_memory, check_throughput


CHECKS: dict[str, Callable] = {
    "te_parity": check_te_parity,
    "packed_vs_unpacked": check_packed_vs_unpacked,
    "flex_attention": check_flex_attention,
    "shared_prefix": check_shared_prefix,
    "fp8_step": check_fp8_step,
    "checkpoint_after_overlap": check_checkpoint_after_overlap,
    "tp_comm_overlap": check_tp_comm_overlap,
    "throughput": check_throughput,
}


def run_item(env: CheckEnv, name: str, results: list) -> ItemResult:
    findings = Findings()
    free_memory()
    if env.on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    status, reason = "pass", None
    try:
        if env.ctx.tp_size > 1 and name not in ITEMS_AT_TP:
            raise SkipCheck(f"runs at TP=1; this run has --tensor-model-parallel-size "
                            f"{env.ctx.tp_size} (for {', '.join(ITEMS_AT_TP[:-1])})")
        if name == "peak_memory":
            check_peak_memory(env, findings, results)
        else:
            CHECKS[name](env, findings)
        if findings.failures:
            status, reason = "fail", "; ".join(findings.failures)
    except SkipCheck as e:
        status, reason = "skip", str(e)
    except Exception as e:  # an item that crashes fails; the others still run
        status, reason = "fail", f"{type(e).__name__}: {e}"
        findings.figures["traceback"] = traceback.format_exc().splitlines()[-12:]
    if env.on_gpu:
        torch.cuda.synchronize()
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 3) if env.on_gpu else None
    reserved = round(torch.cuda.max_memory_reserved() / 2**30, 3) if env.on_gpu else None
    seconds = time.perf_counter() - start
    free_memory()
    headline = "; ".join(findings.headline_parts) or (reason or "")
    return ItemResult(name, status, reason, headline, jsonable(findings.figures), seconds,
                      peak, reserved)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpu_check.py",
        description="What to run first on a new GPU node: correctness of the GPU paths "
                    "(TE vs local spec, packing, flex attention, shared-prefix packs, FP8, "
                    "checkpoint after overlapped steps), peak memory and training "
                    "throughput / MFU.")
    p.add_argument("--report", default="gpu_check_report.json", help="JSON report path")
    p.add_argument("--allow-cpu", action="store_true",
                   help="run what can run on a CPU (gloo) instead of refusing; for tests")
    p.add_argument("--model-preset", default="internlm2_5-1_8b",
                   help="preset for the throughput item; the correctness items use its widths")
    p.add_argument("--check-layers", type=int, default=4,
                   help="layers of the preset for the correctness items (0: all)")
    p.add_argument("--checks", default=",".join(ITEMS),
                   help=f"comma-separated subset of: {', '.join(ITEMS)}")
    p.add_argument("--throughput-tokens", type=int, default=None,
                   help="tokens per packed micro-batch (default 16384 on a GPU, 512 on CPU)")
    p.add_argument("--throughput-micro-batches", type=int, default=2,
                   help="micro-batches per rank and step")
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed throughput steps")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak for MFU (default: from the GPU name, flops.py)")
    p.add_argument("--min-mfu", type=float, default=None,
                   help="fail the throughput item below this MFU (a fraction, e.g. 0.3)")
    p.add_argument("--fp8-format", default="hybrid", choices=("hybrid", "e4m3"))
    p.add_argument("--fp8-recipe", default="delayed",
                   choices=("delayed", "tensorwise", "blockwise", "mxfp8"))
    p.add_argument("--fp8-steps", type=int, default=3,
                   help="FP8 and bf16 steps on the same batch; the last one is compared")
    p.add_argument("--checkpoint-steps", type=int, default=2)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="TP of the run (default 1); > 1 runs only tp_comm_overlap (and "
                        "peak_memory), at that TP with sequence parallelism; the world size "
                        "must be a multiple")
    p.add_argument("--tolerance-scale", type=float, default=1.0,
                   help="multiply every tolerance (the defaults are TOL in gpu_check/common.py)")
    p.add_argument("--work-dir", default=None,
                   help="scratch directory for the checkpoint item (default: a temporary one; "
                        "give a shared path when ranks span nodes)")
    p.add_argument("--timeout-minutes", type=int, default=10,
                   help="collective timeout, so a rank that fails mid-item cannot hang the job")
    p.add_argument("--seed", type=int, default=1234)
    # Tests: make one item's comparison see a wrong value, to prove it fails.
    p.add_argument("--inject-fault", default=None, choices=ITEMS, help=argparse.SUPPRESS)
    return p


def _shared_workdir(args, rank: int, world: int) -> tuple[Path, bool]:
    made = False
    path = args.work_dir
    if path is None and rank == 0:
        path, made = tempfile.mkdtemp(prefix="gpu_check_"), True
    if world > 1:
        box = [path]
        torch.distributed.broadcast_object_list(box, src=0)
        path = box[0]
    Path(path).mkdir(parents=True, exist_ok=True)
    return Path(path), made

def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    selected = _selected_checks(args)
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.allow_cpu:
        print(NO_GPU_MESSAGE, file=sys.stderr)
        return 2

    env, made_workdir, started = _set_up(args, on_gpu)
    items = _run_items(env, selected)
    code = 1 if any(i["status"] == "fail" for i in items) else 0
    if env.rank == 0:
        report = build_report(env, items, code, started)
        write_report(report, Path(args.report))
        print(format_table(report), flush=True)
    if made_workdir and env.rank == 0:
        shutil.rmtree(env.workdir, ignore_errors=True)
    if env.world > 1:
        torch.distributed.barrier()
    return code


def _selected_checks(args) -> list[str]:
    """The items of --checks; the parser's error (exit status 2) for an unknown item or a TP
    that does not divide the world size."""
    selected = [c.strip() for c in args.checks.split(",") if c.strip()]
    unknown = [c for c in selected if c not in ITEMS]
    if unknown:
        build_parser().error(f"unknown check(s) {unknown}; known: {', '.join(ITEMS)}")
    tp, world_size = args.tensor_model_parallel_size, int(os.environ.get("WORLD_SIZE", "1"))
    if tp < 1 or world_size % tp:
        build_parser().error(f"--tensor-model-parallel-size {tp} must be >= 1 and divide the "
                             f"world size {world_size}")
    return selected


def _set_up(args, on_gpu: bool) -> tuple[CheckEnv, bool, float]:
    """(env, whether the work directory was made here, the run's start time): the parallel
    state, the presets and what this machine has."""
    from megatron_polar.model.config import ModelRunConfig
    from megatron_polar.model.presets import get_preset
    from megatron_polar.model.spec import transformer_engine_available
    from megatron_polar.runtime.parallel import initialize_parallel

    started = time.perf_counter()
    ctx = initialize_parallel(
        ModelRunConfig(seed=args.seed, tensor_model_parallel_size=args.tensor_model_parallel_size),
        timeout_minutes=args.timeout_minutes)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    preset = get_preset(args.model_preset)
    layers = args.check_layers if 0 < args.check_layers < preset.num_layers else preset.num_layers
    check_preset = preset if layers == preset.num_layers else \
        preset.replace(name=f"{preset.name}-{layers}l", num_layers=layers)
    workdir, made = _shared_workdir(args, rank, world)
    env = CheckEnv(args=args, ctx=ctx, preset=preset, check_preset=check_preset, on_gpu=on_gpu,
                   te=on_gpu and transformer_engine_available(),
                   capability=tuple(torch.cuda.get_device_capability()) if on_gpu else None,
                   tf32=tf32_enabled(), rank=rank, world=world, workdir=workdir,
                   tolerance_scale=args.tolerance_scale)
    return env, made, started


def _run_items(env: CheckEnv, selected: list[str]) -> list[dict]:
    """Every selected item on this rank, then merged over the ranks, in ITEMS' order."""
    results: list[ItemResult] = []
    # peak_memory reads the others' figures, so it runs last; the report keeps ITEMS' order.
    order = [n for n in ITEMS if n in selected and n != "peak_memory"] \
        + (["peak_memory"] if "peak_memory" in selected else [])
    for name in order:
        result = run_item(env, name, results)
        results.append(result)
        if env.rank == 0:
            print(f"[gpu-check] {name}: {result.status} ({result.seconds:.1f} s)"
                  + (f": {result.reason}" if result.status != "pass" and result.reason else ""),
                  flush=True)
    items = [r.as_dict() for r in sorted(results, key=lambda r: ITEMS.index(r.name))]
    if env.world > 1:
        gathered = [None] * env.world
        torch.distributed.all_gather_object(gathered, items)
        items = [merge_ranks([g[i] for g in gathered]) for i in range(len(items))]
    return items
