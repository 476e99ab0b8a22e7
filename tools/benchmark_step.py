#!/usr/bin/env python3
"""Training-step throughput of a preset: tokens/s (and TFLOP/s, MFU on a GPU).

    python tools/benchmark_step.py --model-preset small --micro-batch-tokens 2048
    torchrun --nproc-per-node 8 tools/benchmark_step.py --model-preset internlm2_5-1_8b \
        --bf16 --micro-batch-tokens 16384 --tensor-model-parallel-size 1
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_polar.model.presets import get_preset  # noqa: E402
from megatron_polar.training.arguments import add_model_args, run_config_from_args  # noqa: E402


def main(argv=None):
    parser = add_model_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--micro-batch-tokens", type=int, default=4096,
                        help="token budget of one packed micro-batch")
    parser.add_argument("--micro-batches", type=int, default=4, help="per DP rank and step")
    parser.add_argument("--prompt-max", type=int, default=None,
                        help="longest prompt (default: micro-batch-tokens / 16)")
    parser.add_argument("--response-max", type=int, default=None,
                        help="longest response (default: micro-batch-tokens / 8)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--use-distributed-optimizer", action="store_true")
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    args = parser.parse_args(argv)

    import torch

    from megatron_polar.training.benchmark import BenchmarkConfig, benchmark_step
    from megatron_polar.training.parallel import destroy_parallel, initialize_parallel

    preset = get_preset(args.model_preset)
    run = run_config_from_args(args, preset.num_layers)
    cfg = BenchmarkConfig(
        micro_batch_tokens=args.micro_batch_tokens, micro_batches=args.micro_batches,
        prompt_max=args.prompt_max or max(1, args.micro_batch_tokens // 16),
        response_max=args.response_max or max(1, args.micro_batch_tokens // 8),
        steps=args.steps, warmup_steps=args.warmup_steps,
        use_distributed_optimizer=args.use_distributed_optimizer)
    ctx = initialize_parallel(run)
    result = benchmark_step(preset, run, cfg, ctx)
    if torch.distributed.get_rank() == 0:
        if not args.json:
            device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
                f"CPU ({torch.get_num_threads()} threads)"
            mfu = f"{100 * result.mfu:.1f}%" if result.mfu is not None else "n/a"
            print(f"{preset.name} on {device}: {result.tokens_per_s:,.0f} tokens/s "
                  f"({result.tokens_per_s_per_gpu:,.0f} per rank), step {result.step_seconds:.3f}s, "
                  f"{result.tflops_per_gpu:.2f} TFLOP/s per rank, MFU {mfu}, "
                  f"packing {result.packing_efficiency:.3f}")
        print(json.dumps(result.as_dict()))
    destroy_parallel()


if __name__ == "__main__":
    main()
