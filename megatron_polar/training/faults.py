"""Fault injection for tests: the trainer's `--inject-nan-at`, `--inject-nan-grad-at`,
`--exit-after-iteration`, `--exit-during-save` and `--wait-for-signal-after-iteration`.

A `FaultInjector` is a hook the trainer calls at fixed points (the forward step of an
iteration, the end of an iteration, a checkpoint being written); with none of the flags given
it does nothing. The step API (`train_step`) knows nothing about it: the injector only hands it
another forward step.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional

from megatron_polar.training.config import FaultConfig
from megatron_polar.training.objective import with_nan_loss
from megatron_polar.training.step import pair_forward_step


class FaultInjectionTimeout(RuntimeError):
    """`--wait-for-signal-after-iteration` waited 300 s and no SIGTERM came."""


@dataclass(frozen=True)
class FaultInjector:
    nan_loss_at: frozenset[int] = field(default_factory=frozenset)
    nan_grad_at: frozenset[int] = field(default_factory=frozenset)
    exit_after_iteration: Optional[int] = None
    exit_during_save: Optional[int] = None
    wait_for_signal_after_iteration: Optional[int] = None
    wait_seconds: float = 300.0

    @classmethod
    def from_config(cls, cfg: FaultConfig) -> "FaultInjector":
        return cls(frozenset(cfg.inject_nan_at), frozenset(cfg.inject_nan_grad_at),
                   cfg.exit_after_iteration, cfg.exit_during_save,
                   cfg.wait_for_signal_after_iteration)

    def forward_step(self, iteration: int) -> Callable:
        """The forward step of `iteration` (1-based): the pairwise one, poisoned if asked."""
        loss, grad = iteration in self.nan_loss_at, iteration in self.nan_grad_at
        return poisoned_forward_step(nan_loss=loss, nan_grad=grad)

    def after_iteration(self, iteration: int, signalled: Callable[[], bool]) -> None:
        """A crash (no clean-up) or a wait for SIGTERM after `iteration`, when asked."""
        if self.exit_after_iteration == iteration:
            crash(3)
        if self.wait_for_signal_after_iteration == iteration:
            # hold here, iteration logged, until a test sends SIGTERM (checked on every rank)
            deadline = time.monotonic() + self.wait_seconds
            while not signalled():
                if time.monotonic() > deadline:
                    raise FaultInjectionTimeout(
                        f"--wait-for-signal-after-iteration {iteration}: no SIGTERM within "
                        f"{self.wait_seconds:.0f} s")
                time.sleep(0.05)

    def during_save(self, stage: str, iteration: int) -> None:
        """Called by the checkpoint writer while it writes `iteration`."""
        if self.exit_during_save == iteration:
            crash(4)


def poisoned_forward_step(nan_loss: bool, nan_grad: bool = False) -> Callable:
    """The pairwise forward step with a NaN loss and/or NaN gradients (or the plain one)."""
    if not (nan_loss or nan_grad):
        return pair_forward_step
    return partial(_poisoned_forward_step, nan_loss=nan_loss, nan_grad=nan_grad)


def _poisoned_forward_step(data_iterator, model, nan_loss: bool, nan_grad: bool):
    scores, loss_func = pair_forward_step(data_iterator, model)
    if nan_grad and scores.requires_grad:
        # the loss stays finite; the gradient flowing back from this stage's output is NaN
        # (and so every gradient before it)
        scores.register_hook(lambda grad: grad * float("nan"))
    if nan_loss:  # a NaN loss, reported as well as back-propagated
        return scores, partial(with_nan_loss, loss_func)
    return scores, loss_func


def crash(code: int) -> None:
    """Die at once, as a node failure would: this process and its helpers (megatron's
    checkpoint writer keeps a multiprocessing manager process), without any clean-up."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        child.kill()
    os._exit(code)
