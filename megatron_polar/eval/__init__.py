"""Evaluating POLAR reward models (docs/evaluation.md).

- `scorer`: `RewardScorer`, a reward model loaded once (checkpoint, HF directory or a fresh
  init) that scores `ScoreRecord`s in packed micro-batches, in one process or under torchrun;
- `flags`: the flags every scoring tool shares, defined once (`add_scorer_args`: model source,
  `ScoringLimits`, the model group), `scorer_from_args`, `source_from_args`;
- `preference`: the paper's protocol on ranked preference sets (the best response is the
  reference; the RM must prefer the 2nd over the 3rd), accuracy per category and overall;
- `discrimination`: policy-discrimination accuracy on held-out policies' trajectories, with
  triplets built as pre-training builds them.

The evaluations take any `score_fn(list[ScoreRecord]) -> list[float]`; a RewardScorer is one.
"""
