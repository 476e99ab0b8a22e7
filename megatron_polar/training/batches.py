"""The trainer's data: the training and validation streams of triplets, the packing sampler
that turns them into each step's micro-batches, and the schedule length.

`TrainingData` checks every dataset against the model (vocabulary, tokenizer, build mode)
before any step, and owns the sampler whose `state_dict` a checkpoint keeps.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from megatron.core.num_microbatches_calculator import init_num_microbatches_calculator

from megatron_polar.data.dataset import BlendSpec, DatasetError, TripletStream
from megatron_polar.data.sampler import PackingSampler
from megatron_polar.model.config import ModelRunConfig
from megatron_polar.model.presets import ModelPreset
from megatron_polar.runtime.parallel import ParallelContext
from megatron_polar.training.policies import TrainingStopped
from megatron_polar.training.reporting import Reporter


class TrainingData:
    def __init__(self, args, preset: ModelPreset, run: ModelRunConfig, ctx: ParallelContext,
                 reporter: Reporter):
        self.args, self.preset, self.ctx, self.reporter = args, preset, ctx, reporter
        sha = None
        if args.tokenizer:
            from megatron_polar.data.tokenizer import PolarTokenizer

            sha = PolarTokenizer(args.tokenizer).identity().sha256
        self.blend = BlendSpec.parse(args.data_path)
        held_out = 0.0 if args.valid_data_path else args.valid_fraction
        self.train_stream = TripletStream(self.blend, "train", held_out, args.seed, sha)
        self.valid_stream: Optional[TripletStream] = None
        if args.valid_data_path:
            self.valid_stream = TripletStream(BlendSpec.parse(args.valid_data_path), "train",
                                              0.0, args.seed, sha)
        elif args.valid_fraction > 0:
            self.valid_stream = TripletStream(self.blend, "valid", args.valid_fraction,
                                              args.seed, sha)
        self._check_datasets()
        # Aligned pack lengths: sequence parallelism splits packs across TP ranks.
        self.pad_multiple = math.lcm(64, ctx.tp_size)
        if run.tp_comm_overlap:
            # TE's userbuffers are registered for one activation shape: every pack is padded
            # to the whole budget (packing efficiency drops to the budget fill).
            if args.micro_batch_tokens is None:
                raise TrainingStopped("--tp-comm-overlap needs --micro-batch-tokens (one fixed "
                                      "activation shape)")
            self.pad_multiple = args.micro_batch_tokens
        self.sampler = self.new_sampler(self.train_stream)
        if args.micro_batch_size is not None:  # Megatron's fixed micro-batch: its calculator
            init_num_microbatches_calculator(torch.distributed.get_rank(), None,
                                             args.global_batch_size, args.micro_batch_size,
                                             ctx.dp_size)
        self.train_iters = self._schedule_length()

    def _check_datasets(self) -> None:
        a, preset = self.args, self.preset
        for ds in self.train_stream.datasets + (self.valid_stream.datasets if self.valid_stream
                                                else []):
            if ds.meta["vocab_size"] > preset.vocab_size:
                raise DatasetError(f"{ds.prefix}: built with a tokenizer of "
                                   f"{ds.meta['vocab_size']} ids, more than the model's "
                                   f"vocabulary of {preset.vocab_size} ({preset.name})")
            if a.stage == "sft" and ds.meta.get("mode") not in ("rankings", "triplets"):
                self.reporter.print(f"warning: {ds.prefix} was built in "
                                    f"{ds.meta.get('mode')!r} mode; SFT expects ranked triplets")

    def _schedule_length(self) -> int:
        """Optimizer steps: given, or estimated from the tokens asked for (0: --skip-train)."""
        a = self.args
        if a.train_iters is not None:
            return a.train_iters
        if a.train_tokens is None:
            return 0
        weights = np.asarray(self.blend.weights) / sum(self.blend.weights)
        mean_pair = sum(w * float(ds.pair_lengths.mean())
                        for w, ds in zip(weights, self.train_stream.datasets))
        iters = max(1, math.ceil(a.train_tokens / (a.global_batch_size * mean_pair)))
        self.reporter.print(f"--train-tokens {a.train_tokens:.4g}: about {iters} iterations "
                            f"({a.global_batch_size} pairs of {mean_pair:.0f} tokens on "
                            "average); the LR schedule spans them")
        return iters

    def new_sampler(self, stream: TripletStream) -> PackingSampler:
        """A packing sampler over `stream` for this rank (the validator makes a fresh one over
        the validation stream for each evaluation: the same pairs every time)."""
        a, ctx = self.args, self.ctx
        # megatron's interleaved (VPP) schedule needs a multiple of PP micro-batches per step
        # (pipeline_parallel/schedules.py 0.16.1, lines 995-1015) and one activation shape per
        # step: its shape exchange at PP=2 pairs messages crosswise, so variable_seq_lengths is
        # off under VPP (model/config.py) and every pack of a step is padded to one length.
        vpp = ctx.vp_size is not None
        pp = ctx.pp_size if vpp else 1
        try:
            return PackingSampler(stream, a.global_batch_size, token_budget=a.micro_batch_tokens,
                                  pairs_per_micro_batch=a.micro_batch_size,
                                  dp_rank=ctx.dp_rank, dp_size=ctx.dp_size,
                                  pad_id=self.preset.pad_token_id, pad_multiple=self.pad_multiple,
                                  micro_batch_multiple=pp, min_micro_batches=pp,
                                  uniform_length_per_step=vpp)
        except ValueError as e:
            raise TrainingStopped(str(e)) from None
