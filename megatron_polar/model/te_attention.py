"""Shared-prefix packs on Transformer Engine's attention (the TE layer spec).

A shared-prefix pack (model/shared_prefix.py) is attention over *segments*: the queries of
segment s are its own pack positions, its keys/values are gathered (`kv_index`: the item's
prefix, then the segment itself) and the mask is causal aligned to the bottom right. That is
TE's THD varlen attention with different q and kv segment lengths:

    q = query (pack order), k/v = key/value.index_select(0, kv_index),
    cu_seqlens_q = the segments' bounds in the pack, cu_seqlens_kv = cu_seqlens_kv_gathered,
    attn_mask_type = "padding_causal_bottom_right".

Upstream facts this relies on (TE v2.10, checked against v2.4 and v2.18; megatron-core 0.16.1):

- THD needs a "padding" mask type and int32 cu_seqlens_q/cu_seqlens_kv of the same shape, but
  not equal values (TE dot_product_attention.py:1106-1123 in v2.10), and max_seqlen_q/kv as
  the longest q and kv segment (else TE derives them with a device sync, :1125-1136).
  megatron's `TEDotProductAttention.forward` cannot say "padding_causal_bottom_right": it
  passes `attn_mask_type.name` of megatron's `AttnMaskType`, which has no such member
  (megatron/core/transformer/enums.py:49-57; extensions/transformer_engine.py:1396-1408),
  so this module calls TE's `DotProductAttention.forward` itself (with megatron's extras:
  num_splits; its qk-clip, dynamic CP and attention-bias paths are refused here).
- Backends (TE utils.py `get_attention_backend`, v2.10):
  * FusedAttention (cuDNN, F16_arbitrary_seqlen): THD only on sm90+ (fused_attn.cpp:393-402),
    "padding_causal_bottom_right" from cuDNN 9.6 with max_seqlen_q/kv % 64 == 0 and
    max_seqlen_q <= max_seqlen_kv, no bias, no dropout; cuDNN >= 9.7 drops the % 64 and
    allows dropout when max_seqlen_q <= max_seqlen_kv (fused_attn.cpp:371-387). Both hold
    here: every segment has at least as many keys as queries, and max_seqlen is rounded up
    to 64 as TE itself does when it derives it (dot_product_attention.py:1130).
    Not on sm120 before cuDNN 9.18.1 (utils.py:692-698; v2.18 utils.py:992-999).
  * FlashAttention 2/3 (flash-attn varlen, `causal=True` is bottom-right since 2.1,
    utils.py:860-870): bf16/fp16, sm80+ (FA3: sm90 only), no padding between sequences. It is
    the only THD backend on sm80/sm89; on Hopper+ TE prefers FusedAttention when both can run
    (utils.py:1139-1145).
  * UnfusedDotProductAttention: THD only from TE 2.11 (v2.10 utils.py:679-682 disables it);
    it builds its padding masks from cu_seqlens_q alone for attention_type "self"
    (v2.18 backends.py:450-468, utils.py `get_padding_mask`), so this module sets its
    attention_type to "cross", which builds q and kv masks from their own cu_seqlens.
  * Context parallelism: no backend takes a bottom-right mask (utils.py:767-806): refused.
- End padding: TE's FlashAttention path leaves the outputs (and flash-attn the dq) of rows
  past cu_seqlens_q[-1] uninitialised (flash-attn allocates them with `empty_like`); only
  FusedAttention zero-fills THD outputs and gradients (pytorch/csrc/extensions/attention.cpp:
  157-160, 452-456). Describing the tail with cu_seqlens_q_padded instead would mark
  "padding between sequences" from TE 2.11 on (v2.18 dot_product_attention.py:1550-1559:
  any padded tensor that is not cu_seqlens itself), which disables FlashAttention 2. So the
  tail is described as segments of its own, PAD_CHUNK positions each, every pad position
  attending causally to its chunk (as in model/shared_prefix.py): every query row is real to
  TE, finite on every backend, and never seen by a real token. The *_padded arguments are
  then None (TE uses cu_seqlens for the offsets, backends.py:1834-1837).
- FP8: with fp8 GEMMs only (no fp8_dpa) attention runs in bf16 as above. FP8 attention
  (--fp8-dot-product-attention / fp8_multi_head_attention) has no THD backend for training:
  cuDNN's FP8 fused attention takes BSHD/SBHD only (fused_attn.cpp:230-257, unchanged in
  v2.18), FlashAttention 2 is off for FP8 and FlashAttention 3's FP8 is inference only
  (utils.py:468-478). It is refused here with that explanation.

Importing this module never imports Transformer Engine: the class is built on first use by
`shared_prefix_te_attention_class()` (megatron's TEDotProductAttention is a MagicMock base
when TE is absent, megatron/core/extensions/transformer_engine.py:62-78).
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_polar.model.shared_prefix import PAD_CHUNK, SharedPrefixParams

MASK_TYPE = "padding_causal_bottom_right"
# The oldest TE release whose attention code this was checked against (v2.4, v2.10, v2.18).
MIN_TE_VERSION = "2.4"


def _round64(n: int) -> int:
    return -(-n // 64) * 64


def _layout(params: SharedPrefixParams, total_q: int):
    """(kv gather index, cu_seqlens_q, cu_seqlens_kv, longest q, longest kv) with the end
    padding as segments of its own; built once per params (megatron hands every layer the
    same object) and from host-side sizes only, so no device sync."""
    cached = params.__dict__.get("_te_layout")
    if cached is not None and cached[0] == total_q:
        return cached[1]
    if not params.segments or params.kv_index is None or params.cu_seqlens_kv_gathered is None:
        raise ValueError("SharedPrefixParams needs its host-side segments, kv_index and "
                         "cu_seqlens_kv_gathered (build it with shared_prefix_params)")
    real = params.segments[-1].end
    pad = total_q - real
    if pad < 0:
        raise ValueError(f"the pack holds {real} real tokens but attention got {total_q} rows")
    kv_index, cu_q, cu_kv = params.kv_index, params.cu_seqlens_q, params.cu_seqlens_kv_gathered
    longest_q = max(s.end - s.start for s in params.segments)
    longest_kv = params.max_seqlen_kv_gathered
    if pad:
        chunks = -(-pad // PAD_CHUNK)
        ends = torch.arange(1, chunks + 1, dtype=torch.int32, device=cu_q.device) * PAD_CHUNK
        ends = ends.clamp_(max=pad)
        cu_q = torch.cat([cu_q, ends + real])
        cu_kv = torch.cat([cu_kv, ends + kv_index.numel()])
        kv_index = torch.cat([kv_index, torch.arange(real, total_q, dtype=kv_index.dtype,
                                                     device=kv_index.device)])
        longest_q = max(longest_q, min(pad, PAD_CHUNK))
        longest_kv = max(longest_kv, min(pad, PAD_CHUNK))
    layout = (kv_index, cu_q, cu_kv, longest_q, longest_kv)
    params.__dict__["_te_layout"] = (total_q, layout)
    return layout


def te_shared_prefix_arguments(params: SharedPrefixParams, total_q: int) -> dict:
    """Keyword arguments of TE's `DotProductAttention.forward` for a shared-prefix pack whose
    query tensor has `total_q` rows (real tokens, then end padding); the keys/values passed
    with them are gathered by `te_kv_gather_index(params, total_q)`. See the module docstring.
    """
    _, cu_q, cu_kv, longest_q, longest_kv = _layout(params, total_q)
    return dict(
        qkv_format="thd",
        attn_mask_type=MASK_TYPE,
        cu_seqlens_q=cu_q,
        cu_seqlens_kv=cu_kv,
        # No padding inside or after segments: TE takes the offsets from cu_seqlens.
        cu_seqlens_q_padded=None,
        cu_seqlens_kv_padded=None,
        # Longest segment, rounded up to 64 (cuDNN 9.6 needs it; harmless elsewhere);
        # max_seqlen_q <= max_seqlen_kv as cuDNN's bottom-right mask wants.
        max_seqlen_q=_round64(longest_q),
        max_seqlen_kv=_round64(longest_kv),
    )


def te_kv_gather_index(params: SharedPrefixParams, total_q: int) -> torch.Tensor:
    """Pack positions of the keys/values of every segment of `te_shared_prefix_arguments`
    (the params' `kv_index`, then the end padding's own positions)."""
    return _layout(params, total_q)[0]


def _refusal(config, packed_seq_params, attention_bias, training: bool) -> Optional[str]:
    """Why TE cannot run this shared-prefix call, or None."""
    if config.context_parallel_size > 1 or packed_seq_params.cp_group is not None:
        return ("context parallelism: no TE backend takes a bottom-right causal mask with it "
                "(TE utils.py get_attention_backend); use --context-parallel-size 1")
    if attention_bias is not None:
        return "an attention bias: shared-prefix attention takes none"
    if config.qk_clip or config.log_max_attention_logit:
        return ("qk-clip / max-logit logging: TE has no THD backend that returns the max logit "
                "(TE utils.py, filter 'Return max_logit'); turn them off")
    if config.window_size is not None:
        return "sliding-window attention: shared-prefix packs assume full causal attention"
    if training and config.fp8 and (config.fp8_dot_product_attention
                                    or config.fp8_multi_head_attention):
        return ("FP8 attention (--fp8-dot-product-attention / fp8_multi_head_attention): TE has "
                "no FP8 attention kernel for packed (THD) sequences in training (cuDNN's FP8 "
                "fused attention takes BSHD/SBHD only; flash-attn 3 FP8 is inference only). "
                "Drop it: the FP8 GEMMs still run, attention stays bf16")
    return None


_CLASS = None


def shared_prefix_te_attention_class():
    """`SharedPrefixTEAttention`, a subclass of megatron's `TEDotProductAttention`, built on
    first use (it needs Transformer Engine)."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    from megatron.core.extensions.transformer_engine import HAVE_TE, TEDotProductAttention
    from megatron.core.utils import get_te_version
    from packaging.version import Version

    if not HAVE_TE:
        raise ImportError("SharedPrefixTEAttention needs Transformer Engine (pip install "
                          "'megatron_polar[gpu]'); without it use --transformer-impl local")
    if get_te_version() < Version(MIN_TE_VERSION):
        raise ImportError(f"shared-prefix attention on Transformer Engine needs TE >= "
                          f"{MIN_TE_VERSION} (this is {get_te_version()}); upgrade it or use "
                          "--transformer-impl local")

    class SharedPrefixTEAttention(TEDotProductAttention):
        """megatron's TE core attention, plus shared-prefix packs (`SharedPrefixParams`):
        keys/values gathered per segment and TE's THD attention with
        "padding_causal_bottom_right" (FusedAttention on sm90+ with cuDNN >= 9.6, or
        flash-attn on sm80+; see megatron_polar/model/te_attention.py). Any other call is
        megatron's `TEDotProductAttention.forward`, unchanged."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # From TE 2.11 the unfused backend takes THD; with attention_type "self" it would
            # build the kv padding mask from cu_seqlens_q (see the module docstring). It is
            # only read for padding masks, so "cross" leaves megatron's causal calls alone.
            if hasattr(self, "unfused_attention"):
                self.unfused_attention.attention_type = "cross"

        def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                    attention_bias=None, packed_seq_params: Optional[PackedSeqParams] = None,
                    num_splits: Optional[int] = None):
            if not isinstance(packed_seq_params, SharedPrefixParams):
                return super().forward(query, key, value, attention_mask, attn_mask_type,
                                       attention_bias=attention_bias,
                                       packed_seq_params=packed_seq_params,
                                       num_splits=num_splits)
            why = _refusal(self.config, packed_seq_params, attention_bias, self.training)
            if why is not None:
                raise NotImplementedError(f"shared-prefix packs on Transformer Engine cannot "
                                          f"run with {why}")
            total = query.shape[0]  # q/k/v: [t, heads, head_dim] (megatron squeezes b for thd)
            kwargs = te_shared_prefix_arguments(packed_seq_params, total)
            index = te_kv_gather_index(packed_seq_params, total)
            if num_splits is None:
                num_splits = self.num_splits
            if num_splits is not None:  # TE >= 2.10 (megatron asserts it in its forward)
                kwargs["num_splits"] = num_splits
            try:
                # TE's DotProductAttention.forward, past megatron's (which cannot name the mask).
                return super(TEDotProductAttention, self).forward(
                    query, key.index_select(0, index), value.index_select(0, index), None,
                    **kwargs)
            except ValueError as error:
                if "No dot product attention backend" not in str(error):
                    raise
                raise RuntimeError(
                    "Transformer Engine has no attention backend for shared-prefix packs here: "
                    "THD with different q/kv lengths and a bottom-right causal mask needs "
                    "FusedAttention (sm90+, cuDNN >= 9.6, bf16/fp16, no context parallelism) "
                    "or flash-attn 2 (sm80+, bf16/fp16). Install cuDNN >= 9.6 or flash-attn, "
                    "or use --transformer-impl local. (NVTE_DEBUG=1 NVTE_DEBUG_LEVEL=2 shows "
                    "why TE disabled each backend.)") from error

    SharedPrefixTEAttention.__module__ = __name__
    _CLASS = SharedPrefixTEAttention
    return _CLASS


def __getattr__(name):
    # `from megatron_polar.model.te_attention import SharedPrefixTEAttention` (and pickling by
    # reference) work once TE is installed; importing the module alone never needs TE.
    if name == "SharedPrefixTEAttention":
        return shared_prefix_te_attention_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
