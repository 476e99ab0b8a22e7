"""Data-parallel sampler that packs whole pairs into micro-batch token budgets, and resumes exactly.

A step is `micro_batches_per_step` packs over the whole data-parallel group; rank r takes
packs r, r + dp, ... Every rank runs the same packer over the same `TripletStream`, reading
only pair lengths (from the index) until it materialises its own packs.

Packing is best-fit-decreasing over a lookahead window: each pack takes the longest pairs in
the window that still fit, and pairs that do not fit wait for a later pack, so no pair is
split or dropped. Pairs longer than the budget cannot be trained on at that budget; they are
counted in `skipped_oversize` and logged, never silently lost.

`state_dict()` holds the stream position and the window; a run restarted from it sees exactly
the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import bisect
import logging
from typing import Optional

from megatron_polar.data.dataset import TripletStream
from megatron_polar.data.packing import PackedMicroBatch, build_packed_micro_batch

log = logging.getLogger(__name__)


class PackingSampler:
    def __init__(self, stream: TripletStream, token_budget: int, micro_batches_per_step: int,
                 dp_rank: int = 0, dp_size: int = 1, lookahead: int = 1024, pad_id: int = 2,
                 pad_multiple: int = 64):
        if micro_batches_per_step % dp_size:
            raise ValueError(f"micro_batches_per_step ({micro_batches_per_step}) must be a "
                             f"multiple of the data-parallel size ({dp_size})")
        if not 0 <= dp_rank < dp_size:
            raise ValueError("dp_rank out of range")
        self.stream, self.budget = stream, token_budget
        self.per_step, self.dp_rank, self.dp_size = micro_batches_per_step, dp_rank, dp_size
        self.lookahead, self.pad_id, self.pad_multiple = lookahead, pad_id, pad_multiple
        self.position = 0  # next stream position to enter the window
        self.window: list[tuple[int, int]] = []  # (-length, position), sorted
        self.skipped_oversize = 0
        self.steps = 0

    # -- packing ---------------------------------------------------------------------------

    def _fill(self) -> None:
        while len(self.window) < self.lookahead:
            n = self.stream.length(self.position)
            if n > self.budget:
                self.skipped_oversize += 1
                k = self.skipped_oversize
                if k <= 10 or (k & (k - 1)) == 0:  # the first ten, then at powers of two
                    log.warning("pair at stream position %d has %d tokens, more than the budget "
                                "%d; skipped (%d so far)", self.position, n, self.budget, k)
            else:
                bisect.insort(self.window, (-n, self.position))
            self.position += 1

    def _next_pack(self) -> list[int]:
        """Stream positions of the next pack, in stream order."""
        self._fill()
        room, chosen, keep = self.budget, [], []
        for neg_len, pos in self.window:  # longest first
            if -neg_len <= room:
                chosen.append(pos)
                room += neg_len
            else:
                keep.append((neg_len, pos))
        self.window = keep
        return sorted(chosen)

    def next_step_positions(self) -> list[list[int]]:
        """This rank's packs of the next step, as stream positions."""
        packs = [self._next_pack() for _ in range(self.per_step)]
        self.steps += 1
        return packs[self.dp_rank::self.dp_size]

    def next_step(self) -> list[PackedMicroBatch]:
        """This rank's micro-batches of the next step, all of one padded length."""
        packs = self.next_step_positions()
        pairs = [[self.stream.pair(p) for p in pack] for pack in packs]
        longest = max(sum(len(a) + len(b) for a, b in pack) for pack in pairs)
        pad_to = min(self.budget, -(-longest // self.pad_multiple) * self.pad_multiple)
        return [build_packed_micro_batch(pack, pad_to, self.pad_id, pair_ids=tuple(positions))
                for pack, positions in zip(pairs, packs)]

    # -- checkpointing -------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"position": self.position, "window": [list(w) for w in self.window],
                "skipped_oversize": self.skipped_oversize, "steps": self.steps,
                "token_budget": self.budget, "micro_batches_per_step": self.per_step,
                "lookahead": self.lookahead}

    def load_state_dict(self, state: dict, strict: Optional[bool] = True) -> None:
        for key, mine in (("token_budget", self.budget), ("micro_batches_per_step", self.per_step),
                          ("lookahead", self.lookahead)):
            if strict and state[key] != mine:
                raise ValueError(f"sampler state was saved with {key}={state[key]}, this run "
                                 f"uses {mine}; the batches would not continue the same stream")
        self.position = int(state["position"])
        self.window = [tuple(w) for w in state["window"]]
        self.skipped_oversize = int(state["skipped_oversize"])
        self.steps = int(state["steps"])
