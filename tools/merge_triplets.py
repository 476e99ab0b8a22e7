#!/usr/bin/env python3
"""Merge triplet datasets built in partitions (in the order given) into one."""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--inputs", nargs="+", required=True, help="dataset prefixes, in order")
    p.add_argument("--output-prefix", required=True)
    args = p.parse_args(argv)

    from megatron_polar.data.merge import merge_triplets

    try:
        meta = merge_triplets(args.inputs, args.output_prefix)
    except (FileNotFoundError, ValueError) as e:
        print(f"merge_triplets: error: {e}", file=sys.stderr)
        return 1
    print(f"merge_triplets: {len(args.inputs)} parts, {meta['triplets']:,} triplets, "
          f"{meta['tokens']:,} tokens -> {args.output_prefix}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
