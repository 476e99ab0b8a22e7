#!/usr/bin/env python3
"""Evaluate a POLAR reward model: ranked preference sets and held-out policy discrimination.

    python tools/eval_preference.py --checkpoint runs/polar7b --ranked rmb.jsonl \\
        --output-json eval.json
    python tools/eval_preference.py --hf POLAR-7B-mine --trajectories 'heldout/*.jsonl' \\
        --policies qwen2-7b,llama3-8b --max-triplets 2000
    python tools/eval_preference.py --init-preset tiny --seed 1 --tokenizer tok.model \\
        --ranked ranked.jsonl                                   # the chance baseline
    torchrun --nproc-per-node 2 tools/eval_preference.py --checkpoint CKPT \\
        --tensor-model-parallel-size 2 --ranked rmb.jsonl

Prints a table per evaluation (rank 0) and writes the full report, per-record rewards
included, to --output-json. Bad input exits with status 2 and names the file and line.
See docs/evaluation.md.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    from megatron_polar.eval.flags import HF_HELP, add_scorer_args

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data = p.add_argument_group("evaluations (one or both)")
    data.add_argument("--ranked", nargs="+", default=None, metavar="FILE",
                      help="ranked JSONL (prompt, responses best first): the reference is the "
                           "1st, the model must prefer the 2nd over the 3rd")
    data.add_argument("--category-field", default="category",
                      help="field of a ranked record that names its category")
    data.add_argument("--trajectories", nargs="+", default=None, metavar="GLOB",
                      help="trajectory JSONL (prompt_id, prompt, policy, trajectory) of "
                           "held-out policies")
    data.add_argument("--policies", default=None,
                      help="comma-separated policies to keep (default: all present)")
    data.add_argument("--max-triplets", type=int, default=None,
                      help="score at most this many triplets, drawn with --triplet-seed")
    data.add_argument("--triplet-seed", type=int, default=1234,
                      help="seed of triplet assembly and of the --max-triplets draw "
                           "(as build_triplets --seed)")
    p.add_argument("--output-json", default=None, help="write the report here")
    add_scorer_args(p, hf_help=HF_HELP + " (one process only)",
                    init_preset_help="a freshly initialised model of this preset, seeded with "
                                     "--seed (the before-training baseline)")
    return p


def write_report(args, scorer, reports: dict, seconds: float) -> None:
    """The tables on stdout and, with --output-json, the whole report as JSON."""
    ctx = scorer.ctx
    report = {
        "model": {**scorer.source.describe(),
                  "seed": args.seed if args.init_preset else None},
        "encoding": {"max_length": args.max_length,
                     "max_response_length": args.max_response_length},
        "layout": {"tensor_model_parallel_size": ctx.tp_size,
                   "pipeline_model_parallel_size": ctx.pp_size,
                   "data_parallel_size": ctx.dp_size},
        "seconds": round(seconds, 3),
    }
    if "preference" in reports:
        report["preference"] = {"files": args.ranked, "category_field": args.category_field,
                                **reports["preference"].as_dict()}
    if "discrimination" in reports:
        report["discrimination"] = {"max_triplets": args.max_triplets,
                                    **reports["discrimination"].as_dict()}
    print(f"model: {scorer.source.kind} {scorer.source.path or scorer.preset.name} "
          f"(preset {scorer.preset.name})")
    for r in reports.values():
        print("\n" + r.table())
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, ensure_ascii=False)
            f.write("\n")
        print(f"\nreport: {args.output_json}")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.ranked and not args.trajectories:
        parser.error("give --ranked and/or --trajectories")
    if args.max_triplets is not None and args.max_triplets < 1:
        parser.error("--max-triplets must be >= 1")
    policies = ([p.strip() for p in args.policies.split(",") if p.strip()]
                if args.policies else None)

    import torch

    from megatron_polar.config.flags import ConfigError
    from megatron_polar.data.encoding import RecordError
    from megatron_polar.eval.discrimination import evaluate_discrimination, load_policy_triplets
    from megatron_polar.eval.flags import scorer_from_args
    from megatron_polar.eval.preference import EvalInputError, evaluate_preference, read_ranked
    from megatron_polar.eval.scorer import ScorerError
    from megatron_polar.runtime.parallel import destroy_parallel

    start = time.perf_counter()
    try:
        # Inputs first: a bad line fails before any model is loaded.
        ranked = read_ranked(args.ranked, args.category_field) if args.ranked else None
        triplets = (load_policy_triplets(args.trajectories, policies, args.triplet_seed,
                                         args.max_triplets) if args.trajectories else None)
        scorer = scorer_from_args(args)
        reports = {}
        if ranked is not None:
            reports["preference"] = evaluate_preference(ranked, scorer)
        if triplets is not None:
            reports["discrimination"] = evaluate_discrimination(triplets, scorer)
    except (EvalInputError, RecordError, ScorerError, ConfigError) as e:
        print(f"eval_preference: error: {e}", file=sys.stderr)
        return 2

    # Every rank holds the rewards (RewardScorer broadcasts them); rank 0 reports.
    if torch.distributed.get_rank() == 0:
        write_report(args, scorer, reports, time.perf_counter() - start)
    torch.distributed.barrier()
    destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
