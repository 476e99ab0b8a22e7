#!/usr/bin/env python3
"""Training-step throughput through the real trainer (tokens/s; TFLOP/s and MFU on a GPU).

    python tools/benchmark_step.py --model-preset tiny --micro-batch-tokens 1024
    torchrun --nproc-per-node 8 tools/benchmark_step.py --model-preset internlm2_5-1_8b \
        --micro-batch-tokens 16384 --bf16 --use-distributed-optimizer

Flags it does not know go to `python -m megatron_polar.train` unchanged (parallel layout,
precision, recompute, ...). Prints a readable line and one JSON object.
"""

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-preset", default="tiny")
    p.add_argument("--micro-batch-tokens", type=int, default=4096)
    p.add_argument("--micro-batches", type=int, default=4,
                   help="about this many packed micro-batches per data-parallel rank and step")
    p.add_argument("--prompt-max", type=int, default=None,
                   help="longest prompt (default: micro-batch-tokens / 16)")
    p.add_argument("--response-max", type=int, default=None,
                   help="longest response (default: micro-batch-tokens / 8)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    args, trainer_args = p.parse_known_args(argv)

    from megatron_polar.model.presets import get_preset
    from megatron_polar.testing.step_benchmark import summarize, world_layout, write_synthetic_dataset
    from megatron_polar.training.arguments import build_train_parser
    from megatron_polar.training.trainer import main as train_main

    preset = get_preset(args.model_preset)
    budget = args.micro_batch_tokens
    rank, world = world_layout()
    layout, _ = build_train_parser().parse_known_args(trainer_args)  # just the parallel sizes
    dp = world // (layout.tensor_model_parallel_size * layout.pipeline_model_parallel_size
                   * layout.context_parallel_size)
    with tempfile.TemporaryDirectory() as tmp:
        # Every rank writes the same small dataset to its own directory: no shared disk needed.
        n_pairs = 200 * args.micro_batches * dp
        mean_pair = write_synthetic_dataset(
            os.path.join(tmp, "pairs"), preset, n_pairs, budget,
            args.prompt_max or max(1, budget // 16), args.response_max or max(1, budget // 8))
        batch = max(dp, round(args.micro_batches * dp * 0.97 * budget / mean_pair))
        log = os.path.join(tmp, "log.jsonl")
        rc = train_main(trainer_args + [
            "--model-preset", args.model_preset, "--data-path", os.path.join(tmp, "pairs"),
            "--micro-batch-tokens", str(budget), "--global-batch-size", str(batch),
            "--lr", "1e-5", "--train-iters", str(args.warmup_steps + args.steps),
            "--log-interval", "1", "--log-json", log])
        if rc:
            return rc
        if rank != 0:
            return 0
        result = {"preset": preset.name, "world_size": world, "global_batch_size": batch,
                  "micro_batch_tokens": budget, **summarize(log, args.warmup_steps)}
    if not args.json:
        import torch

        device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
            f"CPU ({torch.get_num_threads()} threads)"
        mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "n/a"
        print(f"{preset.name} on {device}, {world} rank(s): {result['tokens_per_s']:,.0f} "
              f"tokens/s ({result['tokens_per_s'] / world:,.0f} per rank), step "
              f"{result['step_seconds']:.3f}s, {result['tflops_per_gpu']:.2f} TFLOP/s per rank, "
              f"MFU {mfu}, packing {result['packing_efficiency']:.3f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
