"""The POLAR trainer, top to bottom: set up, resume, then train step by step.

    setup   parallel groups -> data (streams, packing sampler) -> model chunks (megatron DDP)
            -> megatron optimizer + OptimizerParamScheduler -> resume (or initial weights)
    step    plan the next global batch -> megatron forward/backward schedule -> guarded
            optimizer step (non-finite steps are skipped and counted) -> log -> evaluate
            -> checkpoint -> SIGTERM check

Everything parallel is megatron-core's; this file only decides what happens when.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.num_microbatches_calculator import (destroy_num_microbatches_calculator,
                                                       get_num_microbatches,
                                                       init_num_microbatches_calculator)
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.timers import Timers

from megatron_polar.data.dataset import BlendSpec, DatasetError, TripletStream
from megatron_polar.data.sampler import MicroBatchCountError, PackingSampler
from megatron_polar.model.presets import ModelPreset, get_preset
from megatron_polar.model.spec import resolve_use_te
from megatron_polar.runtime.checkpoints import (CheckpointError, is_checkpoint_dir,
                                                is_training_checkpoint, latest_iteration,
                                                load_model_weights, read_manifest,
                                                resolve_checkpoint_dir, write_manifest)
from megatron_polar.runtime.chunks import build_model_chunks
from megatron_polar.runtime.device import compute_device
from megatron_polar.runtime.parallel import (ParallelContext, any_rank, destroy_parallel,
                                             initialize_parallel)
from megatron_polar.training.arguments import parse_train_args, run_config_from_args
from megatron_polar.training.checkpointing import (CheckpointWriter, load_checkpoint,
                                                   training_state_dict)
from megatron_polar.training.flops import peak_tflops_of_this_gpu, training_flops
from megatron_polar.training.hparams import polar_hparams
from megatron_polar.training.objective import PairMetrics, PairMetricsMean
from megatron_polar.training.reporting import Reporter, memory_gib
from megatron_polar.training.step import (build_optimizer, evaluate_pairs, initialize_userbuffers,
                                          train_step)


class TrainingStopped(RuntimeError):
    """The run cannot go on; the message says why and where."""


@dataclass
class TrainState:
    """Counters saved in every checkpoint."""

    iteration: int = 0
    consumed_pairs: int = 0
    consumed_tokens: int = 0
    skipped_steps: int = 0
    consecutive_skipped: int = 0


class Trainer:
    def __init__(self, args, preset: ModelPreset, ctx: ParallelContext, reporter: Reporter):
        self.args, self.preset, self.ctx, self.reporter = args, preset, ctx, reporter
        self.run_config = run_config_from_args(args, preset.num_layers)
        try:  # FP8, context parallelism, TP overlap: refused up front where they cannot run
            resolve_use_te(self.run_config)
        except RuntimeError as e:
            raise TrainingStopped(str(e)) from None
        self.timers = Timers(log_level=2, log_option="max")
        self._hyperparameters()
        self._data()
        self._model_and_optimizer()
        self.state = TrainState()
        self._resume()
        self.writer = (CheckpointWriter(args.save, args.keep_last_checkpoints, args.async_save,
                                        fault_hook=self._fault_during_save,
                                        describe=self._describe_checkpoint,
                                        parallelization_group=ctx.pg.dp)
                       if args.save else None)
        self._signal = False
        signal.signal(signal.SIGTERM, self._on_sigterm)

    # -- setup ---------------------------------------------------------------------------------

    def _hyperparameters(self) -> None:
        a = self.args
        if a.auto_hparams:
            n = a.model_params or self.preset.nominal_parameters or self.preset.num_parameters()
            hp = polar_hparams(n, a.base_tokens, a.rm_tokens)
            self.reporter.print(hp.describe(n, a.base_tokens, a.rm_tokens)
                                + " (batch counted in triplets)")
            a.lr = a.lr if a.lr is not None else hp.lr
            a.global_batch_size = a.global_batch_size or hp.global_batch_size
        if a.min_lr is None:
            a.min_lr = 0.1 * a.lr  # released configs: cosine to 0.1 x LR

    def _describe_checkpoint(self, directory: Path) -> None:
        """The preset and the tokenizer beside the shards: export and scoring need both."""
        write_manifest(directory, self.preset, self.args.tokenizer)

    def _data(self) -> None:
        a, ctx = self.args, self.ctx
        sha = None
        if a.tokenizer:
            from megatron_polar.data.tokenizer import PolarTokenizer

            sha = PolarTokenizer(a.tokenizer).identity().sha256
        blend = BlendSpec.parse(a.data_path)
        held_out = 0.0 if a.valid_data_path else a.valid_fraction
        self.train_stream = TripletStream(blend, "train", held_out, a.seed, sha)
        self.valid_stream = None
        if a.valid_data_path:
            self.valid_stream = TripletStream(BlendSpec.parse(a.valid_data_path), "train", 0.0,
                                              a.seed, sha)
        elif a.valid_fraction > 0:
            self.valid_stream = TripletStream(blend, "valid", a.valid_fraction, a.seed, sha)
        for ds in self.train_stream.datasets + (self.valid_stream.datasets if self.valid_stream
                                                else []):
            if ds.meta["vocab_size"] > self.preset.vocab_size:
                raise DatasetError(f"{ds.prefix}: built with a tokenizer of "
                                   f"{ds.meta['vocab_size']} ids, more than the model's "
                                   f"vocabulary of {self.preset.vocab_size} ({self.preset.name})")
            if a.stage == "sft" and ds.meta.get("mode") not in ("rankings", "triplets"):
                self.reporter.print(f"warning: {ds.prefix} was built in "
                                    f"{ds.meta.get('mode')!r} mode; SFT expects ranked triplets")
        # Aligned pack lengths: sequence parallelism splits packs across TP ranks.
        self.pad_multiple = math.lcm(64, ctx.tp_size)
        if self.run_config.tp_comm_overlap:
            # TE's userbuffers are registered for one activation shape: every pack is padded
            # to the whole budget (packing efficiency drops to the budget fill).
            if a.micro_batch_tokens is None:
                raise TrainingStopped("--tp-comm-overlap needs --micro-batch-tokens (one fixed "
                                      "activation shape)")
            self.pad_multiple = a.micro_batch_tokens
        self.sampler = self._sampler(self.train_stream)
        if a.micro_batch_size is not None:  # Megatron's fixed micro-batch: its calculator
            init_num_microbatches_calculator(torch.distributed.get_rank(), None,
                                             a.global_batch_size, a.micro_batch_size, ctx.dp_size)
        # Schedule length: given, or estimated from the tokens asked for.
        if a.train_iters is not None:
            self.train_iters = a.train_iters
        elif a.train_tokens is not None:
            weights = np.asarray(blend.weights) / sum(blend.weights)
            mean_pair = sum(w * float(ds.pair_lengths.mean())
                            for w, ds in zip(weights, self.train_stream.datasets))
            self.train_iters = max(1, math.ceil(a.train_tokens / (a.global_batch_size * mean_pair)))
            self.reporter.print(f"--train-tokens {a.train_tokens:.4g}: about {self.train_iters} "
                                f"iterations ({a.global_batch_size} pairs of {mean_pair:.0f} "
                                "tokens on average); the LR schedule spans them")
        else:
            self.train_iters = 0  # --skip-train

    def _sampler(self, stream: TripletStream) -> PackingSampler:
        a = self.args
        # megatron's interleaved (VPP) schedule needs a multiple of PP micro-batches per step
        # (pipeline_parallel/schedules.py 0.16.1, lines 995-1015) and one activation shape per
        # step: its shape exchange at PP=2 pairs messages crosswise, so variable_seq_lengths is
        # off under VPP (model/config.py) and every pack of a step is padded to one length.
        vpp = self.ctx.vp_size is not None
        pp = self.ctx.pp_size if vpp else 1
        try:
            return PackingSampler(stream, a.global_batch_size, token_budget=a.micro_batch_tokens,
                                  pairs_per_micro_batch=a.micro_batch_size,
                                  dp_rank=self.ctx.dp_rank, dp_size=self.ctx.dp_size,
                                  pad_id=self.preset.pad_token_id, pad_multiple=self.pad_multiple,
                                  micro_batch_multiple=pp, min_micro_batches=pp,
                                  uniform_length_per_step=vpp)
        except ValueError as e:
            raise TrainingStopped(str(e)) from None

    def _model_and_optimizer(self) -> None:
        a, run = self.args, self.run_config
        ddp = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=a.overlap_grad_reduce,
            overlap_param_gather=a.overlap_param_gather,
            use_distributed_optimizer=a.use_distributed_optimizer)
        if run.tp_comm_overlap:  # every pack is padded to the budget (`_data`)
            initialize_userbuffers(a.micro_batch_tokens, self.preset.hidden_size,
                                   self.ctx.tp_size, fp8=run.fp8.enabled, bf16=run.bf16)
        try:
            self.chunks = build_model_chunks(self.preset, run, self.ctx, ddp)
        except ValueError as e:  # a layout this machine cannot build
            raise TrainingStopped(str(e)) from None
        self.optimizer = build_optimizer(self.chunks, OptimizerConfig(
            optimizer="adam", lr=a.lr, min_lr=a.min_lr, weight_decay=a.weight_decay,
            adam_beta1=a.adam_beta1, adam_beta2=a.adam_beta2, adam_eps=a.adam_eps,
            clip_grad=a.clip_grad, bf16=run.bf16,
            params_dtype=torch.bfloat16 if run.bf16 else torch.float32,
            use_distributed_optimizer=a.use_distributed_optimizer,
            overlap_param_gather_with_optimizer_step=False), self.ctx)
        steps = max(self.train_iters, 1)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=a.lr, min_lr=a.min_lr,
            lr_warmup_steps=round(a.lr_warmup_fraction * steps), lr_decay_steps=steps,
            lr_decay_style=a.lr_decay_style, start_wd=a.weight_decay, end_wd=a.weight_decay,
            wd_incr_steps=steps, wd_incr_style="constant")

    def _resume(self) -> None:
        a, ctx = self.args, self.ctx

        def read(directory, load, *args, **kwargs):
            """A load that fails inside megatron or torch (a truncated or corrupt shard, tensors
            of another shape) becomes one line naming the checkpoint, not a traceback."""
            from torch.distributed.checkpoint.api import CheckpointException

            try:
                return load(*args, **kwargs)
            except (CheckpointError, TrainingStopped):
                raise
            except (Exception, CheckpointException) as e:  # the latter is a BaseException
                cause, where = e, ""
                if isinstance(e, CheckpointException) and e.failures:
                    # torch gathers every rank's failure: the same error on all of them
                    rank, (cause, _) = next(iter(sorted(e.failures.items())))
                    where = f" on rank {rank}"
                lines = str(cause).strip().splitlines()
                error = CheckpointError(f"{directory}: cannot be read ({type(cause).__name__}"
                                        + (f": {lines[0]}" if lines else "") + f"{where})")
                # Otherwise possibly this rank's failure alone: it reports it itself (main).
                error.on_any_rank = not isinstance(e, CheckpointException)
                raise error from None

        iteration = a.ckpt_step
        if a.load and iteration is None:
            iteration = latest_iteration(a.load)
        if a.load and iteration is not None:
            directory = resolve_checkpoint_dir(a.load, iteration)
            if a.finetune:
                read(directory, load_model_weights, self.chunks, directory)
                self.reporter.print(f"fine-tuning from the weights of {directory}")
                return
            common = read(directory, load_checkpoint, directory, self.chunks, self.optimizer,
                          ctx, load_optimizer=not a.no_load_optim, load_rng=not a.no_load_rng)
            self.state = TrainState(**common["train_state"])
            self.scheduler.load_state_dict(common["scheduler"])
            # A different data-parallel size only changes which rank gets which pack.
            self.sampler.load_state_dict(common["sampler"])
            saved = common["layout"]
            self.reporter.print(f"resumed from {directory} (iteration {self.state.iteration}, "
                                f"saved at TP={saved['tp']} PP={saved['pp']} DP={saved['dp']})")
            if a.no_load_optim:
                self.reporter.print("optimizer state not loaded (--no-load-optim): fresh Adam "
                                    "moments")
            if a.no_load_rng:
                self.reporter.print("RNG state not restored (--no-load-rng)")
        elif a.pretrained_checkpoint or (a.load and is_checkpoint_dir(a.load)):
            # `--load` of a checkpoint with no iterations (e.g. from HF import) starts from its
            # weights at iteration 0, as Megatron-LM does with converted "release" checkpoints.
            # (`--load` of a run directory with nothing saved yet is a fresh start, below.)
            source = a.pretrained_checkpoint or a.load
            if not a.pretrained_checkpoint and is_training_checkpoint(Path(source)):
                raise CheckpointError(f"{source} is a training checkpoint; pass its run "
                                      "directory to --load to resume, or --ckpt-step")
            found = read(source, load_model_weights, self.chunks, source)
            self.reporter.print(f"initial weights from {found}")
        elif a.stage == "sft":
            raise TrainingStopped("SFT starts from a pre-trained POLAR model: pass "
                                  "--pretrained-checkpoint (or --load a run to resume)")
        else:
            self.reporter.print("no checkpoint to load: training from random initialisation")

    # -- the loop ------------------------------------------------------------------------------

    def done(self) -> bool:
        a, s = self.args, self.state
        if a.train_tokens is not None:
            return s.consumed_tokens >= a.train_tokens
        return s.iteration >= self.train_iters

    def run(self) -> int:
        a, s = self.args, self.state
        if a.skip_train:
            self.evaluate()
            return 0
        self.reporter.print(
            f"training {self.preset.name} ({a.stage}) at TP={self.ctx.tp_size} "
            f"PP={self.ctx.pp_size} DP={self.ctx.dp_size}: {self.train_iters} iterations of "
            f"{a.global_batch_size} triplets, lr {a.lr:.3g} -> {a.min_lr:.3g}")
        window = _Window()
        last_saved = last_evaluated = None
        while not self.done():
            self.timers("data").start()
            micro_batches = self.sampler.next_step()
            plan = self.sampler.last_plan
            self.timers("data").stop()
            if a.micro_batch_size is not None:
                assert len(micro_batches) == get_num_microbatches()
            result = train_step(self.chunks, self.optimizer, micro_batches, self.ctx,
                                self.scheduler, poison_loss=s.iteration + 1 in a.inject_nan_at,
                                poison_grad=s.iteration + 1 in a.inject_nan_grad_at)
            s.iteration += 1
            s.consumed_pairs += plan.pairs
            s.consumed_tokens += plan.tokens
            lengths = [int(n) for mb in micro_batches
                       for n in (mb.cu_seqlens[1:] - mb.cu_seqlens[:-1]).tolist()]
            window.add(result, plan.tokens, training_flops(self.preset, lengths),
                       local_computed=sum(mb.tokens.shape[1] for mb in micro_batches))
            if result.update_successful:
                s.consecutive_skipped = 0
            else:
                s.skipped_steps += 1
                s.consecutive_skipped += 1
                self.reporter.print(f"iteration {s.iteration}: non-finite loss or gradient norm "
                                    f"(loss {result.metrics.loss}, grad norm {result.grad_norm});"
                                    f" step skipped ({s.skipped_steps} so far)")
                if s.consecutive_skipped >= a.max_consecutive_skipped_steps:
                    first = s.iteration - s.consecutive_skipped + 1
                    raise TrainingStopped(
                        f"stopping at iteration {s.iteration}: {s.consecutive_skipped} steps in a "
                        f"row (iterations {first}-{s.iteration}) had a non-finite loss or "
                        "gradient norm (--max-consecutive-skipped-steps "
                        f"{a.max_consecutive_skipped_steps}); the last good weights are in the "
                        "latest checkpoint")
            if s.iteration % a.log_interval == 0:
                self._log_train(window)
                window = _Window()
            paused = time.perf_counter()  # evaluation and saving do not count as step time
            if a.eval_interval and s.iteration % a.eval_interval == 0:
                self.evaluate()
                last_evaluated = s.iteration
            if self.writer:
                self.writer.poll()
                if a.save_interval and s.iteration % a.save_interval == 0:
                    self.save()
                    last_saved = s.iteration
            window.start += time.perf_counter() - paused
            if a.exit_after_iteration == s.iteration:  # fault injection: a crash, no clean-up
                _crash(3)
            if a.wait_for_signal_after_iteration == s.iteration:
                # fault injection (tests): hold here, iteration logged, until SIGTERM comes
                deadline = time.monotonic() + 300
                while not any_rank(self._signal):
                    if time.monotonic() > deadline:
                        raise TrainingStopped(f"--wait-for-signal-after-iteration {s.iteration}:"
                                              " no SIGTERM within 300 s")
                    time.sleep(0.05)
            if any_rank(self._signal):
                if self.writer and last_saved != s.iteration:
                    self.save()
                if self.writer:
                    self.writer.wait()
                self.reporter.print(f"SIGTERM received: checkpoint saved at iteration "
                                    f"{s.iteration}; exiting" if self.writer else
                                    f"SIGTERM received at iteration {s.iteration} (no --save); "
                                    "exiting")
                return 0
        if window.steps:
            self._log_train(window)
        if self.valid_stream is not None and a.eval_interval and last_evaluated != s.iteration:
            self.evaluate()
        if self.writer:
            if last_saved != s.iteration:
                self.save()
            self.writer.wait()
        self.reporter.print(f"done: {s.iteration} iterations, {s.consumed_pairs} triplets, "
                            f"{s.consumed_tokens} tokens, {s.skipped_steps} skipped steps, "
                            f"{self.sampler.skipped_oversize} pairs over the micro-batch budget")
        return 0

    def evaluate(self) -> Optional[PairMetrics]:
        """Loss/accuracy over `--eval-iters` validation steps, the same pairs every time."""
        if self.valid_stream is None:
            return None
        self.timers("eval").start()
        sampler = self._sampler(self.valid_stream)
        mean = PairMetricsMean()
        for _ in range(self.args.eval_iters):
            mean.add(evaluate_pairs(self.chunks, sampler.next_step(), self.ctx))
        self.timers("eval").stop()
        metrics, pairs = mean.result(), mean.pairs
        figures = {**metrics.means(), "pairs": pairs, "seconds": self.timers("eval").elapsed()}
        self.reporter.log("valid", self.state.iteration, figures,
                          f"validation at iteration {self.state.iteration}: loss "
                          f"{metrics.loss:.4f} | accuracy {metrics.accuracy:.3f} | r+ "
                          f"{metrics.reward_chosen:.3f} r- {metrics.reward_rejected:.3f} | "
                          f"{pairs} pairs")
        return metrics

    def _log_train(self, w: "_Window") -> None:
        s, ctx = self.state, self.ctx
        sums = torch.tensor([w.local_flops, w.local_real, w.local_computed],
                            dtype=torch.float64, device=compute_device())
        if ctx.dp_size > 1:  # every TP/PP rank of a replica saw the same data
            torch.distributed.all_reduce(sums, group=ctx.pg.dp)
        flops, real, computed = sums.tolist()
        world = torch.distributed.get_world_size()
        tflops_per_gpu = flops / w.seconds / world / 1e12
        peak = self.args.peak_tflops or peak_tflops_of_this_gpu()
        m = w.metrics.result().means()
        figures = {
            **m, "grad_norm": w.last_grad_norm, "lr": self.scheduler.get_lr(
                self.optimizer.param_groups[0]),
            "tokens_per_s": w.tokens / w.seconds, "tflops_per_gpu": tflops_per_gpu,
            "mfu": tflops_per_gpu / peak if peak else None,
            "packing_efficiency": real / max(computed, 1), "skipped_steps": s.skipped_steps,
            "consumed_pairs": s.consumed_pairs, "consumed_tokens": s.consumed_tokens,
            "step_seconds": w.seconds / w.steps,
            "data_seconds": self.timers("data").elapsed(), **memory_gib()}
        mem = figures.get("mem_peak_gib", figures.get("mem_rss_gib"))
        grad = "n/a" if w.last_grad_norm is None else f"{w.last_grad_norm:.3f}"
        text = (f"iteration {s.iteration:7d}/{self.train_iters} | loss {m['loss']:.4f} | "
                f"acc {m['accuracy']:.3f} | r+ {m['reward_chosen']:.3f} r- "
                f"{m['reward_rejected']:.3f} margin {m['margin']:.3f} | grad norm {grad} | "
                f"lr {figures['lr']:.3e} | {figures['tokens_per_s']:,.0f} tok/s | "
                f"{tflops_per_gpu:.1f} TFLOP/s/GPU"
                + (f" | MFU {100 * figures['mfu']:.1f}%" if figures["mfu"] else "")
                + f" | mem {mem:.1f} GiB | skipped {s.skipped_steps}")
        self.reporter.log("train", s.iteration, figures, text)

    # -- checkpoints and signals ---------------------------------------------------------------

    def save(self) -> None:
        self.timers("save").start()
        common = {"train_state": asdict(self.state), "scheduler": self.scheduler.state_dict(),
                  "sampler": self.sampler.state_dict(), "preset": self.preset.name,
                  "layout": {"tp": self.ctx.tp_size, "pp": self.ctx.pp_size,
                             "dp": self.ctx.dp_size, "vpp": self.ctx.vp_size}}
        state = training_state_dict(
            self.chunks, self.optimizer, self.ctx, common,
            optimizer_format=("fully_reshardable" if self.args.dist_ckpt_optim_fully_reshardable
                              else "dp_reshardable"))
        self.writer.save(self.state.iteration, state)
        self.timers("save").stop()
        self.reporter.print(f"checkpoint {'scheduled' if self.args.async_save else 'saved'}: "
                            f"iteration {self.state.iteration} in {self.args.save} "
                            f"({self.timers('save').elapsed():.1f} s)")

    def _fault_during_save(self, stage: str, iteration: int) -> None:
        if self.args.exit_during_save == iteration:  # fault injection: die mid-save
            _crash(4)

    def _on_sigterm(self, signum, frame) -> None:
        self._signal = True  # acted on at the end of the current step, on every rank


def _crash(code: int) -> None:
    """Die at once, as a node failure would: this process and its helpers (megatron's
    checkpoint writer keeps a multiprocessing manager process), without any clean-up."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        child.kill()
    os._exit(code)


class _Window:
    """Figures accumulated between two log lines."""

    def __init__(self):
        self.start = time.perf_counter()
        self.steps = self.tokens = 0
        self.local_flops = 0.0
        self.local_real = self.local_computed = 0  # this rank's tokens, real and padded
        self.metrics = PairMetricsMean()
        self.last_grad_norm: Optional[float] = None

    def add(self, result, tokens: int, local_flops: float, local_computed: int) -> None:
        self.steps += 1
        self.tokens += tokens
        self.local_flops += local_flops
        self.local_real += result.num_tokens
        self.local_computed += local_computed
        self.last_grad_norm = result.grad_norm
        if result.update_successful:  # a skipped step's NaNs would hide the others' means
            self.metrics.add(result.metrics)

    @property
    def seconds(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)


def resolve_run_preset(name: Optional[str], checkpoint: Optional[str]) -> ModelPreset:
    """`--model-preset`, else the preset a checkpoint records (HF import and our checkpoints
    write `model.json`), else "tiny". A named preset that contradicts the checkpoint is an error."""
    if not checkpoint:
        return get_preset(name or "tiny")
    return read_manifest(checkpoint, must_exist=False).preset_for(name, default="tiny")


def main(argv=None) -> int:
    args = parse_train_args(argv)
    try:
        preset = resolve_run_preset(args.model_preset, args.pretrained_checkpoint or args.load)
    except (ValueError, CheckpointError) as e:  # a bad marker or model.json: before any work
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    ctx = initialize_parallel(run_config_from_args(args, preset.num_layers))
    reporter = Reporter(torch.distributed.get_rank(), args.log_json, args.tensorboard_dir,
                        args.wandb_project, args.wandb_exp_name, config=vars(args))
    try:
        return Trainer(args, preset, ctx, reporter).run()
    except (TrainingStopped, DatasetError, CheckpointError, MicroBatchCountError) as e:
        # Every rank reaches the same decision; one line is enough. A checkpoint that one rank
        # alone failed to read is reported by that rank.
        rank = torch.distributed.get_rank()
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        elif getattr(e, "on_any_rank", False):
            print(f"error (rank {rank}): {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        reporter.close()
        destroy_num_microbatches_calculator()
        destroy_parallel()
