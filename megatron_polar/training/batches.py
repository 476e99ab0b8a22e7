"""The trainer's data: the training and validation streams of triplets, the packing sampler
that turns them into each step's micro-batches, and the schedule length.

`TrainingData` checks every dataset against the model (vocabulary, tokenizer, build mode)
before any step, and owns the sampler whose `state_dict` a checkpoint keeps.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional

import numpy as np
import torch
from megatron.core.num_microbatches_calculator import init_num_microbatches_calculator

from megatron_polar.data.dataset import BlendSpec, DatasetError, TripletStream
from megatron_polar.data.packing import PackedMicroBatch
from megatron_polar.data.sampler import PackingSampler
from megatron_polar.model.presets import ModelPreset
from megatron_polar.runtime.parallel import ParallelContext
from megatron_polar.training.config import TrainConfig
from megatron_polar.training.policies import TrainingStopped
from megatron_polar.training.reporting import Reporter


class TrainingData:
    def __init__(self, cfg: TrainConfig, preset: ModelPreset, ctx: ParallelContext,
                 reporter: Reporter):
        self.cfg, self.preset, self.ctx, self.reporter = cfg, preset, ctx, reporter
        sha = None
        if cfg.data.tokenizer:
            from megatron_polar.data.tokenizer import PolarTokenizer

            sha = PolarTokenizer(cfg.data.tokenizer).identity().sha256
        self.blend = BlendSpec.parse(cfg.data.data_path)
        held_out = 0.0 if cfg.data.valid_data_path else cfg.data.valid_fraction
        self.train_stream = TripletStream(self.blend, "train", held_out, cfg.run.seed, sha)
        self.valid_stream: Optional[TripletStream] = None
        if cfg.data.valid_data_path:
            self.valid_stream = TripletStream(BlendSpec.parse(cfg.data.valid_data_path), "train",
                                              0.0, cfg.run.seed, sha)
        elif cfg.data.valid_fraction > 0:
            self.valid_stream = TripletStream(self.blend, "valid", cfg.data.valid_fraction,
                                              cfg.run.seed, sha)
        self._check_datasets()
        # Aligned pack lengths: sequence parallelism splits packs across TP ranks.
        self.pad_multiple = math.lcm(64, ctx.tp_size)
        if cfg.run.tp_comm_overlap:
            # TE's userbuffers are registered for one activation shape: every pack is padded
            # to the whole budget (packing efficiency drops to the budget fill).
            if cfg.data.micro_batch_tokens is None:
                raise TrainingStopped("--tp-comm-overlap needs --micro-batch-tokens (one fixed "
                                      "activation shape)")
            self.pad_multiple = cfg.data.micro_batch_tokens
        self.sampler = self.new_sampler(self.train_stream)
        if cfg.data.micro_batch_size is not None:  # Megatron's fixed micro-batch: its calculator
            init_num_microbatches_calculator(torch.distributed.get_rank(), None,
                                             cfg.data.global_batch_size, cfg.data.micro_batch_size,
                                             ctx.dp_size)
        self.train_iters = self._schedule_length()

    def _check_datasets(self) -> None:
        preset = self.preset
        for ds in self.train_stream.datasets + (self.valid_stream.datasets if self.valid_stream
                                                else []):
            if ds.meta["vocab_size"] > preset.vocab_size:
                raise DatasetError(f"{ds.prefix}: built with a tokenizer of "
                                   f"{ds.meta['vocab_size']} ids, more than the model's "
                                   f"vocabulary of {preset.vocab_size} ({preset.name})")
            if self.cfg.stage == "sft" and ds.meta.get("mode") not in ("rankings", "triplets"):
                self.reporter.print(f"warning: {ds.prefix} was built in "
                                    f"{ds.meta.get('mode')!r} mode; SFT expects ranked triplets")

    def _schedule_length(self) -> int:
        """Optimizer steps: given, or estimated from the tokens asked for (0: --skip-train)."""
        c, d = self.cfg.optim, self.cfg.data
        if c.train_iters is not None:
            return c.train_iters
        if c.train_tokens is None:
            return 0
        weights = np.asarray(self.blend.weights) / sum(self.blend.weights)
        # tokens per triplet: a ranked list's candidates count once for all its pairs
        mean_pair = sum(w * float(ds.document_lengths.sum()) / float(ds.document_pairs.sum())
                        for w, ds in zip(weights, self.train_stream.datasets))
        iters = max(1, math.ceil(c.train_tokens / (d.global_batch_size * mean_pair)))
        self.reporter.print(f"--train-tokens {c.train_tokens:.4g}: about {iters} iterations "
                            f"({d.global_batch_size} pairs of {mean_pair:.0f} tokens on "
                            "average); the LR schedule spans them")
        return iters

    @property
    def has_validation(self) -> bool:
        return self.valid_stream is not None

    def validation_steps(self, steps: int) -> Iterator[list[PackedMicroBatch]]:
        """`steps` steps of validation pairs, the same pairs at every evaluation (a fresh
        sampler over the validation stream each time)."""
        sampler = self.new_sampler(self.valid_stream)
        for _ in range(steps):
            yield sampler.next_step()

    def new_sampler(self, stream: TripletStream) -> PackingSampler:
        """A packing sampler over `stream` for this rank."""
        d, ctx = self.cfg.data, self.ctx
        # megatron's interleaved (VPP) schedule needs a multiple of PP micro-batches per step
        # (pipeline_parallel/schedules.py 0.16.1, lines 995-1015) and one activation shape per
        # step: its shape exchange at PP=2 pairs messages crosswise, so variable_seq_lengths is
        # off under VPP (model/config.py) and every pack of a step is padded to one length.
        vpp = ctx.vp_size is not None
        pp = ctx.pp_size if vpp else 1
        try:
            return PackingSampler(stream, d.global_batch_size, token_budget=d.micro_batch_tokens,
                                  pairs_per_micro_batch=d.micro_batch_size,
                                  dp_rank=ctx.dp_rank, dp_size=ctx.dp_size,
                                  pad_id=self.preset.pad_token_id, pad_multiple=self.pad_multiple,
                                  micro_batch_multiple=pp, min_micro_batches=pp,
                                  uniform_length_per_step=vpp,
                                  shared_prefix=d.shared_prefix)
        except ValueError as e:
            raise TrainingStopped(str(e)) from None
