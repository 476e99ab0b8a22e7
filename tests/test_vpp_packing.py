"""Token-budget packing for megatron's interleaved (virtual) pipeline schedule.

megatron-core 0.16.1 runs a rank's M micro-batches interleaved only if M is a multiple of PP
(at the default microbatch_group_size_per_vp_stage = PP), and at PP=2 only if all of a step's
micro-batches have one length. The sampler's `micro_batch_multiple` / `min_micro_batches` and
`uniform_length_per_step` provide both without dropping, duplicating or overfilling.
"""

from __future__ import annotations

import random

import pytest

from megatron_polar.data.packing import best_fit_decreasing
from megatron_polar.data.sampler import (MicroBatchCountError, PackingSampler, deal_to_ranks,
                                         smallest_valid_count, valid_count)
from tests.distributed import run_distributed


class FakeStream:
    """The two methods of TripletStream the sampler reads: pair lengths, then pairs."""

    def __init__(self, lengths, vocab=500):
        self.lengths = list(lengths)
        self.vocab = vocab

    def length(self, position):
        return self.lengths[position % len(self.lengths)]

    def pair(self, position):
        n = self.length(position)
        pos = n // 2
        rng = random.Random(position)
        seq = [rng.randrange(3, self.vocab - 1) for _ in range(n)]
        return seq[:pos - 1] + [self.vocab - 1], seq[pos:n - 1] + [self.vocab - 1]


def random_case(rng):
    budget = rng.choice([64, 100, 256, 1000])
    dp = rng.randint(1, 4)
    multiple = rng.randint(1, 4)
    minimum = rng.choice([1, multiple, multiple + 1])
    pairs = rng.randint(1, 40)
    style = rng.random()
    if style < 0.3:  # long pairs: many single-pair packs
        lengths = [rng.randint(budget // 2, budget) for _ in range(pairs)]
    elif style < 0.6:  # short pairs: a few full packs
        lengths = [rng.randint(2, max(2, budget // 8)) for _ in range(pairs)]
    else:
        lengths = [rng.randint(2, budget) for _ in range(pairs)]
    return budget, dp, multiple, minimum, dict(enumerate(lengths, start=rng.randint(0, 100)))


def check_plan(per_rank, lengths, budget, dp, multiple, minimum):
    assert len(per_rank) == dp
    for packs in per_rank:
        assert valid_count(len(packs), multiple, minimum), [len(p) for p in per_rank]
        for pack in packs:
            assert pack and sum(lengths[k] for k in pack) <= budget
    everything = [k for packs in per_rank for pack in packs for k in pack]
    assert sorted(everything) == sorted(lengths)  # every pair once: none lost, none twice


def test_counts_are_valid_pairs_kept_and_budget_held_for_random_steps():
    rng = random.Random(0)
    done = refused = 0
    for _ in range(3000):
        budget, dp, multiple, minimum, lengths = random_case(rng)
        packs = best_fit_decreasing(lengths, budget)
        if len(lengths) < dp:
            continue  # the plain deal already refuses (fewer pairs than ranks)
        plain = deal_to_ranks(packs, lengths, dp)
        try:
            per_rank = deal_to_ranks(packs, lengths, dp, micro_batch_multiple=multiple,
                                     min_micro_batches=minimum)
        except MicroBatchCountError as e:
            # refused only when the step has fewer pairs than the packs it needs
            floor = smallest_valid_count(multiple, minimum)
            packs_now = sum(map(len, plain))
            assert len(lengths) < max(dp * floor, -(-packs_now // multiple) * multiple), e
            assert f"multiple of {multiple}" in str(e)
            refused += 1
            continue
        check_plan(per_rank, lengths, budget, dp, multiple, minimum)
        done += 1
        # where every rank holds enough pairs, its own packs are split: tokens per rank, and
        # so the balance across ranks, stay those of the plain deal
        floor = smallest_valid_count(multiple, minimum)
        targets = [max(floor, -(-len(p) // multiple) * multiple) for p in plain]
        if all(t <= sum(map(len, p)) for t, p in zip(targets, plain)):
            for mine, theirs in zip(per_rank, plain):
                assert sorted(k for p in mine for k in p) == sorted(k for p in theirs for k in p)
    assert done > 1500 and refused > 10


def test_default_is_the_plain_deal():
    rng = random.Random(1)
    for _ in range(300):
        budget, dp, _, _, lengths = random_case(rng)
        if len(lengths) < dp:
            continue
        packs = best_fit_decreasing(lengths, budget)
        assert (deal_to_ranks(packs, lengths, dp, micro_batch_multiple=1, min_micro_batches=1)
                == deal_to_ranks(packs, lengths, dp))


def test_splitting_halves_the_largest_pack_of_the_short_rank():
    lengths = {0: 40, 1: 30, 2: 20, 3: 10, 4: 100}
    # plain deal at DP=2: rank 0 gets the four pairs of 100 tokens, rank 1 the 100-token pair
    packs = [[4], [0, 1, 2, 3]]
    assert deal_to_ranks(packs, lengths, 2) == [[[0, 1, 2, 3]], [[4]]]
    # a multiple of 2 per rank: rank 1 cannot split one pair, so the step is dealt again
    # (the 100-token pack and a 10-token half on one rank, three pairs of 90 on the other)
    per_rank = deal_to_ranks(packs, lengths, 2, micro_batch_multiple=2)
    check_plan(per_rank, lengths, 100, 2, 2, 1)
    assert sorted(sum(lengths[k] for p in packs for k in p) for packs in per_rank) == [90, 110]
    # DP=1: the four-pair pack splits into halves of 50 and 50 tokens
    assert deal_to_ranks([[0, 1, 2, 3]], lengths, 1, micro_batch_multiple=2) == [[[0, 3], [1, 2]]]


def test_sampler_steps_satisfy_the_schedule_and_pad_to_one_length():
    rng = random.Random(2)
    stream = FakeStream([rng.randint(8, 300) for _ in range(997)])
    budget, batch, dp, pp = 512, 24, 2, 2
    ranks = [PackingSampler(stream, batch, token_budget=budget, dp_rank=r, dp_size=dp,
                            pad_multiple=16, micro_batch_multiple=pp, min_micro_batches=pp,
                            uniform_length_per_step=True) for r in range(dp)]
    plain = PackingSampler(stream, batch, token_budget=budget, dp_size=dp, pad_multiple=16)
    for _ in range(20):
        steps = [r.next_step() for r in ranks]
        expected = sum(plain.next_step_positions() + plain.last_plan.per_rank[1], [])
        pairs = [k for mbs in steps for mb in mbs for k in mb.pair_ids]
        assert sorted(pairs) == sorted(expected) and len(pairs) == batch  # the same step
        for mbs in steps:
            assert len(mbs) % pp == 0
            widths = {mb.tokens.shape[1] for mb in mbs}
            assert len(widths) == 1  # one length per rank and step
            width = widths.pop()
            assert width % 16 == 0 and width - max(mb.num_tokens for mb in mbs) < 16
            assert all(mb.num_tokens <= budget for mb in mbs)
    # the state is that of the plain sampler: the options do not change the stream
    assert ranks[0].state_dict() == plain.state_dict()
    assert set(plain.state_dict()) == {"position", "skipped_oversize", "steps",
                                       "global_batch_size", "token_budget",
                                       "pairs_per_micro_batch", "shared_prefix"}


def test_without_uniform_length_each_pack_keeps_its_own_length():
    stream = FakeStream([30, 200, 60, 90, 250, 20])
    s = PackingSampler(stream, 6, token_budget=256, pad_multiple=16, micro_batch_multiple=2)
    mbs = s.next_step()
    assert len(mbs) % 2 == 0
    assert [mb.tokens.shape[1] for mb in mbs] == [-(-mb.num_tokens // 16) * 16 for mb in mbs]
    assert len({mb.tokens.shape[1] for mb in mbs}) > 1


def test_too_small_a_batch_is_refused_with_what_to_change():
    stream = FakeStream([50] * 10)
    with pytest.raises(ValueError, match=r"global batch size 6 .* DP=4 .* multiple of 2 "
                                         r"micro-batches \(PP=2 .*at least 8 pairs.*"
                                         r"--global-batch-size"):
        PackingSampler(stream, 6, token_budget=256, dp_size=4, micro_batch_multiple=2,
                       min_micro_batches=2)
    with pytest.raises(ValueError, match=r"global batch size 12 / \(micro-batch size 2 x "
                                         r"DP=2\) = 3 .* multiple of 8"):
        PackingSampler(stream, 12, pairs_per_micro_batch=2, dp_size=2, micro_batch_multiple=2)
    PackingSampler(stream, 8, pairs_per_micro_batch=2, dp_size=2, micro_batch_multiple=2)


def test_a_step_of_long_pairs_that_cannot_be_split_is_refused():
    # three pairs that each fill the budget, DP=1, PP=2: two or four packs are impossible
    stream = FakeStream([250, 240, 230])
    s = PackingSampler(stream, 3, token_budget=256, micro_batch_multiple=2)
    with pytest.raises(MicroBatchCountError, match=r"step 1 .*3 pairs in 3 packs.*multiple "
                                                   r"of 2.*--global-batch-size \(now 3\).*"
                                                   r"--micro-batch-tokens.*PP=2.*DP=1"):
        s.next_step()


# -- megatron's interleaved schedule at PP=2, VPP=2 on gloo --------------------------------------

PP_LENGTHS = [30, 150, 70, 210, 44, 96, 18, 120, 64, 180, 26, 88]


def interleaved_run(uniform, out_file):
    import torch

    from megatron_polar.model.config import ModelRunConfig
    from megatron_polar.model.presets import get_preset
    from megatron_polar.runtime.parallel import initialize_parallel
    from megatron_polar.runtime.chunks import build_model_chunks
    from megatron_polar.training.optimizer import build_optimizer
    from megatron_polar.training.step import train_step
    from tests.test_parallel_parity_tiny import optimizer_config

    preset = get_preset("tiny")
    run = ModelRunConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    ctx = initialize_parallel(run)
    chunks = build_model_chunks(preset, run, ctx)
    optimizer = build_optimizer(chunks, optimizer_config(), ctx)
    sampler = PackingSampler(FakeStream(PP_LENGTHS, vocab=preset.vocab_size), 6,
                             token_budget=256, dp_rank=ctx.dp_rank, dp_size=ctx.dp_size,
                             pad_id=preset.pad_token_id, pad_multiple=16,
                             micro_batch_multiple=ctx.pp_size, min_micro_batches=ctx.pp_size,
                             uniform_length_per_step=uniform)
    seen = []
    for _ in range(2):
        mbs = sampler.next_step()
        result = train_step(chunks, optimizer, mbs, ctx)
        seen.append(([mb.tokens.shape[1] for mb in mbs], [mb.num_tokens for mb in mbs],
                     result.metrics.num_pairs, result.metrics.loss))
    if ctx.pp_rank == 0:
        torch.save(seen, out_file)


def test_interleaved_pp2_vpp2_trains_on_variable_length_steps(tmp_path):
    """Two steps of packs of different lengths at PP=2, VPP=2 through megatron's interleaved
    schedule: 3 packs made 4, then 2 (M = PP), each step padded to one length.

    Without `uniform_length_per_step` the step is refused (variable_seq_lengths is off under
    the interleaved schedule). With megatron's shape exchange on instead, the first step
    aborts in gloo ("Received data size doesn't match expected size": at PP=2 the combined
    send_forward_backward_recv_forward_backward hands the peer a gradient's shape for an
    activation) and the second (M = PP) hangs."""
    out = tmp_path / "seen.pt"
    run_distributed(2, interleaved_run, True, str(out), timeout=300)
    import torch

    seen = torch.load(out, weights_only=False)
    for widths, real, num_pairs, loss in seen:
        assert len(widths) % 2 == 0 and len(set(widths)) == 1
        assert len(set(real)) > 1  # the packs themselves differ in length
        assert num_pairs == 6 and loss == loss and loss > 0
