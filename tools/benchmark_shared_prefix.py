#!/usr/bin/env python3
"""Shared-prefix packing against whole-sequence packing, side by side, same model and batch.

    python tools/benchmark_shared_prefix.py --model-preset small --budgets 16384 24576

Pre-training mix (prompt 1..1024, responses 1..4096 tokens, POLAR's pre-training lengths)
through the real trainer (`tools/benchmark_step.py`, `--shared-prefix` vs
`--no-shared-prefix`), and a ranked-list SFT mix (K responses per prompt: the reference and
K-1 candidates, every ordered pair) through the trainer too: a `--list-documents`-style dataset
(one item per list) vs the same lists as triplets packed whole. Prints computed tokens per pair,
pairs/s and the speed-up per budget, then one JSON object.
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def trainer_run(args, budget: int, shared: bool) -> dict:
    cmd = [sys.executable, os.path.join(ROOT, "tools", "benchmark_step.py"), "--json",
           "--model-preset", args.model_preset, "--micro-batch-tokens", str(budget),
           "--micro-batches", str(args.micro_batches), "--prompt-max", str(args.prompt_max),
           "--response-max", str(args.response_max), "--steps", str(args.steps),
           "--warmup-steps", str(args.warmup_steps),
           "--shared-prefix" if shared else "--no-shared-prefix"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def list_runs(args, preset, budget: int) -> dict:
    """The ranked-list mix through the trainer: the lists as one document each (shared-prefix
    items) vs the same lists as their triplets packed whole (--no-shared-prefix), the same
    global batch of pairs."""
    import tempfile

    from megatron_polar.testing.step_benchmark import summarize, write_synthetic_lists

    k = args.list_size
    batch = args.lists * (k - 1) * (k - 2) // 2
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "ranked")
        write_synthetic_lists(data, preset, 40 * args.lists, k, budget, args.prompt_max,
                              args.list_response_max)
        for layout, path, flag in (("plain", data + ".triplets", "--no-shared-prefix"),
                                   ("shared", data + ".lists", "--shared-prefix")):
            log = os.path.join(tmp, f"{layout}.jsonl")
            cmd = [sys.executable, "-m", "megatron_polar.train",
                   "--model-preset", preset.name, "--data-path", path,
                   "--micro-batch-tokens", str(budget), "--global-batch-size", str(batch),
                   "--lr", "1e-5", "--train-iters", str(args.warmup_steps + args.steps),
                   "--log-interval", "1", "--log-json", log, flag]
            run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
            if run.returncode:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{run.stdout[-2000:]}"
                                 f"{run.stderr[-4000:]}")
            out[layout] = summarize(log, args.warmup_steps)
    out["speedup"] = out["shared"]["pairs_per_s"] / out["plain"]["pairs_per_s"]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-preset", default="small")
    p.add_argument("--budgets", type=int, nargs="+", default=[16384, 24576])
    p.add_argument("--prompt-max", type=int, default=1024)
    p.add_argument("--response-max", type=int, default=4096)
    p.add_argument("--micro-batches", type=int, default=2,
                   help="pre-training mix: about this many plain packs per step")
    p.add_argument("--list-size", type=int, default=4, help="K: responses per ranked list")
    p.add_argument("--lists", type=int, default=4,
                   help="ranked lists per step (the global batch: their pairs)")
    p.add_argument("--list-response-max", type=int, default=1024)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--skip-pretrain", action="store_true")
    p.add_argument("--skip-lists", action="store_true")
    args = p.parse_args(argv)

    from megatron_polar.model.presets import get_preset

    preset = get_preset(args.model_preset)
    report = {"preset": preset.name, "pretrain": {}, "ranked_lists": {}}
    if not args.skip_pretrain:
        for budget in args.budgets:
            plain, shared = (trainer_run(args, budget, s) for s in (False, True))
            report["pretrain"][budget] = {"plain": plain, "shared": shared,
                                          "speedup": shared["pairs_per_s"] / plain["pairs_per_s"]}
            print(f"pre-training mix, budget {budget}: computed tokens/pair "
                  f"{plain['computed_tokens_per_pair']:,.0f} -> "
                  f"{shared['computed_tokens_per_pair']:,.0f}; pairs/s "
                  f"{plain['pairs_per_s']:.3f} -> {shared['pairs_per_s']:.3f} "
                  f"({report['pretrain'][budget]['speedup']:.2f}x)", flush=True)
    if not args.skip_lists:
        for budget in args.budgets:
            r = list_runs(args, preset, budget)
            report["ranked_lists"][budget] = r
            print(f"ranked lists K={args.list_size}, budget {budget}: computed tokens/pair "
                  f"{r['plain']['computed_tokens_per_pair']:,.0f} -> "
                  f"{r['shared']['computed_tokens_per_pair']:,.0f}; pairs/s "
                  f"{r['plain']['pairs_per_s']:.3f} -> {r['shared']['pairs_per_s']:.3f} "
                  f"({r['speedup']:.2f}x)", flush=True)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
