"""The trainer's policies and builders as objects: each decides one thing and keeps its state
across a checkpoint (training/policies.py, training/optimizer.py, training/faults.py)."""

import math
from types import SimpleNamespace

import pytest

from megatron_polar.training.config import FaultConfig
from megatron_polar.training.faults import FaultInjector, poisoned_forward_step
from megatron_polar.training.objective import PairMetrics
from megatron_polar.training.optimizer import OptimizerSettings
from megatron_polar.training.policies import (CheckpointPolicy, MetricsWindow, NaNGuard,
                                              TrainingStopped, Validator)
from megatron_polar.training.step import pair_forward_step


class Printed:
    def __init__(self):
        self.lines = []

    def print(self, text):
        self.lines.append(text)


def result(ok=True, loss=0.5, pairs=4, grad_norm=1.0, tokens=100):
    metrics = PairMetrics(loss if ok else math.nan, 0.75, 1.0, -1.0, 2.0, pairs)
    return SimpleNamespace(metrics=metrics, grad_norm=grad_norm if ok else math.nan,
                           update_successful=ok, num_tokens=tokens)


def test_nan_guard_counts_resets_and_stops_after_the_limit_in_a_row():
    out = Printed()
    guard = NaNGuard(3, out)
    for it, ok in enumerate([True, False, False, True, False, False], start=1):
        guard.observe(it, result(ok))
    assert guard.state_dict() == {"skipped_steps": 4, "consecutive_skipped": 2}
    last = out.lines[-1]
    assert last.startswith("iteration 6: non-finite loss") and "(4 so far)" in last
    resumed = NaNGuard(3, Printed())
    resumed.load_state_dict(guard.state_dict())  # the count goes on across a resume
    with pytest.raises(TrainingStopped, match=r"3 steps in a row \(iterations 5-7\)"):
        resumed.observe(7, result(False))
    with pytest.raises(ValueError, match="--max-consecutive-skipped-steps"):
        NaNGuard(0, out)


def test_metrics_window_means_survive_a_checkpoint_but_its_clock_does_not():
    w = MetricsWindow()
    w.add(result(loss=0.2, pairs=2), 100, 1e6, 128)
    w.add(result(ok=False), 100, 1e6, 128)  # a skipped step counts, its NaN does not
    assert w.steps == 2 and w.metrics.result().loss == pytest.approx(0.2)
    restored = MetricsWindow()
    restored.load_state_dict(w.state_dict())
    restored.add(result(loss=0.8, pairs=2), 50, 1e6, 64)
    assert restored.steps == 3 and restored.timed_steps == 1 and restored.tokens == 50
    assert restored.metrics.result().loss == pytest.approx(0.5)  # (0.2 * 2 + 0.8 * 2) / 4
    restored.reset()
    assert restored.steps == 0 and restored.metrics.pairs == 0


def test_validator_evaluates_on_the_interval_and_once_at_the_end():
    seen = []
    v = Validator(5, lambda it: seen.append(it), enabled=True)
    for it in range(1, 11):
        v.after_step(it)
    v.finish(10)  # just evaluated: not again
    v.finish(12)
    assert seen == [5, 10, 12]
    off = Validator(5, lambda it: seen.append(("off", it)), enabled=False)
    off.after_step(5)
    off.finish(7)
    assert off.evaluate(7) is None and ("off", 5) not in seen
    none = Validator(None, lambda it: seen.append(("none", it)), enabled=True)
    none.after_step(5)
    none.finish(7)
    assert not [s for s in seen if isinstance(s, tuple)]


def test_checkpoint_policy_saves_on_interval_and_finish_never_twice():
    saved, events = [], []
    writer = SimpleNamespace(poll=lambda: events.append("poll"),
                             wait=lambda: events.append("wait"))
    policy = CheckpointPolicy(writer, 2, saved.append)
    for it in range(1, 5):
        policy.after_step(it)
    policy.finish(4)  # saved at 4 already: only waits
    assert saved == [2, 4] and events.count("poll") == 4 and events[-1] == "wait"
    policy.finish(5)
    assert saved == [2, 4, 5]
    nothing = CheckpointPolicy(None, 2, saved.append)  # no --save
    nothing.after_step(2)
    nothing.finish(3)
    assert saved == [2, 4, 5]


def test_optimizer_settings_check_their_fields_and_build_megatron_config():
    s = OptimizerSettings(lr=1e-4, min_lr=1e-5, warmup_steps=3)
    cfg = s.megatron_config(bf16=True)
    assert (cfg.lr, cfg.min_lr, cfg.adam_beta2, cfg.clip_grad, cfg.bf16) == \
        (1e-4, 1e-5, 0.95, 1.0, True)
    for bad, match in ((dict(lr=0.0), "lr must be > 0"),
                       (dict(lr=1e-4, min_lr=1e-3), "min_lr must lie"),
                       (dict(lr=1e-4, decay_style="step"), "decay_style"),
                       (dict(lr=1e-4, warmup_steps=-1), "warmup_steps")):
        with pytest.raises(ValueError, match=match):
            OptimizerSettings(**bad)


def test_fault_injector_is_inert_unless_asked():
    faults = FaultInjector.from_config(FaultConfig(inject_nan_at=[3],
                                                   wait_for_signal_after_iteration=2))
    assert faults.forward_step(1) is pair_forward_step
    assert faults.forward_step(3) is not pair_forward_step
    assert poisoned_forward_step(False) is pair_forward_step
    faults.after_iteration(1, signalled=lambda: False)  # nothing asked at 1
    calls = []
    faults.after_iteration(2, signalled=lambda: calls.append(1) or len(calls) > 2)
    assert len(calls) == 3  # waited until the signal came
    faults.during_save("write", 5)  # no --exit-during-save: returns
