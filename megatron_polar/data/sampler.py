"""Data-parallel sampler: a step is the next `global_batch_size` pairs of the stream, packed.

The paper counts its batch in triplets (1940 for 1.8B, 4343 for 7B), so a step always takes
exactly that many pairs, whatever their lengths. Two ways to form micro-batches:

- `token_budget` (the default for POLAR): the step's pairs are packed best-fit-decreasing
  into packs of at most `token_budget` tokens (no pair split), and the packs are dealt to the
  data-parallel ranks largest first, each to the rank with the fewest tokens so far. Ranks may
  run different numbers of micro-batches; megatron's gradient reduction happens once per step,
  so that is fine. Pairs longer than the budget cannot be trained on at that budget: they are
  counted in `skipped_oversize` and logged, never silently lost, and the step takes the next
  pair instead.
- `pairs_per_micro_batch` (Megatron's `--micro-batch-size`): consecutive runs of that many
  pairs, each rank taking a contiguous slice of the step, as Megatron-LM splits a global batch.

Every pack is padded only to its own length rounded up to `pad_multiple`, so the computed
tokens are the real tokens plus a little alignment padding (pipeline stages then exchange
shapes per micro-batch: `variable_seq_lengths` in the model config).

Every rank runs the same planner over the same `TripletStream`, reading only pair lengths from
the index until it materialises its own packs, so the state is the same on all ranks:
`state_dict()` (stream position, steps, skip count) resumes exactly.
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass
from typing import Optional

from megatron_polar.data.dataset import TripletStream
from megatron_polar.data.packing import (PackedMicroBatch, best_fit_decreasing,
                                         build_packed_micro_batch)

log = logging.getLogger(__name__)


@dataclass
class StepPlan:
    """One step over the whole data-parallel group: stream positions of each rank's packs."""

    per_rank: list[list[list[int]]]
    tokens: int  # real tokens of the step, all ranks
    pairs: int


def deal_to_ranks(packs: list[list[int]], lengths: dict[int, int], dp_size: int) -> list[list[list[int]]]:
    """Largest pack first, each to the rank with the fewest tokens; every rank gets at least
    one pack (a multi-pair pack is split if there are fewer packs than ranks)."""
    packs = [list(p) for p in packs]
    while len(packs) < dp_size:
        widest = max(range(len(packs)), key=lambda i: (len(packs[i]), -i))
        if len(packs[widest]) < 2:
            raise ValueError(f"{sum(map(len, packs))} pairs cannot give each of {dp_size} "
                             "data-parallel ranks a micro-batch")
        packs.append([packs[widest].pop()])
    size = {id(p): sum(lengths[k] for k in p) for p in packs}
    order = sorted(packs, key=lambda p: (-size[id(p)], min(p)))
    heap = [(0, r) for r in range(dp_size)]
    per_rank: list[list[list[int]]] = [[] for _ in range(dp_size)]
    for pack in order:
        tokens, r = heapq.heappop(heap)
        per_rank[r].append(sorted(pack))
        heapq.heappush(heap, (tokens + size[id(pack)], r))
    return per_rank


class PackingSampler:
    def __init__(self, stream: TripletStream, global_batch_size: int, *,
                 token_budget: Optional[int] = None, pairs_per_micro_batch: Optional[int] = None,
                 dp_rank: int = 0, dp_size: int = 1, pad_id: int = 2, pad_multiple: int = 64):
        if (token_budget is None) == (pairs_per_micro_batch is None):
            raise ValueError("give exactly one of token_budget (micro-batch tokens) and "
                             "pairs_per_micro_batch (micro-batch size)")
        if not 0 <= dp_rank < dp_size:
            raise ValueError("dp_rank out of range")
        if global_batch_size < dp_size:
            raise ValueError(f"global batch size {global_batch_size} is smaller than the "
                             f"data-parallel size {dp_size}")
        if pairs_per_micro_batch is not None and global_batch_size % (pairs_per_micro_batch * dp_size):
            raise ValueError(f"global batch size {global_batch_size} is not a multiple of "
                             f"micro-batch size x data-parallel size = "
                             f"{pairs_per_micro_batch} x {dp_size}")
        self.stream, self.global_batch_size = stream, global_batch_size
        self.budget, self.pairs_per_mb = token_budget, pairs_per_micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.pad_id, self.pad_multiple = pad_id, pad_multiple
        self.position = 0  # next stream position
        self.skipped_oversize = 0
        self.steps = 0
        self.last_plan: Optional[StepPlan] = None

    # -- planning ----------------------------------------------------------------------------

    def _take(self) -> dict[int, int]:
        """The next `global_batch_size` trainable pairs: position -> length."""
        taken: dict[int, int] = {}
        while len(taken) < self.global_batch_size:
            n = self.stream.length(self.position)
            if self.budget is not None and n > self.budget:
                self.skipped_oversize += 1
                k = self.skipped_oversize
                if k <= 10 or (k & (k - 1)) == 0:  # the first ten, then at powers of two
                    log.warning("pair at stream position %d has %d tokens, more than the "
                                "micro-batch budget %d; skipped (%d so far)",
                                self.position, n, self.budget, k)
            else:
                taken[self.position] = n
            self.position += 1
        return taken

    def plan_step(self) -> StepPlan:
        """Plan the next step for all ranks (every rank computes the same plan)."""
        lengths = self._take()
        if self.budget is not None:
            per_rank = deal_to_ranks(best_fit_decreasing(lengths, self.budget), lengths,
                                     self.dp_size)
        else:
            order = sorted(lengths)
            per_rank_pairs = len(order) // self.dp_size
            per_rank = [[order[s: s + self.pairs_per_mb]
                         for s in range(r * per_rank_pairs, (r + 1) * per_rank_pairs,
                                        self.pairs_per_mb)]
                        for r in range(self.dp_size)]
        self.steps += 1
        self.last_plan = StepPlan(per_rank, tokens=sum(lengths.values()), pairs=len(lengths))
        return self.last_plan

    def next_step_positions(self) -> list[list[int]]:
        """This rank's packs of the next step, as stream positions."""
        return self.plan_step().per_rank[self.dp_rank]

    def next_step(self) -> list[PackedMicroBatch]:
        """This rank's micro-batches of the next step, each padded to its own multiple of
        `pad_multiple`."""
        batches = []
        for positions in self.next_step_positions():
            pairs = [self.stream.pair(p) for p in positions]
            total = sum(len(a) + len(b) for a, b in pairs)
            pad_to = -(-total // self.pad_multiple) * self.pad_multiple
            batches.append(build_packed_micro_batch(pairs, pad_to, self.pad_id,
                                                    pair_ids=tuple(positions)))
        return batches

    # -- checkpointing -------------------------------------------------------------------------

    def _settings(self) -> dict:
        return {"global_batch_size": self.global_batch_size, "token_budget": self.budget,
                "pairs_per_micro_batch": self.pairs_per_mb}

    def state_dict(self) -> dict:
        return {"position": self.position, "skipped_oversize": self.skipped_oversize,
                "steps": self.steps, **self._settings()}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Continue from `state`. With `strict`, a different batch size or micro-batch setting
        is an error: the batches would not continue the same stream. (The data-parallel size
        may change: it only changes which rank gets which pack.)"""
        if strict:
            for key, mine in self._settings().items():
                if state.get(key) != mine:
                    raise ValueError(f"sampler state was saved with {key}={state.get(key)}, "
                                     f"this run uses {mine}; the batches would not continue "
                                     "the same stream (load with strict=False to accept)")
        self.position = int(state["position"])
        self.skipped_oversize = int(state["skipped_oversize"])
        self.steps = int(state["steps"])
