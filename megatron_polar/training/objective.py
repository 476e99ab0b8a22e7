"""The POLAR objective: Bradley-Terry over (s+, s-) pairs, loss = -log sigmoid(r+ - r-).

The loss function follows megatron's per-token-loss contract with *pairs* as the "tokens":
it returns the summed loss of a micro-batch and its pair count; megatron's schedules add the
counts over micro-batches, `finalize_model_grads` all-reduces them over data-parallel ranks and
divides the gradients by the total. So the step's gradient is exactly that of the mean loss over
the global batch, whatever the split of pairs across micro-batches and ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from megatron_polar.model.reward_model import rewards_at
from megatron_polar.runtime.device import compute_device

# Order of the per-micro-batch sums returned under "pair_stats".
_STATS = ("loss", "correct", "chosen", "rejected", "margin", "pairs")
# The per-pair means of PairMetrics, in field order.
_MEANS = ("loss", "accuracy", "reward_chosen", "reward_rejected", "margin")


def pairwise_loss(reward_positions: torch.Tensor, token_scores: torch.Tensor, *,
                  pair_index: Optional[torch.Tensor] = None):
    """megatron loss_func: (summed loss, pair count, {"pair_stats": sums}) for one micro-batch.

    Without `pair_index`, `reward_positions` lists s+_0, s-_0, s+_1, s-_1, ... so chosen and
    rejected alternate. With it (shared-prefix packs), pair k compares the rewards at
    reward_positions[pair_index[k, 0]] (better) and [pair_index[k, 1]] (worse): a ranked list's
    candidates are scored once and enter every pair they belong to.
    """
    rewards = rewards_at(token_scores, reward_positions.to(token_scores.device))
    if pair_index is None:
        chosen, rejected = rewards[0::2], rewards[1::2]
    else:
        pair_index = pair_index.to(rewards.device)
        chosen, rejected = rewards[pair_index[:, 0]], rewards[pair_index[:, 1]]
    margin = chosen - rejected
    loss = -F.logsigmoid(margin).sum()
    num_pairs = margin.numel()
    stats = torch.stack([
        loss.detach(), (margin > 0).sum().float(), chosen.detach().sum(),
        rejected.detach().sum(), margin.detach().sum(),
        torch.full((), float(num_pairs), device=loss.device),
    ])
    # torch.full, not torch.tensor: no host-to-device copy (a blocking one syncs the stream).
    count = torch.full((), num_pairs, dtype=torch.int, device=loss.device)
    return loss, count, {"pair_stats": stats}


def with_nan_loss(loss_func, token_scores: torch.Tensor):
    """`loss_func`'s result with a NaN loss, back-propagated and reported alike (the step's
    metrics are summed from "pair_stats"), as a real NaN would show: fault injection."""
    loss, count, stats = loss_func(token_scores)
    pair_stats = stats["pair_stats"].clone()
    pair_stats[_STATS.index("loss")] = float("nan")
    return loss * float("nan"), count, {**stats, "pair_stats": pair_stats}


@dataclass
class PairMetrics:
    """Means over every pair of a global batch."""

    loss: float
    accuracy: float
    reward_chosen: float
    reward_rejected: float
    margin: float
    num_pairs: int

    def means(self) -> dict:
        return {k: getattr(self, k) for k in _MEANS}

    @classmethod
    def from_sums(cls, sums: torch.Tensor) -> "PairMetrics":
        s = dict(zip(_STATS, sums.tolist()))
        n = max(s["pairs"], 1.0)
        return cls(loss=s["loss"] / n, accuracy=s["correct"] / n, reward_chosen=s["chosen"] / n,
                   reward_rejected=s["rejected"] / n, margin=s["margin"] / n,
                   num_pairs=int(s["pairs"]))


class PairMetricsMean:
    """Pair-weighted means of PairMetrics over several steps (a log window, a validation)."""

    def __init__(self):
        self.sums = np.zeros(len(_MEANS))
        self.pairs = 0

    def add(self, m: PairMetrics) -> None:
        self.sums += m.num_pairs * np.array([getattr(m, k) for k in _MEANS])
        self.pairs += m.num_pairs

    def result(self) -> PairMetrics:
        means = self.sums / self.pairs if self.pairs else np.full(len(_MEANS), np.nan)
        return PairMetrics(*means.tolist(), num_pairs=self.pairs)


def reduce_pair_stats(outputs: list[dict], group) -> PairMetrics:
    """Sum the micro-batch stats of this rank, then over `group` (data-parallel ranks)."""
    device = compute_device()
    sums = torch.zeros(len(_STATS), dtype=torch.float64, device=device)
    for out in outputs:
        sums += out["pair_stats"].to(device=device, dtype=torch.float64)
    if group is not None and torch.distributed.is_initialized() and group.size() > 1:
        torch.distributed.all_reduce(sums, group=group)
    return PairMetrics.from_sums(sums)
