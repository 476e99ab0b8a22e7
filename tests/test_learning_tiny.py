"""The tiny preset learns the synthetic policy-discrimination task (~40 s of a quiet 2-core CPU).

Bounded in steps, not seconds: a busy machine makes it slower, not wrong."""

from megatron_polar.testing.synthetic_run import SyntheticRunConfig, run_synthetic


def test_tiny_learns_held_out_policy_discrimination(ctx1):
    report = run_synthetic(SyntheticRunConfig(time_budget_s=None, max_steps=700), ctx=ctx1)
    assert report.steps == 700
    assert 0.35 < report.accuracy_before < 0.65  # untrained: chance
    assert report.accuracy_after >= 0.95, report.history
