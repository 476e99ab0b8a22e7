"""The flags every tool that scores with a reward model shares, defined once: which model
(`--checkpoint` | `--hf`, `--tokenizer`, the model group of `add_model_args`) and how its
inputs are cut and packed (`ScoringLimits`). Used by `python -m megatron_polar.score`,
`tools/eval_preference.py` and `python -m megatron_polar.serving`.
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

from megatron_polar.config.flags import ConfigError, add_flags, from_namespace, option
from megatron_polar.data.encoding import EncodingConfig
from megatron_polar.eval.scorer import ModelSource, RewardScorer, open_source
from megatron_polar.training.arguments import add_model_args, run_config_from_args

CHECKPOINT_HELP = "megatron checkpoint: run dir, iter_N dir or weights"
HF_HELP = ("HF reward-model directory: InternLM2ForRewardModel or "
           "LlamaForSequenceClassification (e.g. an export, docs/export.md)")


@dataclass(frozen=True)
class ScoringLimits:
    """How records are cut to the model's lengths and packed into micro-batches."""

    tokenizer: Optional[str] = option(
        None, help="the reward model's tokenizer (default: the one kept with the model)")
    max_length: int = option(16384, help="tokens of a whole sequence, as the data was built")
    max_response_length: int = option(4096, help="tokens of a response, as the data was built")
    micro_batch_tokens: int = option(
        8192, help="tokens per packed micro-batch (raised to the longest pair if needed)")

    def __post_init__(self):
        if min(self.max_length, self.max_response_length, self.micro_batch_tokens) < 1:
            raise ValueError("--max-length, --max-response-length and --micro-batch-tokens "
                             "must be >= 1")

    @property
    def encoding(self) -> EncodingConfig:
        return EncodingConfig(self.max_length, self.max_response_length)


def add_scorer_args(parser: argparse.ArgumentParser, *, required: bool = True,
                    hf_help: str = HF_HELP, init_preset_help: Optional[str] = None) -> None:
    """The model source (exactly one of --checkpoint, --hf and, with `init_preset_help`,
    --init-preset; `required=False` leaves the check to the caller, e.g. after a --config
    file), `ScoringLimits`' flags and the model group."""
    src = parser.add_mutually_exclusive_group(required=required)
    src.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    src.add_argument("--hf", help=hf_help)
    if init_preset_help:
        src.add_argument("--init-preset", help=init_preset_help)
    add_flags(parser, ScoringLimits)
    add_model_args(parser)


def scoring_limits(args: argparse.Namespace) -> ScoringLimits:
    return from_namespace(ScoringLimits, args)


@contextlib.contextmanager
def source_from_args(args: argparse.Namespace) -> Iterator[ModelSource]:
    """The model source the flags name (`open_source`: an HF directory is imported into a
    temporary checkpoint for the duration)."""
    if args.checkpoint is None and args.hf is None and getattr(args, "init_preset", None) is None:
        raise ConfigError("give the model: one of --checkpoint or --hf")
    with open_source(checkpoint=args.checkpoint, hf=args.hf,
                     init_preset=getattr(args, "init_preset", None),
                     tokenizer=args.tokenizer, model_preset=args.model_preset) as source:
        yield source


def scorer_from_args(args: argparse.Namespace) -> RewardScorer:
    """A `RewardScorer` of the model and limits `add_scorer_args`' flags name."""
    limits = scoring_limits(args)
    with source_from_args(args) as source:
        return RewardScorer.load(source, run_config_from_args(args, source.preset.num_layers),
                                 encoding=limits.encoding,
                                 micro_batch_tokens=limits.micro_batch_tokens)
