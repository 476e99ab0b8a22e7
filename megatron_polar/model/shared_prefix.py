"""Shared-prefix packs: one common prefix computed once, then the candidates that extend it.

The two sequences of a POLAR pair (and the sequences of a ranked list) begin with the same
tokens, `[BOS] prompt "\\n" reference <|reward|> prompt "\\n"`, and differ only in the
candidate. With causal attention a candidate's reward depends only on that prefix and on
itself, so a pack can hold an *item* as `prefix, cand_1, ..., cand_n` and compute the prefix
once. This module describes such a pack to the model:

- Segments, in pack order: an item's prefix (left out when empty), then each candidate.
  Megatron's own fields of `PackedSeqParams` (`cu_seqlens_q`/`_kv`, their `_padded` forms,
  `max_seqlen_*`) describe these segments exactly as they describe the sequences of a plain
  pack, so everything megatron does per segment (RoPE's split of the pack, sequence
  parallelism) works unchanged.
- Attention: a prefix segment attends to itself causally; a candidate attends to its item's
  prefix and, causally, to itself, never to another candidate. Written as varlen attention,
  the queries are the pack's segments and each segment's keys/values are gathered
  (`kv_index`: the prefix's positions, then the segment's own), with the causal mask aligned
  to the bottom right (`cu_seqlens_kv_gathered` marks the gathered segments).
- Positions: a candidate's RoPE positions continue from the end of its prefix (the pack's
  `position_ids`); `PolarRewardModel` turns them into per-token rotary frequencies.

`SharedPrefixParams` is a `PackedSeqParams` (megatron passes it through unchanged) with these
extra fields; `PackedCoreAttention` (and the TE attention of the TE spec) read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from megatron.core.packed_seq_params import PackedSeqParams

# End padding (positions from the last real token to the pack's end) is cut into chunks of
# this many positions, each attending only to itself (as in plain packs, model/attention.py).
PAD_CHUNK = 128


@dataclass(frozen=True)
class Segment:
    """One segment of a shared-prefix pack: query positions [start, end); it also attends to
    keys [prefix_start, prefix_end) (empty for a prefix segment or an item without prefix)."""

    start: int
    end: int
    prefix_start: int
    prefix_end: int
    item: int  # which item of the pack
    is_prefix: bool  # the item's prefix (it attends only to itself)

    @property
    def kv_length(self) -> int:
        return (self.prefix_end - self.prefix_start) + (self.end - self.start)


def segments_of(items: Sequence[tuple[int, Sequence[int]]]) -> list[Segment]:
    """The segments of items (prefix length, candidate lengths) laid out one after another."""
    out, at = [], 0
    for i, (prefix, candidates) in enumerate(items):
        if prefix < 0 or not candidates:
            raise ValueError(f"item {i}: needs a prefix length >= 0 and at least one candidate")
        if prefix:
            out.append(Segment(at, at + prefix, at, at, i, True))
        p0, p1 = at, at + prefix
        at += prefix
        for c in candidates:
            if c <= 0:
                raise ValueError(f"item {i}: a candidate needs at least one token")
            out.append(Segment(at, at + c, p0, p1, i, False))
            at += c
    return out


@dataclass
class SharedPrefixParams(PackedSeqParams):
    """`PackedSeqParams` of a shared-prefix pack (see the module docstring). The inherited
    fields describe the pack's segments; the extra ones say what each segment attends to."""

    segments: tuple = ()  # host-side `Segment`s, for the per-segment CPU path
    kv_index: Optional[torch.Tensor] = None  # [T_kv] int64 pack positions of gathered keys
    cu_seqlens_kv_gathered: Optional[torch.Tensor] = None  # [S + 1] int32
    max_seqlen_kv_gathered: int = 0
    # Per pack position (end padding included): the item's id, the segment's id, and whether
    # it is a prefix token; padding chunks get ids of their own. For block-mask attention.
    token_item: Optional[torch.Tensor] = None
    token_segment: Optional[torch.Tensor] = None
    token_is_prefix: Optional[torch.Tensor] = None

    @property
    def max_position(self) -> int:
        """The largest position id + 1 (RoPE's reach): a segment's gathered keys run from
        position 0 (its prefix's first token) to its own last token."""
        return self.max_seqlen_kv_gathered


def shared_prefix_params(items: Sequence[tuple[int, Sequence[int]]], total: int,
                         device=None) -> SharedPrefixParams:
    """`SharedPrefixParams` of `items` (prefix length, candidate lengths) packed into `total`
    positions (real tokens first, end padding after). Built on the host, each tensor copied
    to `device` once."""
    segs = segments_of(items)
    real = segs[-1].end if segs else 0
    if real > total:
        raise ValueError(f"{real} tokens do not fit a pack of {total}")
    bounds = [0] + [s.end for s in segs]
    cu = torch.tensor(bounds, dtype=torch.int32)
    padded = cu.clone()
    padded[-1] = total
    kv_index, kv_bounds = [], [0]
    for s in segs:
        kv_index.extend(range(s.prefix_start, s.prefix_end))
        kv_index.extend(range(s.start, s.end))
        kv_bounds.append(len(kv_index))
    item = torch.empty(total, dtype=torch.int64)
    segment = torch.empty(total, dtype=torch.int64)
    is_prefix = torch.zeros(total, dtype=torch.bool)
    for k, s in enumerate(segs):
        item[s.start:s.end], segment[s.start:s.end] = s.item, k
        is_prefix[s.start:s.end] = s.is_prefix
    chunk = torch.arange(total - real) // PAD_CHUNK
    item[real:] = len(items) + chunk
    segment[real:] = len(segs) + chunk
    longest = max([b - a for a, b in zip(bounds[:-1], bounds[1:])] + [total - bounds[-2]])
    move = (lambda t: t.to(device, non_blocking=True)) if device is not None else (lambda t: t)
    cu_d, padded_d = move(cu), move(padded)
    return SharedPrefixParams(
        qkv_format="thd", cu_seqlens_q=cu_d, cu_seqlens_kv=cu_d,
        cu_seqlens_q_padded=padded_d, cu_seqlens_kv_padded=padded_d,
        max_seqlen_q=longest, max_seqlen_kv=longest,
        segments=tuple(segs),
        kv_index=move(torch.tensor(kv_index, dtype=torch.int64)),
        cu_seqlens_kv_gathered=move(torch.tensor(kv_bounds, dtype=torch.int32)),
        # padding sits at position 0; a pack without segments (none is built) reaches 1
        max_seqlen_kv_gathered=max([s.kv_length for s in segs], default=1),
        token_item=move(item), token_segment=move(segment), token_is_prefix=move(is_prefix),
    )
