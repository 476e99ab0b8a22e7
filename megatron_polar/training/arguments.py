"""Megatron-style command-line flags: the model group every tool that runs a model shares
(preset, parallel layout, precision: generated from `ModelRunConfig`'s fields) and the
trainer's. Errors are ConfigErrors; the tools' `main`s turn them into exit status 2."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from megatron_polar.config.flags import ConfigError, add_flags, from_namespace, load_yaml
from megatron_polar.model.config import ModelRunConfig
from megatron_polar.model.presets import PRESETS, ModelPreset
from megatron_polar.training.hparams import polar_hparams


def add_model_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`--model-preset`, and a flag for every field of `ModelRunConfig` (parallel sizes,
    precision, FP8, recompute, layer spec, seed), generated from the fields."""
    g = parser.add_argument_group("model and parallelism")
    g.add_argument("--model-preset", default=None,
                   help=f"architecture: a preset name ({', '.join(sorted(PRESETS))}), a model.json, "
                        "or a checkpoint directory holding one (default: the preset recorded in "
                        "the checkpoint loaded, else tiny)")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="interleaved pipeline: layers per virtual stage (megatron's VPP)")
    add_flags(g, ModelRunConfig)
    return parser


def run_config_from_args(args: argparse.Namespace, num_layers: int) -> ModelRunConfig:
    """The `ModelRunConfig` of parsed `add_model_args` flags for a model of `num_layers`
    layers; ConfigError for a value the config refuses."""
    vpp = None
    if args.num_layers_per_virtual_pipeline_stage:
        per_stage = num_layers // args.pipeline_model_parallel_size
        if per_stage % args.num_layers_per_virtual_pipeline_stage:
            raise ConfigError("--num-layers-per-virtual-pipeline-stage must divide the layers "
                              f"per pipeline stage ({per_stage})")
        vpp = per_stage // args.num_layers_per_virtual_pipeline_stage
    return from_namespace(ModelRunConfig, args, virtual_pipeline_model_parallel_size=vpp)


# -- the trainer's flags -----------------------------------------------------------------------

STAGES = ("pretrain", "sft")


def build_train_parser() -> argparse.ArgumentParser:
    """`python -m megatron_polar.train` flags. A `--config` YAML file sets any of them (keys are
    the flag names without dashes, `-` or `_`); flags given on the command line win."""
    p = argparse.ArgumentParser(
        prog="python -m megatron_polar.train",
        description="Pre-train (POLAR) or fine-tune (ranked SFT) a reward model on megatron-core.")
    p.add_argument("--config", default=None, help="YAML file of flag values")
    p.add_argument("--stage", choices=STAGES, default="pretrain")
    add_model_args(p)

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=None,
                   help="PREFIX, or WEIGHT PREFIX WEIGHT PREFIX ... (built by build_triplets)")
    g.add_argument("--valid-data-path", nargs="+", default=None,
                   help="separate validation datasets (default: --valid-fraction of --data-path)")
    g.add_argument("--valid-fraction", type=float, default=0.0,
                   help="share of each training dataset held out for validation")
    g.add_argument("--tokenizer", default=None,
                   help="the run's tokenizer; datasets built with another one are refused")
    g.add_argument("--micro-batch-tokens", type=int, default=None,
                   help="token budget of a packed micro-batch (whole pairs, best-fit packing)")
    g.add_argument("--micro-batch-size", type=int, default=None,
                   help="pairs per micro-batch (instead of a token budget)")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="triplets (pairs) per optimizer step, over all data-parallel ranks")

    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--min-lr", type=float, default=None, help="default: 0.1 x --lr")
    g.add_argument("--lr-warmup-fraction", type=float, default=0.03)
    g.add_argument("--lr-decay-style", choices=["cosine", "linear", "constant"], default="cosine")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--train-tokens", type=float, default=None,
                   help="stop after this many real tokens (the LR schedule's length is "
                        "estimated from the datasets' mean pair length)")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--overlap-grad-reduce", action="store_true")
    g.add_argument("--overlap-param-gather", action="store_true")
    g.add_argument("--max-consecutive-skipped-steps", type=int, default=10,
                   help="stop the run after this many steps in a row with non-finite "
                        "loss or gradients (each is skipped and counted)")
    g.add_argument("--auto-hparams", action="store_true",
                   help="LR and global batch from the paper's laws (needs --base-tokens, "
                        "--rm-tokens)")
    g.add_argument("--base-tokens", type=float, default=None,
                   help="tokens the base LLM was pre-trained on (D_p)")
    g.add_argument("--rm-tokens", type=float, default=None,
                   help="reward-model pre-training tokens (D_rm)")
    g.add_argument("--model-params", type=float, default=None,
                   help="model size N for --auto-hparams (default: the preset's nominal size)")

    g = p.add_argument_group("checkpoints")
    g.add_argument("--save", default=None, help="directory of training checkpoints")
    g.add_argument("--load", default=None,
                   help="resume from the latest checkpoint of this run directory (if there is "
                        "one); a checkpoint without iterations (e.g. an HF import) gives the "
                        "initial weights")
    g.add_argument("--ckpt-step", type=int, default=None, help="resume from this iteration")
    g.add_argument("--pretrained-checkpoint", default=None,
                   help="initial weights (e.g. imported from HF) when --load has no checkpoint")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--keep-last-checkpoints", type=int, default=None)
    g.add_argument("--async-save", action="store_true")
    g.add_argument("--dist-ckpt-optim-fully-reshardable", action="store_true",
                   help="save the distributed optimizer's state in model space, loadable at "
                        "any TP/PP/DP (gathered on each TP/PP group's first DP rank while "
                        "saving). Default: dp_reshardable, every rank writes its own shard "
                        "and a resume may change DP but not TP/PP")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--finetune", action="store_true",
                   help="with --load: take the weights only, start at iteration 0")

    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--eval-interval", type=int, default=None)
    g.add_argument("--eval-iters", type=int, default=10,
                   help="validation steps (of --global-batch-size pairs) per evaluation")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--log-json", default=None, help="append one JSON object per log line")
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--wandb-project", default=None)
    g.add_argument("--wandb-exp-name", default=None)
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="GPU dense bf16 peak for MFU (default: known from the GPU name)")
    g.add_argument("--skip-train", action="store_true", help="load, evaluate, exit")

    g = p.add_argument_group("fault injection (tests)")
    g.add_argument("--inject-nan-at", type=int, nargs="*", default=[],
                   help="make the loss NaN at these iterations")
    g.add_argument("--exit-after-iteration", type=int, default=None,
                   help="hard exit (no save) after this iteration, as a crash would")
    g.add_argument("--exit-during-save", type=int, default=None,
                   help="hard exit while writing this iteration's checkpoint")
    g.add_argument("--inject-nan-grad-at", type=int, nargs="*", default=[],
                   help="make the gradients NaN (the loss stays finite) at these iterations")
    g.add_argument("--wait-for-signal-after-iteration", type=int, default=None,
                   help="after logging this iteration, wait (every rank, up to 300 s) for "
                        "SIGTERM, so that a test can signal a run at a known iteration")
    return p


def yaml_defaults(path: str, parser: argparse.ArgumentParser) -> dict:
    """The values of a `--config` YAML file for `parser`'s flags (ConfigError otherwise)."""
    return load_yaml(path, {a.dest for a in parser._actions} - {"config", "help"})


def parse_train_args(argv=None) -> argparse.Namespace:
    parser = build_train_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config:
        parser.set_defaults(**yaml_defaults(first.config, parser))
    args = parser.parse_args(argv)
    if isinstance(args.data_path, str):  # a single prefix written as a string in YAML
        args.data_path = args.data_path.split()
    if isinstance(args.valid_data_path, str):
        args.valid_data_path = args.valid_data_path.split()
    _check(parser, args)
    return args


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if (args.micro_batch_tokens is None) == (args.micro_batch_size is None):
        parser.error("give one of --micro-batch-tokens (packed token budget) and "
                     "--micro-batch-size (pairs per micro-batch)")
    if not args.skip_train and (args.train_iters is None) == (args.train_tokens is None):
        parser.error("give one of --train-iters and --train-tokens")
    if args.auto_hparams:
        if args.base_tokens is None or args.rm_tokens is None:
            parser.error("--auto-hparams needs --base-tokens and --rm-tokens")
    else:
        for flag, value in (("--lr", args.lr), ("--global-batch-size", args.global_batch_size)):
            if value is None:
                parser.error(f"{flag} is required (or use --auto-hparams)")
    if not args.data_path:
        parser.error("--data-path is required")
    if args.eval_interval and not (args.valid_fraction > 0 or args.valid_data_path):
        parser.error("--eval-interval needs --valid-fraction or --valid-data-path")
    if args.save_interval and not args.save:
        parser.error("--save-interval needs --save")


# -- derived values, once ------------------------------------------------------------------------

RESOLVED_CONFIG = "resolved_config.yaml"


def resolve_train_args(args: argparse.Namespace,
                       preset: ModelPreset) -> tuple[argparse.Namespace, list[str]]:
    """The run's flags with every derived value filled in, computed once at the start: the LR
    and global batch of `--auto-hparams` (the paper's laws) and `--min-lr`'s default of
    0.1 x LR (the released configs' cosine floor). Returns the resolved copy and what to tell
    the user about it."""
    a, notes = argparse.Namespace(**vars(args)), []
    if a.auto_hparams:
        n = a.model_params or preset.nominal_parameters or preset.num_parameters()
        hp = polar_hparams(n, a.base_tokens, a.rm_tokens)
        notes.append(hp.describe(n, a.base_tokens, a.rm_tokens) + " (batch counted in triplets)")
        a.lr = a.lr if a.lr is not None else hp.lr
        a.global_batch_size = a.global_batch_size or hp.global_batch_size
    if a.min_lr is None:
        a.min_lr = 0.1 * a.lr
    return a, notes


def write_resolved_config(args: argparse.Namespace, directory: str) -> Path:
    """`directory/resolved_config.yaml`: every flag of the run as resolved (derived values
    included), keyed by flag name; `--config` of that file starts the same run again. Written
    atomically."""
    import yaml

    values = {dest.replace("_", "-"): value for dest, value in sorted(vars(args).items())
              if dest != "config"}
    path = Path(directory) / RESOLVED_CONFIG
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text("# the resolved flags of the latest start of this run (python -m "
                   "megatron_polar.train --config THIS_FILE starts it again)\n"
                   + yaml.safe_dump(values, sort_keys=False))
    os.replace(tmp, path)
    return path
