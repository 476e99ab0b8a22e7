"""Core attention for the local (non-Transformer-Engine) layer spec, with packed sequences.

megatron-core's local `DotProductAttention` rejects `PackedSeqParams`, so without TE packed
pairs could not restart their RoPE positions. This module is a drop-in `core_attention`
submodule (same constructor and forward signature) that accepts both layouts megatron's
`SelfAttention` hands it:

- "sbhd": q [s, b, np, hn], k/v [s, b, ng, hn]; causal, optionally with an extra mask.
- "thd" (packed): q [t, np, hn], k/v [t, ng, hn] with `cu_seqlens_q`; attention is causal
  *inside* each sequence and never crosses sequences: an explicit block-diagonal causal mask.

On CPU it computes exactly the diagonal blocks of that mask: one causal
`scaled_dot_product_attention` per sequence (O(sum of L^2), not O(T^2)); `block_causal_mask`
is the dense form, used by the tests to check it. On CUDA it uses a compiled `flex_attention`
with a document block mask, which skips the masked blocks instead of computing them; pack
lengths are padded to a few bucket lengths so that only a bounded number of kernels compile,
and the block mask is built once per micro-batch, not once per layer.
End padding (positions from `cu_seqlens[-1]`) never attends to or from real tokens; it attends
causally within its own 128-position chunk, so it costs linear, not quadratic, work.
RoPE (applied by `SelfAttention` before this module) restarts per sequence via `cu_seqlens`.
"""

from __future__ import annotations

import inspect
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from megatron_polar.model.shared_prefix import PAD_CHUNK, SharedPrefixParams


# Flex attention's block size. End padding is also cut into chunks of this size: one chunk
# attends only to itself, so padding (pack padding, and the bucket padding of the flex path)
# costs one diagonal block per chunk instead of a quadratic block of its own.
_FLEX_BLOCK = PAD_CHUNK


def document_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Document id of every packed position: its sequence index for real tokens; end padding
    (positions from cu_seqlens[-1]) gets one id per 128-position chunk, numbered after the last
    sequence's, so padding never shares an id with a real token. Ids never decrease along the
    pack (the flex block mask relies on it). No host sync: only cu_seqlens' shape is read."""
    positions = torch.arange(total, device=cu_seqlens.device)
    doc = torch.searchsorted(cu_seqlens[1:].to(positions.dtype), positions, right=True)
    pad = (cu_seqlens.numel() - 1) + positions // _FLEX_BLOCK
    return torch.where(positions < cu_seqlens[-1], doc, pad)


def block_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[total, total] bool, True where query i may attend key j (same document, j <= i).
    End padding forms causal blocks of its own (one per 128-position chunk, see
    `document_ids`), so every row has a finite softmax."""
    doc = document_ids(cu_seqlens, total)
    idx = torch.arange(total, device=cu_seqlens.device)
    return (doc[:, None] == doc[None, :]) & (idx[None, :] <= idx[:, None])


class PackedCoreAttention(MegatronModule):
    """`core_attention` for the local spec: causal attention, packed (THD) or padded (SBHD)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism needs Transformer Engine attention")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"PackedCoreAttention is causal only, got {attn_mask_type}")
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp_size = pg_collection.tp.size()
        self.heads = divide(config.num_attention_heads, tp_size)
        self.groups = divide(config.num_query_groups or config.num_attention_heads, tp_size)
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def _sdpa(self, q, k, v, mask, is_causal):
        # q [b, np, s, hn], k/v [b, ng, s, hn]
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            scale=self.softmax_scale, enable_gqa=self.heads != self.groups,
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported")
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            return self._forward_packed(query, key, value, packed_seq_params)
        # [s, b, n, hn] -> [b, n, s, hn]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        if attention_mask is not None:
            # megatron masks are True where attention is *forbidden*; SDPA wants the opposite.
            s = q.shape[2]
            causal = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
            out = self._sdpa(q, k, v, causal & ~attention_mask, is_causal=False)
        else:
            out = self._sdpa(q, k, v, None, is_causal=True)
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)

    def _forward_packed(self, query, key, value, params: PackedSeqParams) -> torch.Tensor:
        total = query.shape[0]
        if isinstance(params, SharedPrefixParams):
            return self._forward_shared_prefix(query, key, value, params)
        cu = params.cu_seqlens_q
        # [t, n, hn] -> [1, n, t, hn]
        q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (query, key, value))
        if q.is_cuda or FORCE_FLEX:
            out = flex_document_attention(q, k, v, cu, self.softmax_scale,
                                           self.heads != self.groups, compile=q.is_cuda)
            return out.squeeze(0).transpose(0, 1).reshape(total, -1)
        bounds = cu.tolist()
        # End padding: causal blocks of its own, cut at multiples of 128 as `document_ids` does.
        bounds += range((bounds[-1] // _FLEX_BLOCK + 1) * _FLEX_BLOCK, total, _FLEX_BLOCK)
        if bounds[-1] < total:
            bounds.append(total)
        lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        blocks = [self._sdpa(qi, ki, vi, None, is_causal=True)
                  for qi, ki, vi in zip(*(x.split(lengths, dim=2) for x in (q, k, v)))]
        out = torch.cat(blocks, dim=2)
        return out.squeeze(0).transpose(0, 1).reshape(total, -1)


    def _forward_shared_prefix(self, query, key, value, params: SharedPrefixParams):
        """A shared-prefix pack (model/shared_prefix.py): each segment's queries attend to
        its item's prefix and, causally, to its own keys. On CPU one SDPA call per segment
        over [prefix; segment] keys, with a bottom-right causal mask or, where cheaper, as
        one causal call with the prefix's queries in front (`_MASKED_SCORE_COST`); on CUDA
        one flex attention call with a block mask over the pack (no gathered copies)."""
        total = query.shape[0]
        q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (query, key, value))
        if q.is_cuda or FORCE_FLEX:
            out = flex_shared_prefix_attention(q, k, v, params, self.softmax_scale,
                                               self.heads != self.groups, compile=q.is_cuda)
            return out.squeeze(0).transpose(0, 1).reshape(total, -1)
        q_lengths, kv_lengths, kv_index = _segment_layout(params, total)
        # One split of q and one gather + split of k/v: their backward is one op each (a
        # slice per segment would cost a full-size zero gradient per slice).
        qs = q.split(q_lengths, dim=2)
        ks, vs = (x.index_select(2, kv_index).split(kv_lengths, dim=2) for x in (k, v))
        segs = params.segments
        blocks: list = [None] * len(qs)
        prefix_of = {seg.item: i for i, seg in enumerate(segs) if seg.is_prefix}
        for i, (qi, ki, vi) in enumerate(zip(qs, ks, vs)):
            n, m = qi.shape[2], ki.shape[2]
            if i < len(segs) and segs[i].is_prefix:
                continue  # below: from a candidate's call, or on its own
            if n == m:  # an item without prefix, end padding: plain causal
                blocks[i] = self._sdpa(qi, ki, vi, None, is_causal=True)
            elif (m - n) < _MASKED_SCORE_COST * 2 * n - n:
                # Cheaper as one causal call over [prefix; candidate] with the prefix's own
                # queries in front (the kernel skips the causal future; a mask would not):
                # its last n rows are the candidate's, its first rows the prefix's.
                p = prefix_of[segs[i].item]
                out = self._sdpa(torch.cat([qs[p], qi], dim=2), ki, vi, None, is_causal=True)
                blocks[i] = out[:, :, m - n:]
                if blocks[p] is None:
                    blocks[p] = out[:, :, :m - n]
            else:  # bottom-right causal mask: query j sees the prefix and its keys 0..j
                rows = torch.arange(n, device=q.device)[:, None] + (m - n)
                mask = torch.arange(m, device=q.device)[None, :] <= rows
                blocks[i] = self._sdpa(qi, ki, vi, mask, is_causal=False)
        for i, seg in enumerate(segs):
            if seg.is_prefix and blocks[i] is None:
                blocks[i] = self._sdpa(qs[i], ks[i], vs[i], None, is_causal=True)
        out = torch.cat(blocks, dim=2)
        return out.squeeze(0).transpose(0, 1).reshape(total, -1)


# The CPU SDPA kernel (torch 2.13, flash attention for CPU) costs about 1.5x as much per
# score with an explicit mask as with is_causal (measured: a 2000 x 5000 masked block vs a
# 5000-token causal one, forward and backward), and skips nothing under a mask. A candidate of
# n queries after P prefix keys then costs ~1.5 n (P + n) masked, or (P + n)^2 / 2 as a causal
# call over [prefix; candidate] that recomputes the prefix's rows; the cheaper one is taken
# (causal when P < 2n, the pre-training mix's long candidates; masked for short candidates
# after a long prefix, ranked lists).
_MASKED_SCORE_COST = 1.5


def _segment_layout(params: SharedPrefixParams, total: int):
    """(query lengths, key lengths, key gather index) of a shared-prefix pack's segments, end
    padding appended as 128-position chunks of its own; cached on the params (megatron hands
    every layer the same object)."""
    cached = params.__dict__.get("_cpu_layout")
    if cached is not None and cached[0] == total:
        return cached[1]
    real = params.segments[-1].end if params.segments else 0
    pad = [min(PAD_CHUNK, total - a) for a in range(real, total, PAD_CHUNK)]
    q_lengths = [s.end - s.start for s in params.segments] + pad
    kv_lengths = [s.kv_length for s in params.segments] + pad
    index = params.kv_index
    if pad:
        index = torch.cat([index, torch.arange(real, total, device=index.device,
                                               dtype=index.dtype)])
    layout = (q_lengths, kv_lengths, index)
    params.__dict__["_cpu_layout"] = (total, layout)
    return layout


# Tests set this to take the flex path on CPU too (flex's eager reference, not compiled).
FORCE_FLEX = False


def flex_bucket(total: int) -> int:
    """The padded length the flex path runs `total` packed positions at: the smallest
    128 * {1, 2, 3, 4, 6, 8, 12, 16, 24, ...} (2^k and 3 * 2^(k-1) blocks) that holds them.

    `flex_attention` is compiled with static shapes (its seq length is baked into the kernel),
    so every distinct length is one more compilation (tens of seconds each, fwd and bwd), and
    past the recompile limit torch falls back to the eager reference, which materialises T x T
    scores. Two buckets per octave bound the variants by 2 * log2(T / 128) + 1 (17 up to 32k
    tokens; in practice packs cluster just under the micro-batch budget and use one or two)
    while padding by less than half the pack or one 128-block (powers of two: up to 100%).
    The padding costs little compute (one diagonal block per 128 positions, see
    `document_ids`), but the padded q/k/v/out are copies kept for backward, so it is paid in
    attention activation memory; a finer geometric set would trade that for more compiles."""
    blocks = max(1, -(-total // _FLEX_BLOCK))
    octave = 1 << (blocks - 1).bit_length()  # smallest power of two >= blocks
    if octave >= 4 and blocks <= 3 * octave // 4:
        return 3 * octave // 4 * _FLEX_BLOCK
    return octave * _FLEX_BLOCK


# Compiled variants: buckets x grad mode (training, scoring) x dtype, well under this even for
# million-token packs. Raised from dynamo's default of 8, which would otherwise silently send
# the ninth bucket to the eager T x T reference.
_FLEX_RECOMPILE_LIMIT = 64
_FLEX_BACKEND = "inductor"  # tests swap in a counting backend
_FLEX = None


def _compiled_flex():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        # dynamic=True would avoid bucketing, but flex's dynamic-shape support is partial in
        # torch 2.13 (_inductor/kernel/flex/flex_flash_attention.py: "TODO(dynamic shapes)";
        # flex_attention.py's FLASH check rejects captured SymInts); static shapes per bucket
        # are the well-trodden path.
        params = inspect.signature(torch.compile).parameters
        if "recompile_limit" in params and "isolate_recompiles" in params:
            # torch 2.13: a limit of this callable's own, leaving every other compile alone.
            limit = dict(recompile_limit=_FLEX_RECOMPILE_LIMIT, isolate_recompiles=True)
        else:  # older torch (NGC images): only the global limit exists; raise it, never lower
            limit, config = {}, torch._dynamo.config
            name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
            setattr(config, name, max(getattr(config, name), _FLEX_RECOMPILE_LIMIT))
        _FLEX = torch.compile(flex_attention, dynamic=False, backend=_FLEX_BACKEND, **limit)
    return _FLEX


# Block masks of the last few micro-batches: [(cu_seqlens, its _version, padded, BlockMask)],
# most recently used last. megatron hands every layer of a micro-batch the same PackedSeqParams,
# so the same cu_seqlens *object*: keying on identity (plus the in-place version counter) finds
# it without reading its values, which would be a device sync in every layer. Entries hold a
# reference to their tensor, so its id cannot be reused by a new tensor while cached. Four
# entries cover recomputation in backward (activation recompute re-runs the forward of an
# earlier micro-batch while a later one's entry is the newest); a miss only costs a rebuild.
_MASK_CACHE: list = []
_MASK_CACHE_SIZE = 4


def _version(t: torch.Tensor) -> int:
    # Inference tensors have no version counter (and cannot be changed outside inference mode).
    return -1 if t.is_inference() else t._version


def document_block_mask(cu_seqlens: torch.Tensor, padded: int):
    """The flex `BlockMask` of `_build_document_block_mask`, cached by cu_seqlens identity."""
    return _cached_mask(cu_seqlens, padded, lambda: _build_document_block_mask(cu_seqlens, padded))


def _cached_mask(key: torch.Tensor, padded: int, build):
    """The block mask for (`key` tensor, `padded`), built by `build()` on a miss."""
    version = _version(key)
    for i, (cached, ver, length, mask) in enumerate(_MASK_CACHE):
        if cached is key and ver == version and length == padded:
            _MASK_CACHE.append(_MASK_CACHE.pop(i))
            return mask
    mask = build()
    _MASK_CACHE.append((key, version, padded, mask))
    del _MASK_CACHE[:-_MASK_CACHE_SIZE]
    return mask


def _build_document_block_mask(cu_seqlens: torch.Tensor, padded: int):
    """Causal document `BlockMask` over `padded` positions (a multiple of 128), built from each
    block's first and last document id in O((padded / 128)^2), where `create_block_mask` would
    evaluate the mask at all padded^2 pairs (a 1 GiB bool tensor at 32k tokens)."""
    from torch.nn.attention.flex_attention import BlockMask

    doc = document_ids(cu_seqlens, padded)

    def mask_mod(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)

    # Ids never decrease, so a block holds every id from its first to its last. Key block j
    # before query block i shares a document with it iff last[j] == first[i], and every pair
    # is allowed (a "full" block, no mask_mod needed) iff first[j] == last[i]. Diagonal blocks
    # are always partial (causal); blocks after the diagonal are empty.
    first, last = doc[::_FLEX_BLOCK], doc[_FLEX_BLOCK - 1::_FLEX_BLOCK]
    idx = torch.arange(first.numel(), device=doc.device)
    before = idx[None, :] < idx[:, None]  # [query block, key block]
    full = before & (first[None, :] == last[:, None])
    partial = (before & (last[None, :] == first[:, None]) & ~full) | (idx[None, :] == idx[:, None])

    def ordered(dense):  # as create_block_mask: per row, the count and the present blocks first
        dense = dense.to(torch.int32)[None, None]
        indices = torch.argsort(dense, dim=-1, descending=True, stable=True)
        return dense.sum(-1).to(torch.int32), indices.to(torch.int32)

    # (seq_lengths default to the blocks' extent, `padded`; older torch has no such argument)
    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=_FLEX_BLOCK,
                                    mask_mod=mask_mod)


def flex_document_attention(q, k, v, cu_seqlens, scale, gqa, compile: bool = True):
    """Block-sparse causal document attention with torch's flex_attention (CUDA path).

    q [1, np, t, hn], k/v [1, ng, t, hn]. Runs at the `flex_bucket` length: the tail up to it is
    end padding (it also keeps blocks whole, which not every flex backend handles partially).
    `compile=False` runs flex's eager reference, which the CPU tests use to check the mask.
    """
    return _bucketed_flex(q, k, v, lambda padded: document_block_mask(cu_seqlens, padded),
                          scale, gqa, compile)


def _bucketed_flex(q, k, v, block_mask_for, scale, gqa, compile: bool):
    """flex_attention of q [1, np, t, hn] over k/v [1, ng, t, hn] at the `flex_bucket` length
    (the tail up to it is end padding), with the block mask `block_mask_for(padded)`;
    compiled, or flex's eager reference with `compile=False`."""
    total = q.shape[2]
    padded = flex_bucket(total)
    if padded != total:
        q, k, v = (F.pad(x, (0, 0, 0, padded - total)) for x in (q, k, v))
    block_mask = block_mask_for(padded)
    if compile:
        attend = _compiled_flex()
    else:
        from torch.nn.attention.flex_attention import flex_attention as attend
    out = attend(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    return out[:, :, :total]


def _padded_ids(ids: torch.Tensor, padded: int) -> torch.Tensor:
    """`ids` extended to `padded` positions, the tail in 128-chunks of ids of its own."""
    extra = padded - ids.numel()
    if extra <= 0:
        return ids
    tail = ids.max() + 1 + torch.arange(extra, device=ids.device) // PAD_CHUNK
    return torch.cat([ids, tail])


def _build_shared_prefix_block_mask(params: SharedPrefixParams, padded: int):
    """Flex `BlockMask` of a shared-prefix pack over `padded` positions: query i may attend key
    j iff both are in one item, j <= i, and j is a prefix token or in i's own segment. Item and
    segment ids never decrease along the pack, so per 128-block their first and last values
    classify the blocks in O((padded / 128)^2): a key block before the query block is
    skipped unless their items overlap, and computed without the mask where every pair is
    allowed (one item, and the keys all prefix or all in the queries' single segment)."""
    from torch.nn.attention.flex_attention import BlockMask

    item = _padded_ids(params.token_item, padded)
    seg = _padded_ids(params.token_segment, padded)
    is_prefix = torch.cat([params.token_is_prefix,
                           params.token_is_prefix.new_zeros(padded - params.token_is_prefix.numel())])

    def mask_mod(b, h, q_idx, kv_idx):
        return ((item[q_idx] == item[kv_idx]) & (kv_idx <= q_idx)
                & (is_prefix[kv_idx] | (seg[q_idx] == seg[kv_idx])))

    B = _FLEX_BLOCK
    i_first, i_last = item[::B], item[B - 1::B]
    s_first, s_last = seg[::B], seg[B - 1::B]
    all_prefix = is_prefix.view(-1, B).all(dim=1)
    idx = torch.arange(i_first.numel(), device=item.device)
    before = idx[None, :] < idx[:, None]  # [query block, key block]
    one_item = (i_first == i_last)
    same_item = one_item[:, None] & one_item[None, :] & (i_first[:, None] == i_first[None, :])
    one_seg = s_first == s_last
    same_seg = one_seg[:, None] & one_seg[None, :] & (s_first[:, None] == s_first[None, :])
    full = before & same_item & (all_prefix[None, :] | same_seg)
    overlap = i_last[None, :] >= i_first[:, None]
    partial = (before & overlap & ~full) | (idx[None, :] == idx[:, None])

    def ordered(dense):
        dense = dense.to(torch.int32)[None, None]
        indices = torch.argsort(dense, dim=-1, descending=True, stable=True)
        return dense.sum(-1).to(torch.int32), indices.to(torch.int32)

    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=B,
                                    mask_mod=mask_mod)


def flex_shared_prefix_attention(q, k, v, params: SharedPrefixParams, scale, gqa,
                                 compile: bool = True):
    """Shared-prefix attention with flex_attention (CUDA path; `compile=False` runs flex's
    eager reference for the CPU tests). Runs at the `flex_bucket` length, as the plain path."""
    def block_mask_for(padded):
        return _cached_mask(params.token_item, padded,
                            lambda: _build_shared_prefix_block_mask(params, padded))

    return _bucketed_flex(q, k, v, block_mask_for, scale, gqa, compile)
