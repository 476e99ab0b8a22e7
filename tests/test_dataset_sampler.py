"""Reading triplet datasets: validation, blending, split, shuffles, packing sampler, exact resume."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from megatron_polar.data.build import BuildConfig, build_triplets
from megatron_polar.data.dataset import BlendSpec, DatasetError, TripletDataset, TripletStream
from megatron_polar.data.packing import best_fit_decreasing
from megatron_polar.data.sampler import PackingSampler, deal_to_ranks
from megatron_polar.data.tokenizer import PolarTokenizer
from tests.test_build_triplets import good_records, write_jsonl
from megatron_polar.testing.tokenizers import make_sentencepiece


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    tok = str(make_sentencepiece(root))
    prefixes = []
    for name, n, seed in (("a", 120, 1), ("b", 40, 2)):
        src = write_jsonl(root / f"{name}.jsonl", good_records(n, seed))
        build_triplets(BuildConfig([src], str(root / name), tok), progress=False)
        prefixes.append(str(root / name))
    return root, tok, prefixes


def copy_dataset(prefix, dest):
    for suffix in (".bin", ".idx", ".meta.json", ".rejected.jsonl"):
        shutil.copy(prefix + suffix, dest + suffix)
    return dest


def test_damaged_or_foreign_datasets_are_clear_errors(built, tmp_path):
    root, tok, (a, b) = built
    sha = PolarTokenizer(tok).identity().sha256
    TripletDataset(a, sha)  # the good one opens
    truncated = copy_dataset(a, str(tmp_path / "trunc"))
    data = Path(truncated + ".bin").read_bytes()
    Path(truncated + ".bin").write_bytes(data[:-10])
    with pytest.raises(DatasetError, match=r"trunc.bin: .* bytes, the index describes"):
        TripletDataset(truncated)
    mixed = copy_dataset(a, str(tmp_path / "mixed"))
    shutil.copy(b + ".idx", mixed + ".idx")
    with pytest.raises(DatasetError, match="mixed"):
        TripletDataset(mixed)
    with pytest.raises(DatasetError, match="built with tokenizer .* not this run's"):
        TripletDataset(a, "0" * 64)
    Path(truncated + ".idx").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="trunc.idx"):
        TripletDataset(truncated)


def test_blending_follows_weights_and_epochs_cover_every_pair(built):
    _, _, (a, b) = built
    stream = TripletStream(BlendSpec.parse(["3", a, "1", b]), seed=7)
    located = [stream.locate(p) for p in range(800)]
    counts = np.bincount([d for d, _ in located], minlength=2)
    assert abs(counts[0] - 600) <= 1 and abs(counts[1] - 200) <= 1
    first_epoch_b = [i for d, i in located if d == 1][:40]
    assert sorted(first_epoch_b) == list(range(40))  # each pair once per epoch
    second_epoch_b = [i for d, i in located if d == 1][40:80]
    assert sorted(second_epoch_b) == list(range(40)) and second_epoch_b != first_epoch_b
    assert [stream.locate(p) for p in range(800)] == located  # deterministic


def test_train_and_valid_splits_are_disjoint(built):
    _, _, (a, _) = built
    blend = BlendSpec.parse([a])
    train = TripletStream(blend, "train", valid_fraction=0.1, seed=3)
    valid = TripletStream(blend, "valid", valid_fraction=0.1, seed=3)
    t = {train.locate(p)[1] for p in range(108)}
    v = {valid.locate(p)[1] for p in range(12)}
    assert len(t) == 108 and len(v) == 12 and not t & v


def run_steps(sampler, n):
    return [[(mb.pair_ids, mb.tokens.tolist()) for mb in sampler.next_step()] for _ in range(n)]


def test_sampler_packs_whole_pairs_and_ranks_split_the_step(built):
    _, _, (a, b) = built
    stream = TripletStream(BlendSpec.parse(["1", a, "1", b]), seed=1)
    budget, batch = 1024, 12
    one = PackingSampler(stream, batch, token_budget=budget)
    ranks = [PackingSampler(stream, batch, token_budget=budget, dp_rank=r, dp_size=2)
             for r in range(2)]
    seen = []
    for _ in range(6):
        whole = one.next_step_positions()
        parts = [r.next_step_positions() for r in ranks]
        # the ranks' packs are exactly the single rank's pairs, each rank with at least one pack
        assert sorted(sum(parts[0] + parts[1], [])) == sorted(sum(whole, []))
        assert all(parts)
        step_pairs = sum(whole, [])
        assert len(step_pairs) == batch  # a step is exactly the global batch of pairs
        for pack in whole:
            assert sum(stream.length(p) for p in pack) <= budget
        seen.extend(step_pairs)
    assert len(seen) == len(set(seen))  # no pair twice
    oversize = {p for p in range(one.position) if stream.length(p) > budget}
    assert len(oversize) == one.skipped_oversize
    assert set(seen) | oversize == set(range(one.position))  # none lost
    for mb in PackingSampler(stream, batch, token_budget=budget).next_step():
        assert mb.num_pairs == len(mb.pair_ids) and mb.tokens.shape[1] <= budget
        assert mb.tokens.shape[1] % 64 == 0 and mb.tokens.shape[1] - mb.num_tokens < 64
        for k, p in enumerate(mb.pair_ids):
            pos, neg = stream.pair(p)
            s = int(mb.cu_seqlens[2 * k])
            assert mb.tokens[0, s: s + len(pos)].tolist() == pos


def test_best_fit_decreasing_and_dealing():
    lengths = {0: 6, 1: 5, 2: 4, 3: 3, 4: 2, 5: 1, 6: 7}
    bins = best_fit_decreasing(lengths, 10)
    assert sorted(sum(bins, [])) == sorted(lengths)
    assert all(sum(lengths[k] for k in b) <= 10 for b in bins)
    assert len(bins) == 3  # 28 tokens cannot go in fewer than 3 bins of 10
    per_rank = deal_to_ranks(bins, lengths, 2)
    loads = [sum(lengths[k] for p in packs for k in p) for packs in per_rank]
    # greedy dealing is within one pack of perfectly even (here 18 vs 10, packs of 10, 10, 8)
    assert max(loads) - min(loads) <= max(sum(lengths[k] for k in b) for b in bins)
    # fewer packs than ranks: multi-pair packs are split so every rank computes something
    per_rank = deal_to_ranks([[0, 1, 2]], lengths, 3)
    assert [len(packs) for packs in per_rank] == [1, 1, 1]
    with pytest.raises(ValueError, match="cannot give each"):
        deal_to_ranks([[0], [1]], lengths, 3)


def test_micro_batch_size_mode_splits_like_megatron(built):
    _, _, (a, _) = built
    stream = TripletStream(BlendSpec.parse([a]), seed=3)
    ranks = [PackingSampler(stream, 8, pairs_per_micro_batch=2, dp_rank=r, dp_size=2)
             for r in range(2)]
    plans = [r.next_step_positions() for r in ranks]
    assert plans == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
    with pytest.raises(ValueError, match="not a multiple"):
        PackingSampler(stream, 6, pairs_per_micro_batch=2, dp_size=2)


@pytest.mark.parametrize("shared", [False, True], ids=["plain", "shared-prefix"])
def test_resume_sees_the_uninterrupted_batches(built, shared):
    _, _, (a, b) = built
    stream = TripletStream(BlendSpec.parse(["2", a, "1", b]), seed=11)
    straight = PackingSampler(stream, 6, token_budget=384, shared_prefix=shared)
    expected = run_steps(straight, 10)
    first = PackingSampler(stream, 6, token_budget=384, shared_prefix=shared)
    run_steps(first, 4)
    state = json.loads(json.dumps(first.state_dict()))  # as it would be checkpointed
    resumed = PackingSampler(TripletStream(BlendSpec.parse(["2", a, "1", b]), seed=11),
                             6, token_budget=384, shared_prefix=shared)
    resumed.load_state_dict(state)
    assert run_steps(resumed, 6) == expected[4:]
    if shared:  # pairs over the plain budget fit; at a budget all fit, the same pairs
        plain_sampler = PackingSampler(stream, 6, token_budget=384)
        run_steps(plain_sampler, 10)
        assert straight.skipped_oversize < plain_sampler.skipped_oversize
        steps = [run_steps(PackingSampler(stream, 6, token_budget=4096, shared_prefix=s), 5)
                 for s in (False, True)]
        plain, shared_steps = ([sorted(p for ids, _ in step for p in ids) for step in run]
                               for run in steps)
        assert plain == shared_steps
        assert straight.last_plan.computed < 0.9 * straight.last_plan.tokens
    with pytest.raises(ValueError, match="token_budget=384, this run uses 512"):
        PackingSampler(stream, 6, token_budget=512).load_state_dict(state)


def test_oversize_pairs_are_counted_not_silently_dropped(built):
    _, _, (a, _) = built
    stream = TripletStream(BlendSpec.parse([a]), seed=1)
    budget = int(np.median(TripletDataset(a).document_lengths))
    sampler = PackingSampler(stream, 4, token_budget=budget)
    sampler.next_step()
    assert sampler.skipped_oversize > 0
    assert sampler.last_plan.pairs == 4
    assert sampler.state_dict()["skipped_oversize"] == sampler.skipped_oversize
