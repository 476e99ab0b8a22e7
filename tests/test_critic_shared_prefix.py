"""The critic's shared-prefix packing (serving/critic.py): PPO rows that share a prompt run as
one shared-prefix item, and values, loss and gradients equal the padded [B, S] path's."""

from __future__ import annotations

import numpy as np
import pytest

WIDTH = 80  # S of the request


def rollout_rows(seed: int = 0):
    """Three prompts with three responses each (a 40-token shared prefix), plus three
    unrelated rows; right-padded to WIDTH with zeros, as the actor sends them."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(3):
        prefix = rng.integers(1, 511, size=40).tolist()
        for n in rng.integers(1, 30, size=3).tolist():
            rows.append(prefix + rng.integers(1, 511, size=n).tolist())
    for n in (7, 55, 72):
        rows.append(rng.integers(1, 511, size=n).tolist())
    order = rng.permutation(len(rows))  # groups are not contiguous in the request
    rows = [rows[i] for i in order]
    tokens = np.zeros((len(rows), WIDTH), dtype=np.int64)
    for b, r in enumerate(rows):
        tokens[b, :len(r)] = r
    return tokens, np.array([len(r) for r in rows], dtype=np.int64)


def make_critic(ctx, state=None, **config):
    from megatron_polar.model.config import ModelRunConfig
    from megatron_polar.model.presets import get_preset
    from megatron_polar.runtime.chunks import build_model_chunks, unwrap
    from megatron_polar.runtime.parallel import seed_everything
    from megatron_polar.serving.critic import CriticConfig, CriticService
    from megatron_polar.training.optimizer import OptimizerSettings, build_optimizer

    preset, run = get_preset("tiny"), ModelRunConfig()
    seed_everything(5, ctx)
    chunks = build_model_chunks(preset, run, ctx)
    if state is not None:
        unwrap(chunks[0]).load_state_dict(state)
    cfg = CriticConfig(**{"lr": 1e-4, "global_batch_size": 64, "micro_batch_size": 2,
                          **config})
    optimizer = build_optimizer(chunks, OptimizerSettings(lr=cfg.lr, clip_grad=cfg.clip_grad),
                                ctx, bf16=run.bf16)
    return CriticService(chunks, optimizer, ctx, cfg, preset.vocab_size)


@pytest.fixture(scope="module")
def critic(ctx1):
    import torch

    torch.set_num_threads(2)
    return make_critic(ctx1)


def test_pack_rows_layout():
    from megatron_polar.serving.critic import pack_rows

    tokens, lengths = rollout_rows()
    rows = [tokens[b, :n].tolist() for b, n in enumerate(lengths)] + [[]]  # an empty row
    packs = pack_rows(rows, 10_000, pad_id=0, pad_multiple=64)
    assert len(packs) == 1 and packs[0].batch.tokens.shape[1] % 64 == 0
    seen = []
    for rp in packs:
        pack_tokens, pack_pos = rp.batch.tokens[0].numpy(), rp.batch.position_ids[0].numpy()
        for r, pos in zip(rp.rows, rp.positions):
            # token t of the row sits at its pack position, at RoPE position t
            assert pack_tokens[pos].tolist() == rows[r]
            assert pack_pos[pos].tolist() == list(range(len(rows[r])))
            seen.append(r)
        computed = rp.batch.num_tokens
    assert sorted(seen) == list(range(len(rows) - 1))  # every non-empty row once
    # each 40-token prefix computed once: 2 x 40 tokens saved per group of three
    assert computed <= int(lengths.sum()) - 3 * 2 * 39
    # a small budget splits into several packs, never a group
    small = pack_rows(rows, 128, pad_id=0, pad_multiple=64)
    assert len(small) > 1
    assert sorted(r for rp in small for r in rp.rows) == list(range(len(rows) - 1))
    assert all(rp.batch.num_tokens <= 128 for rp in small)


def test_values_equal_padded(critic):
    tokens, lengths = rollout_rows(1)
    lengths_in = lengths.copy()
    lengths_in[0] = WIDTH + 5  # a length past the width covers the whole row (padded path)
    critic.shared_prefix = False
    try:
        want = critic._values(tokens, lengths_in)
    finally:
        del critic.shared_prefix
    got = critic._values(tokens, lengths_in)
    assert got.shape == want.shape == tokens.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    for row, n in zip(got[1:], lengths[1:]):
        assert np.all(row[n:] == 0) and np.all(row[:n] != 0)
    # a zero length gives a row of zeros, as before
    zero = lengths_in.copy()
    zero[2] = 0
    out = critic._values(tokens, zero)
    assert np.all(out[2] == 0)
    np.testing.assert_allclose(np.delete(out, 2, axis=0), np.delete(got, 2, axis=0), atol=1e-6)


def train_batch(seed: int = 2):
    tokens, lengths = rollout_rows(seed)
    rng = np.random.default_rng(seed)
    mask = (np.arange(WIDTH - 1)[None, :] < lengths[:, None] - 1).astype(np.float32)
    mask[3, :10] = 0  # a response mask: the prompt left out
    mask[5] = 0  # a row that adds nothing
    returns = rng.normal(size=mask.shape).astype(np.float32)
    prev = (returns + 0.3 * rng.normal(size=mask.shape)).astype(np.float32)
    return tokens, returns, prev, mask


def test_train_equals_padded(ctx1):
    import torch

    tokens, returns, prev, mask = train_batch()
    padded = make_critic(ctx1)
    padded.shared_prefix = False
    shared = make_critic(ctx1, state=padded.core.state_dict())
    for a, b in zip(padded.core.parameters(), shared.core.parameters()):
        assert torch.equal(a, b)

    micro = shared._shared_micro_batches(*(torch.as_tensor(a) for a in (tokens, returns, prev,
                                                                          mask)))
    assert sum(m.num_tokens for m in micro) == int(mask.sum())
    assert len(micro) < -(-len(tokens) // 2)  # fewer than the padded path's micro-batches
    assert all(m.pack.tokens.shape[1] <= 2 * WIDTH for m in micro)  # padded: mbs x S at most

    want = padded._train(tokens, returns, prev, mask)
    got = shared._train(tokens, returns, prev, mask)
    assert np.isfinite(want) and abs(got - want) <= 1e-5 * max(1.0, abs(want)), (got, want)
    assert padded.steps == shared.steps == 1
    # the same gradient (megatron's DDP buffers keep it until the next step)
    for (name, a), b in zip(padded.core.named_parameters(), shared.core.parameters()):
        ga, gb = a.main_grad, b.main_grad
        torch.testing.assert_close(gb, ga, atol=1e-5, rtol=1e-4, msg=name)
