#!/usr/bin/env python3
"""Convert between Hugging Face InternLM2/POLAR checkpoints and megatron-core checkpoints.

    python tools/convert_hf.py import --hf internlm2_5-7b --out ckpt/polar7b-init \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 1
    python tools/convert_hf.py export --ckpt runs/polar7b --out POLAR-7B-mine --dtype bf16
    python tools/convert_hf.py export --ckpt runs/polar7b --out POLAR-7B-llama \\
        --format llama-seqcls

See docs/export.md.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF InternLM2 base model, InternLM2ForRewardModel or a "
                                        "LlamaForSequenceClassification export -> megatron-core "
                                        "weights checkpoint")
    imp.add_argument("--hf", required=True, help="HF model directory (config.json + weights)")
    imp.add_argument("--out", required=True, help="checkpoint directory to create")
    imp.add_argument("--tensor-model-parallel-size", type=int, default=1,
                     help="TP size the checkpoint will be trained at (checked against the model; "
                          "the checkpoint itself loads at any TP/PP)")
    imp.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    imp.add_argument("--reward-token-id", type=int, default=None,
                     help="reward token id (default: config.json's reward_token_id, else 92527)")
    imp.add_argument("--model-preset", default=None,
                     help="a preset the checkpoint must match (default: derived from config.json)")
    imp.add_argument("--tokenizer", default=None,
                     help="tokenizer to check and keep with the checkpoint (default: the HF "
                          "directory's own tokenizer files, if any)")
    imp.add_argument("--part-size-mb", type=float, default=1024,
                     help="write the checkpoint in parts of about this size (peak memory)")
    exp = sub.add_parser("export", help="megatron-core checkpoint (any TP/PP) -> HF "
                                        "InternLM2ForRewardModel (or, with --format "
                                        "llama-seqcls, LlamaForSequenceClassification) directory")
    exp.add_argument("--ckpt", required=True,
                     help="a run directory (its latest checkpoint), an iter_N directory, or an "
                          "imported weights checkpoint")
    exp.add_argument("--out", required=True, help="HF directory to create")
    exp.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    exp.add_argument("--format", default="internlm2", choices=("internlm2", "llama-seqcls"),
                     help="internlm2: InternLM2ForRewardModel, the released POLAR layout (remote "
                          "code, shipped from xtuner or the imported model); llama-seqcls: "
                          "LlamaForSequenceClassification with one label, loaded natively by "
                          "transformers, vLLM, sglang, TRL, OpenRLHF (docs/export.md)")
    exp.add_argument("--tokenizer", default=None,
                     help="tokenizer to ship (default: the one kept in the checkpoint)")
    exp.add_argument("--model-preset", default=None,
                     help="preset (default: the one recorded in the checkpoint)")
    exp.add_argument("--max-shard-size-mb", type=float, default=4768,
                     help="largest safetensors shard (default 5 GB, as save_pretrained)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "import":
        from megatron_polar.convert.importer import main_import

        return main_import(args)
    from megatron_polar.convert.exporter import main_export

    return main_export(args)


if __name__ == "__main__":
    sys.exit(main())
