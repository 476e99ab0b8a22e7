#!/usr/bin/env python3
"""Train a tiny POLAR reward model on the synthetic policy-discrimination task, end to end.

Prints held-out-policy accuracy before (chance) and after training and saves the model as a
megatron distributed checkpoint. Runs on CPU in about a minute; also under torchrun:

    torchrun --nproc-per-node 2 tools/demo_synthetic.py --tensor-model-parallel-size 2
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_polar.training.arguments import add_model_args, run_config_from_args  # noqa: E402


def main(argv=None):
    parser = add_model_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.set_defaults(seed=1)
    parser.add_argument("--global-batch-size", type=int, default=16, help="pairs per step")
    parser.add_argument("--micro-batch-tokens", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--min-lr", type=float, default=2e-3)
    parser.add_argument("--train-iters", type=int, default=900)
    parser.add_argument("--time-budget", type=float, default=55.0,
                        help="stop training after this many seconds (0: no limit)")
    parser.add_argument("--save", default=None, help="directory for the final checkpoint")
    parser.add_argument("--report", default=None, help="write the report as JSON here")
    args = parser.parse_args(argv)

    from megatron_polar.model.presets import get_preset
    from megatron_polar.runtime.checkpoints import save_model_weights
    from megatron_polar.runtime.parallel import destroy_parallel
    from megatron_polar.testing.synthetic_run import SyntheticRunConfig, run_synthetic

    run = run_config_from_args(args, get_preset(args.model_preset or "tiny").num_layers)
    cfg = SyntheticRunConfig(
        model_preset=args.model_preset or "tiny", run=run, pairs_per_step=args.global_batch_size,
        token_budget=args.micro_batch_tokens, lr=args.lr, min_lr=args.min_lr,
        max_steps=args.train_iters, time_budget_s=args.time_budget or None)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    log = print if rank0 else (lambda _msg: None)
    chunks_holder = {}
    report = run_synthetic(cfg, log=log, keep=chunks_holder)
    if args.save:
        save_model_weights(chunks_holder["chunks"], args.save)
        log(f"saved checkpoint to {args.save}")
    if rank0:
        print(f"\nPOLAR synthetic demo: held-out policy discrimination "
              f"{report.accuracy_before:.3f} -> {report.accuracy_after:.3f} "
              f"in {report.steps} steps, {report.seconds:.0f}s, {report.tokens_per_s:,.0f} tokens/s")
        if args.report:
            with open(args.report, "w") as f:
                json.dump(report.as_dict(), f, indent=2)
    destroy_parallel()


if __name__ == "__main__":
    main()
