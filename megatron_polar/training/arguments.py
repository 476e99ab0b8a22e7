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
from megatron_polar.training.config import SECTIONS, STAGES, TrainConfig
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

def build_train_parser() -> argparse.ArgumentParser:
    """`python -m megatron_polar.train` flags, one per field of the trainer's config sections
    (training/config.py) and of the model group. A `--config` YAML file sets any of them (keys
    are the flag names without dashes, `-` or `_`); flags given on the command line win."""
    p = argparse.ArgumentParser(
        prog="python -m megatron_polar.train",
        description="Pre-train (POLAR) or fine-tune (ranked SFT) a reward model on megatron-core.")
    p.add_argument("--config", default=None, help="YAML file of flag values")
    p.add_argument("--stage", choices=STAGES, default="pretrain")
    add_model_args(p)
    for _, title, section in SECTIONS:
        add_flags(p.add_argument_group(title), section)
    return p


def train_config(args: argparse.Namespace, run: ModelRunConfig) -> TrainConfig:
    """The typed config of parsed (and resolved) trainer flags; ConfigError names a bad flag."""
    sections = {name: from_namespace(section, args) for name, _, section in SECTIONS}
    return TrainConfig(stage=args.stage, model_preset=args.model_preset, run=run, **sections)


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
