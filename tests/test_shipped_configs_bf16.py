"""The shipped YAMLs in bf16, as labs run them (tests/test_shipped_configs.py has the fp32
runs and explains the CPU overrides; a file of its own so that `make test`'s two workers run
both halves at once)."""

import math

from tests.test_shipped_configs import (STEPS, SINGLE, assert_close, losses,  # noqa: F401
                                        records, runs)

# bf16 as shipped. The reference runs in bf16 too, so both round the same weights, but DP and
# TP reduce gradients and activations in another order: bf16 keeps 8 significant bits, so one
# rounding of a ~0.7 loss or of an update moves it by up to ~3e-3, and five steps compound a
# few of those. 2e-2 is far under the loss's own step-to-step change at lr 2e-3 but would
# still catch a wrong reduction (a doubled or halved gradient moves the loss by ~1e-1).
BF16_TOL = 2e-2


def test_shipped_configs_in_bf16_match_one_process_and_resume_exactly(runs):
    root = runs.root
    runs("ref16", "pretrain_1_8b.yaml", True, 1, **SINGLE)
    runs("c18_16", "pretrain_1_8b.yaml", True, 2)
    runs("c7_16", "pretrain_7b.yaml", True, 2)
    ref, dp2, tp2 = losses(root, "ref16"), losses(root, "c18_16"), losses(root, "c7_16")
    assert sorted(dp2) == sorted(tp2) == list(range(1, STEPS + 1))
    assert_close(ref, dp2, range(1, 6), BF16_TOL, "bf16 DP2")
    assert_close(ref, tp2, range(1, 6), BF16_TOL, "bf16 TP2")
    # A bf16 model with the distributed optimizer saves (megatron's optimizer index and its
    # parameter groups agree) and resumes at the same layout exactly: DP2, dp_reshardable
    # optimizer state, overlapped reduce-scatter and all-gather (the 7B layout's resume at
    # another TP is the fp32 test's).
    runs("c18_16_same", "pretrain_1_8b.yaml", True, 2, resume_from="c18_16")
    same = losses(root, "c18_16_same")
    assert sorted(same) == list(range(4, STEPS + 1))
    assert all(same[i] == dp2[i] for i in same), (same, dp2)
    v = records(root, "c18_16", "valid")
    assert v and all(math.isfinite(r["loss"]) for r in v)
