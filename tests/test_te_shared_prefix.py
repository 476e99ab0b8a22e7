"""Shared-prefix packs as Transformer Engine sees them (model/te_attention.py), on CPU.

TE is not installed here: these tests check the arguments our call passes to TE's THD
attention, and that gathered keys/values plus a bottom-right causal mask per segment (what TE
computes from those arguments) give the shared-prefix attention of the whole pack."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_polar.model import te_attention
from megatron_polar.model.shared_prefix import PAD_CHUNK, shared_prefix_params
from megatron_polar.model.te_attention import (te_kv_gather_index, te_shared_prefix_arguments)

# (items, total): items are (prefix length, candidate lengths); end padding = total - real.
LAYOUTS = [
    ([(3, [2, 4])], 9),  # one item, no padding
    ([(3, [2, 4]), (0, [5]), (2, [1, 1, 3])], 24),  # an item without prefix; 1 pad position
    ([(4, [3]), (1, [2, 2])], 12 + 2 * PAD_CHUNK + 5),  # padding over three chunks
]


def real_length(items):
    return sum(p + sum(c) for p, c in items)


def test_arguments_of_a_small_pack():
    # item 0: prefix [0,3), cands [3,5) [5,9); item 1: cand [9,14) (no prefix); 2 pad positions
    params = shared_prefix_params([(3, [2, 4]), (0, [5])], 16)
    args = te_shared_prefix_arguments(params, 16)
    assert args["qkv_format"] == "thd"
    assert args["attn_mask_type"] == "padding_causal_bottom_right"
    assert args["cu_seqlens_q"].tolist() == [0, 3, 5, 9, 14, 16]
    # kv segments: prefix 3, cand 3+2, cand 3+4, cand 5, pad 2
    assert args["cu_seqlens_kv"].tolist() == [0, 3, 8, 15, 20, 22]
    assert args["cu_seqlens_q_padded"] is None and args["cu_seqlens_kv_padded"] is None
    assert args["cu_seqlens_q"].dtype == args["cu_seqlens_kv"].dtype == torch.int32
    assert args["max_seqlen_q"] == 64 and args["max_seqlen_kv"] == 64  # 5 and 7, rounded up
    assert te_kv_gather_index(params, 16).tolist() == (
        [0, 1, 2] + [0, 1, 2, 3, 4] + [0, 1, 2, 5, 6, 7, 8] + [9, 10, 11, 12, 13] + [14, 15])


@pytest.mark.parametrize("items,total", LAYOUTS)
def test_arguments_cover_every_row(items, total):
    params = shared_prefix_params(items, total)
    args = te_shared_prefix_arguments(params, total)
    index = te_kv_gather_index(params, total)
    cu_q, cu_kv = args["cu_seqlens_q"], args["cu_seqlens_kv"]
    real, pad = real_length(items), total - real_length(items)
    segments = len(params.segments) + math.ceil(pad / PAD_CHUNK)
    assert cu_q.shape == cu_kv.shape == (segments + 1,)  # TE wants equal shapes
    assert cu_q[-1] == total and cu_kv[-1] == index.numel()  # every query row is a segment's
    assert cu_q[:len(params.segments) + 1].tolist() == params.cu_seqlens_q.tolist()
    q_len, kv_len = cu_q.diff(), cu_kv.diff()
    assert bool((kv_len >= q_len).all())  # bottom-right: every query sees >= 1 key
    assert bool((q_len[len(params.segments):] <= PAD_CHUNK).all())
    assert args["max_seqlen_q"] % 64 == 0 and args["max_seqlen_kv"] % 64 == 0
    assert q_len.max() <= args["max_seqlen_q"] <= args["max_seqlen_kv"]
    assert kv_len.max() <= args["max_seqlen_kv"] < kv_len.max() + 64
    assert bool((index[params.kv_index.numel():] == torch.arange(real, total)).all())
    # built once per params (megatron hands every layer the same object)
    assert te_shared_prefix_arguments(params, total)["cu_seqlens_q"] is cu_q


def reference_mask(items, total):
    """[total, total] allowed (query, key) of the real tokens, from the rule: same item,
    key <= query, key in the item's prefix or in the query's own segment."""
    item, segment, prefix = [], [], []
    for i, (p, cands) in enumerate(items):
        for k, length in enumerate(([p] if p else []) + list(cands)):
            item += [i] * length
            segment += [(i, k)] * length
            prefix += [bool(p) and k == 0] * length
    n = len(item)
    mask = torch.zeros(total, total, dtype=torch.bool)
    for q in range(n):
        for k in range(q + 1):
            mask[q, k] = item[q] == item[k] and (prefix[k] or segment[k] == segment[q])
    return mask


def te_like_attention(q, k, v, args, index):
    """What TE computes from the arguments: per segment, the gathered keys, causal mask
    aligned to the bottom right."""
    k, v = k.index_select(0, index), v.index_select(0, index)
    cu_q, cu_kv, out = args["cu_seqlens_q"].tolist(), args["cu_seqlens_kv"].tolist(), []
    for q0, q1, k0, k1 in zip(cu_q[:-1], cu_q[1:], cu_kv[:-1], cu_kv[1:]):
        lq, lk = q1 - q0, k1 - k0
        allowed = torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=lk - lq)
        qs, ks, vs = (x.transpose(0, 1) for x in (q[q0:q1], k[k0:k1], v[k0:k1]))
        out.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed).transpose(0, 1))
    return torch.cat(out)


@pytest.mark.parametrize("items,total", LAYOUTS)
def test_gathered_bottom_right_attention_matches_the_dense_rule(items, total):
    torch.manual_seed(0)
    heads, dim = 2, 8
    q, k, v = (torch.randn(total, heads, dim, dtype=torch.float64) for _ in range(3))
    params = shared_prefix_params(items, total)
    out = te_like_attention(q, k, v, te_shared_prefix_arguments(params, total),
                            te_kv_gather_index(params, total))
    assert out.shape == q.shape and bool(torch.isfinite(out).all())  # padding rows too
    real = real_length(items)
    mask = reference_mask(items, total)[:real, :real]
    expected = F.scaled_dot_product_attention(
        q[:real].transpose(0, 1), k[:real].transpose(0, 1), v[:real].transpose(0, 1),
        attn_mask=mask).transpose(0, 1)
    torch.testing.assert_close(out[:real], expected)


def test_padding_does_not_reach_real_tokens():
    items, total = [(2, [3, 1])], 6 + 2 * PAD_CHUNK
    params = shared_prefix_params(items, total)
    args, index = te_shared_prefix_arguments(params, total), te_kv_gather_index(params, total)
    q, k, v = (torch.randn(total, 1, 4, dtype=torch.float64) for _ in range(3))
    first = te_like_attention(q, k, v, args, index)
    for x in (q, k, v):
        x[6:] = 1e4 * torch.randn_like(x[6:])
    torch.testing.assert_close(te_like_attention(q, k, v, args, index)[:6], first[:6])


def test_refuses_short_queries_and_missing_host_segments():
    params = shared_prefix_params([(2, [3])], 8)
    with pytest.raises(ValueError, match="real tokens"):
        te_shared_prefix_arguments(params, 4)
    bare = shared_prefix_params([(2, [3])], 8)
    bare.segments = ()
    with pytest.raises(ValueError, match="segments"):
        te_shared_prefix_arguments(bare, 8)


def test_class_needs_transformer_engine_only_when_built():
    from megatron.core.extensions.transformer_engine import HAVE_TE

    if HAVE_TE:
        pytest.skip("Transformer Engine is installed")
    with pytest.raises(ImportError, match="--transformer-impl local"):
        te_attention.shared_prefix_te_attention_class()
    with pytest.raises(ImportError, match="Transformer Engine"):
        te_attention.SharedPrefixTEAttention  # noqa: B018


def test_forward_dispatch_with_a_stand_in_for_transformer_engine(monkeypatch):
    """The subclass's forward against stand-ins for TE's DotProductAttention and megatron's
    TEDotProductAttention: shared-prefix packs go to TE's forward with gathered k/v and our
    arguments, anything else to megatron's forward unchanged."""
    from types import SimpleNamespace

    import megatron.core.extensions.transformer_engine as mte
    import megatron.core.utils as mcu
    from megatron.core.packed_seq_params import PackedSeqParams
    from packaging.version import Version

    class TEDotProductAttentionOfTE(torch.nn.Module):  # te.pytorch.DotProductAttention
        def forward(self, q, k, v, attention_mask, **kwargs):
            self.te_call = kwargs
            if self.no_backend:
                raise ValueError("No dot product attention backend is available for the "
                                 "provided inputs.")
            return te_like_attention(q, k, v, kwargs, torch.arange(k.shape[0])).flatten(1)

    class MegatronTEDotProductAttention(TEDotProductAttentionOfTE):
        def __init__(self, config):
            super().__init__()
            self.config, self.num_splits, self.no_backend = config, None, False

        def forward(self, *args, **kwargs):
            self.megatron_call = (args, kwargs)
            return "megatron"

    monkeypatch.setattr(mte, "HAVE_TE", True)
    monkeypatch.setattr(mte, "TEDotProductAttention", MegatronTEDotProductAttention)
    monkeypatch.setattr(mcu, "get_te_version", lambda: Version("2.10"))
    monkeypatch.setattr(te_attention, "_CLASS", None)
    config = SimpleNamespace(context_parallel_size=1, qk_clip=False, log_max_attention_logit=False,
                             window_size=None, fp8=None, fp8_dot_product_attention=False,
                             fp8_multi_head_attention=False)
    attention = te_attention.shared_prefix_te_attention_class()(config)

    items, total = [(3, [2, 4]), (0, [5])], 16
    params = shared_prefix_params(items, total)
    q, k, v = (torch.randn(total, 2, 8, dtype=torch.float64) for _ in range(3))
    out = attention(q, k, v, None, None, packed_seq_params=params)
    assert attention.te_call["attn_mask_type"] == "padding_causal_bottom_right"
    assert "num_splits" not in attention.te_call
    expected = te_like_attention(q, k, v, te_shared_prefix_arguments(params, total),
                                 te_kv_gather_index(params, total))
    torch.testing.assert_close(out, expected.flatten(1))

    plain = PackedSeqParams(qkv_format="thd", cu_seqlens_q=torch.tensor([0, 16]))
    assert attention(q, k, v, None, "causal", packed_seq_params=plain) == "megatron"
    assert attention.megatron_call[1]["packed_seq_params"] is plain
    assert attention(q, k, v, None, "causal") == "megatron"

    attention.no_backend = True
    with pytest.raises(RuntimeError, match="cuDNN >= 9.6"):
        attention(q, k, v, None, None, packed_seq_params=params)
    attention.no_backend = False
    config.fp8, config.fp8_dot_product_attention = "hybrid", True
    with pytest.raises(NotImplementedError, match="fp8-dot-product-attention"):
        attention.train()(q, k, v, None, None, packed_seq_params=params)
    config.fp8 = None
    config.context_parallel_size = 2
    with pytest.raises(NotImplementedError, match="context-parallel-size 1"):
        attention(q, k, v, None, None, packed_seq_params=params)
