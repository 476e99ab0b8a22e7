#!/usr/bin/env python3
"""Tokenize POLAR triplets (JSONL) into megatron-core indexed datasets (.bin/.idx + .meta.json).

    python tools/build_triplets.py --input 'data/*.jsonl.gz' --output-prefix out/polar \
        --tokenizer /models/POLAR-7B --workers 16 [--skip-bad] \
        [--from-trajectories | --from-rankings]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", required=True, help="JSONL files or globs (.gz too)")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--tokenizer", required=True,
                   help="sentencepiece .model file or HF tokenizer directory")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--max-length", type=int, default=16384)
    p.add_argument("--max-response-length", type=int, default=4096)
    p.add_argument("--skip-bad", action="store_true",
                   help="write bad lines to PREFIX.rejected.jsonl and go on (default: stop)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--from-trajectories", action="store_true",
                      help="input is per-policy generations "
                           "(prompt_id, prompt, policy, trajectory)")
    mode.add_argument("--from-rankings", action="store_true",
                      help="input is ranked responses (prompt, responses best first): triplets "
                           "(responses[0], responses[i], responses[j]) for 1 <= i < j")
    p.add_argument("--list-documents", action="store_true",
                   help="with --from-rankings: one document per ranked list (its candidates, "
                        "every ordered pair a triplet), trained as one shared-prefix item: the "
                        "prompt and reference computed once per list; format "
                        "megatron-polar-triplets/2, which older readers refuse")
    p.add_argument("--seed", type=int, default=1234, help="triplet assembly seed (trajectories)")
    p.add_argument("--partitions", type=int, default=1, help="split the input lines into N parts")
    p.add_argument("--partition-index", type=int, default=0, help="which part this run builds")
    p.add_argument("--separator-id", type=int, default=None, help="id of <|reward|> (override)")
    p.add_argument("--reward-token-id", type=int, default=None, help="reward token id (override)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    args = p.parse_args(argv)

    from megatron_polar.data.build import BuildConfig, BuildError, build_triplets
    from megatron_polar.data.encoding import RecordError

    cfg = BuildConfig(
        inputs=args.input, output_prefix=args.output_prefix, tokenizer=args.tokenizer,
        workers=args.workers, max_length=args.max_length,
        max_response_length=args.max_response_length, skip_bad=args.skip_bad,
        from_trajectories=args.from_trajectories,
        from_rankings=args.from_rankings, list_documents=args.list_documents,
        seed=args.seed, partitions=args.partitions,
        partition_index=args.partition_index, separator_id=args.separator_id,
        reward_token_id=args.reward_token_id)
    try:
        summary = build_triplets(cfg, progress=not args.quiet)
    except (BuildError, RecordError, FileNotFoundError, ValueError) as e:
        print(f"build_triplets: error: {e}", file=sys.stderr)
        return 1
    print(f"build_triplets: {summary.line()} -> {args.output_prefix}.bin/.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
