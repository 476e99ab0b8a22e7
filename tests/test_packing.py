"""Packing pairs into micro-batches: boundaries, positions, padding, budget."""

import pytest

from megatron_polar.data.packing import (best_fit_decreasing, build_padded_batch, pack_pairs,
                                         pair_length)


def make_pairs(lengths):
    token = iter(range(10, 10_000))
    return [([next(token) for _ in range(a)], [next(token) for _ in range(b)]) for a, b in lengths]


def test_best_fit_decreasing_respects_budget_and_keeps_every_item():
    lengths = [7, 3, 9, 2, 5, 5, 1, 8]
    bins = best_fit_decreasing(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 4  # 40 tokens in bins of 10: BFD finds the optimum (9+1, 8+2, 7+3, 5+5)


def test_best_fit_decreasing_rejects_oversize_item():
    with pytest.raises(ValueError, match="pair 1 has 12 tokens"):
        best_fit_decreasing([3, 12], 10)


def test_pack_layout_positions_boundaries_and_end_padding():
    pairs = make_pairs([(3, 2), (4, 4), (1, 2)])
    packs = pack_pairs(pairs, token_budget=32, pad_id=0, pad_multiple=8)
    assert len(packs) == 1
    pack = packs[0]
    assert pack.pair_ids == (0, 1, 2)  # input order kept inside a pack
    assert pack.num_pairs == 3 and pack.num_tokens == 16
    assert pack.tokens.shape == (1, 16)  # 16 real tokens, already a multiple of 8
    assert pack.cu_seqlens.tolist() == [0, 3, 5, 9, 13, 14, 16]
    expected_pos = [0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 1, 2, 3, 0, 0, 1]
    assert pack.position_ids[0].tolist() == expected_pos
    flat = [t for p in pairs for s in p for t in s]
    assert pack.tokens[0].tolist() == flat
    assert pack.reward_positions[:, 1].tolist() == [2, 4, 8, 12, 13, 15]


def test_padding_only_at_the_end_and_all_packs_share_a_length():
    pairs = make_pairs([(20, 20), (5, 6), (30, 1), (2, 2)])
    packs = pack_pairs(pairs, token_budget=48, pad_id=0, pad_multiple=16)
    assert {p.tokens.shape[1] for p in packs} == {48}
    for p in packs:
        n = p.num_tokens
        assert (p.tokens[0, n:] == 0).all() and (p.tokens[0, :n] != 0).all()
        params = p.packed_seq_params()
        assert params.qkv_format == "thd"
        assert params.cu_seqlens_q_padded[-1] == 48 and params.cu_seqlens_q[-1] == n
    assert sorted(i for p in packs for i in p.pair_ids) == [0, 1, 2, 3]
    assert sum(p.num_tokens for p in packs) == sum(pair_length(x) for x in pairs)


def test_pair_never_split():
    pairs = make_pairs([(10, 10)] * 5)
    packs = pack_pairs(pairs, token_budget=45, pad_id=0)
    assert [p.num_pairs for p in packs] == [2, 2, 1]
    assert all(len(p.cu_seqlens) == 2 * p.num_pairs + 1 for p in packs)


def test_padded_batch_reward_positions():
    batch = build_padded_batch([[5, 6, 7], [8]], pad_id=0, pad_multiple=4)
    assert batch.tokens.tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch.reward_positions.tolist() == [[0, 2], [1, 0]]


def test_empty_sequence_rejected():
    with pytest.raises(ValueError, match="empty sequence"):
        pack_pairs([([1, 2], [])], token_budget=16, pad_id=0)


def test_model_inputs_read_nothing_back_from_the_device():
    """Everything the model needs goes to the device in one copy per tensor, with the values
    that need a host read (max_seqlen, the padded extent) taken before the copy: on the `meta`
    device, where any read of a value raises, the inputs are still built."""
    import torch

    pack = pack_pairs(make_pairs([(3, 2), (4, 4)]), token_budget=32, pad_id=0, pad_multiple=8)[0]
    tokens, positions, params = pack.model_inputs(torch.device("meta"))
    assert tokens.is_meta and positions.is_meta and params.cu_seqlens_q.is_meta
    assert params.cu_seqlens_kv is params.cu_seqlens_q  # one copy, shared
    host = pack.packed_seq_params()
    assert (params.max_seqlen_q, params.qkv_format) == (host.max_seqlen_q, "thd")
    tokens, positions, params = pack.model_inputs(torch.device("cpu"))
    assert torch.equal(tokens, pack.tokens) and torch.equal(positions, pack.position_ids)
    assert torch.equal(params.cu_seqlens_q_padded, host.cu_seqlens_q_padded)
