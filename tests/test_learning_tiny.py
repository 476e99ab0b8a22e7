"""The tiny preset learns the synthetic policy-discrimination task (~40 s of a quiet 2-core CPU).

Bounded in steps, not seconds: a busy machine makes it slower, not wrong."""

from megatron_polar.testing.synthetic_run import SyntheticRunConfig, run_synthetic


def test_tiny_learns_held_out_policy_discrimination(ctx1):
    report = run_synthetic(SyntheticRunConfig(time_budget_s=None, max_steps=700), ctx=ctx1)
    assert report.steps == 700
    assert 0.35 < report.accuracy_before < 0.65  # untrained: chance
    assert report.accuracy_after >= 0.95, report.history


def test_a_time_budget_ends_the_run_as_its_last_step_would(ctx1):
    """The synthetic run's budget is the trainer's --exit-duration-in-mins: checked after each
    step; the run then ends as at its last step (logged, validated)."""
    lines = []
    report = run_synthetic(SyntheticRunConfig(time_budget_s=1e-3, max_steps=50, eval_interval=10),
                           log=lines.append, ctx=ctx1)
    assert report.steps == 1
    assert any(line.startswith("--exit-duration-in-mins") for line in lines)
    assert [h["step"] for h in report.history] == [1]
    assert 0.0 <= report.accuracy_after <= 1.0 and report.tokens_per_s > 0
