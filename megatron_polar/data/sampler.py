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

Interleaved (virtual) pipeline schedule. megatron-core 0.16.1's
`forward_backward_pipelining_with_interleaving` accepts a rank's micro-batch count M only if
N <= M and (M % N == 0 or M % N >= PP), N = `microbatch_group_size_per_vp_stage`, which
defaults to PP (megatron/core/pipeline_parallel/schedules.py:995-1015,
megatron/core/model_parallel_config.py:447-448): at the default, M must be a positive multiple
of PP (with a larger N, multiple = min = N is a valid subset).
`micro_batch_multiple` (and `min_micro_batches`) make every rank's count valid: packs
are dealt as above, then a rank short of the next valid count splits its own multi-pair packs
(tokens per rank unchanged); only if a rank has fewer pairs than that count are the step's
packs dealt again with per-rank quotas. No pair is dropped or duplicated, no pack exceeds the
budget. The interleaved schedule also needs every micro-batch of a step to have one length
(megatron's per-micro-batch shape exchange misorders at PP=2 and is off with virtual stages,
see model/config.py): `uniform_length_per_step` pads a rank's packs to the step's longest.

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
                                         build_packed_micro_batch, build_shared_micro_batch)

log = logging.getLogger(__name__)


@dataclass
class StepPlan:
    """One step over the whole data-parallel group: stream positions of each rank's packs."""

    per_rank: list[list[list[int]]]
    tokens: int  # real tokens of the step, all ranks: its pairs' sequences in full
    pairs: int
    computed: int = 0  # tokens the model computes (shared prefixes once; = tokens otherwise)


def smallest_valid_count(micro_batch_multiple: int = 1, min_micro_batches: int = 1) -> int:
    """The fewest micro-batches a rank may run: a multiple of `micro_batch_multiple`, at least
    `min_micro_batches` (and at least one)."""
    return -(-max(1, min_micro_batches) // micro_batch_multiple) * micro_batch_multiple


def valid_count(count: int, micro_batch_multiple: int = 1, min_micro_batches: int = 1) -> bool:
    return count >= max(1, min_micro_batches) and count % micro_batch_multiple == 0


def _next_valid(count: int, multiple: int, minimum: int) -> int:
    return max(smallest_valid_count(multiple, minimum), -(-count // multiple) * multiple)


def _tokens(pack: list[int], lengths: dict[int, int]) -> int:
    return sum(lengths[k] for k in pack)


def split_pack(pack: list[int], lengths: dict[int, int]) -> tuple[list[int], list[int]]:
    """Two non-empty halves of a multi-pair pack, balanced by tokens (longest pair first, each
    to the lighter half), each in stream order."""
    halves: tuple[list[int], list[int]] = ([], [])
    load = [0, 0]
    for k in sorted(pack, key=lambda k: (-lengths[k], k)):
        h = 0 if load[0] <= load[1] else 1
        halves[h].append(k)
        load[h] += lengths[k]
    return sorted(halves[0]), sorted(halves[1])


def split_to_count(packs: list[list[int]], lengths: dict[int, int], count: int) -> list[list[int]]:
    """Split multi-pair packs, the one with the most tokens first, until there are `count`
    packs. Packs only get smaller, so none exceeds the budget it met before."""
    packs = [list(p) for p in packs]
    if count > sum(map(len, packs)):
        raise ValueError(f"{sum(map(len, packs))} pairs cannot form {count} packs")
    while len(packs) < count:
        i = max((i for i, p in enumerate(packs) if len(p) > 1),
                key=lambda i: (_tokens(packs[i], lengths), -min(packs[i])))
        packs[i: i + 1] = split_pack(packs[i], lengths)
    return packs


class MicroBatchCountError(ValueError):
    """A step's pairs cannot give every data-parallel rank a valid number of micro-batches."""


def deal_to_ranks(packs: list[list[int]], lengths: dict[int, int], dp_size: int, *,
                  micro_batch_multiple: int = 1,
                  min_micro_batches: int = 1) -> list[list[list[int]]]:
    """Largest pack first, each to the rank with the fewest tokens; every rank gets at least
    one pack (a multi-pair pack is split if there are fewer packs than ranks).

    With `micro_batch_multiple` / `min_micro_batches`, every rank's pack count is then made a
    multiple of the one, at least the other (see `_fit_counts`). The defaults leave the deal as
    it is."""
    per_rank = _deal(packs, lengths, dp_size)
    if micro_batch_multiple == 1 and min_micro_batches <= 1:
        return per_rank
    return _fit_counts(per_rank, lengths, dp_size, micro_batch_multiple, min_micro_batches)


def _fit_counts(per_rank: list[list[list[int]]], lengths: dict[int, int], dp_size: int,
                multiple: int, minimum: int) -> list[list[list[int]]]:
    """Make every rank's pack count valid without moving pairs between ranks where possible:
    each rank splits its own multi-pair packs up to the next valid count, so the token load of
    every rank stays that of the plain deal. If some rank holds fewer pairs than that count,
    the step's packs are split to the fewest valid total and dealt again, largest first to the
    rank with the fewest tokens among those still under their quota (quotas as even as the
    multiple allows). Raises `MicroBatchCountError` when the step has fewer pairs than that
    total (only merging packs could help, and no pack may grow past the budget)."""
    targets = [_next_valid(len(packs), multiple, minimum) for packs in per_rank]
    if all(t <= sum(map(len, packs)) for t, packs in zip(targets, per_rank)):
        return [split_to_count(packs, lengths, t) for packs, t in zip(per_rank, targets)]
    packs = [p for rank in per_rank for p in rank]
    pairs = sum(map(len, packs))
    floor = smallest_valid_count(multiple, minimum)
    total = max(dp_size * floor, -(-len(packs) // multiple) * multiple)
    if total > pairs:
        raise MicroBatchCountError(
            f"{pairs} pairs in {len(packs)} packs cannot give each of {dp_size} data-parallel "
            f"ranks a multiple of {multiple} micro-batches (at least {floor}): that needs "
            f"{total} packs, more than there are pairs")
    packs = split_to_count(packs, lengths, total)
    blocks = total // multiple
    quota = [multiple * (blocks // dp_size + (r < blocks % dp_size)) for r in range(dp_size)]
    size = [_tokens(p, lengths) for p in packs]
    heap = [(0, r) for r in range(dp_size)]
    out: list[list[list[int]]] = [[] for _ in range(dp_size)]
    for i in sorted(range(len(packs)), key=lambda i: (-size[i], min(packs[i]))):
        tokens, r = heapq.heappop(heap)
        out[r].append(packs[i])
        if len(out[r]) < quota[r]:
            heapq.heappush(heap, (tokens + size[i], r))
    return out


def _deal(packs: list[list[int]], lengths: dict[int, int],
          dp_size: int) -> list[list[list[int]]]:
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
                 dp_rank: int = 0, dp_size: int = 1, pad_id: int = 2, pad_multiple: int = 64,
                 micro_batch_multiple: int = 1, min_micro_batches: int = 1,
                 uniform_length_per_step: bool = False, shared_prefix: bool = False):
        """`shared_prefix`: pack each pair as its common prefix once and its two candidates
        (data/packing.py `PrefixItem`); the budget then counts those computed tokens.
        `micro_batch_multiple` / `min_micro_batches`: every rank's micro-batch count in every
        step is a multiple of the one and at least the other (the interleaved pipeline schedule:
        multiple = min = PP). `uniform_length_per_step`: all of a rank's packs in a step are
        padded to one length (the interleaved schedule needs it: it takes one `seq_length`
        per step). The defaults keep the plain deal and per-pack lengths."""
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
        if micro_batch_multiple < 1 or min_micro_batches < 1:
            raise ValueError("micro_batch_multiple and min_micro_batches must be >= 1")
        floor = smallest_valid_count(micro_batch_multiple, min_micro_batches)
        if global_batch_size < dp_size * floor:
            raise ValueError(
                f"global batch size {global_batch_size} is too small for the interleaved "
                f"pipeline schedule: each of DP={dp_size} data-parallel ranks must run a "
                f"multiple of {micro_batch_multiple} micro-batches (PP={micro_batch_multiple} "
                f"with virtual pipeline stages), at least {floor}, and a micro-batch holds at "
                f"least one pair, so a step needs at least {dp_size * floor} pairs. Raise "
                f"--global-batch-size to {dp_size * floor} or more, or lower the data- or "
                "pipeline-parallel size, or drop --num-layers-per-virtual-pipeline-stage")
        if pairs_per_micro_batch is not None:
            count = global_batch_size // (pairs_per_micro_batch * dp_size)
            if not valid_count(count, micro_batch_multiple, min_micro_batches):
                raise ValueError(
                    f"global batch size {global_batch_size} / (micro-batch size "
                    f"{pairs_per_micro_batch} x DP={dp_size}) = {count} micro-batches per rank; "
                    f"the interleaved pipeline schedule needs a multiple of "
                    f"{micro_batch_multiple} (PP={micro_batch_multiple}), at least {floor}. "
                    f"Make --global-batch-size a multiple of "
                    f"{pairs_per_micro_batch * dp_size * micro_batch_multiple}")
        self.micro_batch_multiple, self.min_micro_batches = micro_batch_multiple, min_micro_batches
        self.uniform_length_per_step = uniform_length_per_step
        self.shared_prefix = shared_prefix
        # Streams of pairs only (length-only streams of the benchmarks and tests) say nothing.
        self.lists = getattr(stream, "has_lists", False)
        if self.lists and not (shared_prefix and token_budget is not None):
            raise ValueError(
                "ranked-list datasets (built with --list-documents) train with shared-prefix "
                "packing under a token budget: use --shared-prefix and --micro-batch-tokens, "
                "or rebuild the dataset without --list-documents")
        self.stream, self.global_batch_size = stream, global_batch_size
        self.budget, self.pairs_per_mb = token_budget, pairs_per_micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.pad_id, self.pad_multiple = pad_id, pad_multiple
        self.position = 0  # next stream position
        self.skipped_oversize = 0
        self.steps = 0
        self.last_plan: Optional[StepPlan] = None

    # -- planning ----------------------------------------------------------------------------

    def _length(self, position: int) -> int:
        """What a pair costs in a pack: its tokens, or with shared prefixes its tokens less
        its common prefix once."""
        if self.shared_prefix:
            return self.stream.shared_prefix_length(position)
        return self.stream.length(position)

    def _take(self) -> dict[int, int]:
        """The next trainable documents holding `global_batch_size` pairs (a ranked list's
        pairs all count; the last list may take the step past it): position -> length."""
        taken: dict[int, int] = {}
        pairs = 0
        while pairs < self.global_batch_size:
            n = self._length(self.position)
            if self.budget is not None and n > self.budget:
                self.skipped_oversize += 1
                k = self.skipped_oversize
                if k <= 10 or (k & (k - 1)) == 0:  # the first ten, then at powers of two
                    log.warning("pair at stream position %d has %d tokens, more than the "
                                "micro-batch budget %d; skipped (%d so far)",
                                self.position, n, self.budget, k)
            else:
                taken[self.position] = n
                pairs += self.stream.pairs_at(self.position) if self.lists else 1
            self.position += 1
        return taken

    def plan_step(self) -> StepPlan:
        """Plan the next step for all ranks (every rank computes the same plan)."""
        lengths = self._take()
        if self.budget is not None:
            try:
                per_rank = deal_to_ranks(best_fit_decreasing(lengths, self.budget), lengths,
                                         self.dp_size,
                                         micro_batch_multiple=self.micro_batch_multiple,
                                         min_micro_batches=self.min_micro_batches)
            except MicroBatchCountError as e:
                raise MicroBatchCountError(
                    f"step {self.steps + 1} (stream positions {min(lengths)}..{max(lengths)}): "
                    f"{e}. Its pairs are long for the micro-batch budget of {self.budget} "
                    f"tokens: raise --global-batch-size (now {self.global_batch_size}) or "
                    f"--micro-batch-tokens, or lower the pipeline-parallel size "
                    f"(PP={self.micro_batch_multiple}) or data-parallel size "
                    f"(DP={self.dp_size})") from None
        else:
            order = sorted(lengths)
            per_rank_pairs = len(order) // self.dp_size
            per_rank = [[order[s: s + self.pairs_per_mb]
                         for s in range(r * per_rank_pairs, (r + 1) * per_rank_pairs,
                                        self.pairs_per_mb)]
                        for r in range(self.dp_size)]
        self.steps += 1
        computed = sum(lengths.values())
        tokens = sum(map(self.stream.length, lengths)) if self.shared_prefix else computed
        pairs = sum(map(self.stream.pairs_at, lengths)) if self.lists else len(lengths)
        self.last_plan = StepPlan(per_rank, tokens=tokens, pairs=pairs, computed=computed)
        return self.last_plan

    def next_step_positions(self) -> list[list[int]]:
        """This rank's packs of the next step, as stream positions."""
        return self.plan_step().per_rank[self.dp_rank]

    def next_step(self) -> list[PackedMicroBatch]:
        """This rank's micro-batches of the next step, each padded to its own multiple of
        `pad_multiple`; with `uniform_length_per_step`, all padded to the longest of them
        rounded up to `pad_multiple`. Every rank of one pipeline-parallel group has the same
        data-parallel rank, hence the same packs and the same length."""
        packs = self.next_step_positions()
        if self.shared_prefix:  # a pair or a ranked list: one item, every ordered pair
            pairs = [[self.stream.prefix_item(p) for p in positions] for positions in packs]
            totals = [sum(item.computed_length for item in pack) for pack in pairs]
            build = build_shared_micro_batch
        else:
            pairs = [[self.stream.pair(p) for p in positions] for positions in packs]
            totals = [sum(len(a) + len(b) for a, b in pack) for pack in pairs]
            build = build_packed_micro_batch
        if self.uniform_length_per_step:
            totals = [max(totals)] * len(totals)
        return [build(pack, -(-total // self.pad_multiple) * self.pad_multiple, self.pad_id,
                      tuple(positions))
                for pack, total, positions in zip(pairs, totals, packs)]

    # -- checkpointing -------------------------------------------------------------------------

    def _settings(self) -> dict:
        return {"global_batch_size": self.global_batch_size, "token_budget": self.budget,
                "pairs_per_micro_batch": self.pairs_per_mb}

    def state_dict(self) -> dict:
        # shared_prefix is recorded, not enforced: it changes how a step's pairs are packed,
        # not which pairs it takes (except pairs only a shared-prefix pack fits in the budget).
        return {"position": self.position, "skipped_oversize": self.skipped_oversize,
                "steps": self.steps, "shared_prefix": self.shared_prefix, **self._settings()}

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
