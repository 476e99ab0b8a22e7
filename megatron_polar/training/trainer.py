"""The POLAR trainer, top to bottom: set up, resume, then train step by step.

    setup   parallel groups -> data (streams, packing sampler) -> model chunks (megatron DDP)
            -> megatron optimizer + OptimizerParamScheduler -> resume (or initial weights)
    step    plan the next global batch -> megatron forward/backward schedule -> guarded
            optimizer step -> NaN guard -> log -> validator -> checkpoint policy -> SIGTERM

Everything parallel is megatron-core's; the policies (when to evaluate, save, stop on NaNs)
are objects of their own in policies.py; this file calls them in order.
"""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.num_microbatches_calculator import (destroy_num_microbatches_calculator,
                                                       get_num_microbatches)
from megatron.core.timers import Timers

from megatron_polar.data.dataset import DatasetError
from megatron_polar.data.sampler import MicroBatchCountError
from megatron_polar.config.flags import ConfigError
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
from megatron_polar.training.arguments import (parse_train_args, resolve_train_args,
                                               run_config_from_args, train_config,
                                               write_resolved_config)
from megatron_polar.training.batches import TrainingData
from megatron_polar.training.config import TrainConfig
from megatron_polar.training.checkpointing import (CheckpointWriter, load_checkpoint,
                                                   load_explained, training_state_dict)
from megatron_polar.training.faults import FaultInjectionTimeout, FaultInjector
from megatron_polar.training.flops import peak_tflops_of_this_gpu, training_flops
from megatron_polar.training.objective import PairMetrics, PairMetricsMean
from megatron_polar.training.optimizer import build_optimizer
from megatron_polar.training.policies import (CheckpointPolicy, MetricsWindow, NaNGuard,
                                              TrainingStopped, Validator)
from megatron_polar.training.reporting import Reporter, memory_gib, sink_modules
from megatron_polar.training.step import evaluate_pairs, initialize_userbuffers, train_step


@dataclass
class TrainState:
    """Counters saved in every checkpoint (with the NaN guard's, under "train_state")."""

    iteration: int = 0
    consumed_pairs: int = 0
    consumed_tokens: int = 0


class Trainer:
    def __init__(self, cfg: TrainConfig, preset: ModelPreset, ctx: ParallelContext,
                 reporter: Reporter, data: Optional[TrainingData] = None):
        """`cfg` resolved (`resolve_train_args`): derived values filled in. `data` is the
        indexed datasets `cfg.data` names unless given (an object with `TrainingData`'s
        `sampler`, `train_iters`, `has_validation` and `validation_steps`: the synthetic run
        feeds the trainer from memory, testing/synthetic_run.py)."""
        self.cfg, self.preset, self.ctx, self.reporter = cfg, preset, ctx, reporter
        self.started = time.monotonic()  # for --exit-duration-in-mins
        self.run_config = cfg.run
        try:  # FP8, context parallelism, TP overlap: refused up front where they cannot run
            resolve_use_te(self.run_config)
        except RuntimeError as e:
            raise TrainingStopped(str(e)) from None
        self.timers = Timers(log_level=2, log_option="max")
        self.data = data if data is not None else TrainingData(cfg, preset, ctx, reporter)
        self.sampler = self.data.sampler
        self.train_iters = self.data.train_iters
        self._model_and_optimizer()
        self.state = TrainState()
        self.guard = NaNGuard(cfg.optim.max_consecutive_skipped_steps, reporter)
        self.window = MetricsWindow()
        self.faults = FaultInjector.from_config(cfg.faults)
        self.validator = Validator(cfg.logging.eval_interval, self._evaluate,
                                   enabled=self.data.has_validation)
        self._resume()
        ck = cfg.checkpoint
        writer = (CheckpointWriter(ck.save, ck.keep_last_checkpoints, ck.async_save,
                                   fault_hook=self.faults.during_save,
                                   describe=self._describe_checkpoint,
                                   parallelization_group=ctx.pg.dp)
                  if ck.save else None)
        self.checkpoints = CheckpointPolicy(writer, ck.save_interval, self.save)
        self._signal = False
        self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    # -- setup ---------------------------------------------------------------------------------

    def _describe_checkpoint(self, directory: Path) -> None:
        """The preset and the tokenizer beside the shards: export and scoring need both."""
        write_manifest(directory, self.preset, self.cfg.data.tokenizer)

    def _model_and_optimizer(self) -> None:
        c, run = self.cfg, self.run_config
        ddp = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=c.optim.overlap_grad_reduce,
            overlap_param_gather=c.optim.overlap_param_gather,
            use_distributed_optimizer=c.optim.use_distributed_optimizer)
        if run.tp_comm_overlap:  # every pack is padded to the budget (TrainingData)
            initialize_userbuffers(c.data.micro_batch_tokens, self.preset.hidden_size,
                                   self.ctx.tp_size, fp8=run.fp8.enabled, bf16=run.bf16)
        try:
            self.chunks = build_model_chunks(self.preset, run, self.ctx, ddp)
        except ValueError as e:  # a layout this machine cannot build
            raise TrainingStopped(str(e)) from None
        settings = c.optim.settings(self.train_iters)
        self.optimizer = build_optimizer(self.chunks, settings, self.ctx, bf16=run.bf16)
        self.scheduler = settings.scheduler(self.optimizer, self.train_iters)

    def _resume(self) -> None:
        c = self.cfg.checkpoint
        iteration = c.ckpt_step
        if c.load and iteration is None:
            iteration = latest_iteration(c.load)
        if c.load and iteration is not None:
            directory = resolve_checkpoint_dir(c.load, iteration)
            if c.finetune:
                load_explained(directory, load_model_weights, self.chunks, directory)
                self.reporter.print(f"fine-tuning from the weights of {directory}")
            else:
                self._resume_from(directory)
        elif c.pretrained_checkpoint or (c.load and is_checkpoint_dir(c.load)):
            # `--load` of a checkpoint with no iterations (e.g. from HF import) starts from its
            # weights at iteration 0, as Megatron-LM does with converted "release" checkpoints.
            # (`--load` of a run directory with nothing saved yet is a fresh start, below.)
            source = c.pretrained_checkpoint or c.load
            if not c.pretrained_checkpoint and is_training_checkpoint(Path(source)):
                raise CheckpointError(f"{source} is a training checkpoint; pass its run "
                                      "directory to --load to resume, or --ckpt-step")
            found = load_explained(source, load_model_weights, self.chunks, source)
            self.reporter.print(f"initial weights from {found}")
        elif self.cfg.stage == "sft":
            raise TrainingStopped("SFT starts from a pre-trained POLAR model: pass "
                                  "--pretrained-checkpoint (or --load a run to resume)")
        else:
            self.reporter.print("no checkpoint to load: training from random initialisation")

    def _resume_from(self, directory: Path) -> None:
        c = self.cfg.checkpoint
        common = load_explained(directory, load_checkpoint, directory, self.chunks, self.optimizer,
                       self.ctx, load_optimizer=not c.no_load_optim, load_rng=not c.no_load_rng)
        counters = common["train_state"]
        self.state = TrainState(**{f.name: counters[f.name] for f in fields(TrainState)})
        self.guard.load_state_dict(counters)
        if "metrics_window" in common:  # saved since the window became an object
            self.window.load_state_dict(common["metrics_window"])
        self.scheduler.load_state_dict(common["scheduler"])
        # A different data-parallel size only changes which rank gets which pack.
        self.sampler.load_state_dict(common["sampler"])
        saved = common["layout"]
        self.reporter.print(f"resumed from {directory} (iteration {self.state.iteration}, "
                            f"saved at TP={saved['tp']} PP={saved['pp']} DP={saved['dp']})")
        if c.no_load_optim:
            self.reporter.print("optimizer state not loaded (--no-load-optim): fresh Adam "
                                "moments")
        if c.no_load_rng:
            self.reporter.print("RNG state not restored (--no-load-rng)")

    # -- the loop ------------------------------------------------------------------------------

    def done(self) -> bool:
        c, s = self.cfg, self.state
        if c.optim.train_tokens is not None:
            finished = s.consumed_tokens >= c.optim.train_tokens
        else:
            finished = s.iteration >= self.train_iters
        return finished or self._out_of_time()

    def _out_of_time(self) -> bool:
        """--exit-duration-in-mins (Megatron-LM's): the run ends as if at its last step
        (validation, checkpoint) once that much wall time has passed, on every rank alike."""
        limit = self.cfg.optim.exit_duration_in_mins
        if limit is None or self.state.iteration == 0:  # checked after each step, as Megatron-LM
            return False
        if not any_rank(time.monotonic() - self.started > 60 * limit):
            return False
        self.reporter.print(f"--exit-duration-in-mins {limit:g}: stopping after iteration "
                            f"{self.state.iteration}")
        return True

    def run(self) -> int:
        """Train to the end (or SIGTERM); the SIGTERM handler is the caller's again after."""
        try:
            return self._run()
        finally:
            signal.signal(signal.SIGTERM, self._previous_handler)

    def _run(self) -> int:
        c, s = self.cfg, self.state
        if c.logging.skip_train:
            self.validator.evaluate(s.iteration)
            return 0
        self.reporter.print(
            f"training {self.preset.name} ({c.stage}) at TP={self.ctx.tp_size} "
            f"PP={self.ctx.pp_size} DP={self.ctx.dp_size}: {self.train_iters} iterations of "
            f"{c.data.global_batch_size} triplets, lr {c.optim.lr:.3g} -> {c.optim.min_lr:.3g}")
        while not self.done():
            self.step()
            if s.iteration % c.logging.log_interval == 0:
                self._log_train()
            with self.window.paused():  # evaluation and saving do not count as step time
                self.validator.after_step(s.iteration)
                self.checkpoints.after_step(s.iteration)
            self.faults.after_iteration(s.iteration, self._signalled)
            if self._signalled():
                self.checkpoints.finish(s.iteration)
                self.reporter.print(f"SIGTERM received: checkpoint saved at iteration "
                                    f"{s.iteration}; exiting" if self.checkpoints.writer else
                                    f"SIGTERM received at iteration {s.iteration} (no --save); "
                                    "exiting")
                return 0
        if self.window.steps:
            self._log_train()
        self.validator.finish(s.iteration)
        self.checkpoints.finish(s.iteration)
        self.reporter.print(f"done: {s.iteration} iterations, {s.consumed_pairs} triplets, "
                            f"{s.consumed_tokens} tokens, {self.guard.skipped_steps} skipped "
                            f"steps, {self.sampler.skipped_oversize} pairs over the micro-batch "
                            "budget")
        return 0

    def step(self) -> None:
        """One optimizer step on the next global batch; counted, guarded and windowed."""
        s = self.state
        self.timers("data").start()
        micro_batches = self.sampler.next_step()
        plan = self.sampler.last_plan
        self.timers("data").stop()
        if self.cfg.data.micro_batch_size is not None:
            assert len(micro_batches) == get_num_microbatches()
        result = train_step(self.chunks, self.optimizer, micro_batches, self.ctx, self.scheduler,
                            forward_step=self.faults.forward_step(s.iteration + 1))
        s.iteration += 1
        s.consumed_pairs += plan.pairs
        s.consumed_tokens += plan.tokens
        flops = sum(training_flops(self.preset, *mb.attention_segments())
                    for mb in micro_batches)
        self.window.add(result, plan.tokens, flops,
                        local_computed=sum(mb.tokens.shape[1] for mb in micro_batches),
                        computed=plan.computed, pairs=plan.pairs)
        self.guard.observe(s.iteration, result)

    def _signalled(self) -> bool:
        return any_rank(self._signal)

    def _evaluate(self, iteration: int) -> Optional[PairMetrics]:
        """Loss/accuracy over `--eval-iters` validation steps, the same pairs every time."""
        self.timers("eval").start()
        mean = PairMetricsMean()
        for micro_batches in self.data.validation_steps(self.cfg.logging.eval_iters):
            mean.add(evaluate_pairs(self.chunks, micro_batches, self.ctx))
        self.timers("eval").stop()
        metrics, pairs = mean.result(), mean.pairs
        figures = {**metrics.means(), "pairs": pairs, "seconds": self.timers("eval").elapsed()}
        self.reporter.log("valid", iteration, figures,
                          f"validation at iteration {iteration}: loss "
                          f"{metrics.loss:.4f} | accuracy {metrics.accuracy:.3f} | r+ "
                          f"{metrics.reward_chosen:.3f} r- {metrics.reward_rejected:.3f} | "
                          f"{pairs} pairs")
        return metrics

    def _log_train(self) -> None:
        s, ctx, w = self.state, self.ctx, self.window
        sums = torch.tensor([w.local_flops, w.local_real, w.local_computed],
                            dtype=torch.float64, device=compute_device())
        if ctx.dp_size > 1:  # every TP/PP rank of a replica saw the same data
            torch.distributed.all_reduce(sums, group=ctx.pg.dp)
        flops, real, computed = sums.tolist()
        world = torch.distributed.get_world_size()
        tflops_per_gpu = flops / w.seconds / world / 1e12
        peak = self.cfg.logging.peak_tflops or peak_tflops_of_this_gpu()
        m = w.metrics.result().means()
        figures = {
            **m, "grad_norm": w.last_grad_norm, "lr": self.scheduler.get_lr(
                self.optimizer.param_groups[0]),
            "tokens_per_s": w.tokens / w.seconds,
            "computed_tokens_per_s": w.computed / w.seconds, "pairs_per_s": w.pairs / w.seconds,
            # the share of the pairs' tokens a shared-prefix pack did not compute
            "prefix_saving": 1.0 - w.computed / max(w.tokens, 1),
            "tflops_per_gpu": tflops_per_gpu,
            "mfu": tflops_per_gpu / peak if peak else None,
            "packing_efficiency": real / max(computed, 1),
            "skipped_steps": self.guard.skipped_steps,
            "consumed_pairs": s.consumed_pairs, "consumed_tokens": s.consumed_tokens,
            "step_seconds": w.seconds / max(w.timed_steps, 1),
            "data_seconds": self.timers("data").elapsed(), **memory_gib()}
        mem = figures.get("mem_peak_gib", figures.get("mem_rss_gib"))
        grad = "n/a" if w.last_grad_norm is None else f"{w.last_grad_norm:.3f}"
        text = (f"iteration {s.iteration:7d}/{self.train_iters} | loss {m['loss']:.4f} | "
                f"acc {m['accuracy']:.3f} | r+ {m['reward_chosen']:.3f} r- "
                f"{m['reward_rejected']:.3f} margin {m['margin']:.3f} | grad norm {grad} | "
                f"lr {figures['lr']:.3e} | {figures['tokens_per_s']:,.0f} tok/s | "
                f"{figures['pairs_per_s']:,.1f} pairs/s"
                + (f" (prefix saves {100 * figures['prefix_saving']:.0f}%)"
                   if figures["prefix_saving"] > 0.005 else "") + " | "
                f"{tflops_per_gpu:.1f} TFLOP/s/GPU"
                + (f" | MFU {100 * figures['mfu']:.1f}%" if figures["mfu"] else "")
                + f" | mem {mem:.1f} GiB | skipped {self.guard.skipped_steps}")
        self.reporter.log("train", s.iteration, figures, text)
        w.reset()

    # -- checkpoints and signals ---------------------------------------------------------------

    def save(self, iteration: int) -> None:
        self.timers("save").start()
        common = {"train_state": {**asdict(self.state), **self.guard.state_dict()},
                  "metrics_window": self.window.state_dict(),
                  "scheduler": self.scheduler.state_dict(),
                  "sampler": self.sampler.state_dict(), "preset": self.preset.name,
                  "layout": {"tp": self.ctx.tp_size, "pp": self.ctx.pp_size,
                             "dp": self.ctx.dp_size, "vpp": self.ctx.vp_size}}
        state = training_state_dict(
            self.chunks, self.optimizer, self.ctx, common,
            optimizer_format=("fully_reshardable"
                              if self.cfg.checkpoint.dist_ckpt_optim_fully_reshardable
                              else "dp_reshardable"))
        self.checkpoints.writer.save(iteration, state)
        self.timers("save").stop()
        ck = self.cfg.checkpoint
        self.reporter.print(f"checkpoint {'scheduled' if ck.async_save else 'saved'}: "
                            f"iteration {iteration} in {ck.save} "
                            f"({self.timers('save').elapsed():.1f} s)")

    def _on_sigterm(self, signum, frame) -> None:
        self._signal = True  # acted on at the end of the current step, on every rank


def resolve_run_preset(name: Optional[str], checkpoint: Optional[str]) -> ModelPreset:
    """`--model-preset`, else the preset a checkpoint records (HF import and our checkpoints
    write `model.json`), else "tiny". A named preset that contradicts the checkpoint is an error."""
    if not checkpoint:
        return get_preset(name or "tiny")
    return read_manifest(checkpoint, must_exist=False).preset_for(name, default="tiny")


def main(argv=None) -> int:
    try:  # flags, config file, preset and derived values: before any process group
        args = parse_train_args(argv)
        preset = resolve_run_preset(args.model_preset, args.pretrained_checkpoint or args.load)
        run = run_config_from_args(args, preset.num_layers)
        args, notes = resolve_train_args(args, preset)
        cfg = train_config(args, run)
        sink_modules(cfg.logging.tensorboard_dir, cfg.logging.wandb_project)  # on every rank
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except (ValueError, CheckpointError) as e:  # a bad marker or model.json
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    ctx = initialize_parallel(cfg.run)
    rank = torch.distributed.get_rank()
    reporter = Reporter(rank, args.log_json, args.tensorboard_dir, args.wandb_project,
                        args.wandb_exp_name, config=vars(args))
    for note in notes:
        reporter.print(note)
    if args.save and rank == 0:
        write_resolved_config(args, args.save)
    try:
        return Trainer(cfg, preset, ctx, reporter).run()
    except (TrainingStopped, DatasetError, CheckpointError, MicroBatchCountError,
            FaultInjectionTimeout) as e:
        # Every rank reaches the same decision; one line is enough. A checkpoint that one rank
        # alone failed to read is reported by that rank.
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        elif getattr(e, "on_any_rank", False):
            print(f"error (rank {rank}): {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        reporter.close()
        destroy_num_microbatches_calculator()
        destroy_parallel()
