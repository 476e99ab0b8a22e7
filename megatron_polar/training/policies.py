"""The trainer's policies, each an object that owns its state and decides one thing:

- `NaNGuard`: counts steps skipped for a non-finite loss or gradient norm and stops the run
  after too many in a row;
- `MetricsWindow`: the figures between two log lines (loss means, throughput);
- `Validator`: when to evaluate on the held-out pairs, and the evaluation itself;
- `CheckpointPolicy`: when to save (every `--save-interval`, on SIGTERM, after the last step).

The trainer (trainer.py) calls them in order once per iteration; none calls another.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Optional

import numpy as np

from megatron_polar.training.objective import PairMetrics, PairMetricsMean
from megatron_polar.training.reporting import Reporter


class TrainingStopped(RuntimeError):
    """The run cannot go on; the message says why and where."""


class NaNGuard:
    """A step whose loss or gradient norm is not finite changes no weight (see
    `guarded_optimizer_step`); this guard counts such steps and stops the run when
    `max_consecutive` come in a row, since the weights then no longer recover."""

    def __init__(self, max_consecutive: int, reporter: Reporter):
        if max_consecutive < 1:
            raise ValueError("--max-consecutive-skipped-steps must be >= 1")
        self.max_consecutive, self.reporter = max_consecutive, reporter
        self.skipped_steps = self.consecutive_skipped = 0

    def observe(self, iteration: int, result) -> None:
        """Count `result` (a StepResult); raises TrainingStopped past the limit."""
        if result.update_successful:
            self.consecutive_skipped = 0
            return
        self.skipped_steps += 1
        self.consecutive_skipped += 1
        self.reporter.print(f"iteration {iteration}: non-finite loss or gradient norm "
                            f"(loss {result.metrics.loss}, grad norm {result.grad_norm});"
                            f" step skipped ({self.skipped_steps} so far)")
        if self.consecutive_skipped >= self.max_consecutive:
            first = iteration - self.consecutive_skipped + 1
            raise TrainingStopped(
                f"stopping at iteration {iteration}: {self.consecutive_skipped} steps in a "
                f"row (iterations {first}-{iteration}) had a non-finite loss or gradient norm "
                f"(--max-consecutive-skipped-steps {self.max_consecutive}); the last good "
                "weights are in the latest checkpoint")

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped_steps,
                "consecutive_skipped": self.consecutive_skipped}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_steps = int(state["skipped_steps"])
        self.consecutive_skipped = int(state["consecutive_skipped"])


class MetricsWindow:
    """Figures accumulated between two log lines.

    The loss means and step count are saved with a checkpoint (`state_dict`): a run resumed in
    the middle of a window logs the same means as one that never stopped. Throughput (tokens,
    FLOPs, seconds) is this process's own and restarts with it.
    """

    def __init__(self):
        self.metrics = PairMetricsMean()
        self.steps = 0
        self.last_grad_norm: Optional[float] = None
        self._restart_clock()

    def _restart_clock(self) -> None:
        self.start = time.perf_counter()
        self.timed_steps = self.tokens = self.computed = self.pairs = 0
        self.local_flops = 0.0
        self.local_real = self.local_computed = 0  # this rank's tokens, real and padded

    def reset(self) -> None:
        self.__init__()

    def add(self, result, tokens: int, local_flops: float, local_computed: int,
            computed: Optional[int] = None, pairs: int = 0) -> None:
        """`tokens`: the step's pairs' tokens in full, all ranks; `computed`: those the model
        computed (shared prefixes once; default `tokens`); `local_computed`: this rank's
        packs' lengths, padding included."""
        self.steps += 1
        self.timed_steps += 1
        self.tokens += tokens
        self.computed += tokens if computed is None else computed
        self.pairs += pairs
        self.local_flops += local_flops
        self.local_real += result.num_tokens
        self.local_computed += local_computed
        self.last_grad_norm = result.grad_norm
        if result.update_successful:  # a skipped step's NaNs would hide the others' means
            self.metrics.add(result.metrics)

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (evaluation, saving) does not count as step time."""
        paused = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - paused

    @property
    def seconds(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "last_grad_norm": self.last_grad_norm,
                "metric_sums": self.metrics.sums.tolist(), "pairs": self.metrics.pairs}

    def load_state_dict(self, state: dict) -> None:
        self.reset()
        self.steps, self.last_grad_norm = int(state["steps"]), state["last_grad_norm"]
        self.metrics.sums = np.asarray(state["metric_sums"], dtype=np.float64)
        self.metrics.pairs = int(state["pairs"])


class Validator:
    """Evaluates every `interval` iterations and once after the last step (unless that step
    was just evaluated); `evaluate` alone serves `--skip-train`."""

    def __init__(self, interval: Optional[int], evaluate: Callable[[int], Optional[PairMetrics]],
                 enabled: bool):
        self.interval, self._evaluate, self.enabled = interval, evaluate, enabled
        self.last_evaluated: Optional[int] = None

    def evaluate(self, iteration: int) -> Optional[PairMetrics]:
        if not self.enabled:
            return None
        self.last_evaluated = iteration
        return self._evaluate(iteration)

    def after_step(self, iteration: int) -> None:
        if self.interval and iteration % self.interval == 0:
            self.evaluate(iteration)

    def finish(self, iteration: int) -> None:
        if self.interval and self.last_evaluated != iteration:
            self.evaluate(iteration)


class CheckpointPolicy:
    """Saves every `interval` iterations, when SIGTERM came, and after the last step; never
    twice for one iteration. `save(iteration)` writes (through the CheckpointWriter);
    `writer` is None without `--save`, and then nothing is saved."""

    def __init__(self, writer, interval: Optional[int], save: Callable[[int], None]):
        self.writer, self.interval, self._save = writer, interval, save
        self.last_saved: Optional[int] = None

    def save(self, iteration: int) -> None:
        if self.writer is not None and self.last_saved != iteration:
            self._save(iteration)
            self.last_saved = iteration

    def after_step(self, iteration: int) -> None:
        if self.writer is None:
            return
        self.writer.poll()  # finish an async save that is done
        if self.interval and iteration % self.interval == 0:
            self.save(iteration)

    def finish(self, iteration: int) -> None:
        """The last step or SIGTERM: save unless just saved, then wait for the writes."""
        if self.writer is not None:
            self.save(iteration)
            self.writer.wait()
