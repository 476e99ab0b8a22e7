"""Megatron-style command-line flags shared by the tools (model preset, parallel layout, precision)."""

from __future__ import annotations

import argparse

from megatron_polar.model.config import FP8Config, ModelRunConfig
from megatron_polar.model.presets import PRESETS


def add_model_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("model and parallelism")
    g.add_argument("--model-preset", default="tiny", choices=sorted(PRESETS),
                   help="architecture preset (default: tiny)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--bf16", action="store_true", help="bf16 parameters and compute")
    g.add_argument("--fp8-format", choices=["hybrid", "e4m3"], default=None,
                   help="FP8 through Transformer Engine (Hopper GPUs only)")
    g.add_argument("--fp8-recipe", default="delayed")
    g.add_argument("--fp8-margin", type=int, default=0)
    g.add_argument("--fp8-amax-history-len", type=int, default=1024)
    g.add_argument("--fp8-amax-compute-algo", choices=["max", "most_recent"], default="max")
    g.add_argument("--transformer-impl", choices=["auto", "transformer_engine", "local"],
                   default="auto", help="layer spec; auto = TE when it imports and CUDA is up")
    g.add_argument("--seed", type=int, default=1234)
    return parser


def run_config_from_args(args: argparse.Namespace, num_layers: int) -> ModelRunConfig:
    vpp = None
    if args.num_layers_per_virtual_pipeline_stage:
        per_stage = num_layers // args.pipeline_model_parallel_size
        if per_stage % args.num_layers_per_virtual_pipeline_stage:
            raise SystemExit("--num-layers-per-virtual-pipeline-stage must divide the layers "
                             f"per pipeline stage ({per_stage})")
        vpp = per_stage // args.num_layers_per_virtual_pipeline_stage
    return ModelRunConfig(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=vpp,
        sequence_parallel=args.sequence_parallel,
        bf16=args.bf16,
        fp8=FP8Config(format=args.fp8_format, recipe=args.fp8_recipe, margin=args.fp8_margin,
                      amax_history_len=args.fp8_amax_history_len,
                      amax_compute_algo=args.fp8_amax_compute_algo),
        use_transformer_engine={"auto": None, "transformer_engine": True,
                                "local": False}[args.transformer_impl],
        seed=args.seed,
    )
