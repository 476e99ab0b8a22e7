#!/usr/bin/env python3
"""Data-pipeline benchmark: build throughput (1 and 2 workers), packing efficiency at 16k/32k
against padding, and sampler throughput. Prints one JSON object and a readable summary."""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=4000, help="synthetic triplets to build")
    p.add_argument("--megatron-lm", type=Path, default=None,
                   help="a Megatron-LM checkout: also time its tools/preprocess_data.py on the "
                        "same records and tokenizer")
    args = p.parse_args(argv)
    from megatron_polar.testing.data_benchmark import run_all

    r = run_all(args.records, args.megatron_lm)
    for b in r["build"]:
        print(f"build, {b['workers']} worker(s): {b['output_tokens_per_s']:,.0f} tokens/s "
              f"({b['input_mb_per_s']:.2f} MB/s of JSONL, {b['records']} triplets)")
    for k in r["packing"]:
        print(f"packing at {k['budget']}: {k['packed_efficiency']:.3f} real/computed "
              f"(budget fill {k['budget_fill']:.3f}, {k['micro_batches_per_step']:.0f} "
              f"micro-batches per step of {k['global_batch_size']} pairs; padding each sequence to "
              f"the maximum: {k['padded_efficiency']:.3f}; "
              f"{k['skipped_oversize_pairs']} of {k['pairs'] + k['skipped_oversize_pairs']} "
              "pairs longer than the budget)")
    s = r["sampler"]
    print(f"sampler at {s['budget']}: {s['tokens_per_s']:,.0f} tokens/s (one core)")
    s = r["sampler_shared_prefix"]
    print(f"sampler at {s['budget']}, shared prefixes: {s['tokens_per_s']:,.0f} tokens/s "
          "(one core)")
    for v in r["against_megatron_lm"] or []:
        sec = v["seconds"]
        print(f"wall time, {v['workers']} worker(s), {v['input_mb']:.0f} MB: build_triplets "
              f"{sec['build_triplets']:.1f} s, Megatron-LM preprocess_data "
              f"{sec['megatron_lm_preprocess_data']:.1f} s")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
