#!/usr/bin/env python3
"""Sample trajectories from a pool of LLM policies for POLAR pre-training (paper, appendix A.1).

    python tools/sample_trajectories.py --policies pool.txt --output gen \
        --corpus 'corpus/*.jsonl.gz' --num-prompts 100000 [--instructions sft.jsonl] \
        [--num-shards 64 --shard-index 3] [--policy NAME_OR_INDEX] [--backend auto]

Writes gen/prompts.jsonl and gen/<policy>/shard-XXXXX-of-YYYYY.jsonl; rerunning resumes.
Then: python tools/build_triplets.py --from-trajectories --input 'gen/*/*.jsonl' ...
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policies", required=True,
                   help="policy pool file: one '[NAME] PATH [base|chat]' per line")
    p.add_argument("--output", required=True, help="output directory")

    g = p.add_argument_group("prompts")
    g.add_argument("--corpus", nargs="+", default=[],
                   help="pre-training corpus files or globs: JSONL (see --corpus-field) or plain "
                        "text with documents separated by blank lines; .gz too")
    g.add_argument("--corpus-field", default="text", help="text field of JSONL corpus records")
    g.add_argument("--num-prompts", type=int, default=None,
                   help="corpus documents to sample (seeded reservoir sampling)")
    g.add_argument("--min-prefix-tokens", type=int, default=1)
    g.add_argument("--max-prefix-tokens", type=int, default=1024)
    g.add_argument("--prefix-tokenizer", default=None,
                   help="HF tokenizer directory that measures prefixes (default: the pool's "
                        "first policy)")
    g.add_argument("--instructions", nargs="+", default=[],
                   help="JSONL files with a 'prompt' field (string or chat messages), answered "
                        "by chat policies only")
    g.add_argument("--num-instructions", type=int, default=None,
                   help="instruction prompts to sample (default: all)")

    g = p.add_argument_group("sampling (defaults: the paper's)")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--max-new-tokens", type=int, default=4096)
    g.add_argument("--samples-per-prompt", type=int, default=2,
                   help="trajectories per prompt and policy (POLAR needs 2: reference + positive)")
    g.add_argument("--seed", type=int, default=1234)

    g = p.add_argument_group("work selection")
    g.add_argument("--num-shards", type=int, default=1, help="prompt i goes to shard i %% N")
    g.add_argument("--shard-index", type=int, default=None, help="run this shard only")
    g.add_argument("--policy", action="append", default=[],
                   help="run this policy only (name or 0-based index; repeatable)")

    g = p.add_argument_group("engine")
    g.add_argument("--backend", choices=("auto", "transformers", "vllm"), default="auto",
                   help="auto: vllm if installed and CUDA is available, else transformers")
    g.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    g.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                   default="auto", help="auto: bfloat16 on GPU, float32 on CPU (transformers)")
    g.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM only")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vLLM only")
    g.add_argument("--exit-after-batches", type=int, default=None,
                   help="testing: exit hard (like a crash) after N batches are written")
    g.add_argument("--prompts-only", action="store_true",
                   help="write OUTPUT/prompts.jsonl and stop (run once before a Slurm array)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def config_from_args(args):
    from megatron_polar.generation.sampler import SamplingConfig

    return SamplingConfig(
        policies=args.policies, output=args.output, corpus=args.corpus,
        corpus_field=args.corpus_field, num_prompts=args.num_prompts,
        min_prefix_tokens=args.min_prefix_tokens, max_prefix_tokens=args.max_prefix_tokens,
        prefix_tokenizer=args.prefix_tokenizer, instructions=args.instructions,
        num_instructions=args.num_instructions, temperature=args.temperature,
        top_p=args.top_p, top_k=args.top_k, max_new_tokens=args.max_new_tokens,
        samples_per_prompt=args.samples_per_prompt, seed=args.seed,
        num_shards=args.num_shards, shard_index=args.shard_index, policy=args.policy,
        backend=args.backend, batch_size=args.batch_size, dtype=args.dtype,
        tensor_parallel_size=args.tensor_parallel_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
        exit_after_batches=args.exit_after_batches, prompts_only=args.prompts_only)


def main(argv=None):
    args = build_parser().parse_args(argv)
    from megatron_polar.generation.backends import BackendError
    from megatron_polar.generation.pool import PoolError
    from megatron_polar.generation.prompts import PromptError
    from megatron_polar.generation.sampler import SamplingError, run_sampling

    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"sample_trajectories: error: {e}", file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar: ours (no per-model "Loading weights" bars)
    bar = None
    if not args.quiet and not args.prompts_only:
        from tqdm import tqdm

        bar = tqdm(unit=" traj", desc="sampling", dynamic_ncols=True)
    try:
        summary = run_sampling(cfg, progress=None if bar is None else bar.update)
    except (PoolError, PromptError, BackendError, SamplingError, FileNotFoundError) as e:
        error = e
    else:
        error = None
    if bar is not None:
        bar.close()
    if error is not None:
        print(f"sample_trajectories: error: {error}", file=sys.stderr)
        return 1
    if args.prompts_only:
        print(f"sample_trajectories: prompt set in {os.path.join(args.output, 'prompts.jsonl')}")
    else:
        print(f"sample_trajectories: {summary.line()} -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
