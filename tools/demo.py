#!/usr/bin/env python3
"""The whole POLAR pipeline on tiny models, on a CPU, with no downloads (`make demo`).

    python tools/demo.py [--workdir runs/demo]

corpus (docstrings, Python and C++ from the sources of the pinned torch and megatron-core)
-> tokenizer -> policy pool (tiny Llama LMs) and base LM -> sampling -> build_triplets ->
POLAR pre-training -> ranked SFT -> evaluation -> HF export -> scoring with the exported model.
Finished stages are reused on a re-run (docs/demo.md).
"""

import argparse
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--num-prompts", type=int, default=None, help="corpus prompts to sample")
    p.add_argument("--pretrain-iters", type=int, default=None)
    p.add_argument("--sft-iters", type=int, default=None)
    p.add_argument("--seed", type=int, default=None,
                   help="seed of everything: policies, base LM, prompts, sampling, training "
                        "(default 1234; docs/demo.md lists three seeds' results)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes for the pool, base LM and sampling (default 2; results do "
                        "not depend on it)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from pathlib import Path

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # each stage shows one bar of its own

    from megatron_polar.demo.pipeline import DemoConfig, DemoPipeline
    from megatron_polar.demo.report import plot_curves, summary_text

    cfg = DemoConfig(workdir=args.workdir)
    for name in ("num_prompts", "pretrain_iters", "sft_iters", "seed", "workers"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    report = DemoPipeline(cfg).run()
    work = Path(cfg.workdir)
    (work / "report.json").write_text(json.dumps(report, indent=2))
    plot_curves(report, work / "training_curves.png")
    print()
    print(summary_text(report, cfg.held_out))
    print(f"  training curves: {work / 'training_curves.png'}; report: {work / 'report.json'}")
    print(f"  wall time: {report['wall_seconds']:.0f} s (stages reused on a re-run are not "
          "counted again)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
