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
is the dense form, used by the tests to check it. On CUDA it uses `flex_attention` with a
document mask, which skips the masked blocks instead of computing them.
RoPE (applied by `SelfAttention` before this module) restarts per sequence via `cu_seqlens`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


def document_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Sequence index of every packed position; positions past cu_seqlens[-1] get -1 (padding)."""
    positions = torch.arange(total, device=cu_seqlens.device)
    doc = torch.searchsorted(cu_seqlens[1:].to(positions.dtype), positions, right=True)
    return torch.where(positions < cu_seqlens[-1], doc, torch.full_like(doc, -1))


def block_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[total, total] bool, True where query i may attend key j (same sequence, j <= i).
    End padding forms one more causal block, so every row has a finite softmax."""
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
        cu = params.cu_seqlens_q
        # [t, n, hn] -> [1, n, t, hn]
        q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (query, key, value))
        if q.is_cuda:
            out = _flex_document_attention(q, k, v, cu, self.softmax_scale, self.heads != self.groups)
            return out.squeeze(0).transpose(0, 1).reshape(total, -1)
        bounds = cu.tolist()
        if bounds[-1] < total:
            bounds.append(total)  # end padding: its own block, attends only within itself
        lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        blocks = [self._sdpa(qi, ki, vi, None, is_causal=True)
                  for qi, ki, vi in zip(*(x.split(lengths, dim=2) for x in (q, k, v)))]
        out = torch.cat(blocks, dim=2)
        return out.squeeze(0).transpose(0, 1).reshape(total, -1)


_FLEX = None
_FLEX_BLOCK = 128  # flex_attention's block size; lengths are padded to a multiple of it


def _flex_document_attention(q, k, v, cu_seqlens, scale, gqa, compile: bool = True):
    """Block-sparse causal document attention with torch's flex_attention (CUDA path).

    q [1, np, t, hn], k/v [1, ng, t, hn]. `compile=False` runs flex's eager reference, which
    the CPU tests use to check the mask.
    """
    global _FLEX
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if compile and _FLEX is None:
        _FLEX = torch.compile(flex_attention, dynamic=False)
    attend = _FLEX if compile else flex_attention
    total = q.shape[2]
    padded = -(-total // _FLEX_BLOCK) * _FLEX_BLOCK
    if padded != total:  # partial blocks are not handled by every flex backend
        q, k, v = (F.pad(x, (0, 0, 0, padded - total)) for x in (q, k, v))
    doc = document_ids(cu_seqlens, padded)

    def mask_mod(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)

    block_mask = create_block_mask(mask_mod, None, None, padded, padded, device=q.device)
    out = attend(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    return out[:, :, :total]
