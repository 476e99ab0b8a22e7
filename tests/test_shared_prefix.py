"""Shared-prefix packs: layout, attention masks (per-segment SDPA and flex), no leakage
between candidates, positions, FLOPs. Exactness against plain packing at TP/PP/DP layouts is
in tests/test_parallel_parity_tiny.py, over 20 training steps in tests/test_trainer.py."""

import pytest
import torch
import torch.nn.functional as F

from megatron_polar.data.packing import (PrefixItem, build_shared_micro_batch,
                                         common_prefix_length, pack_items, pack_pairs)
from megatron_polar.model import attention
from megatron_polar.model.shared_prefix import shared_prefix_params
from tests.test_flex_attention import one_rank_attention


def allowed(params, total):
    """The dense rule: same item, key <= query, key in the prefix or the query's segment."""
    item, seg, pre = params.token_item, params.token_segment, params.token_is_prefix
    idx = torch.arange(total)
    return ((item[:, None] == item[None, :]) & (idx[None, :] <= idx[:, None])
            & (pre[None, :] | (seg[:, None] == seg[None, :])))


def test_common_prefix_leaves_every_sequence_its_own_last_token():
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert common_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # identical: one token each
    assert common_prefix_length([[1, 2], [1, 2, 3, 4]]) == 1  # one a prefix of the other
    assert common_prefix_length([[7, 1], [8, 1], [7, 1]]) == 0
    with pytest.raises(ValueError, match="empty"):
        common_prefix_length([[1], []])


def test_layout_positions_rewards_and_pairs():
    pair = PrefixItem.from_pair(([1, 2, 3, 9, 9], [1, 2, 3, 8]))
    ranked = PrefixItem.from_ranking([[5, 6, 1], [5, 6, 2, 2], [5, 6, 3]])
    no_prefix = PrefixItem.from_pair(([4, 4], [5]))
    assert (pair.computed_length, pair.sequence_length) == (6, 9)
    assert ranked.pairs == ((0, 1), (0, 2), (1, 2))
    mb = build_shared_micro_batch([pair, ranked, no_prefix], 32, pad_id=0, item_ids=(4, 5, 6))
    assert mb.tokens[0, :17].tolist() == [1, 2, 3, 9, 9, 8, 5, 6, 1, 2, 2, 3, 4, 4, 5, 0, 0]
    # candidates continue their prefix's positions; an item without prefix starts at 0
    assert mb.position_ids[0, :15].tolist() == [0, 1, 2, 3, 4, 3, 0, 1, 2, 2, 3, 2, 0, 1, 0]
    assert mb.cu_seqlens.tolist() == [0, 3, 5, 6, 8, 9, 11, 12, 14, 15]
    assert mb.reward_positions[:, 1].tolist() == [4, 5, 8, 10, 11, 13, 14]
    assert mb.pair_index.tolist() == [[0, 1], [2, 3], [2, 4], [3, 4], [5, 6]]
    assert (mb.num_pairs, mb.num_tokens, mb.num_sequence_tokens) == (5, 15, 9 + 10 + 3)
    assert mb.attention_segments() == ([3, 2, 1, 2, 1, 2, 1, 2, 1], [0, 3, 3, 0, 2, 2, 2, 0, 0])
    params = shared_prefix_params(mb.items, 32)
    assert params.max_position == 4 + 1 and params.max_seqlen_kv_gathered == 5
    assert params.kv_index[:8].tolist() == [0, 1, 2, 0, 1, 2, 3, 4]


def random_items(gen, n=5, vocab=50):
    def tokens(lo, hi):
        return torch.randint(3, vocab, (int(torch.randint(lo, hi, (1,), generator=gen)),),
                             generator=gen).tolist()
    items = []
    for k in range(n):
        prefix = tokens(0, 140) if k else []  # one item without a shared prefix
        seqs = [prefix + tokens(1, 90) for _ in range(int(torch.randint(2, 5, (1,),
                                                                        generator=gen)))]
        items.append(PrefixItem.from_ranking(seqs))
    return items


def test_per_segment_and_flex_attention_equal_the_dense_rule(monkeypatch):
    """The CPU path (SDPA per segment over [prefix; segment]) and the CUDA path (flex with a
    block mask, run by its eager reference here) both compute the dense mask's attention,
    end padding included."""
    monkeypatch.setattr(attention, "_MASK_CACHE", [])
    attn = one_rank_attention()
    gen = torch.Generator().manual_seed(5)
    heads, groups, d = 4, 2, 16  # the tiny preset's head dim (the module's softmax scale)
    long_item = PrefixItem([3] * 200, ([4] * 700, [5] * 300), ((0, 1),))  # several chunks
    for _ in range(3):
        items = random_items(gen) + [long_item]
        real = sum(i.computed_length for i in items)
        total = real + int(torch.randint(0, 300, (1,), generator=gen))
        params = shared_prefix_params([(len(i.prefix), [len(c) for c in i.candidates])
                                       for i in items], total)
        q = torch.randn(total, heads, d, generator=gen)
        k, v = (torch.randn(total, groups, d, generator=gen) for _ in range(2))
        monkeypatch.setattr(attention, "FORCE_FLEX", False)
        sdpa = attn(q, k, v, None, packed_seq_params=params)
        monkeypatch.setattr(attention, "FORCE_FLEX", True)
        flex = attn(q, k, v, None, packed_seq_params=params)
        dense = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            attn_mask=allowed(params, total), enable_gqa=True, scale=d ** -0.5)
        dense = dense[0].transpose(0, 1).reshape(total, -1)
        assert torch.allclose(sdpa, dense, atol=1e-5)
        assert torch.allclose(flex, dense, atol=1e-5)


def test_shared_prefix_block_mask_equals_create_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    gen = torch.Generator().manual_seed(8)
    for _ in range(4):
        # and one long item, whose prefix and candidates fill whole 128-blocks
        items = random_items(gen, n=6) + [PrefixItem([3] * 400, ([4] * 300, [5] * 200),
                                                     ((0, 1),))]
        real = sum(i.computed_length for i in items)
        padded = attention.flex_bucket(real + int(torch.randint(0, 200, (1,), generator=gen)))
        params = shared_prefix_params([(len(i.prefix), [len(c) for c in i.candidates])
                                       for i in items], padded)
        ours = attention._build_shared_prefix_block_mask(params, padded)
        rule = allowed(params, padded)
        ref = create_block_mask(lambda b, h, q, kv: rule[q, kv], None, None, padded, padded,
                                device="cpu")
        # Our classification may compute a block create_block_mask would skip only if the
        # rule leaves it empty; never the reverse. Dense forms must agree on what they allow.
        assert torch.equal(ours.to_dense() >= ref.to_dense(), torch.ones_like(ref.to_dense(),
                                                                              dtype=torch.bool))
        # every block ours computes without the mask is one the rule allows whole
        full = torch.zeros(padded // 128, padded // 128, dtype=torch.bool)
        for qb in range(padded // 128):
            n = ours.full_kv_num_blocks[0, 0, qb]
            full[qb, ours.full_kv_indices[0, 0, qb, :n].long()] = True
        blocks = rule.view(padded // 128, 128, padded // 128, 128).all(3).all(1)
        assert full.any() and not (full & ~blocks).any()


def test_rewards_equal_plain_packing_without_leakage_between_candidates(ctx1):
    from megatron_polar.model.config import ModelRunConfig
    from megatron_polar.model.presets import get_preset
    from megatron_polar.runtime.chunks import build_model_chunks
    from megatron_polar.runtime.schedules import score_packed

    preset = get_preset("tiny")
    chunks = build_model_chunks(preset, ModelRunConfig(), ctx1)
    gen = torch.Generator().manual_seed(2)
    items = random_items(gen, n=4, vocab=preset.vocab_size - 1)
    shared = score_packed(chunks, pack_items(items, 2048, preset.pad_token_id), ctx1)
    seqs = [list(i.prefix) + c for i in items for c in i.candidates]
    plain = score_packed(chunks, pack_pairs([(s, s) for s in seqs], 4096, preset.pad_token_id),
                         ctx1)[0::2]
    assert torch.allclose(shared, plain, atol=1e-5)
    assert shared.std() > 1e-3
    # change the last candidate of item 1: no other reward moves
    changed = list(items)
    cands = list(items[1].candidates)
    cands[-1] = [7] + cands[-1][1:] if cands[-1][0] != 7 else [8] + cands[-1][1:]
    changed[1] = PrefixItem(items[1].prefix, tuple(cands), items[1].pairs)
    packs = pack_items(changed, 2048, preset.pad_token_id)
    assert len(packs) == 1 and packs[0].pair_ids == (0, 1, 2, 3)
    after = score_packed(chunks, packs, ctx1)
    last = sum(len(i.candidates) for i in items[:2]) - 1
    assert not torch.isclose(after[last], shared[last], atol=1e-6)
    keep = [k for k in range(len(shared)) if k != last]
    assert torch.allclose(after[keep], shared[keep], atol=1e-6)


def test_flops_count_the_prefix_once():
    from megatron_polar.model.presets import get_preset
    from megatron_polar.training.flops import training_flops

    preset = get_preset("small")
    P, c = 3000, 1000
    plain = training_flops(preset, [P + c, P + c])
    shared = training_flops(preset, [P, c, c], [0, P, P])
    assert shared < plain
    # dense part: tokens; attention: prefix P^2/2 once, each candidate c*P + c^2/2
    dense = 3 * 2 * (P + 2 * c) * training_flops.__globals__["matmul_params_per_token"](preset)
    attn = 3 * 4 * preset.num_layers * preset.hidden_size * (P * P / 2 + 2 * (c * P + c * c / 2))
    assert shared == pytest.approx(dense + attn)
    with pytest.raises(ValueError, match="one prefix length"):
        training_flops(preset, [1, 2], [0])


def test_scoring_groups_candidates_of_one_prompt_and_scores_them_exactly(ctx1):
    from megatron_polar.data.packing import prefix_groups
    from megatron_polar.eval.scorer import score_sequences
    from megatron_polar.model.config import ModelRunConfig
    from megatron_polar.model.presets import get_preset
    from megatron_polar.runtime.chunks import build_model_chunks

    preset = get_preset("tiny")
    chunks = build_model_chunks(preset, ModelRunConfig(), ctx1)
    gen = torch.Generator().manual_seed(4)

    def tokens(n):
        return torch.randint(3, preset.vocab_size - 1, (n,), generator=gen).tolist()

    prompts = [tokens(40 + 10 * k) for k in range(3)]
    sequences = [prompts[k % 3] + tokens(5 + k) + [preset.reward_token_id] for k in range(9)]
    sequences += [tokens(12), tokens(30)]  # alone
    groups = prefix_groups(sequences, 4096)
    assert sorted(map(sorted, groups)) == [[0, 3, 6], [1, 4, 7], [2, 5, 8], [9], [10]]
    assert len(prefix_groups(sequences, 60)) > 5  # the budget splits groups
    shared = score_sequences(chunks, ctx1, sequences, 4096, preset.pad_token_id)
    plain = score_sequences(chunks, ctx1, sequences, 4096, preset.pad_token_id,
                            shared_prefix=False)
    assert torch.allclose(torch.tensor(shared), torch.tensor(plain), atol=1e-5)
    assert torch.tensor(plain).std() > 1e-3
