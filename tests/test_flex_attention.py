"""The flex_attention path (CUDA without Transformer Engine), checked on CPU.

CPU flex runs forward only, through flex's eager reference (compile=False); the compiled path
is exercised through dynamo with a counting backend, which sees every compilation (one per
input shape) without inductor's code generation (tens of seconds per shape on CPU).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_polar.model import attention
from megatron_polar.model.attention import (PackedCoreAttention, block_causal_mask,
                                            document_block_mask, document_ids, flex_bucket)


def random_pack(gen, max_docs=6, max_len=300, max_pad=400):
    """cu_seqlens of a random pack and its total length (real tokens, then end padding)."""
    n = int(torch.randint(1, max_docs + 1, (), generator=gen))
    lengths = torch.randint(1, max_len, (n,), generator=gen)
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).to(torch.int32)])
    return cu, int(cu[-1]) + int(torch.randint(0, max_pad, (), generator=gen))


def test_buckets_are_few_and_pad_by_less_than_half():
    totals = range(1, 32768 + 1)
    buckets = {flex_bucket(t) for t in totals}
    assert len(buckets) <= 2 * math.log2(32768 // 128) + 1  # 17
    assert sorted(buckets)[:8] == [128 * b for b in (1, 2, 3, 4, 6, 8, 12, 16)]
    for t in totals:
        b = flex_bucket(t)
        assert b % 128 == 0 and t <= b < max(t + 128, 1.5 * t)


def test_end_padding_is_chunked_and_ids_never_decrease():
    cu = torch.tensor([0, 5, 6, 200], dtype=torch.int32)
    doc = document_ids(cu, 600)
    assert doc[:5].eq(0).all() and doc[5] == 1 and doc[6:200].eq(2).all()
    # padding: ids after the last sequence's, one per 128-position chunk
    assert doc[200:256].eq(4).all() and doc[256:384].eq(5).all() and doc[512:].eq(7).all()
    assert (doc[1:] >= doc[:-1]).all()
    mask = block_causal_mask(cu, 600)
    assert not mask[200, 199] and mask[255, 200] and not mask[256, 255] and mask[599, 512]


def test_block_mask_equals_create_block_mask():
    """The block mask built from per-block document ranges is create_block_mask's, exactly."""
    from torch.nn.attention.flex_attention import create_block_mask

    gen = torch.Generator().manual_seed(0)
    for _ in range(12):
        cu, total = random_pack(gen)
        padded = flex_bucket(total)
        ours = attention._build_document_block_mask(cu, padded)
        doc = document_ids(cu, padded)
        ref = create_block_mask(lambda b, h, q, kv: (doc[q] == doc[kv]) & (kv <= q),
                                None, None, padded, padded, device="cpu")
        for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                     "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
            assert torch.equal(getattr(ours, name), getattr(ref, name)), name
        assert ours.seq_lengths == (padded, padded)


def one_rank_attention():
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_polar.model.config import ModelRunConfig, build_transformer_config
    from megatron_polar.model.presets import get_preset

    cfg = build_transformer_config(get_preset("tiny"), ModelRunConfig(), use_te=False)

    class OneRank:
        def size(self):
            return 1

    pg = type("PG", (), {"tp": OneRank()})()
    return PackedCoreAttention(cfg, 1, AttnMaskType.causal, "self", pg_collection=pg)


@pytest.mark.parametrize("pack", [
    ([0, 5, 6, 14, 20], 23),        # padding inside the first block, bucket padding after it
    ([0, 100, 256], 256),           # exactly one bucket: no padding at all
    ([0, 70, 130, 131], 400),       # end padding across three chunks, bucket 512
    ([0, 128, 300, 520], 520),      # no end padding; bucket padding only (768)
])
def test_bucketed_flex_equals_per_sequence_sdpa(pack, monkeypatch):
    from megatron.core.packed_seq_params import PackedSeqParams

    monkeypatch.setattr(attention, "_MASK_CACHE", [])
    attn = one_rank_attention()
    cu, total = torch.tensor(pack[0], dtype=torch.int32), pack[1]
    torch.manual_seed(total)
    heads, groups, d = 4, 2, 16
    q = torch.randn(total, heads, d)
    k, v = torch.randn(total, groups, d), torch.randn(total, groups, d)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=total, max_seqlen_kv=total)
    sdpa = attn(q, k, v, None, packed_seq_params=params)
    monkeypatch.setattr(attention, "FORCE_FLEX", True)
    flex = attn(q, k, v, None, packed_seq_params=params)
    assert flex.shape == sdpa.shape == (total, heads * d)
    assert torch.allclose(flex, sdpa, atol=1e-5)
    dense = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=block_causal_mask(cu, total), enable_gqa=True, scale=d ** -0.5)
    assert torch.allclose(sdpa, dense[0].transpose(0, 1).reshape(total, -1), atol=1e-5)


def test_bucketed_flex_equals_per_sequence_sdpa_random_packs(monkeypatch):
    monkeypatch.setattr(attention, "_MASK_CACHE", [])
    gen = torch.Generator().manual_seed(3)
    heads, groups, d = 4, 2, 8
    for _ in range(6):
        cu, total = random_pack(gen, max_docs=4, max_len=200, max_pad=300)
        q = torch.randn(1, heads, total, d, generator=gen)
        k, v = (torch.randn(1, groups, total, d, generator=gen) for _ in range(2))
        flex = attention.flex_document_attention(q, k, v, cu, d ** -0.5, True, compile=False)
        dense = F.scaled_dot_product_attention(q, k, v, attn_mask=block_causal_mask(cu, total),
                                               enable_gqa=True, scale=d ** -0.5)
        assert torch.allclose(flex, dense, atol=1e-5)


def test_mask_cache_is_keyed_on_the_tensor_and_bounded(monkeypatch):
    builds = []
    build = attention._build_document_block_mask
    monkeypatch.setattr(attention, "_build_document_block_mask",
                        lambda cu, padded: builds.append(padded) or build(cu, padded))
    monkeypatch.setattr(attention, "_MASK_CACHE", [])
    cu = torch.tensor([0, 5, 40], dtype=torch.int32)
    mask = document_block_mask(cu, 128)
    assert document_block_mask(cu, 128) is mask and len(builds) == 1
    assert document_block_mask(cu.clone(), 128) is not mask  # equal values, another micro-batch
    assert document_block_mask(cu, 256) is not mask  # another bucket
    cu[1] = 6  # changed in place: its version moves on
    assert document_block_mask(cu, 128) is not mask and len(builds) == 4
    for _ in range(10):
        document_block_mask(torch.tensor([0, 7], dtype=torch.int32), 128)
    assert len(attention._MASK_CACHE) == attention._MASK_CACHE_SIZE
    with torch.inference_mode():
        frozen = torch.tensor([0, 9], dtype=torch.int32)
    assert document_block_mask(frozen, 128) is document_block_mask(frozen, 128)


def test_compiled_variants_are_bounded_by_buckets(monkeypatch):
    """20 pack lengths compile one flex_attention per bucket, past dynamo's default limit of 8
    (which would otherwise send the rest to the eager T x T reference)."""
    compiled = []

    def counting_backend(gm, example_inputs):
        compiled.append(tuple(x.shape[2] for x in example_inputs[:3]))
        return gm.forward

    torch._dynamo.reset()
    monkeypatch.setattr(attention, "_FLEX_BACKEND", counting_backend)
    monkeypatch.setattr(attention, "_FLEX", None)
    monkeypatch.setattr(attention, "_MASK_CACHE", [])
    totals = [40 + 160 * i for i in range(20)]  # 40 .. 3080 tokens
    buckets = {flex_bucket(t) for t in totals}
    assert len(buckets) == 9 > torch._dynamo.config.recompile_limit
    try:
        for total in totals:
            q, k, v = (torch.randn(1, 1, total, 8) for _ in range(3))
            cu = torch.tensor([0, total // 3, total - 5], dtype=torch.int32)
            out = attention.flex_document_attention(q, k, v, cu, 8 ** -0.5, False, compile=True)
            assert out.shape == q.shape
    finally:
        torch._dynamo.reset()
    assert len(compiled) == len(buckets)
    assert {shape for shape, _, _ in compiled} == buckets
    assert all(len(set(shapes)) == 1 for shapes in compiled)


def test_model_builds_the_mask_once_per_micro_batch(ctx1, monkeypatch):
    """A multi-layer packed forward on the flex path builds one block mask per micro-batch
    (not one per layer) and scores as the per-sequence SDPA path does."""
    from megatron_polar.data.packing import pack_pairs
    from megatron_polar.model.config import ModelRunConfig
    from megatron_polar.model.presets import get_preset
    from megatron_polar.runtime.chunks import build_model_chunks
    from megatron_polar.runtime.schedules import score_packed
    from tests.test_parallel_parity_tiny import fixed_pairs

    preset = get_preset("tiny")
    assert preset.num_layers > 1
    chunks = build_model_chunks(preset, ModelRunConfig(), ctx1)
    packs = pack_pairs(fixed_pairs(), 160, pad_id=preset.pad_token_id)
    assert len(packs) > 1
    sdpa = score_packed(chunks, packs, ctx1)

    builds = []
    build = attention._build_document_block_mask
    monkeypatch.setattr(attention, "_build_document_block_mask",
                        lambda cu, padded: builds.append(padded) or build(cu, padded))
    lookups = []
    lookup = attention.document_block_mask
    monkeypatch.setattr(attention, "document_block_mask",
                        lambda cu, padded: lookups.append(padded) or lookup(cu, padded))
    monkeypatch.setattr(attention, "_MASK_CACHE", [])
    monkeypatch.setattr(attention, "FORCE_FLEX", True)
    flex = score_packed(chunks, packs, ctx1)
    assert len(lookups) == preset.num_layers * len(packs)  # every layer took the flex path
    assert len(builds) == len(packs)
    assert torch.allclose(flex, sdpa, atol=1e-5)
