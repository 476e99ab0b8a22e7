#!/usr/bin/env python3
"""POLAR-style JSONL (prompt, reference) -> NeMo-Aligner PPO prompt files + the reward server's
reference file (docs/rlhf.md).

    python tools/make_rlhf_prompts.py --input 'rlhf/*.jsonl' --output-dir prompts \\
        [--prompt-template $'User: {prompt}\\nAssistant:' | --chat-template-from ACTOR_HF_DIR]

The template is taken literally: bash's $'...' quoting gives it real newlines.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", required=True,
                   help="JSONL files or globs (.gz too): prompt, reference[, wrapper, id]")
    p.add_argument("--output-dir", required=True)
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--prompt-template", default="{prompt}",
                     help="the actor's text, with {prompt} for the prompt's plain text "
                     "(literal: use bash's $'...' for newlines)")
    fmt.add_argument("--chat-template-from", default=None,
                     help="HF tokenizer directory whose chat template formats the prompt")
    p.add_argument("--validation-fraction", type=float, default=0.01,
                   help="share of prompts for validation.jsonl, in (0, 1); at least one")
    p.add_argument("--seed", type=int, default=1234, help="validation split seed")
    p.add_argument("--reject-file", default=None, help="default: OUTPUT_DIR/rejects.jsonl")
    args = p.parse_args(argv)

    from megatron_polar.data.rlhf_prompts import (chat_template_formatter, make_rlhf_prompts,
                                                  template_formatter)

    try:
        formatter = (chat_template_formatter(args.chat_template_from)
                     if args.chat_template_from else template_formatter(args.prompt_template))
        summary = make_rlhf_prompts(args.input, args.output_dir, formatter,
                                    args.validation_fraction, args.seed, args.reject_file)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary.as_dict()))
    for r in summary.rejects[:5]:
        print(f"rejected {r['where']}: {r['reason']}", file=sys.stderr)
    if summary.rejected > 5:
        print(f"... {summary.rejected - 5} more in the reject file", file=sys.stderr)
    for w in summary.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if not summary.written:
        print(f"error: no prompt written: none of the {summary.read} non-blank input lines "
              "was usable (reasons in the reject file)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
