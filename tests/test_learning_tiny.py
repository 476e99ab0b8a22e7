"""The tiny preset learns the synthetic policy-discrimination task within a minute of CPU."""

from megatron_polar.training.synthetic_run import SyntheticRunConfig, run_synthetic


def test_tiny_learns_held_out_policy_discrimination(ctx1):
    report = run_synthetic(SyntheticRunConfig(time_budget_s=55.0), ctx=ctx1)
    assert report.seconds < 60
    assert 0.35 < report.accuracy_before < 0.65  # untrained: chance
    assert report.accuracy_after >= 0.95, report.history
