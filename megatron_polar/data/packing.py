"""Pack POLAR pairs into micro-batches under a token budget.

A pair is the two sequences of one triplet, s+ = (p, ref, pos) and s- = (p, ref, neg); the two
always travel together, s+ first. A pack concatenates whole pairs ("THD" layout, batch of one):
position ids restart at 0 for every sequence, `cu_seqlens` marks sequence boundaries so
attention never crosses them, and padding (if any) sits only at the end of the pack.

Shared-prefix packs (`PrefixItem`, `build_shared_micro_batch`) hold items instead: the
sequences' longest common prefix once, then each sequence's remainder (its candidate), whose
positions continue from the prefix (model/shared_prefix.py describes the attention). An item
is a pair (two candidates, one ordered pair) or a ranked list (K candidates, best first,
every ordered pair); its reward tokens are the candidates' last tokens, as before.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_polar.model.shared_prefix import shared_prefix_params

Pair = tuple[Sequence[int], Sequence[int]]  # (token ids of s+, token ids of s-)


def common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """The longest common prefix of `seqs` that leaves every one at least one token of its
    own (its reward token is then its own last token)."""
    shortest = min(len(s) for s in seqs)
    if shortest == 0:
        raise ValueError("empty sequence")
    first = np.asarray(seqs[0][: shortest - 1])
    n = len(first)
    for other in seqs[1:]:
        differ = np.flatnonzero(first[:n] != np.asarray(other[:n]))
        n = int(differ[0]) if differ.size else n
    return n


@dataclass(frozen=True)
class PrefixItem:
    """A shared-prefix item: `prefix`, then `candidates` that each continue it, and the
    ordered pairs (better, worse) of candidate indices the objective compares."""

    prefix: Sequence[int]
    candidates: tuple[Sequence[int], ...]
    pairs: tuple[tuple[int, int], ...]

    @classmethod
    def from_sequences(cls, seqs: Sequence[Sequence[int]], pairs: Sequence[tuple[int, int]],
                       prefix_length: Optional[int] = None) -> "PrefixItem":
        """`prefix_length`: `common_prefix_length(seqs)` when the caller knows it already."""
        n = common_prefix_length(seqs) if prefix_length is None else prefix_length
        return cls(list(seqs[0][:n]), tuple(list(s[n:]) for s in seqs), tuple(pairs))

    @classmethod
    def from_pair(cls, pair: Pair) -> "PrefixItem":
        """The item of one pre-training pair (s+, s-): one ordered pair."""
        return cls.from_sequences(pair, [(0, 1)])

    @classmethod
    def from_ranking(cls, seqs: Sequence[Sequence[int]],
                     prefix_length: Optional[int] = None) -> "PrefixItem":
        """The item of a ranked list (sequences best first): every pair i < j, as the
        triplet expansion of the list orders them."""
        k = len(seqs)
        return cls.from_sequences(seqs, [(i, j) for i in range(k) for j in range(i + 1, k)],
                                  prefix_length)

    @property
    def computed_length(self) -> int:
        """Tokens the model computes for the item: the prefix once."""
        return len(self.prefix) + sum(len(c) for c in self.candidates)

    @property
    def sequence_length(self) -> int:
        """Tokens of its sequences in full (what a plain pack computes)."""
        return len(self.candidates) * len(self.prefix) + sum(len(c) for c in self.candidates)


@dataclass
class PackedMicroBatch:
    """One micro-batch of packed pairs. Plain packs order their sequences s+_0, s-_0, s+_1,
    s-_1, ...; shared-prefix packs (`items` set) hold items, whose segments `cu_seqlens`
    marks: each item's prefix (when not empty), then its candidates."""

    tokens: torch.Tensor  # [1, T] int64
    position_ids: torch.Tensor  # [1, T] int64
    cu_seqlens: torch.Tensor  # [segments + 1] int32, real tokens only
    num_pairs: int
    max_seqlen: int
    pair_ids: tuple[int, ...] = ()  # which input pairs (items) this pack holds, in order
    # Shared-prefix packs only: (prefix length, candidate lengths) per item, the reward
    # positions' indices (better, worse) of every ordered pair, and the full sequences' tokens.
    items: Optional[tuple[tuple[int, tuple[int, ...]], ...]] = None
    pair_index: Optional[torch.Tensor] = None  # [num_pairs, 2] int64
    sequence_tokens: Optional[int] = None

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens the model computes."""
        return int(self.cu_seqlens[-1])

    @property
    def num_sequence_tokens(self) -> int:
        """Tokens of the pack's sequences in full (each with its prefix): the pairs' size."""
        return self.num_tokens if self.sequence_tokens is None else self.sequence_tokens

    @property
    def reward_positions(self) -> torch.Tensor:
        """[sequences, 2] (row, position) of each sequence's last token (the reward token):
        every sequence of a plain pack, every candidate of a shared-prefix pack."""
        ends = self.cu_seqlens[1:].long() - 1
        if self.items is not None:
            candidate = torch.tensor([not (prefix and k == 0) for prefix, cands in self.items
                                      for k in range(len(cands) + (1 if prefix else 0))])
            ends = ends[candidate]
        return torch.stack([torch.zeros_like(ends), ends], dim=1)

    def attention_segments(self) -> tuple[list[int], list[int]]:
        """(length, keys before it) of every segment: the sequences of a plain pack (0 keys
        before); a shared-prefix pack's prefixes (0) and candidates (their prefix's length).
        What `training_flops` counts."""
        lengths = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()
        if self.items is None:
            return lengths, [0] * len(lengths)
        before = [p for p, cands in self.items for p in ([0] if p else []) + [p] * len(cands)]
        return lengths, before

    def packed_seq_params(self) -> PackedSeqParams:
        total = self.tokens.shape[1]
        padded = self.cu_seqlens.clone()
        padded[-1] = total  # end padding belongs to the last sequence's padded extent
        # RoPE tables are built for max_seqlen and sliced per padded sequence, so it must cover
        # the padded last sequence too (an upper bound is all attention kernels need).
        longest = max(self.max_seqlen, int(total - self.cu_seqlens[-2]))
        return PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=self.cu_seqlens, cu_seqlens_kv=self.cu_seqlens,
            cu_seqlens_q_padded=padded, cu_seqlens_kv_padded=padded,
            max_seqlen_q=longest, max_seqlen_kv=longest,
        )

    def model_inputs(self, device) -> tuple[torch.Tensor, torch.Tensor, PackedSeqParams]:
        """(tokens, position_ids, packed_seq_params) on `device`: each tensor copied once, and
        everything that needs a value (the padded extent, max_seqlen) read on the host first,
        so the step has no device-to-host sync."""
        if self.items is not None:
            return (self.tokens.to(device, non_blocking=True),
                    self.position_ids.to(device, non_blocking=True),
                    shared_prefix_params(self.items, self.tokens.shape[1], device))
        params = self.packed_seq_params()
        cu = params.cu_seqlens_q.to(device, non_blocking=True)
        padded = params.cu_seqlens_q_padded.to(device, non_blocking=True)
        return (self.tokens.to(device, non_blocking=True),
                self.position_ids.to(device, non_blocking=True),
                PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                cu_seqlens_q_padded=padded, cu_seqlens_kv_padded=padded,
                                max_seqlen_q=params.max_seqlen_q,
                                max_seqlen_kv=params.max_seqlen_kv))


def pair_length(pair: Pair) -> int:
    return len(pair[0]) + len(pair[1])


def best_fit_decreasing(lengths: Mapping[int, int] | Sequence[int], budget: int) -> list[list[int]]:
    """Pack items into bins of capacity `budget`: longest first (ties by key), each into the
    fullest bin that still has room. `lengths` maps keys to lengths (a sequence: index ->
    length). Returns the keys of each bin in the order they went in. An item longer than the
    budget is an error."""
    if not isinstance(lengths, Mapping):
        lengths = dict(enumerate(lengths))
    bins: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for key in sorted(lengths, key=lambda k: (-lengths[k], k)):
        n = lengths[key]
        if n > budget:
            raise ValueError(f"pair {key} has {n} tokens, more than the micro-batch budget {budget}")
        i = bisect.bisect_left(rooms, (n, -1))
        if i < len(rooms):
            room, b = rooms.pop(i)
            bins[b].append(key)
            bisect.insort(rooms, (room - n, b))
        else:
            bins.append([key])
            bisect.insort(rooms, (budget - n, len(bins) - 1))
    return bins


def build_packed_micro_batch(pairs: Sequence[Pair], pad_to: int, pad_id: int,
                             pair_ids: Sequence[int] = ()) -> PackedMicroBatch:
    """Concatenate whole pairs into one [1, pad_to] pack, padding at the end with `pad_id`."""
    seqs = [seq for pair in pairs for seq in pair]
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    if (lengths == 0).any():
        raise ValueError("empty sequence in a pair")
    total = int(lengths.sum())
    if total > pad_to:
        raise ValueError(f"pack of {total} tokens does not fit pad_to={pad_to}")
    tokens = np.full(pad_to, pad_id, dtype=np.int64)
    tokens[:total] = np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs])
    starts = np.concatenate([[0], np.cumsum(lengths)])
    positions = np.zeros(pad_to, dtype=np.int64)
    positions[:total] = np.arange(total) - np.repeat(starts[:-1], lengths)
    return PackedMicroBatch(
        tokens=torch.from_numpy(tokens)[None],
        position_ids=torch.from_numpy(positions)[None],
        cu_seqlens=torch.from_numpy(starts.astype(np.int32)),
        num_pairs=len(pairs),
        max_seqlen=int(lengths.max()),
        pair_ids=tuple(pair_ids),
    )


def build_shared_micro_batch(items: Sequence[PrefixItem], pad_to: int, pad_id: int,
                             item_ids: Sequence[int] = ()) -> PackedMicroBatch:
    """Lay `items` out one after another (prefix, then candidates, positions continuing from
    the prefix) in one [1, pad_to] pack, padding at the end with `pad_id`."""
    tokens = np.full(pad_to, pad_id, dtype=np.int64)
    positions = np.zeros(pad_to, dtype=np.int64)
    bounds, layout, pairs, at, offset = [0], [], [], 0, 0
    for item in items:
        p = len(item.prefix)
        parts = ([item.prefix] if p else []) + list(item.candidates)
        starts = ([0] if p else []) + [p] * len(item.candidates)
        for part, start in zip(parts, starts):
            n = len(part)
            if n == 0:
                raise ValueError("empty candidate in an item")
            if at + n > pad_to:
                raise ValueError(f"items of more than {pad_to} tokens do not fit pad_to={pad_to}")
            tokens[at: at + n] = part
            positions[at: at + n] = np.arange(start, start + n)
            at += n
            bounds.append(at)
        layout.append((p, tuple(len(c) for c in item.candidates)))
        pairs += [(offset + i, offset + j) for i, j in item.pairs]
        offset += len(item.candidates)
    lengths = np.diff(bounds)
    return PackedMicroBatch(
        tokens=torch.from_numpy(tokens)[None],
        position_ids=torch.from_numpy(positions)[None],
        cu_seqlens=torch.tensor(bounds, dtype=torch.int32),
        num_pairs=len(pairs),
        max_seqlen=int(lengths.max()),
        pair_ids=tuple(item_ids),
        items=tuple(layout),
        pair_index=torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2),
        sequence_tokens=sum(item.sequence_length for item in items),
    )


def prefix_groups(sequences: Sequence[Sequence[int]], token_budget: int,
                  min_prefix: int = 16) -> list[list[int]]:
    """Indices of `sequences` grouped to share a common prefix of at least `min_prefix`
    tokens (several responses to one prompt and reference, as scoring and serving see them),
    each group's computed tokens (prefix once) within `token_budget`; the others alone.
    Sorting brings sequences with common prefixes together, and a sorted run's common prefix
    is the least of its neighbours'."""
    order = sorted(range(len(sequences)), key=lambda i: list(sequences[i]))
    groups: list[list[int]] = []
    common = shortest = total = 0
    for i in order:
        seq = sequences[i]
        if groups:
            group = groups[-1]
            # common_prefix_length leaves the two one token each; the group's shortest too
            shared = min(common, common_prefix_length([sequences[group[-1]], seq]),
                         shortest - 1)
            # tokens computed: every member in full, less the prefix for all but one
            cost = total + len(seq) - shared * len(group)
            if shared >= min_prefix and cost <= token_budget:
                group.append(i)
                common, shortest, total = shared, min(shortest, len(seq)), total + len(seq)
                continue
        groups.append([i])
        common, shortest, total = len(seq), len(seq), len(seq)
    return groups


def _bins_of_one_length(lengths: Sequence[int], token_budget: int,
                        pad_multiple: int) -> tuple[list[list[int]], int]:
    """Best-fit decreasing bins of `lengths` (indices in input order within a bin, so the
    layout does not depend on sort ties) and the one length every pack is padded to: the
    longest bin rounded up to `pad_multiple`, at most the budget."""
    bins = [sorted(b) for b in best_fit_decreasing(lengths, token_budget)]
    longest = max(sum(lengths[i] for i in b) for b in bins)
    return bins, max(longest, min(token_budget, -(-longest // pad_multiple) * pad_multiple))


def pack_items(items: Sequence[PrefixItem], token_budget: int, pad_id: int,
               pad_multiple: int = 16) -> list[PackedMicroBatch]:
    """`pack_pairs` for shared-prefix items: best-fit decreasing on computed tokens."""
    if not items:
        return []
    bins, pad_to = _bins_of_one_length([item.computed_length for item in items], token_budget,
                                       pad_multiple)
    return [build_shared_micro_batch([items[i] for i in b], pad_to, pad_id, item_ids=b)
            for b in bins]


def pack_sequences(sequences: Sequence[Sequence[int]], token_budget: int, pad_id: int,
                   pad_multiple: int = 16) -> list[tuple[PackedMicroBatch, list[int]]]:
    """Whole sequences (to score, or a critic's rows) as shared-prefix packs: those sharing a
    prefix grouped into one item (`prefix_groups`), the items packed (`pack_items`). Returns
    each pack with the indices of its sequences in the order of its reward positions (the
    candidates of its items, item after item)."""
    groups = prefix_groups(sequences, token_budget)
    items = [PrefixItem.from_sequences([sequences[i] for i in g], ()) for g in groups]
    return [(pack, [i for item_id in pack.pair_ids for i in groups[item_id]])
            for pack in pack_items(items, token_budget, pad_id, pad_multiple)]


def pack_pairs(pairs: Sequence[Pair], token_budget: int, pad_id: int,
               pad_multiple: int = 16) -> list[PackedMicroBatch]:
    """Pack `pairs` into as few micro-batches of at most `token_budget` tokens as best-fit
    decreasing finds. All packs share one length (the longest pack rounded up to `pad_multiple`,
    at most the budget) so pipeline stages exchange tensors of a fixed shape."""
    if not pairs:
        return []
    bins, pad_to = _bins_of_one_length([pair_length(p) for p in pairs], token_budget,
                                       pad_multiple)
    return [build_packed_micro_batch([pairs[i] for i in b], pad_to, pad_id, pair_ids=b)
            for b in bins]


@dataclass
class PaddedBatch:
    """Unpacked sequences, one per row, right-padded: the layout for plain scoring."""

    tokens: torch.Tensor  # [b, S]
    position_ids: torch.Tensor  # [b, S]
    lengths: torch.Tensor  # [b]

    @property
    def reward_positions(self) -> torch.Tensor:
        rows = torch.arange(len(self.lengths))
        return torch.stack([rows, self.lengths.long() - 1], dim=1)


def build_padded_batch(seqs: Sequence[Sequence[int]], pad_id: int,
                       pad_multiple: int = 16) -> PaddedBatch:
    lengths = [len(s) for s in seqs]
    if not seqs or min(lengths) == 0:
        raise ValueError("need at least one non-empty sequence")
    width = -(-max(lengths) // pad_multiple) * pad_multiple
    tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    positions = torch.arange(width).expand(len(seqs), width).contiguous()
    return PaddedBatch(tokens, positions, torch.tensor(lengths))
