"""Pack POLAR pairs into micro-batches under a token budget.

A pair is the two sequences of one triplet, s+ = (p, ref, pos) and s- = (p, ref, neg); the two
always travel together, s+ first. A pack concatenates whole pairs ("THD" layout, batch of one):
position ids restart at 0 for every sequence, `cu_seqlens` marks sequence boundaries so
attention never crosses them, and padding (if any) sits only at the end of the pack.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from megatron.core.packed_seq_params import PackedSeqParams

Pair = tuple[Sequence[int], Sequence[int]]  # (token ids of s+, token ids of s-)


@dataclass
class PackedMicroBatch:
    """One micro-batch of packed pairs. Sequences are ordered s+_0, s-_0, s+_1, s-_1, ..."""

    tokens: torch.Tensor  # [1, T] int64
    position_ids: torch.Tensor  # [1, T] int64
    cu_seqlens: torch.Tensor  # [2 * num_pairs + 1] int32, real tokens only
    num_pairs: int
    max_seqlen: int
    pair_ids: tuple[int, ...] = ()  # which input pairs this pack holds, in order

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int(self.cu_seqlens[-1])

    @property
    def reward_positions(self) -> torch.Tensor:
        """[2 * num_pairs, 2] (row, position) of each sequence's last token (the reward token)."""
        ends = self.cu_seqlens[1:].long() - 1
        return torch.stack([torch.zeros_like(ends), ends], dim=1)

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


def pack_pairs(pairs: Sequence[Pair], token_budget: int, pad_id: int,
               pad_multiple: int = 16) -> list[PackedMicroBatch]:
    """Pack `pairs` into as few micro-batches of at most `token_budget` tokens as best-fit
    decreasing finds. All packs share one length (the longest pack rounded up to `pad_multiple`,
    at most the budget) so pipeline stages exchange tensors of a fixed shape."""
    if not pairs:
        return []
    # Indices in input order within a pack, so the layout does not depend on sort ties.
    bins = [sorted(b) for b in best_fit_decreasing([pair_length(p) for p in pairs], token_budget)]
    longest = max(sum(pair_length(pairs[i]) for i in b) for b in bins)
    pad_to = min(token_budget, -(-longest // pad_multiple) * pad_multiple)
    pad_to = max(pad_to, longest)
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
